"""Shared machinery of the pruning methods: keep the highest-scoring experts of each layer.

Respects DeepSeek group-limited routing (the same number of experts kept in every group: the best of each
group) and protects super experts (experts whose down-projection outputs show extreme outliers) unless
``protect_super`` is off.

Super experts (Su et al., "Unveiling Super Experts in MoE LLMs", arXiv 2507.23279). The paper profiles
a_{l,e} = max over tokens of |down_proj output| of expert e in layer l and flags, MODEL-wide, the experts with
a_{l,e} > P99.5({a}) and a_{l,e} > max({a}) / 10 (in the layers that produce massive activations): a handful
of experts out of thousands. Methods here plan one layer at a time (in sequential mode before later layers
even exist), so the rule is the per-layer analogue of "an extreme outlier among the layer's experts":

    e is super  <=>  a_e > super_threshold x median_{e'} a_{e'}      (default super_threshold = 10)

with a_e the ``max_activation`` statistic (max |y_e(x)_j| over routed real tokens, y before the routing
weight). Ordinary experts of a layer have peaks within a small factor of each other (the paper's super
experts are 10^2-10^4 x above the rest); raise ``super_threshold`` if a layer flags too many. A super expert
that was never routed on the calibration data has no peak and cannot be detected.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, LayerPlan, Method, Params, get_method
from moe_compress.models.surgery import keep_set


class PruneParams(Params):
    protect_super: bool = True     # never prune super experts (needs the max_activation statistic)
    super_threshold: float = 10.0  # an expert is "super" if its max |output| > threshold x layer median


def super_experts(max_activation: torch.Tensor | None, threshold: float) -> list[int]:
    """Experts whose largest |down_proj output| exceeds ``threshold`` x the layer's median (max_activation [E])."""
    if max_activation is None or max_activation.numel() == 0:
        return []
    max_activation = max_activation.double().cpu()
    med = max_activation.median().clamp(min=1e-12)
    return [int(e) for e in torch.nonzero(max_activation > threshold * med).flatten()]


def protected_experts(ctx: LayerContext, params: PruneParams) -> list[int]:
    """The super experts of this layer that must be kept (empty when ``params.protect_super`` is off).

    At most ``ctx.n_experts`` of them, and with DeepSeek groups at most n_keep / n_group per group: the ones
    with the largest peaks win when there are more.
    """
    if not getattr(params, "protect_super", False):
        return []
    peaks = ctx.stats.get("max_activation")
    supers = super_experts(peaks, params.super_threshold)
    if peaks is None or not supers:  # no peaks, no super experts
        return []
    strength = lambda e: -float(peaks[e])  # noqa: E731
    rule, n = ctx.layer.rule, ctx.layer.n_experts
    if rule.n_group <= 1:
        return sorted(sorted(supers, key=strength)[:ctx.n_experts])
    per_group, cap = n // rule.n_group, ctx.n_experts // rule.n_group
    kept = []
    for g in range(rule.n_group):
        kept += sorted([e for e in supers if e // per_group == g], key=strength)[:cap]
    return sorted(kept)


def rounded(values: Iterable[Any]) -> list[float]:
    """Values as JSON floats with 7 significant digits (small errors stay visible, unlike fixed decimals)."""
    return [float(f"{float(v):.7g}") for v in values]


def check_target(ctx: LayerContext) -> None:
    """A `UserError` if ``ctx.n_experts`` is not a count this layer can be pruned to."""
    n, rule = ctx.layer.n_experts, ctx.layer.rule
    if not 1 <= ctx.n_experts < n:
        raise UserError(f"layer {ctx.layer.index}: cannot keep {ctx.n_experts} of {n} experts")
    problem = rule.count_problem(ctx.n_experts)
    if problem is not None:
        raise UserError(f"layer {ctx.layer.index}: cannot keep {ctx.n_experts} experts: {problem}")


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


def selection_method(select: str, *, select_tokens: int, protect_super: bool, super_threshold: float,
                     balance: str = "tokens") -> Method:
    """The pruning method that chooses a kept set for a method built on top of one (refit, absorb): ``select``
    with the caller's super-expert protection; NAEE also gets its token count and balance."""
    common: dict[str, Any] = {"protect_super": protect_super, "super_threshold": super_threshold}
    if select == "naee":
        return get_method("naee", max_tokens=select_tokens, balance=balance, **common)
    return get_method(select, **common)


class ScorePruning(Method):
    """Keep the experts with the highest ``score`` (subclasses define it).

    Plan info: ``kept`` (original indices), ``scores`` (one per original expert), ``super_experts``
    (protected ones).
    """

    kind = "prune"

    class Params(PruneParams):
        pass

    params: PruneParams  # subclasses narrow it to their own Params

    def score(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, ctx: LayerContext) -> LayerPlan:
        check_target(ctx)
        scores = self.score(ctx).double().cpu()
        supers = protected_experts(ctx, self.params)
        kept = choose_kept(scores, ctx.n_experts, ctx.layer.rule.n_group, supers)
        info = {"kept": kept, "scores": rounded(scores), "super_experts": supers}
        return LayerPlan(keep_set(ctx.layer, kept), info)
