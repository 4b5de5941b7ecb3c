"""The merge pipeline shared by every merging method: group -> (align) -> merge -> adapt the router -> record.

A merging method subclasses `MergeMethod` and implements `group` (which experts go together) and, if it
does not average, `merge_experts`. `MergeMethod.plan` does the rest for one layer and always returns a real
reduced `ExpertSet` (E' new experts, their router rows and biases, ``sources`` = [(original expert, merge
weight), ...] per new expert); the plan info records the groups, frequencies, merge weights, ranks, the router
rule and the routing-mass error it leaves (and the frequency-averaged router's, for comparison).

Calibration inputs: every merging method asks for the MoE block's inputs (``needs_inputs``), subsampled
evenly to ``max_tokens`` tokens: they feed the similarity signals an observer did not provide, the router
refit, whitening and the routing-mass measurement.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from pydantic import Field

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, LayerPlan, Method, Params
from moe_compress.methods.merging import signals
from moe_compress.methods.merging.align import align_groups
from moe_compress.methods.merging.grouping import Signal
from moe_compress.methods.merging.merge import Weighting, frequency_average, group_weights
from moe_compress.methods.merging.oracle import measured_weights
from moe_compress.methods.merging.router import RouterRule, adapt_router, routing_mass_error
from moe_compress.models.layer import ExpertSet, ExpertWeights

SimilarityKind = Literal["output", "router", "weight", "output_mean"]
# (ctx, weights, groups, merge weights, x) -> (merged experts, info): `MergeMethod.merge_experts`
MergeFn = Callable[[LayerContext, ExpertWeights, list[list[int]], list[torch.Tensor], torch.Tensor | None],
                   tuple[ExpertWeights, dict]]


class MergeParams(Params):
    router: RouterRule = "freq_avg"          # freq_avg | logit_adjust | lstsq | keep_dominant
    tau: float = Field(1.0, ge=0.0)          # logit_adjust strength
    ridge: float = Field(1e-3, ge=0.0)       # relative ridge of the router least squares
    align: bool = False                      # permutation-align members to the group's reference first
    weighting: Weighting = "frequency"       # merge weights: frequency | uniform
    max_tokens: int = Field(32768, ge=16)    # calibration tokens used (evenly subsampled)
    # bound on the output-similarity pass: at most budget x T x k / E of its max_tokens (similarity.py); None: none
    similarity_budget: float | None = Field(None, gt=0.0)
    n_init: int = Field(8, ge=1)             # k-means restarts


def similarity_signal(kind: SimilarityKind, ctx: LayerContext, x: torch.Tensor | None) -> Signal:
    """The `Signal` of one kind for this layer: stats if an observer gave them, else computed from x."""
    layer = ctx.layer
    if kind == "output":
        return Signal(similarity=signals.output_similarity(layer, ctx.stats, x))
    if kind == "router":
        return Signal(similarity=signals.router_similarity(layer, ctx.stats, x))
    if kind == "weight":
        return Signal(similarity=signals.weight_similarity(layer.experts))
    if kind == "output_mean":
        return Signal(features=signals.output_mean(layer, ctx.stats, x))
    raise ValueError(f"unknown similarity {kind!r}")


def stat_for(kind: SimilarityKind) -> str | None:
    return {"output": "output_similarity", "router": "router_similarity", "output_mean": "expert_output_mean"}.get(kind)


class MergeMethod(Method):
    """Base of the merging methods (kind "merge")."""

    kind = "merge"
    needs = frozenset({"frequency"})
    needs_inputs = True

    class Params(MergeParams):
        pass

    params: MergeParams  # subclasses narrow it to their own Params

    def __init__(self, **params: Any):
        super().__init__(**params)
        kind = getattr(self.params, "similarity", None)
        stat = stat_for(kind) if kind else None
        if stat is not None and signals.observer_available(stat):  # else computed from the inputs
            self.needs = frozenset(self.needs | {stat})

    def observer_options(self) -> dict:
        """The similarity observer runs every expert on an even subsample of ``max_tokens`` tokens (fewer with
        ``similarity_budget``: see calibration/similarity.py)."""
        out: dict = {"similarity_tokens": self.params.max_tokens}
        if self.params.similarity_budget is not None:
            out["similarity_budget"] = self.params.similarity_budget
        return out

    # -- what subclasses define ---------------------------------------------------------------------------
    def group(self, ctx: LayerContext, freq: torch.Tensor, x: torch.Tensor | None) -> tuple[list[list[int]], dict]:
        raise NotImplementedError

    def merge_experts(self, ctx: LayerContext, w: ExpertWeights, groups: list[list[int]],
                      weights: list[torch.Tensor], x: torch.Tensor | None) -> tuple[ExpertWeights, dict]:
        return frequency_average(w, groups, weights), {"ranks": "full"}

    # -- the shared pipeline ------------------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, ctx: LayerContext) -> LayerPlan:
        x = signals.subsample_tokens(ctx.inputs, self.params.max_tokens)
        freq = signals.frequency(ctx.layer, ctx.stats, x)
        groups, group_info = self.group(ctx, freq, x)
        return merge_plan(ctx, groups, self.params, freq, x, self.merge_experts, group_info)


@torch.no_grad()
def merge_plan(ctx: LayerContext, groups: list[list[int]], params: MergeParams, freq: torch.Tensor,
               x: torch.Tensor | None, merge_fn: MergeFn | None = None, extra_info: dict | None = None, *,
               weights: list[torch.Tensor] | None = None) -> LayerPlan:
    """Merge the given groups of ``ctx.layer`` into one expert each (in the given order) and adapt the router.

    ``merge_fn(ctx, weights, groups, merge_weights, x) -> (ExpertWeights, info)`` defaults to the
    frequency-weighted average. ``weights`` (one float64 vector per group, summing to 1) replaces the merge
    weights ``params.weighting`` would give (a method that measured its own: absorb).
    """
    layer = ctx.layer
    flat = sorted(e for g in groups for e in g)
    if flat != list(range(layer.n_experts)):
        raise ValueError(f"layer {layer.index}: groups {groups} are not a partition of {layer.n_experts} experts")
    blend_info = None
    if weights is not None:
        if len(weights) != len(groups) or any(len(w) != len(g) for w, g in zip(weights, groups)):
            raise ValueError(f"layer {layer.index}: merge weights do not match the groups {groups}")
    elif params.weighting == "measured":
        if x is None or x.shape[0] == 0:
            raise UserError("weighting=measured needs calibration inputs (--calib)")
        weights, blend_info = measured_weights(layer, groups, x, freq, router=params.router, tau=params.tau,
                                               ridge=params.ridge)
    else:
        weights = group_weights(freq, groups, params.weighting)
    w = layer.experts
    align_info = None
    if params.align:
        refs = [g[int(torch.argmax(wg))] for g, wg in zip(groups, weights)]
        w, moved = align_groups(w, groups, refs)
        align_info = {"references": refs, "neurons_moved": {str(e): n for e, n in moved.items()}}
    if merge_fn is None:
        merged, merge_info = frequency_average(w, groups, weights), {"ranks": "full"}
    else:
        merged, merge_info = merge_fn(ctx, w, groups, weights, x)
    rows = adapt_router(layer, groups, weights, params.router, freq=freq, x=x, tau=params.tau, ridge=params.ridge)
    mass = None
    if x is not None and x.shape[0] > 0:
        mass = {params.router: round(routing_mass_error(layer, x, groups, rows), 6)}
        if params.router != "freq_avg":
            base = adapt_router(layer, groups, weights, "freq_avg")
            mass["freq_avg"] = round(routing_mass_error(layer, x, groups, base), 6)
    n_tokens = float(freq.sum()) / max(1, layer.rule.top_k) or 1.0  # f_i = share of tokens whose top-k holds i
    sources = [[(e, float(wi)) for e, wi in zip(g, wg)] for g, wg in zip(groups, weights)]
    info = {
        **(extra_info or {}),
        "groups": groups,
        "frequencies": [[round(float(freq[e]) / n_tokens, 6) for e in g] for g in groups],
        "merge_weights": [[round(float(v), 6) for v in wg] for wg in weights],
        "weighting": params.weighting,
        **(blend_info or {}),
        **merge_info,
        "align": align_info if params.align else False,
        "router": rows.info,
        "routing_mass_error": mass,
        "calibration_tokens": 0 if x is None else int(x.shape[0]),
    }
    expert_set = ExpertSet(merged, rows.weight, rows.bias, rows.correction_bias, sources)
    return LayerPlan(expert_set, info)
