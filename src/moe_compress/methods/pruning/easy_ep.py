"""EASY-EP pruning (Dong et al., "Domain-Specific Pruning of Large Mixture-of-Experts Models with Few-shot
Demonstrations", arXiv 2504.06792): keep the experts that matter most on a few in-domain demonstrations.

    score_e = sum_t s_t sum_{slots of t routed to e} w_{e,t} ||f_e(x_t)||_2,
    s_t = max(0, 1 - cos(x_t, x_t + r_t)),   r_t = sum_{e in top-k(t)} w_{e,t} f_e(x_t),

(statistic ``easy_ep``): the output-aware importance w ||f|| (gate weight as the model applies it x L2 norm of
the expert's output) weighted by the token contribution s_t (tokens whose hidden state the routed experts turn
more count more), summed over calibration tokens; the lowest-scoring experts are removed in every layer. A
sum, like the authors' selection script, not a mean: frequency counts. x_t here is the MoE block's input (see
docs/methods.md for how this differs from the authors' residual stream).
"""

from __future__ import annotations

import torch

from moe_compress.methods.base import LayerContext, register
from moe_compress.methods.pruning.base import ScorePruning


@register
class EasyEPPruning(ScorePruning):
    name = "easy-ep"
    summary = ("prune the experts with the smallest gate x output norm summed over calibration tokens, each token "
               "weighted by how much the routed experts change its hidden state (EASY-EP)")
    needs = frozenset({"easy_ep", "max_activation"})

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.stats["easy_ep"]
