"""Pruning by routing statistics: frequency, soft count, and a seeded random control.

- ``frequency``: score = number of tokens whose top-k contains the expert.
- ``soft-count``: score = sum of the routing weights the expert receives.
- ``random``: uniformly random kept set (seeded): the control every criterion must beat. Needs no data.
"""

from __future__ import annotations

import torch

from moe_compress.methods.base import LayerContext, register
from moe_compress.methods.pruning.base import PruneParams, ScorePruning


@register
class FrequencyPruning(ScorePruning):
    name = "frequency"
    summary = "prune the experts selected least often in the top-k on calibration tokens"
    needs = frozenset({"frequency", "max_activation"})

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.stats["frequency"]


@register
class SoftCountPruning(ScorePruning):
    name = "soft-count"
    summary = "prune the experts with the smallest sum of routing weights on calibration tokens"
    needs = frozenset({"soft_count", "max_activation"})

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.stats["soft_count"]


@register
class RandomPruning(ScorePruning):
    name = "random"
    summary = "keep a seeded uniformly random subset of experts (control; needs no data)"
    needs_data = False

    class Params(PruneParams):
        protect_super: bool = False

    params: Params

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return torch.rand(ctx.layer.n_experts, generator=ctx.generator, dtype=torch.float64)
