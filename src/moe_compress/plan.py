"""``--dry-run``: what a recipe would do, from the config alone (no weights are loaded)."""

from __future__ import annotations

import torch

from moe_compress.methods.base import method_class
from moe_compress.models.loading import load_config
from moe_compress.models.registry import get_adapter
from moe_compress.models.surgery import check_expert_count
from moe_compress.recipe import Recipe


def count_parameters(config) -> tuple[int, int, list[int]]:
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


def describe_plan(recipe: Recipe) -> str:
    """A few lines: layers, experts kept, parameters and weight memory before/after, calibration size."""
    cls = method_class(recipe.method)
    cls(**recipe.params)  # validates the parameters
    config = load_config(recipe.model, recipe.trust_remote_code)
    adapter = get_adapter(config)
    n_orig = adapter.n_experts()
    n_new = recipe.target_experts(n_orig)
    if n_new >= n_orig:
        from moe_compress.errors import UserError

        raise UserError(f"--experts {n_new} must be smaller than the model's {n_orig} experts per layer")
    check_expert_count(adapter, n_new)
    total, per_expert, moe_layers = count_parameters(config)
    after = total - per_expert * (n_orig - n_new) * len(moe_layers)
    bytes_per = 2 if recipe.dtype in ("bfloat16", "float16", "auto") else 4
    c = recipe.calibration
    lines = [
        f"plan (dry run, nothing written): {recipe.model} -> {recipe.output}",
        f"  method      {recipe.method} ({cls.kind}) params={recipe.params or {}}",
        f"  MoE layers  {len(moe_layers)} of {config.num_hidden_layers}: {n_orig} -> {n_new} routed experts each "
        f"(top-{adapter.rule().top_k}, {adapter.rule().kind})",
        f"  parameters  {total / 1e6:.2f}M -> {after / 1e6:.2f}M ({100 * (1 - after / total):.1f}% fewer); "
        f"weights {total * bytes_per / 2**30:.2f} -> {after * bytes_per / 2**30:.2f} GiB at {bytes_per} bytes",
    ]
    if cls.needs_data:
        lines.append(f"  calibration {c.data}: {c.n_samples} x {c.seq_len} tokens ({c.n_samples * c.seq_len} "
                     f"tokens), mode {recipe.mode}")
        lines.append("  time        about one forward pass of the calibration tokens, layer by layer, plus "
                     "planning")
    lines.append(f"  peak device memory about one decoder layer ({per_expert * n_orig * bytes_per / 2**20:.1f} MiB of "
                 "routed experts) plus the calibration activations")
    return "\n".join(lines)
