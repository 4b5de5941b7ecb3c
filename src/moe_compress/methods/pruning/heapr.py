"""HEAPr (Li et al., "HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space", arXiv 2509.22299):
prune atomic experts, i.e. single neurons of the routed experts, by second-order (OBS) saliency computed in
the atomic experts' output space.

An expert is a sum of atomic experts: y_e(x) = sum_j d_{e,j} a_{e,j}(x) (+ b_d), with d_{e,j} = down_e[:, j] [H] and
a_{e,j}(x) = act(gate_e[j] x + b_g, up_e[j] x + b_u) the scalar activation; the block output is
Y(x) = sum_{e in top-k(x)} w_e(x) y_e(x). Removing atomic expert (e, j) perturbs Y(x) by
delta(x) = -w_e(x) a_{e,j}(x) d_{e,j}, and the OBS estimate of the loss increase is 1/2 sum_x delta^T H delta,
H the Hessian of the loss with respect to the block output.

Here H is the Hessian of the layer-local reconstruction loss L = sum_x ||Y(x) - Y'(x)||^2, i.e. H = 2 I, so

    S_{e,j} = sum_{x routed to e} ||w_e(x) a_{e,j}(x) d_{e,j}||^2 = ||d_{e,j}||^2 * sum_x w_e(x)^2 a_{e,j}(x)^2

(statistic ``expert_act_wsq`` [E, I], one pass). It is the exact reconstruction error of removing that one
atomic expert, with no approximation. The paper's H comes from the language-model loss (two forward passes
and a backward pass through the whole model); the layer-by-layer runner has no backward pass, so the
layer-local quadratic loss is used (see docs/methods.md).

Budget: every expert is kept (``keeps_experts``) and narrowed to the same width I' = round(I n / E) (rounded to
a multiple of ``width_multiple``, default 8: transformers' grouped_mm backend needs 16-byte strides), n the
pipeline's ``--experts`` (so ``--experts 6`` of 8 keeps the routed-expert parameters of 6 experts); each
expert keeps its I' highest-scoring neurons (ties: lower index) in their original order. The paper ranks all
atomic experts of the model globally (different widths per expert and layer), which a standard checkpoint
cannot hold.
"""

from __future__ import annotations

import torch
from pydantic import Field

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, LayerPlan, Method, Params, register
from moe_compress.methods.pruning.base import rounded
from moe_compress.models.layer import ExpertSet, ExpertWeights, MoELayer


def atomic_scores(layer: MoELayer, act_wsq: torch.Tensor) -> torch.Tensor:
    """S [E, I] fp64: ||down_e[:, j]||^2 x sum over routed tokens of (w a_{e,j})^2 (act_wsq [E, I])."""
    d2 = layer.experts.down.detach().double().square().sum(dim=1)  # [E, I]
    return d2 * act_wsq.double().to(d2.device)


def keep_width(n_budget: int, n_experts: int, width: int, multiple: int = 8) -> int:
    """Neurons kept per expert for a budget of ``n_budget`` of ``n_experts`` experts' parameters: width x
    n_budget / n_experts rounded (half up) to a multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, int(width * n_budget / n_experts / multiple + 0.5) * multiple)


def narrow(layer: MoELayer, keep: torch.Tensor) -> ExpertSet:
    """Every expert of ``layer`` with only its neurons ``keep`` [E, I'] (sorted per row); router unchanged."""
    w = layer.experts

    def pick_rows(t: torch.Tensor) -> torch.Tensor:  # [E, I, ...] -> [E, I', ...]
        return torch.gather(t.detach(), 1, keep.view(*keep.shape, *([1] * (t.dim() - 2))).expand(
            -1, -1, *t.shape[2:])).clone()

    down = torch.gather(w.down.detach(), 2, keep[:, None, :].expand(-1, w.down.shape[1], -1)).clone()
    experts = ExpertWeights(pick_rows(w.gate), pick_rows(w.up), down,
                            None if w.gate_bias is None else pick_rows(w.gate_bias),
                            None if w.up_bias is None else pick_rows(w.up_bias),
                            None if w.down_bias is None else w.down_bias.detach().clone())
    return ExpertSet(experts=experts, router_weight=layer.router_weight.detach().clone(),
                     router_bias=None if layer.router_bias is None else layer.router_bias.detach().clone(),
                     correction_bias=None if layer.correction_bias is None else layer.correction_bias.clone(),
                     sources=[[(e, 1.0)] for e in range(layer.n_experts)])


@register
class HEAPr(Method):
    name = "heapr"
    kind = "prune"
    summary = ("prune single neurons (atomic experts) of every expert by their second-order output saliency "
               "(HEAPr); keeps every expert, --experts N = the expert parameters of N experts")
    needs = frozenset({"expert_act_wsq"})
    keeps_experts = True

    class Params(Params):
        # the new width is a multiple of this: transformers' grouped_mm kernel (its default expert backend on CPU)
        # needs 16-byte strides, i.e. 8 bf16 / 4 fp32 values; GPU kernels prefer 64 or more
        width_multiple: int = Field(8, ge=1)

    params: Params

    def plan(self, ctx: LayerContext) -> LayerPlan:
        n, width = ctx.layer.n_experts, ctx.layer.experts.gate.shape[1]
        if not 1 <= ctx.n_experts < n:
            raise UserError(f"layer {ctx.layer.index}: a budget of {ctx.n_experts} of {n} experts' parameters "
                            "is not a reduction")
        scores = atomic_scores(ctx.layer, ctx.stats["expert_act_wsq"])  # [E, I]
        i_new = keep_width(ctx.n_experts, n, width, self.params.width_multiple)
        if i_new >= width:
            raise UserError(f"layer {ctx.layer.index}: a budget of {ctx.n_experts} of {n} experts keeps all {width} "
                            f"neurons once rounded to a multiple of {self.params.width_multiple}; use a smaller "
                            "--experts or a smaller width_multiple")
        # stable descending order: equal scores keep the lower index
        order = torch.sort(-scores, dim=1, stable=True).indices[:, :i_new]
        keep = order.sort(dim=1).values.to(ctx.layer.experts.gate.device)
        s = narrow(ctx.layer, keep)
        kept_mass = torch.gather(scores, 1, order.to(scores.device)).sum(dim=1)
        total = scores.sum(dim=1).clamp(min=1e-300)
        info = {"kept": list(range(n)), "intermediate_size": {"original": width, "kept": i_new},
                "removed_saliency": rounded(1 - kept_mass / total),   # share of sum_j S_{e,j} removed, per expert
                "scores_per_expert": rounded(scores.sum(dim=1))}
        return LayerPlan(s, info)
