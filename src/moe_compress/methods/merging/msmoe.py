"""M-SMoE (Merge, Then Compress; Li et al., ICLR 2024): dominant-expert grouping + frequency-weighted average.

The n most used experts of the layer (n = target count) become the "dominant" centres; every other expert joins
the centre whose router-logit column is most similar (cosine over calibration tokens); each group is replaced
by sum_i f_i W_i / sum_i f_i. Optional permutation alignment (``align``; the original aligns ReLU FFNs only,
here gated experts with gate/up/down permuted together). No low-rank/sparse "compress" stage and no
distillation: this is the merge step, written as a real smaller checkpoint (the original ties modules).
"""

from __future__ import annotations

from typing import Literal

import torch

from moe_compress.methods.base import LayerContext, register
from moe_compress.methods.merging.base import MergeMethod, MergeParams, similarity_signal
from moe_compress.methods.merging.grouping import group_experts


@register
class MSMoE(MergeMethod):
    name = "msmoe"
    summary = ("M-SMoE: the most used experts are centres, the others join the most similar one (router logits); "
               "frequency-weighted average")

    class Params(MergeParams):
        similarity: Literal["router", "output", "weight", "output_mean"] = "router"

    params: Params

    def group(self, ctx: LayerContext, freq: torch.Tensor, x: torch.Tensor | None) -> tuple[list[list[int]], dict]:
        signal = similarity_signal(self.params.similarity, ctx, x)
        groups = group_experts(signal, ctx.n_experts, "dominant", n_group=ctx.layer.rule.n_group, freq=freq)
        return groups, {"similarity": self.params.similarity, "clustering": "dominant"}
