"""Helpers shared by several test modules (import them as ``from helpers import ...``; fixtures live in
conftest.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch

from moe_compress.models.registry import get_adapter


def ids(n: int = 4, length: int = 32, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    """Random token ids [n, length] from a seeded generator."""
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def capture_block_inputs(model, x: torch.Tensor, module: Callable[[object, torch.nn.Module], torch.nn.Module]
                         ) -> dict[int, tuple[torch.Tensor, ...]]:
    """Run the whole model once on ``x`` (no grad); per MoE layer, the positional arguments (detached copies)
    that ``module(adapter, block)`` of its MoE block received, e.g. ``lambda a, b: b.experts``."""
    adapter = get_adapter(model)
    seen, hooks = {}, []
    for i, block in adapter.moe_blocks(model).items():
        def hook(mod, args, i=i):
            seen[i] = tuple(a.detach().clone() for a in args if isinstance(a, torch.Tensor))
        hooks.append(module(adapter, block).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def write_corpus(path: Path, seed: int = 0) -> None:
    """Two small domains (prose, Python) as JSON lines: the training corpus of the tiny testbed runs."""
    rng = random.Random(seed)
    words = "the cat sat on a mat while river water ran past old stone houses near green hills".split()
    lines = []
    for i in range(12):
        prose = " ".join(rng.choice(words) for _ in range(120)) + "."
        code = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12))
        lines += [json.dumps({"text": prose, "domain": "prose"}), json.dumps({"text": code, "domain": "code"})]
    Path(path).write_text("\n".join(lines) + "\n")
