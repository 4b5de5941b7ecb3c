"""Sizes from a config alone (no weights loaded): parameter counts, bytes per parameter, the written size of a
compression, and a byte formatter. Shared by the dry run (`moe_compress.plan`), the pipeline's free-space check
and streaming."""

from __future__ import annotations

import torch

from moe_compress.models.loading import Config
from moe_compress.models.registry import get_adapter
from moe_compress.recipe import Recipe


def count_parameters(config: Config) -> tuple[int, int, list[int]]:
    """(total params, routed-expert params per expert per layer, MoE layer indices) of a config, built on the
    meta device so no memory is used."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(model)
    total = sum(p.numel() for p in model.parameters())
    layer = adapter.layers(model)[0]
    w = layer.experts
    per_expert = sum(t[0].numel() for t in (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)
                     if t is not None) + layer.router_weight.shape[1]
    return total, per_expert, list(adapter.moe_blocks(model))


def bytes_per_parameter(dtype: str) -> int:
    """Bytes per weight of a recipe's ``dtype`` (``auto``: 2, the usual half-precision checkpoint)."""
    return 4 if dtype == "float32" else 2


def written_dtype(recipe: Recipe, config: Config) -> torch.dtype:
    """The main dtype the checkpoint is written in (``save_dtype``; ``source``: the source's, from its config)."""
    from moe_compress.export.dtypes import main_dtype

    return main_dtype({}, None, config) if recipe.save_dtype == "source" else getattr(torch, recipe.save_dtype)


def estimated_output_bytes(recipe: Recipe, config: Config, n_new: int) -> int | None:
    """The written weights' size after compressing ``config`` to ``n_new`` experts (from the config alone, on the
    meta device, in the written dtype), for the free-space check before a run; None when the config cannot be
    built that way (the check is then skipped: the writer still reports a full disk as a user error)."""
    try:
        total, per_expert, moe_layers = count_parameters(config)
    except Exception:  # e.g. remote code that does not build on the meta device: an estimate is optional
        return None
    n_orig = get_adapter(config).n_experts()
    written = torch.empty(0, dtype=written_dtype(recipe, config)).element_size()
    return (total - per_expert * (n_orig - n_new) * len(moe_layers)) * written


def fmt_bytes(n: float) -> str:
    """A size for people: 1.50 GiB, 12.00 MiB, 3.0 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"
