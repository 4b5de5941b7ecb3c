"""Merging a group of experts into one: frequency-weighted averaging and Sub-MoE's joint-SVD subspace merge.

Merge weights. A group g of experts i with calibration frequencies F_i (tokens whose top-k holds i) merges with
w_i = F_i / sum_{j in g} F_j (``weighting="frequency"``; uniform if the group was never selected) or
w_i = 1/|g| (``weighting="uniform"``). Every tensor of an expert, biases included (GPT-OSS gate/up/down
biases), is merged with the same w_i: merging is done per projection on the affine map [W | b].

Frequency-weighted average (M-SMoE, HC-SMoE):  W_g = sum_i w_i W_i  for gate, up, down and the biases.

Sub-MoE (arXiv 2506.23266), per projection W_i [out, in] of the group (gate/up: [I, H], down: [H, I]):
concatenate the members along the INPUT axis, B = [W_1 S | ... | W_n S] [out, n in], and take its SVD
B = U Sigma [V_1^T | ... | V_n^T]: U [out, R] is the basis SHARED by the group and lives on each projection's
OUTPUT side; V_i [in, R] is expert-specific. The merged projection is U_r Sigma_r (sum_i w_i V_i)_r^T S^-1.
Which axis is shared, and why: for down [H, I] the output side is the hidden space H, the same residual-stream
coordinates for every expert, so a shared U is a meaningful common basis and the expert-specific factor sits on
the expert-private neuron axis I. For gate/up [I, H] the output side is the neuron axis I; sharing U there
presumes the members' neurons correspond, which is exactly what permutation alignment (`align.py`) provides;
without alignment the shared basis is a joint basis of unaligned neuron coordinates. We follow the paper
(output side shared for every projection). S is the identity, or (``whiten``, Sub-MoE-dagger, SVD-LLM) a
factor with S S^T = C, C = E[x x^T] over the group's calibration inputs of that projection.

The Sub-MoE identity (exact, checked in tests): because W_i S = U Sigma V_i^T,
    U Sigma (sum_i w_i V_i)^T S^-1 = sum_i w_i W_i                       (full rank),
    U_r Sigma_r (sum_i w_i V_i)_r^T S^-1 = U_r U_r^T sum_i w_i W_i = P_r sum_i w_i W_i   (rank r),
with U_r the top-r left singular vectors of B, i.e. the top-r eigenvectors of B B^T = sum_i W_i C W_i^T. So
the merge never needs V: we form the [out, out] Gram sum_i W_i C W_i^T (or, when n in < out, the [n in, n in]
Gram B^T B and U_r = B V_r Lambda_r^-1/2), take its eigendecomposition in fp64 (batched over the groups of a
layer, ~13x faster than an SVD on GPU), and project the frequency-weighted average. At full rank
(``rank_ratio=1``) the projection is the identity and Sub-MoE's merge IS the frequency-weighted average.
With whitening the truncation minimises the error on the calibration inputs instead of the Frobenius error.

Order inside Sub-MoE: gate and up first (inputs: the group's tokens x, augmented by 1 when biases exist),
then down, whose whitening inputs are the MERGED expert's activations act(gate_g x, up_g x) on those tokens
(what the merged down projection will really see).

Ranks: r = ceil(rank_ratio x min(out, in)) per projection. A standard checkpoint stores the truncated matrix
densely (same size), so truncation changes the weights, not the checkpoint size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from moe_compress.models.layer import Activation, ExpertWeights

Weighting = Literal["frequency", "uniform"]
WHITEN_DAMP = 1e-4  # C + damp * tr(C)/d * I: keeps the second moment positive definite


def group_weights(freq: torch.Tensor, groups: list[list[int]], weighting: Weighting = "frequency") -> list[torch.Tensor]:
    """Merge weights per group (float64, each summing to 1): w_i = F_i / sum_g F, or uniform."""
    f = freq.detach().double().cpu().clamp(min=0.0)
    out = []
    for g in groups:
        fg = f[g]
        if weighting == "uniform" or not float(fg.sum()) > 0.0:
            out.append(torch.full((len(g),), 1.0 / len(g), dtype=torch.float64))
        else:
            out.append(fg / fg.sum())
    return out


def _assignment(groups: list[list[int]], weights: list[torch.Tensor], n_experts: int, device) -> torch.Tensor:
    """[k, E] float32 matrix A with A[g, i] = w_i for i in group g."""
    a = torch.zeros(len(groups), n_experts, dtype=torch.float64)
    for j, (g, w) in enumerate(zip(groups, weights)):
        a[j, g] = w
    return a.to(device=device, dtype=torch.float32)


def average(t: torch.Tensor | None, groups: list[list[int]], weights: list[torch.Tensor]) -> torch.Tensor | None:
    """[E, ...] -> [k, ...] float32: sum_i w_i t_i per group (a member of weight 1 is copied exactly)."""
    if t is None:
        return None
    a = _assignment(groups, weights, t.shape[0], t.device)
    out = torch.einsum("ge,e...->g...", a, t.detach().float())
    for j, w in enumerate(weights):  # exact copies for singletons (no rounding through the einsum)
        if len(groups[j]) == 1:
            out[j] = t[groups[j][0]].detach().float()
    return out


def frequency_average(w: ExpertWeights, groups: list[list[int]], weights: list[torch.Tensor]) -> ExpertWeights:
    """M-SMoE / HC-SMoE merge: every tensor (and bias) of a group averaged with the merge weights (float32)."""
    return ExpertWeights(*(average(t, groups, weights)
                           for t in (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)))


def projection_rank(out_dim: int, in_dim: int, rank_ratio: float) -> int | None:
    """Kept rank of a projection [out, in]; None for no truncation (rank_ratio >= 1)."""
    if rank_ratio >= 1.0:
        return None
    return max(1, math.ceil(rank_ratio * min(out_dim, in_dim)))


def _damped(c: torch.Tensor) -> torch.Tensor:
    d = c.shape[-1]
    return c + WHITEN_DAMP * (c.diagonal().sum() / d).clamp(min=1e-30) * torch.eye(d, dtype=c.dtype, device=c.device)


def subspace_project(members: list[torch.Tensor], merged: torch.Tensor, rank: int | None,
                     moments: list[torch.Tensor | None] | None = None,
                     gram_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """P_r^(g) M_g for every group g: the projection of the merged matrix on the top-``rank`` left singular
    vectors of the group's whitened concatenation B_g = [W_1 S | ... | W_n S].

    Args:
        members: per group, its members' matrices [n_g, out, in].
        merged: [k, out, in] the merged (frequency-weighted) matrices M_g.
        rank: kept rank r (None: no truncation, returns ``merged``).
        moments: per group C_g [in, in] = E[x x^T] of the projection's inputs (whitening), or None (S = I).
    Returns:
        [k, out, in] float32.
    """
    if rank is None:
        return merged.float()
    k, out_dim, in_dim = merged.shape
    if rank >= out_dim:
        return merged.float()
    device = merged.device
    moments = moments if moments is not None else [None] * k
    result = torch.empty(k, out_dim, in_dim, dtype=torch.float32, device=device)
    out_side = [g for g in range(k) if out_dim <= members[g].shape[0] * in_dim]
    # [out, out] Grams sum_i W_i C W_i^T, batched over every group that uses this side
    if out_side:
        grams = []
        for g in out_side:
            w = members[g].to(gram_dtype)
            c = moments[g]
            wc = w if c is None else w @ _damped(c.to(device=device, dtype=gram_dtype))
            grams.append(torch.einsum("noi,npi->op", wc, w))
        _, vecs = torch.linalg.eigh(torch.stack(grams))       # ascending eigenvalues
        u = vecs[..., -rank:]                                  # [b, out, r]
        m = merged[out_side].to(gram_dtype)
        result[out_side] = (u @ (u.transpose(1, 2) @ m)).float()
    # [n in, n in] Grams B^T B for small groups of tall projections, batched by group size
    by_size: dict[int, list[int]] = {}
    for g in range(k):
        if g not in out_side:
            by_size.setdefault(members[g].shape[0], []).append(g)
    for size, gs in by_size.items():
        bs = []
        for g in gs:
            w = members[g].to(gram_dtype)
            c = moments[g]
            if c is not None:
                s = torch.linalg.cholesky(_damped(c.to(device=device, dtype=gram_dtype)))
                w = w @ s
            bs.append(torch.cat(list(w), dim=1))              # [out, n in]
        b = torch.stack(bs)
        lam, v = torch.linalg.eigh(b.transpose(1, 2) @ b)
        lam, v = lam[..., -rank:], v[..., -rank:]
        keep = lam > lam[..., -1:].clamp(min=0) * 1e-13
        u = (b @ v) / lam.clamp(min=1e-300).sqrt()[:, None, :] * keep[:, None, :]
        m = merged[gs].to(gram_dtype)
        result[gs] = (u @ (u.transpose(1, 2) @ m)).float()
    return result


def joint_svd_merge_reference(w: torch.Tensor, weights: torch.Tensor, rank: int | None = None,
                              moment: torch.Tensor | None = None) -> torch.Tensor:
    """The Sub-MoE merge exactly as the paper states it (reference for tests, slow): w [n, out, in] -> [out, in].

    B = [W_1 S | ... | W_n S] = U Sigma [V_1^T | ... | V_n^T] (thin SVD, fp64); merged = U_r Sigma_r
    (sum_i weights_i V_i^T)_r S^-1, with S the Cholesky factor of the moment (S = I without whitening).
    """
    n, out_dim, in_dim = w.shape
    w = w.double()
    if moment is None:
        s = s_inv = torch.eye(in_dim, dtype=torch.float64, device=w.device)
    else:
        s = torch.linalg.cholesky(_damped(moment.double()))
        s_inv = torch.linalg.inv(s)
    b = torch.cat([w[i] @ s for i in range(n)], dim=1)
    u, sig, vh = torch.linalg.svd(b, full_matrices=False)     # vh [R, n in]
    vm = sum(float(weights[i]) * vh[:, i * in_dim:(i + 1) * in_dim] for i in range(n))  # [R, in]
    r = sig.numel() if rank is None else min(rank, sig.numel())
    return (u[:, :r] * sig[:r]) @ vm[:r] @ s_inv


def _augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[..., out, in] (+ bias [..., out]) -> [..., out, in (+1)]: the affine map as one matrix."""
    return w if b is None else torch.cat([w, b[..., None]], dim=-1)


def _moment(x: torch.Tensor, with_one: bool) -> torch.Tensor:
    """E[z z^T] (float64) of the rows of x [t, d], z = [x, 1] if ``with_one``."""
    x = x.double()
    if with_one:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    return (x.T @ x) / max(1, x.shape[0])


@torch.no_grad()
def submoe_merge(w: ExpertWeights, groups: list[list[int]], weights: list[torch.Tensor], *,
                 rank_ratio: float = 1.0, whiten: bool = False, group_inputs: list[torch.Tensor] | None = None,
                 activation: Activation | None = None,
                 gram_dtype: torch.dtype = torch.float64) -> tuple[ExpertWeights, dict]:
    """Sub-MoE merge of every group of a layer (see the module docstring for the math).

    Args:
        w: the layer's experts (gate/up [E, I, H], down [E, H, I], optional biases).
        groups, weights: the groups and their merge weights (`group_weights`).
        rank_ratio: kept rank / min(out, in) per projection; 1 = no truncation (the merge is then exactly the
            frequency-weighted average).
        whiten: whiten with the second moments of each group's calibration inputs (needs ``group_inputs``
            [t_g, H] per group and ``activation``).
    Returns:
        (merged experts [k, ...] float32, info {"ranks": {...}, "whiten": bool}).
    """
    avg = frequency_average(w, groups, weights)
    inter, hidden = w.gate.shape[1], w.gate.shape[2]
    r_in = projection_rank(inter, hidden, rank_ratio)     # gate/up [I, H]
    r_down = projection_rank(hidden, inter, rank_ratio)   # down [H, I]
    info = {"ranks": {"gate": r_in or "full", "up": r_in or "full", "down": r_down or "full"},
            "max_rank": min(inter, hidden), "whiten": bool(whiten and (r_in is not None or r_down is not None))}
    if r_in is None and r_down is None:
        return avg, info
    if whiten and (group_inputs is None or activation is None):
        raise ValueError("whitened Sub-MoE needs the group inputs and the activation")
    k = len(groups)
    device = w.gate.device
    has_bias = w.gate_bias is not None
    pick = lambda t, g: None if t is None else t.detach()[g].to(gram_dtype)  # noqa: E731
    xs = [None] * k if not whiten else [x.to(device) for x in group_inputs]

    # gate and up: one batch of 2k projections sharing the input moment of their group
    in_moments = [None] * k if not whiten else [_moment(x, has_bias) for x in xs]
    members = [_augment(pick(w.gate, g), pick(w.gate_bias, g)) for g in groups]
    members += [_augment(pick(w.up, g), pick(w.up_bias, g)) for g in groups]
    merged = torch.cat([_augment(avg.gate, avg.gate_bias), _augment(avg.up, avg.up_bias)])
    proj = subspace_project(members, merged, r_in, in_moments * 2 if whiten else None, gram_dtype)
    gate, up = proj[:k], proj[k:]
    gate_b = up_b = None
    if has_bias:
        gate, gate_b, up, up_b = gate[..., :-1], gate[..., -1], up[..., :-1], up[..., -1]

    # down: whitened by the merged expert's own activations on the group's tokens
    down_moments = None
    if whiten:
        down_moments = []
        for j, x in enumerate(xs):
            xf = x.float()
            g_pre = xf @ gate[j].T + (0 if gate_b is None else gate_b[j])
            u_pre = xf @ up[j].T + (0 if up_b is None else up_b[j])
            down_moments.append(_moment(activation(g_pre, u_pre), w.down_bias is not None))
    members = [_augment(pick(w.down, g), pick(w.down_bias, g)) for g in groups]
    down = subspace_project(members, _augment(avg.down, avg.down_bias), r_down, down_moments, gram_dtype)
    down_b = None
    if w.down_bias is not None:
        down, down_b = down[..., :-1], down[..., -1]
    return ExpertWeights(gate.contiguous(), up.contiguous(), down.contiguous(),
                         None if gate_b is None else gate_b.contiguous(),
                         None if up_b is None else up_b.contiguous(),
                         None if down_b is None else down_b.contiguous()), info
