"""Absorb: prune the least useful experts, then merge each into the kept expert that takes over its tokens.

Merging methods choose centres by frequency (M-SMoE) or cluster by similarity (HC-SMoE, Sub-MoE) and then average
whole groups; on every project testbed that loses to the best pruning at 25% fewer experts, because averaging
moves the kept experts and their router rows away from what most of their tokens need (docs/RESULTS.md "Why
merging loses here"). Absorb starts from the best pruning instead and merges only where measurement says it helps:

1. **Kept set**: the pruning selection ``select`` (NAEE's reconstruction search by default) keeps n experts.
2. **Successor assignment**: a removed expert d joins the kept expert that takes its place in the top-k when d
   is masked out of the routing: over the calibration tokens whose original top-k holds d, count (weighted by
   d's routing weight) which kept expert enters the masked top-k; d joins the most counted one (within d's
   DeepSeek routing group; with no count, the kept expert of most similar router row). Its tokens are then
   served by the expert it is merged into.
3. **Measured blend** (``weighting=measured``): per group, the merge weights move from the kept expert alone
   (t = 0: exactly the pruned layer) to the frequency average of the group (t = 1) with t on ``grid``, chosen by
   coordinate descent on the measured routed-output error of the whole layer (`oracle.measured_weights`,
   anchored at the kept expert). On the measuring tokens the layer is therefore never worse than the pruning it
   starts from; where every t is 0 the method IS that pruning (the plan info says so: ``blend``).
   ``weighting=frequency``/``uniform`` average every group fully (M-SMoE's merge on these groups).

Router rows follow ``router`` (default ``freq_avg`` with the same blended weights: at t = 0 the kept expert's own
row). The merged experts are plain experts of the original width: a standard checkpoint.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, LayerPlan, register
from moe_compress.methods.merging import signals
from moe_compress.methods.merging.base import MergeMethod, MergeParams, merge_plan
from moe_compress.methods.merging.oracle import measured_weights
from moe_compress.methods.pruning.base import selection_method
from moe_compress.models.layer import MoELayer

AbsorbSelect = Literal["naee", "reap", "soft-count", "frequency", "ean", "easy-ep"]
ABSORB_GRID = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


@torch.no_grad()
def successor_counts(layer: MoELayer, x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """C [E, E] fp64: C[d, c] = sum over tokens t whose original top-k holds d of w_d(x_t) / m_t, over the kept
    experts c that enter the top-k of x_t when only ``kept`` may be chosen (m_t of them). x [T, H]."""
    n = layer.n_experts
    x = x.to(device=layer.router_weight.device, dtype=layer.router_weight.dtype)
    idx, wt = layer.route(x)  # [T, k]
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[kept] = True
    new_idx, _ = layer.route(x, mask)
    before = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
    after = torch.zeros_like(before).scatter_(1, new_idx, True)
    entered = (after & ~before).double()                     # [T, E]
    m = entered.sum(dim=1, keepdim=True).clamp(min=1.0)
    w = torch.zeros(x.shape[0], n, dtype=torch.float64, device=x.device).scatter_(1, idx, wt.double())
    w[:, kept] = 0.0                                         # only removed experts hand over tokens
    return (w.T @ (entered / m)).cpu()


def successor_groups(layer: MoELayer, x: torch.Tensor | None, kept: list[int]) -> tuple[list[list[int]], dict]:
    """Groups (one per kept expert, ascending; members sorted) with every removed expert assigned to its
    successor (module docstring), and info {removed: successor, ...}."""
    n, g_count = layer.n_experts, max(1, layer.rule.n_group)
    per = n // g_count
    kept = sorted(kept)
    counts = successor_counts(layer, x, kept) if x is not None and x.shape[0] else torch.zeros(n, n,
                                                                                               dtype=torch.float64)
    rows = torch.nn.functional.normalize(layer.router_weight.detach().double().cpu(), dim=1)
    assign: dict[int, int] = {}
    for d in range(n):
        if d in kept:
            continue
        cands = [c for c in kept if c // per == d // per]
        score = counts[d, cands]
        if not float(score.max()) > 0.0:  # no token handed over: the most similar router row
            score = rows[cands] @ rows[d]
        assign[d] = cands[int(torch.argmax(score))]
    groups = [sorted([c] + [d for d, s in assign.items() if s == c]) for c in kept]
    return groups, {"successor": {str(d): c for d, c in sorted(assign.items())}}


@register
class Absorb(MergeMethod):
    name = "absorb"
    summary = ("prune by a selection (NAEE), then merge each removed expert into the kept expert that takes over "
               "its tokens, by a measured blend (never worse than the pruning on the measuring tokens)")

    class Params(MergeParams):
        weighting: Literal["measured", "frequency", "uniform"] = "measured"
        select: AbsorbSelect = "naee"               # the pruning that chooses the kept experts
        select_tokens: int = Field(4096, ge=1)      # naee: calibration tokens for the search
        blend_tokens: int = Field(4096, ge=16)      # tokens measuring the blend (evenly subsampled)
        protect_super: bool = True                  # passed to the selection
        super_threshold: float = Field(10.0, gt=0.0)

    params: Params

    def __init__(self, **params):
        super().__init__(**params)
        p = self.params
        self.selector = selection_method(p.select, select_tokens=p.select_tokens, protect_super=p.protect_super,
                                         super_threshold=p.super_threshold)
        self.needs = frozenset(self.needs | self.selector.needs)

    @torch.no_grad()
    def plan(self, ctx: LayerContext) -> LayerPlan:
        p = self.params
        x = signals.subsample_tokens(ctx.inputs, p.max_tokens)
        if x is None or x.shape[0] == 0:
            raise UserError(f"method {self.name} needs the MoE inputs of calibration tokens: pass --calib SPEC")
        freq = signals.frequency(ctx.layer, ctx.stats, x)
        kept = sorted(self.selector.plan(ctx).info["kept"])
        groups, info = successor_groups(ctx.layer, x, kept)
        info = {"select": p.select, "kept": kept, **info}
        weights = None
        if p.weighting == "measured":
            weights, blend_info = measured_weights(ctx.layer, groups, x, freq, grid=ABSORB_GRID,
                                                   n_tokens=p.blend_tokens, router=p.router, tau=p.tau,
                                                   ridge=p.ridge, anchors=kept)
            info.update(blend_info)
        return merge_plan(ctx, groups, p, freq, x, None, info, weights=weights)
