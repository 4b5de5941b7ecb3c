"""EAN pruning (Expert Activation Norm): keep the experts whose outputs carry the most total norm.

score_e = sum over routed calibration tokens x of ||f_e(x)||_2 (f_e = expert e's output before the routing
weight; statistic ``ean``). Combines how often an expert is used with how much it writes.
"""

from __future__ import annotations

import torch

from moe_compress.methods.base import LayerContext, register
from moe_compress.methods.pruning.base import ScorePruning


@register
class EANPruning(ScorePruning):
    name = "ean"
    summary = "prune the experts with the smallest summed output norm over their routed tokens (EAN)"
    needs = frozenset({"ean", "max_activation"})

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.stats["ean"]
