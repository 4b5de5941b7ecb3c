"""Pruning methods: each module registers its methods on import."""

from moe_compress.methods.pruning import dern, ean, easy_ep, heapr, mone, naee, premoe, reap, simple, stun  # noqa: F401
