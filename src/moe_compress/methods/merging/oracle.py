"""Oracle grouping: the partition chosen by the MEASURED error of the merged layer, not by a similarity proxy.

Every similarity-based grouping (router logits, output cosine, output means) is a proxy for what matters: how far
the merged block's routed output moves from the original's. This grouping measures that directly. Greedy
agglomeration from singletons: at each step every pair of current groups (within one DeepSeek routing group, and
only where that routing group still has more than its share k/G of groups) is tried as one merged expert, the
whole layer is rebuilt with the method's merge weights (frequency average, which is Sub-MoE's merge at full rank)
and router rule, and the pair whose merged layer has the lowest relative routed-output error

    err(P) = sum_t ||Y'_P(x_t) - Y(x_t)||^2 / sum_t ||Y(x_t)||^2

on an even subsample of the calibration inputs is merged. Y is the original block's routed output, Y'_P the merged
set's under its new router rows (`reconstruction.set_output`). (E - k) steps of at most C(E, 2) candidates each:
a diagnosis tool and an upper bound on what a better grouping can buy, not a cheap method. Greedy, so not the
global optimum; `exhaustive_groups` (tests, small E) enumerates every partition.
"""

from __future__ import annotations

from itertools import combinations

import torch

from moe_compress.methods.merging.merge import Weighting, frequency_average, group_weights
from moe_compress.methods.merging.router import RouterRule, adapt_router
from moe_compress.methods.reconstruction import even_subsample, original_output, relative_error, set_output
from moe_compress.models.layer import ExpertSet, MoELayer


def merged_error(layer: MoELayer, groups: list[list[int]], x: torch.Tensor, y: torch.Tensor, freq: torch.Tensor,
                 *, router: RouterRule = "freq_avg", weighting: Weighting = "frequency", tau: float = 1.0,
                 ridge: float = 1e-3, weights: list[torch.Tensor] | None = None) -> float:
    """err(P) of the partition ``groups`` (weighted average with ``weights``, default the ``weighting``
    weights; router rows by ``router``) on x [T, H] against the original routed output y [T, H].

    Evaluated in slot form: all E expert slots stay, every slot of a group holds the group's merged expert and
    only its first member's slot may be chosen (the others are masked out of the routing). That computes exactly
    what the reduced layer computes, and it also evaluates partitions whose DeepSeek routing groups hold unequal
    numbers of groups (the greedy search's intermediate steps), which a reduced layer could not route."""
    if weights is None:
        weights = group_weights(freq, groups, weighting)
    rows = adapt_router(layer, groups, weights, router, freq=freq, x=x, tau=tau, ridge=ridge)
    slot = torch.empty(layer.n_experts, dtype=torch.long)
    mask = torch.zeros(layer.n_experts, dtype=torch.bool)
    for j, g in enumerate(groups):
        slot[g] = j
        mask[min(g)] = True
    dev = layer.router_weight.device
    slot, mask = slot.to(dev), mask.to(dev)

    def spread(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, slot.to(t.device))

    s = ExpertSet(frequency_average(layer.experts, groups, weights).select(slot),
                  rows.weight.index_select(0, slot.to(rows.weight.device)), spread(rows.bias),
                  spread(rows.correction_bias))
    return relative_error(set_output(layer, s, x, mask), y)


@torch.no_grad()
def oracle_groups(layer: MoELayer, x: torch.Tensor, freq: torch.Tensor, k: int, *, n_tokens: int = 2048,
                  **rule) -> tuple[list[list[int]], dict]:
    """Greedy measured-error grouping of the layer's E experts into k groups (module docstring).

    Args:
        layer: the original MoE layer view.
        x: calibration MoE inputs [T, H] (an even subsample of ``n_tokens`` is used).
        freq: expert selection counts [E] (merge weights).
        k: groups wanted; with DeepSeek routing groups G, each routing group ends with k / G groups.
        rule: ``router``, ``weighting``, ``tau``, ``ridge`` of `merged_error`.
    Returns:
        (groups in routing-group order, each sorted; info with the error after each step).
    """
    n, g_count = layer.n_experts, max(1, layer.rule.n_group)
    if n % g_count or k % g_count or not 1 <= k <= n:
        raise ValueError(f"cannot group {n} experts into {k} groups with n_group={g_count}")
    per, k_per = n // g_count, k // g_count
    xs = even_subsample(x.to(layer.router_weight.device), n_tokens).float()
    y = original_output(layer, xs)
    groups = [[e] for e in range(n)]
    trajectory = []
    while len(groups) > k:
        count = [sum(1 for g in groups if g[0] // per == r) for r in range(g_count)]
        best: tuple[float, list[list[int]]] | None = None
        for a, b in combinations(range(len(groups)), 2):
            r = groups[a][0] // per
            if groups[b][0] // per != r or count[r] <= k_per:
                continue
            cand = sorted([g for j, g in enumerate(groups) if j not in (a, b)] + [sorted(groups[a] + groups[b])])
            err = merged_error(layer, cand, xs, y, freq, **rule)
            if best is None or err < best[0]:
                best = (err, cand)
        assert best is not None  # some routing group has more than k_per groups while len(groups) > k
        trajectory.append(round(best[0], 6))
        groups = best[1]
    return groups, {"oracle_tokens": int(xs.shape[0]), "oracle_errors": trajectory}


def partitions(items: list[int], k: int):
    """Every partition of ``items`` into exactly k non-empty blocks (blocks and their members in order)."""
    if k == 1:
        yield [list(items)]
        return
    if len(items) == k:
        yield [[i] for i in items]
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest, k - 1):  # first alone
        yield [[first]] + p
    for p in partitions(rest, k):      # first joins a block
        for j in range(k):
            yield [sorted([first] + b) if i == j else b for i, b in enumerate(p)]


def exhaustive_groups(layer: MoELayer, x: torch.Tensor, freq: torch.Tensor, k: int, **rule) -> tuple[list[list[int]],
                                                                                                      float]:
    """The partition of minimum err(P) over ALL partitions into k groups (no routing groups; small E only)."""
    xs = x.to(layer.router_weight.device).float()
    y = original_output(layer, xs)
    best = min(((merged_error(layer, sorted(p), xs, y, freq, **rule), sorted(p))
                for p in partitions(list(range(layer.n_experts)), k)), key=lambda t: t[0])
    return best[1], best[0]


BLEND_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def blend(w: torch.Tensor, t: float, anchor: int | None = None) -> torch.Tensor:
    """Merge weights moved from one member (t = 0: its weight 1, the others 0) to ``w`` (t = 1):
    (1 - t) e_d + t w; d = the position ``anchor`` in the group, else argmax w (ties: the first)."""
    out = w * t
    out[int(torch.argmax(w)) if anchor is None else anchor] += 1.0 - t
    return out


@torch.no_grad()
def measured_weights(layer: MoELayer, groups: list[list[int]], x: torch.Tensor, freq: torch.Tensor, *,
                     grid: tuple[float, ...] = BLEND_GRID, sweeps: int = 2, n_tokens: int = 2048,
                     router: RouterRule = "freq_avg", tau: float = 1.0, ridge: float = 1e-3,
                     anchors: list[int] | None = None) -> tuple[list[torch.Tensor], dict]:
    """Merge weights chosen by the measured layer error: per merged group, blend(w_freq, t) with t from ``grid``
    (t = 0 keeps the dominant member unchanged, i.e. prunes the others; t = 1 is the frequency average), by
    coordinate descent over the groups (``sweeps`` passes from the better of "every t = 1" and "every t = 0"; a
    group keeps its t unless another is strictly better). So on the measuring tokens the result is never worse
    than the frequency average nor than keeping only each group's dominant member (pruning). ``anchors``: the
    expert each group keeps at t = 0 (one per group, a member of it; default its most frequent member).
    Returns (weights per group, info: the chosen t, the errors of all-1, all-0 and the result)."""
    xs = even_subsample(x.to(layer.router_weight.device), n_tokens).float()
    y = original_output(layer, xs)
    base = group_weights(freq, groups, "frequency")
    ts = [1.0] * len(groups)
    if anchors is not None and (len(anchors) != len(groups) or any(a not in g for a, g in zip(anchors, groups))):
        raise ValueError(f"anchors {anchors} are not one member of each group {groups}")
    pos = [None] * len(groups) if anchors is None else [g.index(a) for a, g in zip(anchors, groups)]

    def weights_of(t_list: list[float]) -> list[torch.Tensor]:
        return [blend(w, t, a) for w, t, a in zip(base, t_list, pos)]

    def error(t_list: list[float]) -> float:
        return merged_error(layer, groups, xs, y, freq, router=router, tau=tau, ridge=ridge,
                            weights=weights_of(t_list))

    merged_all, pruned_all = error(ts), error([0.0] * len(groups))
    if pruned_all < merged_all:
        ts = [0.0] * len(groups)
    best = min(merged_all, pruned_all)
    for _ in range(sweeps):
        moved = False
        for j, g in enumerate(groups):
            if len(g) == 1:
                continue
            for t in grid:
                if t == ts[j]:
                    continue
                trial = ts[:j] + [t] + ts[j + 1:]
                err = error(trial)
                if err < best:
                    best, ts, moved = err, trial, True
        if not moved:
            break
    errors = {"average": round(merged_all, 6), "dominant": round(pruned_all, 6), "chosen": round(best, 6)}
    return weights_of(ts), {"blend": ts, "blend_error": errors,
                                                    "blend_tokens": int(xs.shape[0])}
