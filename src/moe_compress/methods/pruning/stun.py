"""STUN pruning (Lee et al., "STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning", arXiv
2409.06211): expert pruning from a clustering of the router, then optional Wanda pruning inside the kept experts.

Structured stage (no forward pass): d(e, f) = ||W_r[e] - W_r[f]||_2, the distance of two experts' router rows
(experts the router scores alike behave alike). Single-linkage agglomerative clustering (repeatedly join the two
clusters holding the closest pair of experts; ties: the lexicographically first pair) down to n clusters (per
DeepSeek group: n / n_group clusters in each group, so every group keeps the same count); each cluster keeps its
representative, the member whose weights (gate, up, down concatenated) are closest in L2 to the cluster's mean
weights (ties: lower index). The representative keeps its own router row: plain pruning.

Unstructured stage (``unstructured_sparsity`` s > 0): Wanda on every kept expert's matrices: metric
M_ij = |W_ij| * ||X_j||_2 with ||X_j||^2 the sum over the calibration tokens routed to the expert of the squared
input feature j (the MoE input for gate/up, statistic ``expert_input_sq``; the activation feeding down_proj for
down, ``expert_act_sq``); in every output row the floor(s * n_in) entries with the smallest metric are set to
zero (ties: lower index first). Zeros are written in place: the checkpoint does not shrink; plan info reports
the measured fraction of zeros of the kept experts' matrices.
"""

from __future__ import annotations

import torch
from pydantic import Field

from moe_compress.methods.base import LayerContext, LayerPlan, Method, Params, register
from moe_compress.methods.pruning.base import check_target, rounded
from moe_compress.models.layer import ExpertWeights, MoELayer
from moe_compress.models.surgery import keep_set


def router_distances(router_weight: torch.Tensor) -> torch.Tensor:
    """Router rows [E, H] -> pairwise L2 distances [E, E] fp64."""
    w = router_weight.detach().double()
    return torch.cdist(w, w)


def single_linkage(dist: torch.Tensor, n_clusters: int) -> list[list[int]]:
    """Agglomerative single-linkage clustering of a distance matrix [n, n] into ``n_clusters`` clusters (lists of
    indices, sorted, ordered by their smallest member). Each step joins the two clusters whose closest members are
    nearest (ties: smallest (i, j) pair)."""
    n = dist.shape[0]
    label = list(range(n))
    pairs = sorted((float(dist[i, j]), i, j) for i in range(n) for j in range(i + 1, n))
    clusters = n
    for _, i, j in pairs:
        if clusters <= n_clusters:
            break
        a, b = label[i], label[j]
        if a == b:
            continue
        lo, hi = min(a, b), max(a, b)
        label = [lo if c == hi else c for c in label]
        clusters -= 1
    groups: dict[int, list[int]] = {}
    for e, c in enumerate(label):
        groups.setdefault(c, []).append(e)
    return sorted(groups.values(), key=lambda g: g[0])


def flat_weights(w: ExpertWeights) -> torch.Tensor:
    """[E, I*H + I*H + H*I] fp64: each expert's gate, up and down matrices concatenated."""
    n = w.n_experts
    return torch.cat([w.gate.detach().reshape(n, -1), w.up.detach().reshape(n, -1),
                      w.down.detach().reshape(n, -1)], dim=1).double()


def representatives(layer: MoELayer, clusters: list[list[int]]) -> list[int]:
    """Per cluster, the member closest (L2) to the mean of the members' flattened weights (ties: lower index)."""
    flat = flat_weights(layer.experts)
    reps = []
    for members in clusters:
        w = flat[members]
        d = torch.linalg.vector_norm(w - w.mean(dim=0, keepdim=True), dim=1)
        reps.append(members[int(torch.nonzero(d == d.min())[0])])
    return reps


def wanda_mask(weight: torch.Tensor, feature_sq: torch.Tensor, sparsity: float) -> torch.Tensor:
    """weight [E', out, in], feature_sq [E', in] (sum of squared inputs) -> bool [E', out, in], True = set to zero:
    per row the floor(sparsity * in) entries with the smallest |W| * sqrt(feature_sq) (stable: ties by index)."""
    metric = weight.detach().abs().double() * feature_sq.double().clamp(min=0).sqrt()[:, None, :]
    n_in = weight.shape[-1]
    n_zero = int(sparsity * n_in)
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if n_zero:
        order = torch.sort(metric, dim=-1, stable=True).indices[..., :n_zero]
        mask.scatter_(-1, order, True)
    return mask


@register
class STUNPruning(Method):
    name = "stun"
    kind = "prune"
    summary = ("keep one representative per single-linkage cluster of router rows (no forward pass), then "
               "optionally Wanda-prune the kept experts' weights to unstructured_sparsity (STUN)")
    needs_data = False  # the expert stage reads weights only; unstructured_sparsity > 0 needs calibration data

    class Params(Params):
        unstructured_sparsity: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of each kept matrix row set to 0

    params: Params

    def __init__(self, **params):
        super().__init__(**params)
        if self.params.unstructured_sparsity > 0:
            self.needs = frozenset({"expert_input_sq", "expert_act_sq"})
            self.needs_data = True

    def plan(self, ctx: LayerContext) -> LayerPlan:
        check_target(ctx)
        layer = ctx.layer
        n, n_group = layer.n_experts, max(layer.rule.n_group, 1)
        per_group, quota = n // n_group, ctx.n_experts // n_group
        dist = router_distances(layer.router_weight)
        clusters = []
        for g in range(n_group):
            members = list(range(g * per_group, (g + 1) * per_group))
            sub = single_linkage(dist[members][:, members], quota)
            clusters += [[members[i] for i in c] for c in sub]
        reps = representatives(layer, clusters)
        kept = sorted(reps)
        expert_set = keep_set(layer, kept)
        info = {"kept": kept, "clusters": [c for _, c in sorted(zip(reps, clusters))],
                "representatives": [r for r in sorted(reps)]}
        s = self.params.unstructured_sparsity
        if s > 0:
            info["unstructured"] = self._wanda(ctx, expert_set, kept, s)
        return LayerPlan(expert_set, info)

    def _wanda(self, ctx: LayerContext, expert_set, kept: list[int], s: float) -> dict:
        """Zero the kept experts' weights in place (``expert_set`` holds copies); returns the record."""
        idx = torch.tensor(kept, dtype=torch.long)
        x_sq = ctx.stats["expert_input_sq"].cpu()[idx]
        a_sq = ctx.stats["expert_act_sq"].cpu()[idx]
        w = expert_set.experts
        zeros, total = 0, 0
        with torch.no_grad():
            for name, feat in (("gate", x_sq), ("up", x_sq), ("down", a_sq)):
                t = getattr(w, name)
                mask = wanda_mask(t.cpu(), feat, s).to(t.device)
                t.masked_fill_(mask, 0)
                zeros += int((t == 0).sum())
                total += t.numel()
        never = [e for e in kept if float(ctx.stats["expert_input_sq"][e].sum()) == 0.0]
        return {"target": s, "measured": rounded([zeros / max(total, 1)])[0], "zeros": zeros, "weights": total,
                "never_routed": never,
                "note": "zeros written in place in gate/up/down of the kept experts; the checkpoint does not shrink"}
