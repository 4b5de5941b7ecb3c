"""Permutation alignment of gated (SwiGLU) experts before merging: weight matching of intermediate neurons.

The I intermediate neurons of an expert can be permuted without changing its function, as long as the rows of
gate and up (and their biases) and the columns of down move together. Two experts trained separately have no
reason to number their neurons alike, so averaging them neuron by neuron mixes unrelated neurons. Alignment
(Git Re-Basin weight matching, as in M-SMoE, here for gated FFNs) permutes each group member to its group's
reference expert (the member with the largest merge weight):

    perm = argmax_P  sum_a <phi_ref(a), phi_m(P(a))>,   phi_e(a) = [gate_e[a, :], up_e[a, :], down_e[:, a],
                                                                    gate_bias_e[a], up_bias_e[a]]

solved exactly by the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`) on the [I, I] matrix of
inner products (fp32 or better). Permuting is exact: every expert computes the same function after alignment.
"""

from __future__ import annotations

import torch

from moe_compress.models.layer import ExpertWeights


def neuron_features(w: ExpertWeights, e: int) -> torch.Tensor:
    """[I, 3H (+2)] per-neuron weight vector of expert e (float32)."""
    parts = [w.gate[e], w.up[e], w.down[e].T]
    parts += [b[e][:, None] for b in (w.gate_bias, w.up_bias) if b is not None]
    return torch.cat([p.detach().float() for p in parts], dim=1)


def neuron_permutation(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """perm [I] int64 maximising sum_a <ref[a], other[perm[a]]> (ref, other: [I, D] neuron features)."""
    from scipy.optimize import linear_sum_assignment

    score = (ref @ other.T).double().cpu().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = torch.empty(ref.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def permute_expert(w: ExpertWeights, e: int, perm: torch.Tensor) -> None:
    """In place on ``w`` (which must own its tensors): neuron a of expert e becomes its old neuron perm[a]."""
    p = perm.to(w.gate.device)
    w.gate[e] = w.gate[e].index_select(0, p)
    w.up[e] = w.up[e].index_select(0, p)
    w.down[e] = w.down[e].index_select(1, p)
    for b in (w.gate_bias, w.up_bias):
        if b is not None:
            b[e] = b[e].index_select(0, p)


def align_groups(w: ExpertWeights, groups: list[list[int]], refs: list[int]) -> tuple[ExpertWeights, dict]:
    """A copy of ``w`` where every member of each group (except its reference ``refs[g]``) is permuted onto the
    reference. Returns (aligned weights, {expert: number of neurons moved}). Singleton groups are untouched."""
    touched = sorted({e for g in groups if len(g) > 1 for e in g})
    out = w.map(lambda t: t.detach().clone())
    moved: dict[int, int] = {}
    if not touched:
        return out, moved
    for group, ref in zip(groups, refs):
        if len(group) < 2:
            continue
        ref_feat = neuron_features(out, ref)
        for e in group:
            if e == ref:
                continue
            perm = neuron_permutation(ref_feat, neuron_features(out, e))
            moved[e] = int((perm != torch.arange(perm.numel())).sum())
            permute_expert(out, e, perm)
    return out, moved
