"""Statistics of the routed expert outputs (observer plug-ins fed by `ObservedExperts` through ``update_routed``:
the outputs the model computed anyway, no second expert pass unless noted).

- ``easy_ep`` [E] (EASY-EP): sum over real tokens t and their top-k slots routed to e of
  s_t * w_{e,t} * ||f_e(x_t)||_2, with the token contribution s_t = max(0, 1 - cos(x_t, x_t + r_t)),
  x_t the MoE block's input, r_t = sum_{slots} w f(x_t) the routed output (shared experts excluded) and w the
  routing weight as the model applies it.
- ``routed_output_sum`` [E, H] and ``routed_output_sq`` [E] (MoNE): sum over routed real tokens of f_e(x) and of
  ||f_e(x)||^2; with ``frequency`` they give the mean output and the total variance
  sum_j Var_j = E||f||^2 - ||E f||^2.
- ``expert_input_sq`` [E, H] and ``expert_act_sq`` [E, I] (Wanda, for STUN's unstructured stage): sum over
  routed real tokens of x_j^2 (the expert's input) and of a_j^2 (the activation feeding down_proj). The
  activation is recomputed per expert on its routed tokens (one gate/up product per expert and batch).
  ``expert_act_wsq`` [E, I] (HEAPr): the same sum of (w a_j)^2, w the routing weight as the model applies it.

All sums in fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_compress.calibration.observer_base import LayerObserver, register_observer
from moe_compress.models.layer import MoELayer, expert_forward


def token_contribution(hidden: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """EASY-EP's token contribution: hidden, routed [T, H] -> s [T] fp32, s_t = max(0, 1 - cos(h_t, h_t + r_t)).

    The routed output is often small next to h, where 1 - cos computed directly cancels catastrophically in
    fp32; for cos > 1/2 it is computed as sin^2 / (1 + cos), sin = ||r_perp|| / ||h + r|| with r_perp the part
    of r orthogonal to h, which keeps full relative precision.
    """
    h, r = hidden.float(), routed.float()
    b = h + r
    cos = F.cosine_similarity(h, b, dim=-1)
    unit = F.normalize(h, dim=-1)
    r_perp = r - (r * unit).sum(dim=-1, keepdim=True) * unit
    sin2 = (r_perp.square().sum(dim=-1) / b.square().sum(dim=-1).clamp(min=1e-30)).clamp(max=1.0)
    return torch.where(cos > 0.5, sin2 / (1.0 + cos), 1.0 - cos).clamp(min=0.0)


@register_observer
class EasyEPScore(LayerObserver):
    """``easy_ep`` [E] float64, see the module docstring."""

    provides = ("easy_ep",)

    def __init__(self, layer: MoELayer, **options):
        super().__init__(layer, **options)
        self.score = torch.zeros(layer.n_experts, dtype=torch.float64, device=layer.router_weight.device)

    def update(self, hidden, idx, weights, mask):
        pass

    def update_routed(self, hidden, tok, expert, y, weight, keep):
        wy = y.float() * weight.float()[:, None]
        routed = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32, device=hidden.device)
        routed.index_add_(0, tok, wy)
        s = token_contribution(hidden, routed)  # [T]
        norms = torch.linalg.vector_norm(y.float(), dim=-1)
        contrib = (s[tok] * weight.float() * norms).double() * keep.double()
        self.score.index_add_(0, expert, contrib)

    def result(self):
        return {"easy_ep": self.score}


@register_observer
class RoutedOutputMoments(LayerObserver):
    """``routed_output_sum`` [E, H] and ``routed_output_sq`` [E] float64, see the module docstring."""

    provides = ("routed_output_sum", "routed_output_sq")

    def __init__(self, layer: MoELayer, **options):
        super().__init__(layer, **options)
        e, h = layer.router_weight.shape
        dev = layer.router_weight.device
        self.sum = torch.zeros(e, h, dtype=torch.float64, device=dev)
        self.sq = torch.zeros(e, dtype=torch.float64, device=dev)

    def update(self, hidden, idx, weights, mask):
        pass

    def update_routed(self, hidden, tok, expert, y, weight, keep):
        yd = y.double() * keep.double()[:, None]
        self.sum.index_add_(0, expert, yd)
        self.sq.index_add_(0, expert, (yd * yd).sum(dim=-1))

    def result(self):
        return {"routed_output_sum": self.sum, "routed_output_sq": self.sq}


@register_observer
class ExpertInputNorms(LayerObserver):
    """``expert_input_sq`` [E, H], ``expert_act_sq`` and ``expert_act_wsq`` [E, I] float64, see the module
    docstring."""

    provides = ("expert_input_sq", "expert_act_sq", "expert_act_wsq")

    def __init__(self, layer: MoELayer, **options):
        super().__init__(layer, **options)
        e, h = layer.router_weight.shape
        inter = layer.experts.gate.shape[1]
        dev = layer.router_weight.device
        self.inp = torch.zeros(e, h, dtype=torch.float64, device=dev)
        self.act = torch.zeros(e, inter, dtype=torch.float64, device=dev)
        self.wact = torch.zeros(e, inter, dtype=torch.float64, device=dev)

    def update(self, hidden, idx, weights, mask):
        pass

    def update_routed(self, hidden, tok, expert, y, weight, keep):
        x = hidden[tok]  # [R, H], rows grouped by expert
        counts = torch.bincount(expert, minlength=self.inp.shape[0]).tolist()
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            xe, k = x[start:start + c], keep[start:start + c].double()[:, None]
            a = expert_forward(self.layer.experts, e, xe, self.layer.activation, intermediate=True)
            self.inp[e] += (xe.double() ** 2 * k).sum(dim=0)
            a2 = a.double() ** 2 * k
            self.act[e] += a2.sum(dim=0)
            self.wact[e] += (a2 * weight[start:start + c].double()[:, None] ** 2).sum(dim=0)
            start += c

    def result(self):
        return {"expert_input_sq": self.inp, "expert_act_sq": self.act, "expert_act_wsq": self.wact}
