"""REAP pruning (Router-weighted Expert Activation Pruning, arXiv 2510.13999).

score_e = (1 / |X_e|) sum_{x in X_e} g_e(x) ||f_e(x)||_2, X_e = calibration tokens routed to e, g_e(x) the
router gate renormalised over the token's top-k (statistic ``reap``); the lowest-scoring experts are removed
uniformly in every layer. A mean, not a sum: a rarely used expert that matters a lot when used is kept.
"""

from __future__ import annotations

import torch

from moe_compress.methods.base import LayerContext, register
from moe_compress.methods.pruning.base import ScorePruning


@register
class REAPPruning(ScorePruning):
    name = "reap"
    summary = "prune the experts with the smallest mean gate x output norm over their routed tokens (REAP)"
    needs = frozenset({"reap", "max_activation"})

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.stats["reap"]
