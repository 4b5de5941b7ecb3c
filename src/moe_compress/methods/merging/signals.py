"""What merging methods measure about experts: frequencies and the similarity signals grouping runs on.

Each signal is taken from the layer's calibration statistics when an observer provided it (names shared with
`calibration/similarity.py`: ``output_similarity`` [E, E], ``router_similarity`` [E, E], ``expert_output_mean``
[E, H]) and otherwise computed here from the MoE block's calibration inputs X [T, H] (``ctx.inputs``):

- output similarity (Sub-MoE): S_ij = mean_t cos(y_i(x_t), y_j(x_t)), every expert run on every token;
- expert output mean (HC-SMoE): m_i = mean_t y_i(x_t), every expert on every token;
- router-logit similarity (M-SMoE): S_ij = cos(L[:, i], L[:, j]) with L = X W_r^T [T, E] the router logits;
- weight similarity: cosine of the flattened (gate, up, down) weights of two experts;
- frequency: number of tokens whose top-k contains the expert (the routed statistic ``frequency``).

All accumulation is fp32 or fp64; tokens are processed in chunks (no Python loop over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_compress.errors import UserError
from moe_compress.models.layer import ExpertWeights, MoELayer, expert_forward
from moe_compress.models.routing import selection_counts


def subsample_tokens(x: torch.Tensor | None, max_tokens: int | None) -> torch.Tensor | None:
    """At most ``max_tokens`` rows of x [T, H], evenly spaced (deterministic), or x itself."""
    if x is None or max_tokens is None or x.shape[0] <= max_tokens:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).round().long()
    return x.index_select(0, idx)


def require_inputs(x: torch.Tensor | None, what: str) -> torch.Tensor:
    if x is None or x.shape[0] == 0:
        raise UserError(f"{what} needs the MoE inputs of calibration tokens; run with calibration data (--calib)")
    return x


@torch.no_grad()
def frequency(layer: MoELayer, stats: dict, x: torch.Tensor | None) -> torch.Tensor:
    """[E] float64 number of top-k selections per expert: ``stats['frequency']`` or recomputed by routing x."""
    if "frequency" in stats:
        return stats["frequency"].detach().double().cpu()
    x = require_inputs(x, "expert frequencies")
    idx, _ = layer.route(x.to(layer.router_weight.device))
    return selection_counts(idx, layer.n_experts).double().cpu()


def _chunk(n_experts: int, width: int, budget: int = 1 << 25) -> int:
    return max(1, budget // max(1, n_experts * width))


@torch.no_grad()
def expert_output_signals(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert on every token of x [T, H] -> (output similarity [E, E] = mean_t cos(y_i, y_j) float64,
    output mean [E, H] float64)."""
    device = layer.router_weight.device
    e_count, h = layer.n_experts, x.shape[1]
    sim = torch.zeros(e_count, e_count, dtype=torch.float64, device=device)
    total = torch.zeros(e_count, h, dtype=torch.float64, device=device)
    step = _chunk(e_count, h, 1 << 26)
    for s in range(0, x.shape[0], step):
        xc = x[s:s + step].to(device)
        y = torch.stack([expert_forward(layer.experts, e, xc.to(layer.experts.gate.dtype), layer.activation).float()
                         for e in range(e_count)])  # [E, t, H]
        total += y.sum(dim=1).double()
        yn = F.normalize(y, dim=-1)
        sim += torch.einsum("ith,jth->ij", yn, yn).double()
    t = max(1, x.shape[0])
    return (sim / t).cpu(), (total / t).cpu()


@torch.no_grad()
def router_logit_similarity(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """[E, E] float64 cosine between the experts' router-logit columns over the tokens x [T, H] (M-SMoE)."""
    device = layer.router_weight.device
    gram = torch.zeros(layer.n_experts, layer.n_experts, dtype=torch.float64, device=device)
    step = _chunk(1, layer.n_experts, 1 << 24)
    for s in range(0, x.shape[0], step):
        logits = layer.router_logits(x[s:s + step].to(device)).double()
        gram += logits.T @ logits
    norm = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / norm[:, None] / norm[None, :]).cpu()


@torch.no_grad()
def weight_similarity(w: ExpertWeights) -> torch.Tensor:
    """[E, E] float64 cosine of the flattened expert weights (gate, up, down and biases together)."""
    e_count = w.n_experts
    gram = torch.zeros(e_count, e_count, dtype=torch.float64, device=w.gate.device)
    for t in (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias):
        if t is None:
            continue
        flat = t.detach().reshape(e_count, -1)
        step = 1 << 22
        for s in range(0, flat.shape[1], step):
            part = flat[:, s:s + step].double()
            gram += part @ part.T
    norm = gram.diagonal().clamp(min=1e-30).sqrt()
    return (gram / norm[:, None] / norm[None, :]).cpu()


def output_similarity(layer: MoELayer, stats: dict, x: torch.Tensor | None) -> torch.Tensor:
    if "output_similarity" in stats:
        return stats["output_similarity"].detach().double().cpu()
    return expert_output_signals(layer, require_inputs(x, "output similarity"))[0]


def output_mean(layer: MoELayer, stats: dict, x: torch.Tensor | None) -> torch.Tensor:
    if "expert_output_mean" in stats:
        return stats["expert_output_mean"].detach().double().cpu()
    return expert_output_signals(layer, require_inputs(x, "expert output means"))[1]


def router_similarity(layer: MoELayer, stats: dict, x: torch.Tensor | None) -> torch.Tensor:
    if "router_similarity" in stats:
        return stats["router_similarity"].detach().double().cpu()
    return router_logit_similarity(layer, require_inputs(x, "router-logit similarity"))


def observer_available(name: str) -> bool:
    """True if a calibration observer provides statistic ``name`` (then a method may list it in ``needs``)."""
    from moe_compress.calibration.observers import EXTRA_OBSERVERS

    if name not in EXTRA_OBSERVERS:
        try:
            import moe_compress.calibration.similarity  # noqa: F401  (registers its observers)
        except ImportError:
            return False
    return name in EXTRA_OBSERVERS
