"""Merging methods: each module registers its methods on import (msmoe, hcsmoe, submoe)."""

from moe_compress.methods.merging import hcsmoe, msmoe, submoe  # noqa: F401
