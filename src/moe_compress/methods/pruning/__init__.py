"""Pruning methods: each module registers its methods on import."""

from moe_compress.methods.pruning import ean, naee, reap, simple  # noqa: F401
