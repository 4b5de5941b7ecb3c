"""Pruning methods: each module registers its methods on import."""

from moe_compress.methods.pruning import dern, easy_ep, ean, heapr, mone, naee, reap, simple, stun  # noqa: F401
