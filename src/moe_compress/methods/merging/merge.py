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
Gram B^T B and U_r = B V_r Lambda_r^-1/2), take its eigendecomposition in fp64 (groups of equal size batched
into one ``torch.linalg.eigh``, on the weights' device), and project the frequency-weighted average. On one
H100 a Mixtral-8x7B layer 8 -> 4 at rank_ratio 0.5 takes 6.0 s this way (the issue's anchor for an SVD per group:
63 s), almost all of it in the dense eigendecompositions (docs/RESULTS.md, "Scale"). At full rank
(``rank_ratio=1``) the projection is the identity and Sub-MoE's merge IS the frequency-weighted average.
With whitening the truncation minimises the error on the calibration inputs instead of the Frobenius error.

Randomized route (``svd="randomized"``, optional): the top-r subspace of each Gram from randomized subspace
iteration (seeded Gaussian test matrix, r + p columns, q power iterations with CholeskyQR2, Rayleigh-Ritz on the
small l x l matrix; `_randomized_top_eig`), batched like the exact route. Its error is reported, not hidden: per
projection the reached ||B - U U^T B||_F / ||B||_F, a lower bound on the exact optimum and their ratio
(``info["svd_error"]``; the exact route reports its optimum there too). On a flat spectrum (random weights) the
truncation is near-optimal (1-3% more residual at q = 2 on a Mixtral layer), but the chosen subspace, and so the
merged weights, differ from the exact route's. With a gap after r it is equal to rounding. docs/RESULTS.md, "Scale".

Order inside Sub-MoE: gate and up first (inputs: the group's tokens x, augmented by 1 when biases exist),
then down, whose whitening inputs are the MERGED expert's activations act(gate_g x, up_g x) on those tokens
(what the merged down projection will really see).

Ranks: r = ceil(rank_ratio x min(out, in)) per projection. A standard checkpoint stores the truncated matrix
densely (same size), so truncation changes the weights, not the checkpoint size.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal, Sequence, cast, overload

import torch

from moe_compress.models.layer import Activation, ExpertWeights

Weighting = Literal["frequency", "uniform", "measured"]  # measured: oracle.measured_weights (merge_plan)
SvdMode = Literal["exact", "randomized"]
PowerPrecision = Literal["gram", "tf32", "bfloat16"]
RitzPrecision = Literal["gram", "tf32"]
WHITEN_DAMP = 1e-4  # C + damp * tr(C)/d * I: keeps the second moment positive definite
AVERAGE_CHUNK_ELEMENTS = 1 << 28  # experts' elements converted to float32 at once in `average` (1 GiB)


def group_weights(freq: torch.Tensor, groups: list[list[int]],
                  weighting: Weighting = "frequency") -> list[torch.Tensor]:
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


@overload
def average(t: torch.Tensor, groups: list[list[int]], weights: list[torch.Tensor]) -> torch.Tensor: ...
@overload
def average(t: None, groups: list[list[int]], weights: list[torch.Tensor]) -> None: ...
@overload
def average(t: torch.Tensor | None, groups: list[list[int]], weights: list[torch.Tensor]) -> torch.Tensor | None: ...


def average(t: torch.Tensor | None, groups: list[list[int]], weights: list[torch.Tensor]) -> torch.Tensor | None:
    """[E, ...] -> [k, ...] float32: sum_i w_i t_i per group (a member of weight 1 is copied exactly).

    Groups of equal size are averaged together as one batched weighted sum (no Python loop over experts),
    in chunks of at most `AVERAGE_CHUNK_ELEMENTS` gathered elements, so the float32 copy of a large layer
    (DeepSeek-V3: 256 x 2048 x 7168 per projection) is never materialised at once."""
    if t is None:
        return None
    t = t.detach()
    out = torch.empty((len(groups), *t.shape[1:]), dtype=torch.float32, device=t.device)
    by_size: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        by_size.setdefault(len(g), []).append(j)
    per_expert = max(1, t[0].numel()) if t.shape[0] else 1
    for n, js in by_size.items():
        if n == 1:  # exact copies for singletons (no rounding)
            idx = torch.tensor([groups[j][0] for j in js], device=t.device)
            out[torch.tensor(js, device=t.device)] = t.index_select(0, idx).float()
            continue
        step = max(1, AVERAGE_CHUNK_ELEMENTS // (n * per_expert))
        for s in range(0, len(js), step):
            part = js[s:s + step]
            idx = torch.tensor([groups[j] for j in part], device=t.device)                 # [b, n]
            w = torch.stack([weights[j] for j in part]).to(device=t.device, dtype=torch.float32)  # [b, n]
            members = t.index_select(0, idx.reshape(-1)).float().view(len(part), n, *t.shape[1:])
            w = w.view(len(part), n, *([1] * (t.dim() - 1)))
            out[torch.tensor(part, device=t.device)] = (members * w).sum(dim=1)
            del members
    return out


def frequency_average(w: ExpertWeights, groups: list[list[int]], weights: list[torch.Tensor]) -> ExpertWeights:
    """M-SMoE / HC-SMoE merge: every tensor (and bias) of a group averaged with the merge weights (float32)."""
    return w.map(lambda t: average(t, groups, weights))


def projection_rank(out_dim: int, in_dim: int, rank_ratio: float) -> int | None:
    """Kept rank of a projection [out, in]; None for no truncation (rank_ratio >= 1)."""
    if rank_ratio >= 1.0:
        return None
    return max(1, math.ceil(rank_ratio * min(out_dim, in_dim)))


def _damped(c: torch.Tensor) -> torch.Tensor:
    """C + damp * tr(C)/d * I for one [d, d] or a batch [..., d, d] of second moments."""
    d = c.shape[-1]
    scale = (c.diagonal(dim1=-2, dim2=-1).sum(-1) / d).clamp(min=1e-30)[..., None, None]
    return c + WHITEN_DAMP * scale * torch.eye(d, dtype=c.dtype, device=c.device)


GRAM_BATCH_ELEMENTS = 1 << 29  # members' elements (gram_dtype) stacked at once: 4 GiB in float64


def subspace_project(members: list[torch.Tensor], merged: torch.Tensor, rank: int | None,
                     moments: Sequence[torch.Tensor | None] | None = None,
                     gram_dtype: torch.dtype = torch.float64, *, svd: SvdMode = "exact",
                     oversample: int = 256, power_iters: int = 2, seed: int = 0,
                     errors: list[dict | None] | None = None, power_precision: PowerPrecision = "gram",
                     exact_tf32: bool = False, ritz_precision: RitzPrecision = "gram") -> torch.Tensor:
    """P_r^(g) M_g for every group g: the projection of the merged matrix on the top-``rank`` left singular
    vectors of the group's whitened concatenation B_g = [W_1 S | ... | W_n S].

    Fast path (equal, to rounding, to the paper's SVD route `joint_svd_merge_reference`): the groups are
    batched by size and by Gram side, with no Python loop over experts. Per batch either the [out, out] Gram
    sum_i W_i C W_i^T (when out <= n in) or the [n in, n in] Gram B^T B (then U_r = B V_r Lambda_r^-1/2),
    one batched ``torch.linalg.eigh``, and the projection U_r (U_r^T M), all on the tensors' device in
    ``gram_dtype``. Batches are cut to at most `GRAM_BATCH_ELEMENTS` stacked member elements (memory bound).

    Args:
        members: per group, its members' matrices [n_g, out, in].
        merged: [k, out, in] the merged (frequency-weighted) matrices M_g.
        rank: kept rank r (None: no truncation, returns ``merged``: P = I at full rank).
        moments: per group C_g [in, in] = E[x x^T] of the projection's inputs (whitening), or None (S = I).
        gram_dtype: precision of the Gram matrices and their eigendecomposition (float64: exact route).
        svd: ``"exact"`` (dense eigh of each Gram) or ``"randomized"`` (subspace iteration on the Gram for the
            top ``rank`` subspace, `_randomized_top_eig`; exact again when rank + oversample >= the Gram size).
        oversample, power_iters, seed: the randomized route's p, q and the seed of its Gaussian test matrix.
        errors: if a list is given, it is filled with one dict per group (randomized route only, else None):
            the a-posteriori error measures of `_randomized_top_eig`.
        power_precision: the randomized route's power-iteration products G Q: ``"gram"`` (in ``gram_dtype``),
            ``"tf32"`` or ``"bfloat16"`` (they only steer the subspace: the final orthonormalisation,
            Rayleigh-Ritz, projection and error measures stay in ``gram_dtype``).
        exact_tf32: the members' entries are bfloat16 values (so exact in TF32's 10-bit mantissa) and there is
            no whitening: the float32 Grams are formed with TF32 tensor-core products, which round nothing on
            the inputs and accumulate in fp32 (equal to the fp32 product up to summation order). Ignored for
            other ``gram_dtype``.
        ritz_precision: the randomized route's products after the power iterations (G Q of the last basis,
            Q^T G Q, the Ritz vectors, U = B V and the projection U (U^T M)): ``"gram"`` (in ``gram_dtype``) or
            ``"tf32"`` (TF32 tensor cores with fp32 accumulation; float32 ``gram_dtype`` only, else ignored).
            The last basis (CholeskyQR2) and the factorisations (Cholesky, eigh) stay in ``gram_dtype``; the
            error measures are then computed from TF32 products (about 1e-3 relative).
    Returns:
        [k, out, in] float32.
    """
    k, out_dim, in_dim = merged.shape
    if errors is not None:
        errors[:] = [None] * k
    if rank is None or rank >= out_dim:
        return merged.float()
    device = merged.device
    moments = moments if moments is not None else [None] * k
    result = torch.empty(k, out_dim, in_dim, dtype=torch.float32, device=device)
    # batches: same group size, same Gram side, same whitening presence
    batches: dict[tuple[int, bool, bool], list[int]] = {}
    for g in range(k):
        n = members[g].shape[0]
        batches.setdefault((n, out_dim <= n * in_dim, moments[g] is not None), []).append(g)
    for (n, out_side, white), gs in batches.items():
        per = max(1, GRAM_BATCH_ELEMENTS // (n * out_dim * in_dim))
        for s in range(0, len(gs), per):
            part = gs[s:s + per]
            w = torch.stack([members[g].to(device=device, dtype=gram_dtype) for g in part])  # [b, n, out, in]
            c = None
            if white:
                # white: every moment of this batch is set
                c = _damped(torch.stack([cast(torch.Tensor, moments[g]).to(device=device, dtype=gram_dtype)
                                         for g in part]))
            m = merged[part].to(gram_dtype)                                                    # [b, out, in]
            rnd = None
            if svd == "randomized":
                gen = torch.Generator(device=device).manual_seed(seed + 7919 * part[0])  # per batch, deterministic
                rnd = dict(oversample=oversample, power_iters=power_iters, generator=gen,
                           power_precision=power_precision, ritz_precision=ritz_precision)
            tf32_gram = exact_tf32 and not white and gram_dtype == torch.float32
            proj, err = _project_batch(w, m, rank, c, out_side, rnd, tf32_gram)
            result[part] = proj.float()
            if errors is not None and err is not None:
                for j, g in enumerate(part):
                    errors[g] = {key: float(v[j]) for key, v in err.items()}
            del w, c, m, proj
    return result


@contextlib.contextmanager
def _tf32(enabled: bool = True) -> Iterator[None]:
    """float32 matrix products on TF32 tensor cores inside the block (where the device has them)."""
    if not enabled:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _project_batch(w: torch.Tensor, m: torch.Tensor, rank: int, c: torch.Tensor | None,
                   out_side: bool, rnd: dict | None = None,
                   tf32_gram: bool = False) -> tuple[torch.Tensor, dict | None]:
    """w [b, n, out, in] members, m [b, out, in] merged, c [b, in, in] damped moments or None -> (U_r U_r^T m,
    per-matrix error measures of the randomized route or None). ``rnd``: None (exact eigh) or the randomized
    route's {oversample, power_iters, generator, power_precision, ritz_precision}. ``tf32_gram``: form the Gram
    with TF32 products (only when the entries are exact in TF32, see `subspace_project`)."""
    b, n, out_dim, in_dim = w.shape
    err = None
    ritz_tf32 = rnd is not None and rnd.get("ritz_precision") == "tf32" and w.dtype == torch.float32
    if out_side:
        # G = sum_i W_i C W_i^T [b, out, out]: one bmm contracting over (member, in)
        wc = w if c is None else w @ c[:, None]
        with _tf32(tf32_gram):
            gram = torch.bmm(wc.permute(0, 2, 1, 3).reshape(b, out_dim, n * in_dim),
                             w.permute(0, 2, 1, 3).reshape(b, out_dim, n * in_dim).transpose(1, 2))
        del wc
        if rnd is None:
            lam, vecs = torch.linalg.eigh(gram)              # ascending eigenvalues
            u = vecs[..., -rank:]                            # [b, out, r]
            err = _exact_error(gram, lam, rank)
            del lam, vecs
        else:
            theta, u, gv, err = _randomized_top_eig(gram, rank, **rnd)
            err["residual_rel"] = _residual_rel(err.pop("trace"), theta.sum(-1))  # U = V: ||U^T B||^2 = sum theta
            del gv
        del gram
    else:
        if c is not None:
            w = w @ torch.linalg.cholesky(c)[:, None]        # W_i S
        bmat = w.permute(0, 2, 1, 3).reshape(b, out_dim, n * in_dim)  # B = [W_1 S | ... | W_n S]
        with _tf32(tf32_gram and c is None):
            gram = bmat.transpose(1, 2) @ bmat
        if rnd is None:
            lam, v = torch.linalg.eigh(gram)
            err = _exact_error(gram, lam, rank)
            lam, v = lam[..., -rank:], v[..., -rank:]
        else:
            lam, v, gv, err = _randomized_top_eig(gram, rank, **rnd)
            # U = B V theta^-1/2 is orthonormal (V^T G V = diag theta after Rayleigh-Ritz);
            # ||U^T B||_F^2 = sum_i ||G v_i||^2 / theta_i >= sum_i theta_i
            kept = (gv.square().sum(-2) / lam.clamp(min=torch.finfo(lam.dtype).tiny)).sum(-1)
            err["residual_rel"] = _residual_rel(err.pop("trace"), kept)
            del gv
        del gram
        keep = lam > lam[..., -1:].clamp(min=0) * 1e-13
        with _tf32(ritz_tf32):
            bv = bmat @ v
        u = bv / lam.clamp(min=torch.finfo(lam.dtype).tiny).sqrt()[:, None, :] * keep[:, None, :]
        del bv
    with _tf32(ritz_tf32):
        return u @ (u.transpose(1, 2) @ m), err


def _exact_error(gram: torch.Tensor, lam: torch.Tensor, rank: int) -> dict:
    """The exact route's truncation error (the optimum): sqrt(sum_{i>r} lambda_i / tr G) per matrix."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    opt = _residual_rel(trace, lam[..., -rank:].sum(-1))
    zero = torch.zeros_like(opt)
    return {"residual_rel": opt, "optimal_residual_rel_lower": opt, "ritz_residual": zero, "complement_max": zero}


def _residual_rel(trace: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """sqrt(max(0, ||B||^2 - ||U^T B||^2) / ||B||^2): the relative Frobenius error ||B - U U^T B||_F / ||B||_F."""
    return ((trace - kept).clamp(min=0) / trace.clamp(min=torch.finfo(trace.dtype).tiny)).sqrt()


def _orth(y: torch.Tensor, rounds: int = 2, tf32_rounds: int = 0) -> torch.Tensor:
    """Orthonormal basis of the columns of a batch y [b, d, l]: CholeskyQR2 (two rounds of Y^T Y = R^T R,
    Q = Y R^-1: matmuls and a triangular solve, much faster than Householder QR on the GPU), falling back to
    Householder QR (`torch.linalg.qr`) where a Cholesky factorisation breaks down (ill-conditioned Y).
    ``rounds=1``: CholeskyQR (orthonormal to about cond(Y)^2 eps: enough for a basis that only steers).
    ``tf32_rounds``: the first that many rounds run on TF32 tensor cores (float32 only): Y^T Y, and Q = Y R^-1
    as a product with the triangular inverse (R^-1 from one small [l, l] solve) instead of a triangular solve
    with Y; about TF32 rounding (1e-3 relative) times cond(Y) away from orthonormal: for bases that only
    steer."""
    q = y
    for i in range(rounds):
        low = i < tf32_rounds and q.dtype == torch.float32
        with _tf32(low):
            qtq = q.transpose(1, 2) @ q
        r, info = torch.linalg.cholesky_ex(qtq, upper=True)
        del qtq
        if bool((info != 0).any()):
            return torch.linalg.qr(y)[0]
        if low:
            eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)
            r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
            with _tf32():
                q = q @ r_inv
            del r_inv
        else:
            q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    if not bool(torch.isfinite(q).all()):
        return torch.linalg.qr(y)[0]
    return q


COMPLEMENT_VECTORS, COMPLEMENT_ITERS = 8, 10  # power iteration estimating the largest missed eigenvalue


def _power_product(gram: torch.Tensor, gram_low: torch.Tensor | None, q: torch.Tensor,
                   precision: PowerPrecision) -> torch.Tensor:
    """G Q for one power iteration, in the requested precision, returned in G's dtype."""
    if precision == "bfloat16" and gram_low is not None:
        return torch.bmm(gram_low, q.to(torch.bfloat16)).to(gram.dtype)
    with _tf32(precision == "tf32" and gram.dtype == torch.float32):
        return torch.bmm(gram, q)


def _randomized_top_eig(gram: torch.Tensor, rank: int, *, oversample: int, power_iters: int,
                        generator: torch.Generator, power_precision: PowerPrecision = "gram",
                        ritz_precision: RitzPrecision = "gram",
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Top-``rank`` eigenpairs of a batch of PSD Grams G [b, d, d] by randomized subspace iteration
    (Halko-Martinsson-Tropp 2011, Alg. 4.4 on G = B B^T or B^T B, so q iterations on G are 2q on B):
    Omega [d, l] Gaussian (l = rank + oversample, from ``generator``), Y = G Omega, then ``power_iters`` times
    Q = orth(Y), Y = G Q; finally Q = orth(Y), Rayleigh-Ritz T = Q^T G Q (l x l), its top ``rank`` eigenpairs
    (theta_i, s_i) give the Ritz pairs (theta_i, v_i = Q s_i). Everything batched over b, in G's dtype;
    orth = CholeskyQR2 (`_orth`). When l >= d the dense eigh is taken (exact). With ``power_precision``
    "tf32" / "bfloat16" the products G Omega and G Q of the iterations run in that precision (G rounded to
    bfloat16 once for the latter) and the intermediate bases are orthonormalised by one CholeskyQR round; the
    last basis (CholeskyQR2), G Q, Rayleigh-Ritz and every error measure below stay in G's dtype, so the
    measures are those of the subspace actually returned. The intermediate CholeskyQR rounds then run on TF32
    tensor cores (`_orth`). With ``ritz_precision="tf32"`` (float32 G) G Q of the last basis, Q^T G Q and the
    Ritz vectors V = Q S, G V use TF32 products (fp32 accumulation); the last basis (float32 CholeskyQR2),
    Cholesky and eigh stay float32, and the measures are computed from those products (their relative accuracy
    is then about 1e-3, not fp32 rounding).

    Returns (theta [b, r] ascending, V [b, d, r], G V [b, d, r], error measures per matrix [b]):
        trace: tr G = ||B||_F^2 (used by the caller for the achieved residual),
        ritz_residual: max_i rho_i / theta_max, rho_i = ||G v_i - theta_i v_i||, over the kept pairs (0 for an
            exactly invariant subspace; by Kahan's theorem each theta_i lies within rho_i of an eigenvalue),
        complement_max: c / theta_max, c = the largest eigenvalue of G on the orthogonal complement of the kept
            V, estimated by `COMPLEMENT_ITERS` block power iterations (`COMPLEMENT_VECTORS` vectors, seeded),
        optimal_residual_rel_lower: sqrt(max(0, tr G - sum_i max(theta_i, c) - sum_i rho_i) / tr G), a lower
            bound of the exact rank-r optimum's relative Frobenius error ||B - B_r||_F / ||B||_F. Derivation: in
            the basis [V, V_perp], G = diag(T_r, C) + F with T_r = diag(theta), C the complement block and F the
            off-diagonal part, whose blocks are E = (I - V V^T) G V (columns G v_i - theta_i v_i, norms rho_i);
            Ky Fan: sum_{i<=r} lambda_i(G) <= sum_{i<=r} lambda_i(diag(T_r, C)) + sum_{i<=r} sigma_i(E)
            <= sum_i max(theta_i, lambda_max(C)) + sum_i rho_i. Rigorous when c >= lambda_max(C); c comes from
            power iteration (a lower estimate of lambda_max(C), accurate to a few percent after 10 iterations).
    """
    b, d, _ = gram.shape
    l = min(d, rank + max(0, oversample))
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    if l >= d:  # nothing to gain: exact
        lam, v = torch.linalg.eigh(gram)
        lam, v = lam[..., -rank:], v[..., -rank:]
        gv = v * lam[:, None, :]
        zero = torch.zeros(b, dtype=gram.dtype, device=gram.device)
        tail = _residual_rel(trace, lam.sum(-1))
        return lam, v, gv, {"trace": trace, "ritz_residual": zero, "complement_max": zero,
                            "optimal_residual_rel_lower": tail}
    omega = torch.randn(b, d, l, generator=generator, device=gram.device, dtype=torch.float32).to(gram.dtype)
    low = power_precision != "gram"
    fast = ritz_precision == "tf32" and gram.dtype == torch.float32
    gram_low = gram.to(torch.bfloat16) if power_precision == "bfloat16" else None
    y = _power_product(gram, gram_low, omega, power_precision)
    del omega
    for _ in range(max(0, power_iters)):
        y = _power_product(gram, gram_low, _orth(y, rounds=1 if low else 2, tf32_rounds=int(low)), power_precision)
    del gram_low
    q = _orth(y)
    del y
    with _tf32(fast):
        gq = torch.bmm(gram, q)                              # [b, d, l]
        t = q.transpose(1, 2) @ gq
    theta, s = torch.linalg.eigh((t + t.transpose(1, 2)) / 2)
    theta, s = theta[..., -rank:], s[..., -rank:]
    with _tf32(fast):
        v, gv = q @ s, gq @ s
    del q, gq, t, s
    rho = (gv - v * theta[:, None, :]).norm(dim=-2)           # [b, r] Ritz residual norms
    # largest eigenvalue of G on the complement of span(V): block power iteration on P G P, P = I - V V^T
    x = torch.randn(b, d, COMPLEMENT_VECTORS, generator=generator, device=gram.device,
                    dtype=torch.float32).to(gram.dtype)
    for _ in range(COMPLEMENT_ITERS):
        x = x - v @ (v.transpose(1, 2) @ x)
        x = torch.linalg.qr(x)[0]
        x = torch.bmm(gram, x)
    x = x - v @ (v.transpose(1, 2) @ x)
    xq = torch.linalg.qr(x)[0]
    c = torch.linalg.eigvalsh(xq.transpose(1, 2) @ torch.bmm(gram, xq))[..., -1].clamp(min=0)  # [b]
    top = theta[..., -1].clamp(min=torch.finfo(theta.dtype).tiny)
    lower = _residual_rel(trace, torch.maximum(theta, c[:, None]).sum(-1) + rho.sum(-1))
    return theta, v, gv, {"trace": trace, "ritz_residual": (rho.amax(-1) / top), "complement_max": c / top,
                          "optimal_residual_rel_lower": lower}


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


def _worst(errors: list[dict | None]) -> dict | str:
    """The randomized route's error measures over a projection's groups: the worst group of each.

    residual_rel: max_g ||B_g - U U^T B_g||_F / ||B_g||_F (achieved); optimal_residual_rel_lower: its estimated
    lower bound for the exact optimum (same group as the worst excess); excess_ratio: max_g residual_rel /
    optimal_residual_rel_lower (>= 1; 1 = as good as the exact truncated SVD); ritz_residual: max_g."""
    errs = [e for e in errors if e is not None]
    if not errs:
        return "full"  # not truncated (rank >= out)
    ratio = lambda e: e["residual_rel"] / max(e["optimal_residual_rel_lower"], 1e-300)  # noqa: E731
    worst = max(errs, key=ratio)
    return {"residual_rel": max(e["residual_rel"] for e in errs),
            "optimal_residual_rel_lower": worst["optimal_residual_rel_lower"],
            "excess_ratio": ratio(worst) if worst["residual_rel"] > 0 else 1.0,
            "ritz_residual": max(e["ritz_residual"] for e in errs),
            "complement_max": max(e["complement_max"] for e in errs)}


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
                 gram_dtype: torch.dtype = torch.float64, svd: SvdMode = "exact", oversample: int = 256,
                 power_iters: int = 2, seed: int = 0,
                 power_precision: PowerPrecision = "gram",
                 ritz_precision: RitzPrecision = "gram") -> tuple[ExpertWeights, dict]:
    """Sub-MoE merge of every group of a layer (see the module docstring for the math).

    Args:
        w: the layer's experts (gate/up [E, I, H], down [E, H, I], optional biases).
        groups, weights: the groups and their merge weights (`group_weights`).
        rank_ratio: kept rank / min(out, in) per projection; 1 = no truncation (the merge is then exactly the
            frequency-weighted average).
        whiten: whiten with the second moments of each group's calibration inputs (needs ``group_inputs``
            [t_g, H] per group and ``activation``).
        svd, oversample, power_iters, seed: ``"exact"`` (dense eigh per Gram) or ``"randomized"`` (randomized
            subspace iteration, `_randomized_top_eig`), its oversampling p, power iterations q and seed.
        power_precision, ritz_precision: the randomized route's precisions (`subspace_project`).
        With ``gram_dtype=float32`` and bfloat16 experts (unwhitened), the Grams are formed with TF32 products:
        bfloat16 entries are exact in TF32, so this is the fp32 product up to summation order.
    Returns:
        (merged experts [k, ...] float32, info {"ranks": {...}, "whiten": bool}; with truncation also "svd"
        {"mode", ...}, "svd_error" {projection: error measures of the worst group (`_worst`); on the exact
        route residual_rel is the optimum ||B - B_r||_F / ||B||_F itself} and "svd_residual_groups"
        {projection: [residual_rel of each group]}).
    """
    avg = frequency_average(w, groups, weights)
    inter, hidden = w.gate.shape[1], w.gate.shape[2]
    r_in = projection_rank(inter, hidden, rank_ratio)     # gate/up [I, H]
    r_down = projection_rank(hidden, inter, rank_ratio)   # down [H, I]
    info = {"ranks": {"gate": r_in or "full", "up": r_in or "full", "down": r_down or "full"},
            "max_rank": min(inter, hidden), "whiten": bool(whiten and (r_in is not None or r_down is not None))}
    if r_in is None and r_down is None:
        return avg, info
    k = len(groups)
    device = w.gate.device
    has_bias = w.gate_bias is not None
    xs: list[torch.Tensor] = []
    if whiten:
        if group_inputs is None or activation is None:
            raise ValueError("whitened Sub-MoE needs the group inputs and the activation")
        xs = [x.to(device) for x in group_inputs]

    def pick(t: torch.Tensor, g: list[int]) -> torch.Tensor:
        # in the experts' own dtype: `subspace_project` casts one batch of groups at a time to gram_dtype (all of
        # a DeepSeek-V3 layer's experts in float64 at once would be 90 GB)
        return t.detach()[g]

    def pick_bias(b: torch.Tensor | None, g: list[int]) -> torch.Tensor | None:
        return None if b is None else pick(b, g)

    # gate and up: one batch of 2k projections sharing the input moment of their group
    in_moments: Sequence[torch.Tensor | None] | None = [_moment(x, has_bias) for x in xs] * 2 if whiten else None
    members = [_augment(pick(w.gate, g), pick_bias(w.gate_bias, g)) for g in groups]
    members += [_augment(pick(w.up, g), pick_bias(w.up_bias, g)) for g in groups]
    merged = torch.cat([_augment(avg.gate, avg.gate_bias), _augment(avg.up, avg.up_bias)])
    def bf16_exact(*ts: torch.Tensor | None) -> bool:
        return all(t is None or t.dtype == torch.bfloat16 for t in ts)

    errs_in: list[dict | None] = []
    proj = subspace_project(members, merged, r_in, in_moments, gram_dtype, seed=seed, errors=errs_in, svd=svd,
                            oversample=oversample, power_iters=power_iters, power_precision=power_precision,
                            exact_tf32=bf16_exact(w.gate, w.up, w.gate_bias, w.up_bias),
                            ritz_precision=ritz_precision)
    gate, up = proj[:k], proj[k:]
    gate_b = up_b = None
    if has_bias:
        gate, gate_b, up, up_b = gate[..., :-1], gate[..., -1], up[..., :-1], up[..., -1]

    # down: whitened by the merged expert's own activations on the group's tokens
    down_moments: list[torch.Tensor | None] | None = None
    if whiten:
        assert activation is not None  # checked above
        down_moments = []
        for j, x in enumerate(xs):
            xf = x.float()
            g_pre = xf @ gate[j].T + (0 if gate_b is None else gate_b[j])
            u_pre = xf @ up[j].T + (0 if up_b is None else up_b[j])
            down_moments.append(_moment(activation(g_pre, u_pre), w.down_bias is not None))
    members = [_augment(pick(w.down, g), pick_bias(w.down_bias, g)) for g in groups]
    errs_down: list[dict | None] = []
    down = subspace_project(members, _augment(avg.down, avg.down_bias), r_down, down_moments, gram_dtype,
                            seed=seed + 1, errors=errs_down, svd=svd, oversample=oversample,
                            power_iters=power_iters, power_precision=power_precision,
                            exact_tf32=bf16_exact(w.down, w.down_bias), ritz_precision=ritz_precision)
    info["svd"] = ({"mode": "randomized", "oversample": oversample, "power_iters": power_iters, "seed": seed,
                    "power_precision": power_precision, "ritz_precision": ritz_precision}
                   if svd == "randomized" else {"mode": "exact"})
    info["svd_error"] = {name: _worst(e) for name, e in
                         (("gate", errs_in[:k]), ("up", errs_in[k:]), ("down", errs_down))}
    # per group (None: not truncated): the reached residual_rel, to compare routes group by group
    info["svd_residual_groups"] = {name: [None if x is None else x["residual_rel"] for x in e] for name, e in
                                   (("gate", errs_in[:k]), ("up", errs_in[k:]), ("down", errs_down))}
    down_b = None
    if w.down_bias is not None:
        down, down_b = down[..., :-1], down[..., -1]
    return ExpertWeights(gate.contiguous(), up.contiguous(), down.contiguous(),
                         None if gate_b is None else gate_b.contiguous(),
                         None if up_b is None else up_b.contiguous(),
                         None if down_b is None else down_b.contiguous()), info
