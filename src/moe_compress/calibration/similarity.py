"""Expert similarity statistics (observer plug-ins): what merging methods group experts by.

- ``output_similarity`` [E, E] (Sub-MoE): mean over a token subsample S of cos(f_e(x), f_f(x)), with f_e the
  output of expert e (no routing weight) and every expert run on every token of S.
- ``expert_output_mean`` [E, H] (HC-SMoE): mean over S of f_e(x).
- ``output_similarity_stderr`` [E, E], ``expert_output_mean_stderr`` [E, H]: the standard error of those two
  means as estimates of the mean over ALL T calibration tokens (see "Sampling error" below).
- ``router_similarity`` [E, E] (M-SMoE): cosine similarity of the router-logit columns over all calibration
  tokens, see `RouterSimilarity`.

The subsample S bounds the cost of running all E experts: option ``similarity_tokens`` (default 2048 per layer)
real tokens, chosen deterministically over the whole calibration set: with T real tokens numbered in batch order
(row-major within a batch, padding skipped), S holds the tokens numbered floor(i T / n) for i = 0..n-1 (all
tokens when n >= T); with option ``similarity_seed`` (an int) S is instead a uniformly random n-subset of the T
tokens drawn from that seed (`torch.randperm`, so the same seed gives the same S and the same statistics). The
runner passes T as the option ``total_tokens``; without it S is the first n real tokens. Option
``similarity_budget`` (a float, default None) bounds n further by the cost of the pass relative to the routed
forward: all E experts on n tokens cost (E / k) (n / T) of the routed experts' FLOPs over T tokens, so
n <= budget x T x k / E (at least 1; ignored without T). Example: budget 0.25 at T = 262144 gives Mixtral-8x7B
(E 8, k 2) 16384 tokens, Qwen3-30B-A3B (128, 8) 4096, DeepSeek-V3 (256, 8) 2048.

Sampling error: with c_t the per-token cosine (or output) and S a simple random sample of n of the T tokens,
the reported standard error is sqrt(s^2 / n x (1 - n / T)), s^2 = sum_{t in S} (c_t - mean)^2 / (n - 1) the
sample variance (0 for n = T: S is every token and the statistic exact; the finite-population factor is 1
without T; infinite for n = 1 < T). It is exact in expectation for ``similarity_seed`` sampling; for the
default even spacing (systematic sampling) it is the usual approximation, exact when the token order is random
and conservative when neighbouring tokens are alike.

All E experts on a chunk of c tokens run as batched matrix products ([c, H] @ [E, H, I]); c (`chunk_tokens`)
is the largest multiple of 64 with E x max(H, I) x c <= ``chunk_elements`` (2**28 by default), at least 128 (or
all the subsample when it is smaller): a multiple of 64 keeps the products on aligned tensor-core kernels (an odd
c such as 585 sent them to slow unaligned ones), and at least 128 tokens keep them compute-bound for large E (a
DeepSeek-V3 layer's 22 GB of experts are read once per chunk). The outputs are laid out [E, c, H], so the
per-token inner products <f_e(x), f_f(x)> of a chunk are one batched product over its c tokens ([c, E, H] @
[c, H, E], in the model's dtype with fp32 accumulation and output; fp32 for fp32 models) of the outputs as they
are: no normalised or fp32 copy of the outputs is made. Each product is divided by the two fp32 norms to give
the cosine, and the sums of the cosines and of their squares are kept in fp64. Measured in
bench/profile_merge_stats.py, bench/scale.py and docs/RESULTS.md ("Merge statistics").
"""

from __future__ import annotations

import torch

from moe_compress.calibration.observer_base import LayerObserver, register_observer
from moe_compress.models.layer import ExpertWeights, MoELayer

CHUNK_ELEMENTS = 2 ** 28
"""Default bound on E x max(H, I) x c, the elements of the largest intermediate of one chunk."""
MIN_CHUNK_TOKENS, CHUNK_ALIGN = 128, 64


def chunk_tokens(n_experts: int, hidden: int, inter: int, chunk_elements: int = CHUNK_ELEMENTS,
                 min_tokens: int = MIN_CHUNK_TOKENS) -> int:
    """Tokens per chunk of the all-experts pass (see the module docstring): the largest multiple of 64 within
    ``chunk_elements`` / (E x max(H, I)), at least ``min_tokens`` (128)."""
    c = int(chunk_elements) // (n_experts * max(hidden, inter))
    return max(int(min_tokens), c // CHUNK_ALIGN * CHUNK_ALIGN, 1)


def chunk_bytes(n_experts: int, hidden: int, inter: int, n_tokens: int, chunk_elements: int = CHUNK_ELEMENTS,
                dtype_bytes: int = 2) -> int:
    """Peak extra memory of one chunk over ``n_tokens`` subsample tokens: gate, up and activation [E, c, I] and
    the outputs [E, c, H] in the model's dtype (with a temporary of the outputs' size for their squares), plus
    the per-token products [c, E, E] in fp32."""
    c = min(chunk_tokens(n_experts, hidden, inter, chunk_elements), max(1, n_tokens))
    return n_experts * c * (3 * inter * dtype_bytes + hidden * 2 * dtype_bytes + 3 * n_experts * 4)


def gram_fp32(flat: torch.Tensor) -> torch.Tensor:
    """flat [E, K] -> flat @ flat.T [E, E] float32, accumulated in fp32: for a half-precision ``flat`` on CUDA one
    tensor-core product with fp32 output (``torch.mm(..., out_dtype=float32)``), elsewhere (or where this torch
    lacks it) the product of its float32 copy."""
    if flat.dtype in (torch.bfloat16, torch.float16) and flat.is_cuda:
        try:
            return torch.mm(flat, flat.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    f = flat.float()
    return f @ f.T


def bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, m, k] @ b [B, k, n] -> [B, m, n] float32, accumulated in fp32: for half-precision CUDA tensors one
    batched tensor-core product with fp32 output (``torch.bmm(..., out_dtype=float32)``), elsewhere (or where this
    torch lacks it) the product of float32 copies (no copy for float32 inputs)."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        for x, z in ((a, b), (a.contiguous(), b.contiguous())):  # strided views first, then dense copies
            try:
                return torch.bmm(x, z, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                pass
    return torch.bmm(a.float(), b.float())


def all_expert_outputs(w: ExpertWeights, x: torch.Tensor, act) -> torch.Tensor:
    """Every expert on every token: x [c, H] -> [E, c, H] (expert e's output on token j is [e, j, :])."""

    def linear(weight, bias, inp):  # weight [E, out, in], inp [c, in] or [E, c, in] -> [E, c, out]
        out = torch.matmul(inp, weight.transpose(1, 2))
        return out if bias is None else out + bias[:, None, :]

    a = act(linear(w.gate, w.gate_bias, x), linear(w.up, w.up_bias, x))
    return linear(w.down, w.down_bias, a)


def token_cosines(y: torch.Tensor) -> torch.Tensor:
    """y [E, c, H] expert outputs -> [c, E, E] float32 per-token cosines cos(y[e, j], y[f, j]) (0 where an
    output is exactly 0): one batched product of the outputs themselves (fp32 accumulation), divided by their
    fp32 norms."""
    yt = y.transpose(0, 1)                                                    # [c, E, H], a view
    dots = bmm_fp32(yt, yt.transpose(1, 2))                                   # [c, E, E]
    inv = torch.linalg.vector_norm(yt, dim=-1, dtype=torch.float32).clamp(min=1e-12).reciprocal()  # [c, E]
    return dots.mul_(inv[:, :, None]).mul_(inv[:, None, :])


def mean_stderr(total: torch.Tensor, sq_total: torch.Tensor, n: int, population: int | None) -> torch.Tensor:
    """Standard error of a sample mean from the sums of n values and of their squares, as an estimate of the
    mean over ``population`` values (simple random sampling without replacement; None: infinite population):
    sqrt(s^2 / n (1 - n / N)), s^2 the sample variance; 0 when n >= N, inf for n = 1 < N."""
    if population is not None and n >= population:
        return torch.zeros_like(total)
    if n < 2:
        return torch.full_like(total, float("inf"))
    var = ((sq_total - total * total / n) / (n - 1)).clamp(min=0)
    fpc = 1.0 if population is None else 1.0 - n / population
    return (var / n * fpc).sqrt()


class SubsampleSelector:
    """Picks the subsample tokens of each batch: real tokens whose global index (batch order, padding
    skipped) is floor(i T / n) for some i < n, or (``seed`` an int) in a uniformly random n-subset of
    range(T) drawn from that seed; the first n real tokens when T is unknown. ``size``: the subsample's size."""

    def __init__(self, n: int, total: int | None, seed: int | None = None):
        self.n, self.total, self.seen = int(n), total, 0
        self.size = self.n if total is None else min(self.n, int(total))
        self._wanted: torch.Tensor | None = None
        if total is not None and self.n < total:
            if seed is None:
                self._wanted = torch.div(torch.arange(self.n, dtype=torch.long) * int(total), self.n,
                                         rounding_mode="floor")
            else:
                gen = torch.Generator().manual_seed(int(seed))
                self._wanted = torch.randperm(int(total), generator=gen)[:self.n].sort().values

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [T] bool (real tokens) -> [T] bool (real tokens in the subsample)."""
        rank = torch.cumsum(mask.long(), 0) - 1 + self.seen  # global index of each real token
        self.seen += int(mask.sum())
        if self._wanted is None:
            return mask & (rank < self.n)
        if self._wanted.device != mask.device:  # moved once, not per batch
            self._wanted = self._wanted.to(mask.device)
        wanted = self._wanted  # sorted: membership by binary search (no sort/unique of isin, no host sync)
        pos = torch.searchsorted(wanted, rank).clamp(max=wanted.numel() - 1)
        return mask & (wanted[pos] == rank)


@register_observer
class ExpertOutputs(LayerObserver):
    """``output_similarity`` [E, E] float64 and ``expert_output_mean`` [E, H] float64 on a token subsample, and
    their standard errors ``output_similarity_stderr`` [E, E], ``expert_output_mean_stderr`` [E, H] (float64).

    output_similarity[e, f] = (1/|S|) sum_{x in S} cos(f_e(x), f_f(x)) (an expert whose output is exactly 0 has
    cosine 0 with every expert); expert_output_mean[e] = (1/|S|) sum_{x in S} f_e(x); the standard errors as in
    the module docstring. Options: ``similarity_tokens`` (|S| per layer, default 2048), ``similarity_seed``
    (None: evenly spaced S; an int: a seeded uniformly random S), ``similarity_budget`` (None, or a bound on
    (E / k) |S| / T), ``chunk_elements`` (memory bound, default 2**28), ``min_chunk_tokens`` (default 128; see
    `chunk_tokens`).
    """

    provides = ("output_similarity", "expert_output_mean", "output_similarity_stderr", "expert_output_mean_stderr")

    def __init__(self, layer: MoELayer, similarity_tokens: int = 2048, total_tokens: int | None = None,
                 chunk_elements: int = CHUNK_ELEMENTS, min_chunk_tokens: int = MIN_CHUNK_TOKENS,
                 similarity_seed: int | None = None, similarity_budget: float | None = None, **options):
        super().__init__(layer, **options)
        if similarity_tokens < 1:
            raise ValueError("similarity_tokens must be >= 1")
        e, h = layer.router_weight.shape
        n = int(similarity_tokens)
        if similarity_budget is not None:
            if not similarity_budget > 0:
                raise ValueError("similarity_budget must be > 0")
            if total_tokens is not None:
                n = min(n, max(1, int(similarity_budget * total_tokens * layer.rule.top_k / e)))
        self.total = total_tokens
        self.select = SubsampleSelector(n, total_tokens, similarity_seed)
        inter = layer.experts.gate.shape[1]
        self.chunk = chunk_tokens(e, h, inter, chunk_elements, min_chunk_tokens)
        dev = layer.router_weight.device
        self.cos_sum = torch.zeros(e, e, dtype=torch.float64, device=dev)
        self.cos_sq = torch.zeros(e, e, dtype=torch.float64, device=dev)
        self.out_sum = torch.zeros(e, h, dtype=torch.float64, device=dev)
        self.out_sq = torch.zeros(e, h, dtype=torch.float64, device=dev)
        self.count = 0

    def update(self, hidden, idx, weights, mask):
        x = hidden[self.select(mask)]
        for s in range(0, x.shape[0], self.chunk):
            y = all_expert_outputs(self.layer.experts, x[s:s + self.chunk], self.layer.activation)  # [E, c, H]
            cos = token_cosines(y)                                                                 # [c, E, E]
            self.cos_sum += cos.sum(dim=0, dtype=torch.float64)
            self.cos_sq += cos.square_().sum(dim=0, dtype=torch.float64)
            self.out_sum += y.sum(dim=1, dtype=torch.float32).double()
            self.out_sq += y.square().sum(dim=1, dtype=torch.float32).double()
            del y, cos
        self.count += x.shape[0]

    def result(self):
        n = max(self.count, 1)
        # the population is the real tokens seen (T when the runner passed it; None when it is unknown)
        pop = self.select.seen if self.total is not None else None
        return {"output_similarity": self.cos_sum / n, "expert_output_mean": self.out_sum / n,
                "output_similarity_stderr": mean_stderr(self.cos_sum, self.cos_sq, self.count, pop),
                "expert_output_mean_stderr": mean_stderr(self.out_sum, self.out_sq, self.count, pop)}


@register_observer
class RouterSimilarity(LayerObserver):
    """``router_similarity`` [E, E] float64: cosine similarity of the router-logit columns (M-SMoE).

    With l_e = (z_e(x_t))_t the column of router logits of expert e over all T real calibration tokens (the
    logits exactly as the model computes them: router bias included for gpt_oss, DeepSeek-V3's choice-only
    correction bias NOT included), router_similarity[e, f] = <l_e, l_f> / (||l_e|| ||l_f||); 0 where a column is
    zero. Exact over every token: it accumulates the Gram matrix sum_t z(x_t) z(x_t)^T in fp64 (cost T x H x E).
    """

    provides = ("router_similarity",)

    def __init__(self, layer: MoELayer, **options):
        super().__init__(layer, **options)
        e = layer.n_experts
        self.gram = torch.zeros(e, e, dtype=torch.float64, device=layer.router_weight.device)

    def update(self, hidden, idx, weights, mask):
        z = self.layer.router_logits(hidden).double() * mask[:, None]
        self.gram += z.T @ z

    def result(self):
        norm = self.gram.diagonal().clamp(min=0).sqrt()
        denom = norm[:, None] * norm[None, :]
        return {"router_similarity": torch.where(denom > 0, self.gram / denom.clamp(min=1e-300), 0.0)}
