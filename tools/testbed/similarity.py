"""How alike the routed experts of a model are: pairwise cosine of their weights and of their outputs.

For every MoE layer (any architecture ``moe_compress.models.registry`` supports), over the E(E-1)/2 pairs i < j:

- weight cosine: cos(vec(gate_i, up_i, down_i), vec(gate_j, up_j, down_j)), the flattened expert matrices (and
  biases, where an architecture has them); permutation-sensitive: two experts holding the same neurons in a
  different order score low;
- output cosine: mean over held-out tokens t of cos(y_i(x_t), y_j(x_t)), every expert run on every token's MoE
  input x_t, routed or not (the Sub-MoE output similarity).

These are the definitions of ``methods.merging.signals.weight_similarity`` / ``expert_output_signals`` (the
tests check it); they are computed here so that testbed training does not import the compression methods.

Shared experts are left out. Weights and expert outputs are compared in fp32 (bf16 checkpoints are upcast).

``expert_similarity`` is what testbed training records in ``training.json`` (``similarity.start`` at MoE step 0,
``similarity.end`` on the saved bf16 model) and what ``python -m tools.testbed similarity MODEL`` prints for an
existing checkpoint. Independently initialised experts score about 0 on weights; copies of one MLP score 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_compress.models.layer import ExpertWeights, MoELayer, expert_forward
from moe_compress.models.registry import get_adapter

DEFAULT_TOKENS = 6144


def similarity_windows(streams: dict[str, np.ndarray], tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Held-out token windows for the similarity measurement: about ``tokens`` tokens split evenly over the
    domains, each domain's share taken from the start of its stream as windows [W, L + 1] (L <= seq_len; one
    tensor per domain, inputs ``[:, :-1]``, next tokens ``[:, 1:]``)."""
    per_domain = max(1, -(-tokens // max(1, len(streams))))
    windows = []
    for stream in streams.values():
        n = min(per_domain, len(stream) - 1)
        if n < 1:
            continue
        length = min(seq_len, n)
        count = n // length
        starts = np.arange(count) * length
        windows.append(torch.from_numpy(stream[starts[:, None] + np.arange(length + 1)].astype(np.int64)))
    return windows


@torch.no_grad()
def moe_inputs(model: nn.Module, windows: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """{decoder layer index: the MoE block's inputs [T, H] (fp32)} over the windows' input tokens.

    Runs in eval mode; a fp32 model on CUDA runs under bf16 autocast (as in training).
    """
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    device = next(model.parameters()).device
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}

    def hook(index: int):
        def fn(module: nn.Module, args: tuple) -> None:
            hidden = args[0]
            captured[index].append(hidden.reshape(-1, hidden.shape[-1]).float())
        return fn

    handles = [block.register_forward_pre_hook(hook(i)) for i, block in blocks.items()]
    autocast = device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    was_training = model.training
    model.eval()
    try:
        for batch in windows:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                model(input_ids=batch[:, :-1].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {i: torch.cat(parts) for i, parts in captured.items()}


@torch.no_grad()
def weight_cosine(w: ExpertWeights) -> torch.Tensor:
    """[E, E] float64 cosine of the experts' flattened weights (gate, up, down and any biases)."""
    parts = [t.detach().reshape(w.n_experts, -1).double()
             for t in (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias) if t is not None]
    flat = F.normalize(torch.cat(parts, dim=1), dim=1)
    return (flat @ flat.T).cpu()


@torch.no_grad()
def output_cosine(layer: MoELayer, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[E, E] float64 mean over the tokens of x [T, H] of cos(y_i(x_t), y_j(x_t)), every expert on every token."""
    device = layer.experts.gate.device
    n = layer.n_experts
    total = torch.zeros(n, n, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], chunk):
        xc = x[start:start + chunk].to(device, layer.experts.gate.dtype)
        y = torch.stack([expert_forward(layer.experts, e, xc, layer.activation).float() for e in range(n)])
        y = F.normalize(y, dim=-1)  # [E, t, H]
        total += torch.einsum("ith,jth->ij", y, y).double()
    return (total / max(1, x.shape[0])).cpu()


def _pairs(matrix: torch.Tensor) -> torch.Tensor:
    """The strictly upper-triangular entries (pairs i < j) of an [E, E] matrix."""
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1)
    return matrix[rows, cols]


def _stats(values: torch.Tensor) -> dict[str, float]:
    return {"mean": round(values.mean().item(), 5), "min": round(values.min().item(), 5),
            "max": round(values.max().item(), 5)}


@torch.no_grad()
def expert_similarity(model: nn.Module, windows: list[torch.Tensor], matrices: bool = True) -> dict:
    """Pairwise expert similarity of every MoE layer of ``model`` on held-out ``windows`` (see the module doc).

    Returns ``{"tokens": T, "layers": [{"layer": decoder layer index, "weight": {mean, min, max}, "output":
    {mean, min, max}, "weight_matrix": [E][E], "output_matrix": [E][E]}], "mean": {"weight": mean over layers of
    the layer means, "output": likewise}}``; the matrices (4 decimals) only with ``matrices``.
    """
    adapter = get_adapter(model)
    inputs = moe_inputs(model, windows)
    layers = []
    for layer in adapter.layers(model):
        fp32 = dataclasses.replace(layer, experts=layer.experts.to(dtype=torch.float32))
        weight = weight_cosine(fp32.experts)
        output = output_cosine(fp32, inputs[layer.index])
        row = {"layer": layer.index, "weight": _stats(_pairs(weight)), "output": _stats(_pairs(output))}
        if matrices:
            row["weight_matrix"] = weight.float().round(decimals=4).tolist()
            row["output_matrix"] = output.float().round(decimals=4).tolist()
        layers.append(row)
    tokens = next(iter(inputs.values())).shape[0] if inputs else 0
    return {"tokens": tokens, "layers": layers,
            "mean": {kind: round(float(np.mean([r[kind]["mean"] for r in layers])), 5)
                     for kind in ("weight", "output")}}


def summary_lines(report: dict) -> list[str]:
    """A small text table of a similarity report: one line per MoE layer."""
    lines = [f"expert similarity over {report['tokens']} held-out tokens (pairs i < j; mean [min, max])",
             f"{'layer':>5}  {'weight cosine':>28}  {'output cosine':>28}"]
    for row in report["layers"]:
        w, o = row["weight"], row["output"]
        lines.append(f"{row['layer']:>5}  {w['mean']:>8.4f} [{w['min']:>8.4f}, {w['max']:>8.4f}]  "
                     f"{o['mean']:>8.4f} [{o['min']:>8.4f}, {o['max']:>8.4f}]")
    lines.append(f"{'mean':>5}  {report['mean']['weight']:>8.4f}{'':20}  {report['mean']['output']:>8.4f}")
    return lines
