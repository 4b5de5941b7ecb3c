"""Device and dtype names from the command line (``--device``, ``--dtype``) -> what torch and transformers take.

A leaf module: the pipeline, streaming, evaluation, analysis, bench and the CLI all resolve these names the same
way, so the helpers live below all of them.
"""

from __future__ import annotations

import torch

from moe_compress.errors import UserError


def pick_device(name: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; any other name unchanged, but a CUDA device
    without CUDA is a `UserError`."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available; use --device cpu")
    return name


def pick_dtype(name: str) -> torch.dtype | str:
    """``auto`` (the checkpoint's own dtype, for ``from_pretrained``) or the torch dtype of that name."""
    return "auto" if name == "auto" else getattr(torch, name)
