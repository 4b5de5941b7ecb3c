"""Sub-MoE (arXiv 2506.23266): output-similarity K-means + joint-SVD subspace merge with frequency-weighted V.

Expert similarity = mean cosine of two experts' outputs over calibration tokens; K-means (k-means++, seeded) on
the similarity rows groups the experts; per group and projection, the SVD of the members' weights concatenated
along the input axis shares the output-side basis U, and the expert-specific V_i are merged with the
frequencies: W_g = U_r Sigma_r (sum_i f_i V_i)_r^T = P_r sum_i f_i W_i (see `merge.py`). Switches:
``similarity`` (output | router | weight | output_mean), ``clustering`` (kmeans | hierarchical | dominant |
oracle: the partition chosen by the measured merged-layer error, `oracle.py`; a diagnosis tool),
``rank_ratio`` (< 1 truncates), ``svd`` (exact | randomized: randomized subspace iteration for the truncated
subspace, with ``oversample``, ``power_iters``, ``svd_seed``, ``power_precision``, ``ritz_precision``; its error
measures go into the plan info), ``whiten`` (Sub-MoE-dagger: SVD-LLM whitening by the group's calibration
second moments; only matters with truncation), ``align``, ``router``, ``weighting``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, register
from moe_compress.methods.merging.base import MergeMethod, MergeParams, similarity_signal
from moe_compress.methods.merging.grouping import group_experts
from moe_compress.methods.merging.merge import submoe_merge
from moe_compress.methods.merging.oracle import oracle_groups
from moe_compress.models.layer import ExpertWeights, MoELayer


def group_tokens(layer: MoELayer, x: torch.Tensor, groups: list[list[int]]) -> list[torch.Tensor]:
    """Per group, the tokens of x [T, H] whose original top-k holds a member (all tokens if there are none)."""
    idx, _ = layer.route(x.to(layer.router_weight.device))
    hit = torch.zeros(x.shape[0], layer.n_experts, dtype=torch.bool, device=idx.device)
    hit.scatter_(1, idx, True)
    out = []
    for g in groups:
        rows = hit[:, g].any(dim=1).to(x.device)
        out.append(x[rows] if bool(rows.any()) else x)
    return out


@register
class SubMoE(MergeMethod):
    name = "submoe"
    summary = ("Sub-MoE: output-similarity K-means, joint-SVD subspace merge with frequency-weighted V "
               "(optional whitening, rank truncation, alignment)")

    class Params(MergeParams):
        similarity: Literal["output", "router", "weight", "output_mean"] = "output"
        clustering: Literal["kmeans", "hierarchical", "dominant", "oracle"] = "kmeans"  # oracle: oracle.py
        oracle_tokens: int = Field(2048, ge=16)          # oracle: calibration tokens of the measured error
        linkage: Literal["average", "single", "complete"] = "average"
        whiten: bool = False
        rank_ratio: float = Field(1.0, gt=0.0, le=1.0)
        gram_dtype: Literal["float64", "float32"] = "float64"
        svd: Literal["exact", "randomized"] = "exact"   # truncated subspace: dense eigh, or randomized
        oversample: int = Field(256, ge=0)               # randomized: p extra test vectors
        power_iters: int = Field(2, ge=0)                # randomized: q subspace iterations on the Gram
        svd_seed: int = 0                                # randomized: seed of the Gaussian test matrix
        power_precision: Literal["gram", "tf32", "bfloat16"] = "gram"  # randomized: precision of the G Q steps
        ritz_precision: Literal["gram", "tf32"] = "gram"  # randomized: products after the iterations (float32)

    params: Params

    def group(self, ctx: LayerContext, freq: torch.Tensor, x: torch.Tensor | None) -> tuple[list[list[int]], dict]:
        p = self.params
        if p.clustering == "oracle":
            if x is None or x.shape[0] == 0:
                raise UserError("submoe clustering=oracle needs calibration inputs (--calib)")
            weighting = "uniform" if p.weighting == "uniform" else "frequency"  # the search's merge weights
            groups, found = oracle_groups(ctx.layer, x, freq, ctx.n_experts, n_tokens=p.oracle_tokens,
                                          router=p.router, weighting=weighting, tau=p.tau, ridge=p.ridge)
            return groups, {"clustering": "oracle", **found}
        signal = similarity_signal(p.similarity, ctx, x)
        groups = group_experts(signal, ctx.n_experts, p.clustering, n_group=ctx.layer.rule.n_group, freq=freq,
                               generator=ctx.generator, linkage=p.linkage, n_init=p.n_init)
        info: dict[str, Any] = {"similarity": p.similarity, "clustering": p.clustering}
        if p.clustering == "hierarchical":
            info["linkage"] = p.linkage
        return groups, info

    def merge_experts(self, ctx: LayerContext, w: ExpertWeights, groups: list[list[int]],
                      weights: list[torch.Tensor], x: torch.Tensor | None) -> tuple[ExpertWeights, dict]:
        p = self.params
        inputs = None
        if p.whiten and p.rank_ratio < 1.0:
            if x is None or x.shape[0] == 0:
                raise UserError("submoe whiten=true needs calibration inputs (--calib)")
            inputs = group_tokens(ctx.layer, x, groups)
        merged, info = submoe_merge(w, groups, weights, rank_ratio=p.rank_ratio, whiten=inputs is not None,
                                    group_inputs=inputs, activation=ctx.layer.activation,
                                    gram_dtype=getattr(torch, p.gram_dtype), svd=p.svd,
                                    oversample=p.oversample, power_iters=p.power_iters, seed=p.svd_seed,
                                    power_precision=p.power_precision, ritz_precision=p.ritz_precision)
        info["rank_ratio"] = p.rank_ratio
        return merged, info
