"""DERN (Zhou et al., "Dropping Experts, Recombining Neurons: Retraining-Free Pruning for Sparse Mixture-of-Experts
LLMs", EMNLP 2025, arXiv 2509.10377): prune experts by router statistics, then recombine the dropped experts'
neurons into the kept ones, keeping every expert's width.

1. **Drop.** Keep the n experts with the highest router statistic (``select``: soft_count = sum of routing
   weights, default; or frequency), per DeepSeek group, super experts protected, as every pruning method.
2. **Segments.** Neuron j of an expert e is the segment phi_e(j) = [gate_e[j, :], up_e[j, :], down_e[:, j]]
   (+ GPT-OSS's gate/up biases b_g[j], b_u[j]): its contribution down_e[:, j] act(gate_e[j] x + b_g, up_e[j] x + b_u).
3. **Assign.** A segment s of a dropped expert p goes to the kept expert c and neuron i maximising the cosine
   similarity cos(phi_p(j), phi_c(i)) (compatibility of s with c = max_i cos, i.e. with c's most similar
   neuron); a segment whose best similarity is below ``min_similarity`` is discarded.
4. **Recombine.** Inside c, neuron i and the segments S_i assigned to it are replaced by their weighted mean

       phi'_c(i) = (f_c phi_c(i) + sum_{s in S_i} f_{p(s)} phi_s) / (f_c + sum_{s in S_i} f_{p(s)}),

   f the experts' frequencies (``weighting=frequency``: top-k selections on calibration tokens) or 1
   (``uniform``). Gate rows, up rows, down columns (and gate/up biases) use the same weights, so the width I is
   unchanged; down biases (GPT-OSS) and the kept router rows are untouched.

With no segment assigned (``min_similarity`` above 1), or a dropped expert identical to a kept one, the result
is exactly plain pruning to the kept set.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from moe_compress.methods.base import LayerContext, LayerPlan, register
from moe_compress.methods.pruning.base import (
    PruneParams,
    ScorePruning,
    check_target,
    choose_kept,
    protected_experts,
    rounded,
)
from moe_compress.models.layer import ExpertWeights
from moe_compress.models.surgery import keep_set


def segment_features(w: ExpertWeights) -> torch.Tensor:
    """[E, I, F] fp32 segment vectors phi_e(j) = [gate_e[j], up_e[j], down_e[:, j] (, b_g[e, j], b_u[e, j])],
    F = 3H (+2 with gate/up biases)."""
    parts = [w.gate, w.up, w.down.transpose(1, 2)]
    parts += [b[:, :, None] for b in (w.gate_bias, w.up_bias) if b is not None]
    return torch.cat([p.detach().float() for p in parts], dim=2)


def assign_segments(w: ExpertWeights, kept: list[int], dropped: list[int],
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each dropped segment's most compatible kept expert and neuron.

    Returns (sim [D, I], target [D, I], neuron [D, I]) for the D dropped experts' I segments: the best cosine
    similarity, the position in ``kept`` of the target expert and the target neuron (ties: lower index). The
    [chunk, n I] similarity blocks keep the memory at chunk x n x I floats.
    """
    phi = F.normalize(segment_features(w), dim=2)                 # [E, I, F]
    kept_phi = phi[kept]                                          # [n, I, F]
    n, i_dim = kept_phi.shape[:2]
    flat_kept = kept_phi.reshape(n * i_dim, -1)                   # [n I, F]
    best = torch.empty(len(dropped), i_dim, device=phi.device)
    arg = torch.empty(len(dropped), i_dim, dtype=torch.long, device=phi.device)
    for d, p in enumerate(dropped):
        for j0 in range(0, i_dim, chunk):
            sim = phi[p, j0:j0 + chunk] @ flat_kept.T             # [chunk, n I]
            best[d, j0:j0 + chunk], arg[d, j0:j0 + chunk] = sim.max(dim=1)  # first maximum: lowest (c, i)
    return best, arg // i_dim, arg % i_dim


def recombine(w: ExpertWeights, kept: list[int], dropped: list[int], target: torch.Tensor, neuron: torch.Tensor,
              accept: torch.Tensor, weight: torch.Tensor) -> ExpertWeights:
    """The kept experts with the accepted dropped segments merged into their target neurons.

    target, neuron, accept [D, I] (from `assign_segments`, accept = bool); weight [E] merge weight per expert.
    Returns ExpertWeights of the n kept experts (same shapes as the originals), fp32 math, original dtype.
    """
    out = w.select(kept)
    n, i_dim = len(kept), w.gate.shape[1]
    wk = weight[kept].double()
    wd = weight[dropped].double()
    # numerator / denominator per (kept expert, neuron), accumulated over the accepted segments
    denom = wk[:, None].expand(n, i_dim).clone()                       # [n, I]
    slot = (target * i_dim + neuron)[accept]                           # flat (c, i) of each accepted segment
    seg_w = wd[:, None].expand(len(dropped), i_dim)[accept]            # [S]
    denom.view(-1).index_add_(0, slot, seg_w)
    safe = denom.clamp(min=1e-30)

    def merge(kept_rows: torch.Tensor, dropped_rows: torch.Tensor) -> torch.Tensor:
        # kept_rows [n, I, ...], dropped_rows [D, I, ...] -> [n, I, ...]
        tail = kept_rows.shape[2:]
        kept_rows, dropped_rows = kept_rows.detach(), dropped_rows.detach()
        num = kept_rows.double() * wk.view(n, 1, *([1] * len(tail)))
        num = num.reshape(n * i_dim, -1)
        seg = dropped_rows.double()[accept].reshape(slot.numel(), num.shape[1]) * seg_w[:, None]
        num.index_add_(0, slot, seg)
        merged = (num / safe.view(-1, 1)).reshape(n, i_dim, *tail)
        return merged.to(kept_rows.dtype)

    dropped_w = w.select(dropped)
    out.gate = merge(out.gate, dropped_w.gate)
    out.up = merge(out.up, dropped_w.up)
    out.down = merge(out.down.transpose(1, 2), dropped_w.down.transpose(1, 2)).transpose(1, 2).contiguous()
    if out.gate_bias is not None and dropped_w.gate_bias is not None:  # gpt_oss: gate and up biases
        out.gate_bias = merge(out.gate_bias[:, :, None], dropped_w.gate_bias[:, :, None])[:, :, 0]
    if out.up_bias is not None and dropped_w.up_bias is not None:
        out.up_bias = merge(out.up_bias[:, :, None], dropped_w.up_bias[:, :, None])[:, :, 0]
    return out


@register
class DERN(ScorePruning):
    name = "dern"
    summary = ("prune experts by router statistics, then merge each dropped expert's neurons into the most similar "
               "neuron of a kept expert (DERN); widths unchanged")
    needs = frozenset({"frequency", "soft_count", "max_activation"})

    class Params(PruneParams):
        select: Literal["soft_count", "frequency"] = "soft_count"   # router statistic that picks the kept experts
        min_similarity: float = Field(0.0, ge=-1.0)                  # segments less similar than this are discarded
        weighting: Literal["frequency", "uniform"] = "frequency"     # merge weight of each expert's neurons

    params: Params

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.stats[self.params.select]

    def plan(self, ctx: LayerContext) -> LayerPlan:
        check_target(ctx)
        scores = self.score(ctx).double().cpu()
        supers = protected_experts(ctx, self.params)
        kept = choose_kept(scores, ctx.n_experts, ctx.layer.rule.n_group, supers)
        dropped = [e for e in range(ctx.layer.n_experts) if e not in kept]
        s = keep_set(ctx.layer, kept)
        w = ctx.layer.experts
        sim, target, neuron = assign_segments(w, kept, dropped)
        accept = sim >= self.params.min_similarity
        if self.params.weighting == "frequency":
            weight = ctx.stats["frequency"].double().cpu().to(w.gate.device)
        else:
            weight = torch.ones(w.n_experts, dtype=torch.float64, device=w.gate.device)
        s.experts = recombine(w, kept, dropped, target, neuron, accept, weight)
        absorbed = torch.zeros(len(kept), len(dropped), dtype=torch.long)
        for d in range(len(dropped)):
            absorbed[:, d] = torch.bincount(target[d][accept[d]].cpu(), minlength=len(kept))
        i_dim = w.gate.shape[1]
        s.sources = [[(c, 1.0)] + [(p, round(int(absorbed[ci, d]) / i_dim, 6)) for d, p in enumerate(dropped)
                                   if absorbed[ci, d] > 0] for ci, c in enumerate(kept)]
        info = {"kept": kept, "scores": rounded(scores), "super_experts": supers, "select": self.params.select,
                "segments": {"dropped": len(dropped) * i_dim, "assigned": int(accept.sum()),
                             "discarded": int((~accept).sum())},
                "assigned_to": {str(p): [kept[int(c)] for c in torch.bincount(target[d][accept[d]].cpu(),
                                                                                 minlength=len(kept)).nonzero().flatten()]
                                for d, p in enumerate(dropped)},
                "mean_similarity": rounded([float(sim[accept].mean()) if accept.any() else 0.0])[0]}
        return LayerPlan(s, info)
