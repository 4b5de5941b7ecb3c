"""Shared machinery of the score-based pruning methods: keep the highest-scoring experts of each layer.

Respects DeepSeek group-limited routing (the same number of experts kept in every group: the best of each
group) and protects super experts (experts whose down-projection outputs show extreme outliers) unless
``protect_super`` is off.
"""

from __future__ import annotations

import torch

from moe_compress.methods.base import LayerContext, LayerPlan, Method, Params
from moe_compress.models.surgery import keep_set


class PruneParams(Params):
    protect_super: bool = True
    super_threshold: float = 10.0  # an expert is "super" if its max |output| > threshold x layer median


def super_experts(max_activation: torch.Tensor | None, threshold: float) -> list[int]:
    """Experts whose largest |down_proj output| exceeds ``threshold`` x the layer's median (max_activation [E])."""
    if max_activation is None or max_activation.numel() == 0:
        return []
    med = max_activation.median().clamp(min=1e-12)
    return [int(e) for e in torch.nonzero(max_activation > threshold * med).flatten()]


def choose_kept(scores: torch.Tensor, n_keep: int, n_group: int = 1, protected: list[int] | None = None) -> list[int]:
    """Indices of the ``n_keep`` highest scores [E] (ties: lower index), protected experts first, split evenly
    over ``n_group`` contiguous groups when n_group > 1."""
    n = scores.numel()
    protected = sorted(set(protected or []))
    bonus = torch.zeros(n, dtype=torch.float64)
    bonus[protected] = float("inf")
    order_key = lambda e: (-(bonus[e].item()), -float(scores[e]), e)  # noqa: E731
    if n_group <= 1:
        return sorted(sorted(range(n), key=order_key)[:n_keep])
    per_group, keep_per_group = n // n_group, n_keep // n_group
    kept = []
    for g in range(n_group):
        members = range(g * per_group, (g + 1) * per_group)
        kept += sorted(members, key=order_key)[:keep_per_group]
    return sorted(kept)


class ScorePruning(Method):
    """Keep the experts with the highest ``score`` (subclasses define it)."""

    kind = "prune"

    class Params(PruneParams):
        pass

    def score(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, ctx: LayerContext) -> LayerPlan:
        scores = self.score(ctx).double().cpu()
        protect = getattr(self.params, "protect_super", False)
        supers = super_experts(ctx.stats.get("max_activation"), self.params.super_threshold) if protect else []
        if len(supers) > ctx.n_experts:  # cannot keep them all: keep the strongest
            supers = sorted(supers, key=lambda e: -float(ctx.stats["max_activation"][e]))[:ctx.n_experts]
        kept = choose_kept(scores, ctx.n_experts, ctx.layer.rule.n_group, supers)
        info = {"kept": kept, "scores": [round(float(s), 6) for s in scores], "super_experts": supers}
        return LayerPlan(keep_set(ctx.layer, kept), info)
