"""Expert similarity statistics (observer plug-ins): what merging methods group experts by.

- ``output_similarity`` [E, E] (Sub-MoE): mean over a token subsample S of cos(f_e(x), f_f(x)), with f_e the
  output of expert e (no routing weight) and every expert run on every token of S.
- ``expert_output_mean`` [E, H] (HC-SMoE): mean over S of f_e(x).
- ``router_similarity`` [E, E] (M-SMoE): cosine similarity of the router-logit columns over all calibration
  tokens, see `RouterSimilarity`.

The subsample S bounds the cost of running all E experts: option ``similarity_tokens`` (default 2048 per layer)
real tokens, chosen deterministically and evenly over the whole calibration set: with T real tokens numbered in
batch order (row-major within a batch, padding skipped), S holds the tokens numbered floor(i T / n) for
i = 0..n-1 (all tokens when n >= T). The runner passes T as the option ``total_tokens``; without it S is the
first n real tokens.

All E experts on a chunk of c tokens run as batched matrix products ([E, I, H] @ [H, c]); c (`chunk_tokens`)
is the largest multiple of 64 with E x max(H, I) x c <= ``chunk_elements`` (2**28 by default), at least 128 (or
all the subsample when it is smaller): a multiple of 64 keeps the products on aligned tensor-core kernels (an odd
c such as 585 sent them to slow unaligned ones), and at least 128 tokens keep them compute-bound for large E (a
DeepSeek-V3 layer's 22 GB of experts are read once per chunk). Each expert output is normalised with an fp32
norm; the cosine Gram of a chunk is one product of the normalised outputs in the model's dtype with fp32
accumulation (in fp32 for fp32 models), and the sums are kept in fp64. Measured in bench/profile_merge_stats.py
and docs/RESULTS.md ("Merge statistics").
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
    """Peak extra memory of one chunk over ``n_tokens`` subsample tokens: gate, up and activation [E, I, c] and
    the outputs [E, H, c] in the model's dtype, plus their normalised fp32 copy."""
    c = min(chunk_tokens(n_experts, hidden, inter, chunk_elements), max(1, n_tokens))
    return n_experts * c * (3 * inter * dtype_bytes + hidden * (2 * dtype_bytes + 4))


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


def all_expert_outputs(w: ExpertWeights, x: torch.Tensor, act) -> torch.Tensor:
    """Every expert on every token: x [c, H] -> [E, H, c] (expert e's output on token j is [e, :, j])."""
    xt = x.transpose(0, 1)  # [H, c]

    def linear(weight, bias, inp):  # weight [E, out, in], inp [in, c] or [E, in, c] -> [E, out, c]
        out = torch.matmul(weight, inp)
        return out if bias is None else out + bias[:, :, None]

    a = act(linear(w.gate, w.gate_bias, xt), linear(w.up, w.up_bias, xt))
    return linear(w.down, w.down_bias, a)


class SubsampleSelector:
    """Picks the subsample tokens of each batch: real tokens whose global index (batch order, padding
    skipped) is floor(i T / n) for some i < n; the first n real tokens when T is unknown."""

    def __init__(self, n: int, total: int | None):
        self.n, self.total, self.seen = int(n), total, 0
        self._wanted: torch.Tensor | None = None
        if total is not None and self.n < total:
            self._wanted = torch.div(torch.arange(self.n, dtype=torch.long) * int(total), self.n,
                                     rounding_mode="floor")

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [T] bool (real tokens) -> [T] bool (real tokens in the subsample)."""
        rank = torch.cumsum(mask.long(), 0) - 1 + self.seen  # global index of each real token
        self.seen += int(mask.sum())
        if self._wanted is None:
            return mask & (rank < self.n)
        wanted = self._wanted.to(mask.device)
        return mask & torch.isin(rank, wanted)


@register_observer
class ExpertOutputs(LayerObserver):
    """``output_similarity`` [E, E] float64 and ``expert_output_mean`` [E, H] float64 on a token subsample.

    output_similarity[e, f] = (1/|S|) sum_{x in S} cos(f_e(x), f_f(x)) (an expert whose output is exactly 0 has
    cosine 0 with every expert); expert_output_mean[e] = (1/|S|) sum_{x in S} f_e(x). Options:
    ``similarity_tokens`` (|S| per layer, default 2048), ``chunk_elements`` (memory bound, default 2**28),
    ``min_chunk_tokens`` (default 128; see `chunk_tokens`).
    """

    provides = ("output_similarity", "expert_output_mean")

    def __init__(self, layer: MoELayer, similarity_tokens: int = 2048, total_tokens: int | None = None,
                 chunk_elements: int = CHUNK_ELEMENTS, min_chunk_tokens: int = MIN_CHUNK_TOKENS, **options):
        super().__init__(layer, **options)
        if similarity_tokens < 1:
            raise ValueError("similarity_tokens must be >= 1")
        self.select = SubsampleSelector(similarity_tokens, total_tokens)
        e, h = layer.router_weight.shape
        inter = layer.experts.gate.shape[1]
        self.chunk = chunk_tokens(e, h, inter, chunk_elements, min_chunk_tokens)
        dev = layer.router_weight.device
        self.cos_sum = torch.zeros(e, e, dtype=torch.float64, device=dev)
        self.out_sum = torch.zeros(e, h, dtype=torch.float64, device=dev)
        self.count = 0

    def update(self, hidden, idx, weights, mask):
        x = hidden[self.select(mask)]
        for s in range(0, x.shape[0], self.chunk):
            y = all_expert_outputs(self.layer.experts, x[s:s + self.chunk], self.layer.activation)  # [E, H, c]
            norms = torch.linalg.vector_norm(y, dim=1, keepdim=True, dtype=torch.float32)  # [E, 1, c]
            # unit vectors per (expert, token) in the model's dtype; an all-zero output stays 0 (cosine 0)
            yn = (y.float() / norms.clamp(min=1e-12)).to(y.dtype)
            flat = yn.reshape(yn.shape[0], -1)
            self.cos_sum += gram_fp32(flat).double()
            self.out_sum += y.sum(dim=-1, dtype=torch.float32).double()
            del y, yn, flat
        self.count += x.shape[0]

    def result(self):
        n = max(self.count, 1)
        return {"output_similarity": self.cos_sum / n, "expert_output_mean": self.out_sum / n}


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
