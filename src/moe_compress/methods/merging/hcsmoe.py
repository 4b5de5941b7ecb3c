"""HC-SMoE (Chen et al., ICML 2025): hierarchical clustering of expert outputs + frequency-weighted average.

Every expert is run on every calibration token; expert i is represented by its mean output m_i = mean_t y_i(x_t)
[H]; agglomerative clustering (average linkage by default) on ||m_i - m_j||_2 is cut at the target count; each
cluster is replaced by sum_i f_i W_i / sum_i f_i. A misspelt linkage is an error (never a silent fallback).
"""

from __future__ import annotations

from typing import Literal

import torch

from moe_compress.methods.base import LayerContext, register
from moe_compress.methods.merging.base import MergeMethod, MergeParams, similarity_signal
from moe_compress.methods.merging.grouping import group_experts


@register
class HCSMoE(MergeMethod):
    name = "hcsmoe"
    summary = "HC-SMoE: hierarchical clustering (average linkage) of expert output means; frequency-weighted average"

    class Params(MergeParams):
        similarity: Literal["output_mean", "output", "router", "weight"] = "output_mean"
        linkage: Literal["average", "single", "complete"] = "average"

    params: Params

    def group(self, ctx: LayerContext, freq: torch.Tensor, x: torch.Tensor | None) -> tuple[list[list[int]], dict]:
        signal = similarity_signal(self.params.similarity, ctx, x)
        groups = group_experts(signal, ctx.n_experts, "hierarchical", n_group=ctx.layer.rule.n_group,
                               linkage=self.params.linkage)
        return groups, {"similarity": self.params.similarity, "clustering": "hierarchical",
                        "linkage": self.params.linkage}
