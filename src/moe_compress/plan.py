"""``--dry-run``: what a recipe would do, from the config alone (no weights are loaded)."""

from __future__ import annotations

import torch

from moe_compress.methods.base import format_method_spec, method_class
from moe_compress.models.loading import load_config
from moe_compress.models.registry import get_adapter
from moe_compress.recipe import Recipe
from moe_compress.sizes import bytes_per_parameter, count_parameters, estimated_output_bytes, fmt_bytes, written_dtype


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'"""
    parts, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts)


# Throughputs behind the dry run's time estimate (stated in its output): effective dense-matmul rates of a
# data-centre GPU in bf16 and of a few CPU cores in fp32, for a forward pass through a MoE model.
GPU_FLOPS, CPU_FLOPS = 200e12, 0.2e12


def calibration_domain_count(spec: str | None) -> int | None:
    """The number of domains of a calibration SPEC, read from local or bundled data (None for hub data, which
    would have to be downloaded to tell)."""
    if not spec or "hf:" in spec:
        return None
    from moe_compress.calibration.data import read_documents

    return len({d.domain for d in read_documents(spec) if d.text.strip()})


def describe_plan(recipe: Recipe) -> str:
    """A few lines: layers, experts kept or merged, parameters and weight memory before/after, peak memory,
    calibration size and a rough time estimate (from the config alone; nothing is loaded or written)."""
    cls = method_class(recipe.method)
    method = cls(**recipe.params)  # validates the parameters
    config = load_config(recipe.model, recipe.trust_remote_code)
    adapter = get_adapter(config)
    n_orig = adapter.n_experts()
    from moe_compress.pipeline import require_calibration, validate_budget

    n_new = validate_budget(recipe, adapter, method)
    c = recipe.calibration
    # every path the run will read, and the output it will write, checked as the run would
    require_calibration(recipe, method)
    from moe_compress.export.writer import check_output_dir

    n_domains = calibration_domain_count(c.data) if cls.writes_companions else None
    estimate = estimated_output_bytes(recipe, config, n_new)
    if estimate and n_domains:
        estimate *= 1 + n_domains
    check_output_dir(recipe.output, recipe.overwrite, estimate)
    total, per_expert, moe_layers = count_parameters(config)
    after = total - per_expert * (n_orig - n_new) * len(moe_layers)
    top_k = adapter.rule().top_k
    active = total - per_expert * (n_orig - top_k) * len(moe_layers)  # parameters one token passes through
    bytes_per = bytes_per_parameter(recipe.dtype)
    saved = written_dtype(recipe, config)
    saved_bytes = torch.empty(0, dtype=saved).element_size()
    if cls.keeps_experts:
        change = (f"all {n_orig} routed experts kept, each narrowed to about {n_new}/{n_orig} of its neurons (the "
                  f"expert parameters of {n_new} experts)")
    elif cls.kind == "merge":
        change = f"{n_orig} -> {n_new} routed experts each ({n_orig} merged into {n_new} groups)"
    else:
        change = f"{n_orig} -> {n_new} routed experts each ({n_orig - n_new} pruned, {n_new} kept)"
    lines = [
        f"plan (dry run, nothing written): {recipe.model} -> {recipe.output}",
        f"  method      {format_method_spec(recipe.method, recipe.params)} ({cls.kind})",
        f"  MoE layers  {len(moe_layers)} of {config.num_hidden_layers} (layers {_ranges(sorted(moe_layers))}): "
        f"{change}; top-{top_k} routing ({adapter.rule().kind}); shared experts untouched",
        f"  parameters  {total / 1e6:.2f}M -> {after / 1e6:.2f}M ({100 * (1 - after / total):.1f}% fewer); "
        f"weights {fmt_bytes(total * bytes_per)} -> {fmt_bytes(after * bytes_per)} at {bytes_per} bytes per parameter",
        f"  written     {fmt_bytes(after * saved_bytes)} in {str(saved).removeprefix('torch.')} "
        f"(save dtype {recipe.save_dtype}{': the config dtype' if recipe.save_dtype == 'source' else ''})",
    ]
    if method.needs_data:
        tokens = c.n_samples * c.seq_len
        flops = 2 * active * tokens
        lines.append(f"  calibration {c.data}: {c.n_samples} x {c.seq_len} = {tokens} tokens, batches of "
                     f"{c.batch_size}, mode {recipe.mode}")
        lines.append(f"  time        compute of one forward pass over the calibration tokens ~{flops:.2g} FLOP (2 x "
                     f"{active / 1e6:.3g}M active parameters x tokens): at least {_duration(flops / GPU_FLOPS)} "
                     f"on a GPU at {GPU_FLOPS / 1e12:.0f} TFLOP/s, {_duration(flops / CPU_FLOPS)} on a CPU at "
                     f"{CPU_FLOPS / 1e12:.1f} TFLOP/s; loading the weights and planning come on top")
    else:
        lines.append("  calibration none (this method needs no data)")
        lines.append(f"  time        loading and writing {fmt_bytes(total * bytes_per)} of weights, plus planning "
                     "(seconds per layer)")
    layer_bytes = fmt_bytes(per_expert * n_orig * bytes_per)
    lines.append(f"  memory      device: about one decoder layer ({layer_bytes} of routed experts) plus the "
                 f"activations of one batch; CPU: the whole model ({fmt_bytes(total * bytes_per)})")
    if cls.writes_companions:
        count = f"{1 + n_domains} checkpoints" if n_domains else "1 + (calibration domains) checkpoints"
        lines.append(f"  companions  one checkpoint of that size per calibration domain in {recipe.output}/domains/ "
                     f"beside the all-domain one at {recipe.output}: {count}"
                     f"{f', {fmt_bytes((1 + n_domains) * after * saved_bytes)} in all' if n_domains else ''}; the "
                     f"original ({fmt_bytes(total * bytes_per)}) stays in CPU memory while they are cut from it")
    if method.needs_teacher:  # `Method.refine`: the original beside the compressed model, trained in fp32
        lines.append(f"  then        distillation: the device holds the original ({fmt_bytes(total * bytes_per)}) "
                     f"and the compressed model in fp32 ({fmt_bytes(after * 4)}), plus gradients and Adam state "
                     "of the trained tensors (up to 3x their fp32 size) and one batch's activations")
    return "\n".join(lines)
