"""``heapr-refit``: HEAPr's neuron pruning, then the removed neurons merged into the kept ones by least squares.

HEAPr (`methods.pruning.heapr`) narrows every routed expert to its I' most salient neurons (atomic experts) and
drops the others, so expert e loses D_{e,R} a_{e,R}(x): the down columns of its removed neurons R times their
activations. With the gate and up projections of the kept neurons K fixed, the routed output is linear in the
kept down columns, and the best kept down projections in the layer's output space are `refit`'s joint
down-projection least squares, fitted to the ORIGINAL block's routed output (ridge towards HEAPr's down, the ridge
chosen on held-out tokens; `methods.hybrid.refit`).

Why this is a merge of neurons: for an expert that is never co-routed with another, and without ridge, the solution
is D'_{e,K} = D_{e,K} + D_{e,R} C_RK C_KK^-1, with C = sum_t w_e(x_t)^2 a(x_t) a(x_t)^T the routing-weighted
second moments of the expert's activations. So every removed neuron j is merged into the kept neurons: its down
column is added to theirs, weighted by the coefficients of the least-squares regression of a_j on a_K. This is
Neuron Merging (Kim et al., NeurIPS 2020), with all kept neurons as partners instead of one. Across co-routed
experts, the joint fit also moves what one expert lost onto its partners.

Budget and checkpoint: HEAPr's. Every expert is kept (``keeps_experts``), each narrowed to the same width
I' = round(I n / E), n the pipeline's ``--experts`` (a parameter budget). The router and the gate/up projections
are HEAPr's unless ``router_steps`` or ``tune_steps`` re-fit them. All of `refit`'s re-fit and distillation
options apply, except the choice of the kept experts: ``select``, ``merge`` and ``fold`` are refused.
"""

from __future__ import annotations

from pydantic import Field

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, LayerPlan, get_method, register
from moe_compress.methods.hybrid.refit import Refit


@register
class HeaprRefit(Refit):
    name = "heapr-refit"
    kind = "prune"
    summary = ("HEAPr's neuron pruning, then the removed neurons merged into the kept ones by the joint "
               "down-projection least squares of refit; every expert kept, --experts N = N experts' parameters")
    needs = frozenset({"expert_act_wsq"})
    keeps_experts = True

    class Params(Refit.Params):
        width_multiple: int = Field(8, ge=1)  # HEAPr's: the new width is a multiple of this

    params: Params

    def __init__(self, **params):
        super().__init__(**params)
        chosen = sorted({"select", "merge", "fold"} & set(self.params.model_fields_set))
        if chosen:
            raise UserError(f"method {self.name}: {', '.join(chosen)} choose which experts refit keeps; "
                            f"{self.name} keeps every expert narrowed by HEAPr")

    def plan(self, ctx: LayerContext) -> LayerPlan:
        p = self.params
        if ctx.inputs is None or ctx.inputs.shape[0] == 0:
            raise UserError(f"method {self.name} needs the MoE inputs of calibration tokens: pass --calib SPEC")
        narrowed = get_method("heapr", width_multiple=p.width_multiple).plan(ctx)
        info = dict(narrowed.info)
        if p.router_steps == 0 and not p.refit_down:
            return LayerPlan(narrowed.expert_set, info)
        out_set, fit_info = self.refit(ctx.layer, narrowed.expert_set, ctx.inputs)
        info.update(fit_info)
        return LayerPlan(out_set, info)
