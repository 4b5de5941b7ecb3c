"""How well a compressed expert set reproduces the original MoE block: the routed outputs of both on the same
tokens and their relative error. Pure functions on tensors (fp32 compute, fp64 sums); used by methods that fit
to the original output (refit, the oracle grouping) and by the pipeline, which records every layer's error.

The routed output of a block on x [T, H] is Y_t = sum_{e in top-k(x_t)} w_e(x_t) y_e(x_t) (shared experts
excluded: compression leaves them unchanged, so they would only dilute the error). For a compressed set the
routing is the set's own router rows under the layer's routing rule (its kind, top-k, scaling, groups; DeepSeek's
correction bias from the set).
"""

from __future__ import annotations

import torch

from moe_compress.models.layer import ExpertSet, ExpertWeights, MoELayer, expert_forward
from moe_compress.models.routing import route

ERROR_TOKENS = 4096  # tokens of the recorded per-layer error (evenly subsampled from the calibration inputs)


@torch.no_grad()
def routed_sum(w: ExpertWeights, x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, act) -> torch.Tensor:
    """sum_slot wt[t, slot] * expert_{idx[t, slot]}(x_t): x [T, H], idx/wt [T, k] -> [T, H] fp32. Each expert runs
    on its routed tokens only."""
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w.n_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel():
            y.index_add_(0, tok, wt[tok, slot, None] * expert_forward(w, e, x[tok], act))
    return y


@torch.no_grad()
def original_output(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The original block's routed output (shared experts excluded) on x [T, H] -> Y [T, H] fp32.

    Experts run in fp32 on fp32 copies of their weights (the same function as the model up to rounding)."""
    idx, wt = layer.route(x.to(layer.router_weight.dtype))
    return routed_sum(layer.experts.to(dtype=torch.float32), x.float(), idx, wt, layer.activation)


def set_logits(layer: MoELayer, s: ExpertSet, x: torch.Tensor) -> torch.Tensor:
    """Router logits [T, n] fp32 of the expert set ``s`` on x [T, H] (fp32 products)."""
    logits = x.float() @ s.router_weight.float().T
    return logits if s.router_bias is None else logits + s.router_bias.float()


@torch.no_grad()
def set_output(layer: MoELayer, s: ExpertSet, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The routed output of the compressed set ``s`` (its router rows, the layer's rule) on x [T, H] -> [T, H];
    ``mask`` [n] bool: experts of ``s`` that may be chosen (None: all)."""
    cb = None if s.correction_bias is None else s.correction_bias.float()
    idx, wt = route(set_logits(layer, s, x), layer.rule, cb, mask)
    return routed_sum(s.experts.to(dtype=torch.float32), x.float(), idx, wt, layer.activation)


@torch.no_grad()
def relative_error(y: torch.Tensor, target: torch.Tensor) -> float:
    """||y - target||^2 / ||target||^2 (fp64)."""
    return float((y.double() - target.double()).pow(2).sum() / target.double().pow(2).sum().clamp(min=1e-30))


def even_subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` rows of x [T, ...], evenly spaced (all of them when T <= n)."""
    if x.shape[0] <= n:
        return x
    return x.index_select(0, torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long())


@torch.no_grad()
def layer_error(layer: MoELayer, s: ExpertSet, x: torch.Tensor, n_tokens: int = ERROR_TOKENS) -> float:
    """||Y' - Y||^2 / ||Y||^2 of the set ``s`` against the original block on (an even subsample of) x [T, H]."""
    x = even_subsample(x.to(layer.router_weight.device), n_tokens).float()
    return relative_error(set_output(layer, s, x), original_output(layer, x))
