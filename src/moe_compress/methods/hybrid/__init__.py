"""Hybrid methods (selection plus re-fitting of what is kept): each module registers its methods on import."""

from moe_compress.methods.hybrid import refit  # noqa: F401
