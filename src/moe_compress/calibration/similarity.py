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

All E experts on a chunk of c tokens run as batched matrix products ([E, I, H] @ [H, c]); c is chosen so that
E x max(H, I) x c stays under ``chunk_elements`` (2**26 by default), which bounds the extra memory. Cosines are
computed in fp32 and summed in fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_compress.calibration.observers import LayerObserver, register_observer
from moe_compress.models.layer import ExpertWeights, MoELayer


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
    ``similarity_tokens`` (|S| per layer, default 2048), ``chunk_elements`` (memory bound, default 2**26).
    """

    provides = ("output_similarity", "expert_output_mean")

    def __init__(self, layer: MoELayer, similarity_tokens: int = 2048, total_tokens: int | None = None,
                 chunk_elements: int = 2 ** 26, **options):
        super().__init__(layer, **options)
        if similarity_tokens < 1:
            raise ValueError("similarity_tokens must be >= 1")
        self.select = SubsampleSelector(similarity_tokens, total_tokens)
        e, h = layer.router_weight.shape
        inter = layer.experts.gate.shape[1]
        self.chunk = max(1, int(chunk_elements) // (e * max(h, inter)))
        dev = layer.router_weight.device
        self.cos_sum = torch.zeros(e, e, dtype=torch.float64, device=dev)
        self.out_sum = torch.zeros(e, h, dtype=torch.float64, device=dev)
        self.count = 0

    def update(self, hidden, idx, weights, mask):
        x = hidden[self.select(mask)]
        for s in range(0, x.shape[0], self.chunk):
            y = all_expert_outputs(self.layer.experts, x[s:s + self.chunk], self.layer.activation).float()
            yn = F.normalize(y, dim=1)  # [E, H, c], unit vectors per (expert, token)
            flat = yn.reshape(yn.shape[0], -1)
            self.cos_sum += (flat @ flat.T).double()
            self.out_sum += y.sum(dim=-1).double()
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
