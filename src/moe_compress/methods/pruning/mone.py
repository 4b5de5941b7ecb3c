"""MoNE pruning (Zhang et al., "MoNE: Replacing Redundant Experts with Lightweight Novices for Structured Pruning
of MoE", arXiv 2507.00390): experts that are rarely used AND whose output barely varies are redundant.

    score_e = r_e * sigma_e,   r_e = (1/T) sum_t w_{e,t}  (routing score: mean routing weight over all T tokens,
                                                           0 where e is not chosen; statistic ``soft_count`` / T)
                               sigma_e = sqrt(sum_j Var_j(f_e(x)))  over the tokens routed to e
                                         (``routed_output_sum``, ``routed_output_sq``, ``frequency``)

The n experts with the highest score are kept (per DeepSeek group, super experts protected); each pruned expert
p becomes a "novice", the constant mu_p = mean of f_p over its routed tokens (the unbiased estimate of its
output), recorded in the plan as ``novice_norms`` (||mu_p||).

What a standard checkpoint can hold. A novice is an extra routed slot the router still chooses, outputting
w * mu_p. Transformers' MoE blocks have no such module; the checkpoint written here is the plain pruning to the
kept experts (the router masked to them: tokens that chose a novice pick their next kept expert), i.e. the novices
are dropped. GPT-OSS could hold a novice exactly (zero weights, down_proj_bias = mu_p: its expert then outputs
exactly mu_p), but only as a full-size expert slot, which saves no memory, so it is not written either.

The paper's model, in memory (`attach_novices`, used by ``bench`` through `MoNEPruning.in_memory_model`): the
ORIGINAL model with its router unchanged, where every slot routed to a novice p contributes w * mu_p instead of
w * f_p(x). A forward hook on each MoE block's experts module adds sum_{slots -> p} w (mu_p - f_p(x)) to its
output, which is that model exactly (to rounding). Its size, as the paper counts it: the pruned model plus one
H-vector per novice. docs/methods.md has the measured in-memory versus exported quality.
"""

from __future__ import annotations

import torch

from moe_compress.methods.base import LayerContext, LayerPlan, register
from moe_compress.methods.pruning.base import ScorePruning, check_target, choose_kept, protected_experts, rounded
from moe_compress.models.layer import expert_forward
from moe_compress.models.surgery import keep_set


def mone_components(stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(routing score r [E], output std sigma [E], mean output mu [E, H]), all fp64, from the statistics."""
    freq = stats["frequency"].double().cpu()
    n = freq.clamp(min=1)
    tokens = max(float(freq.sum()), 1.0)  # = T x k; the common 1/k factor does not change the ranking
    mu = stats["routed_output_sum"].double().cpu() / n[:, None]
    var = (stats["routed_output_sq"].double().cpu() / n - (mu * mu).sum(dim=1)).clamp(min=0)
    sigma = torch.where(freq > 0, var.sqrt(), torch.zeros_like(var))
    r = stats["soft_count"].double().cpu() / tokens
    return r, sigma, mu


@register
class MoNEPruning(ScorePruning):
    name = "mone"
    summary = ("prune the experts with the smallest routing score x output standard deviation (MoNE); the "
               "checkpoint drops their novices (mean outputs), see docs/methods.md")
    needs = frozenset({"frequency", "soft_count", "routed_output_sum", "routed_output_sq", "max_activation"})

    def score(self, ctx: LayerContext) -> torch.Tensor:
        r, sigma, _ = mone_components(ctx.stats)
        return r * sigma

    def plan(self, ctx: LayerContext) -> LayerPlan:
        check_target(ctx)
        r, sigma, mu = mone_components(ctx.stats)
        scores = r * sigma
        supers = protected_experts(ctx, self.params)
        kept = choose_kept(scores, ctx.n_experts, ctx.layer.rule.n_group, supers)
        novices = [e for e in range(ctx.layer.n_experts) if e not in kept]
        info = {"kept": kept, "scores": rounded(scores), "super_experts": supers,
                "routing_score": rounded(r), "output_std": rounded(sigma), "novices": novices,
                "novice_norms": rounded(torch.linalg.vector_norm(mu[novices], dim=1)),
                "novices_exported": "dropped (router masked to the kept experts)"}
        return LayerPlan(keep_set(ctx.layer, kept), info)

    def in_memory_model(self, model, adapter, stats, infos):
        """The original ``model`` with each layer's novices (plan info) replacing their experts' outputs by their
        mean outputs (`attach_novices`); parameters = the pruned model's + one H-vector per novice."""
        novices = {}
        for i, info in infos.items():
            if info.get("novices"):
                novices[i] = (info["novices"], mone_components(stats[i])[2][info["novices"]])
        attach_novices(model, adapter, novices)
        first = min(adapter.moe_blocks(model))
        w = adapter.layer(model, first).experts
        per_expert = sum(t[0].numel() for t in (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)
                         if t is not None)
        n_novices = sum(len(v[0]) for v in novices.values())
        total = sum(p.numel() for p in model.parameters())
        return model, total - n_novices * (per_expert - model.config.hidden_size)


def attach_novices(model, adapter, novices: dict[int, tuple[list[int], torch.Tensor]]) -> list:
    """Make ``model`` (in place) MoNE's in-memory model: in MoE layer i, the slots routed to expert p of
    ``novices[i] = (experts, means [n, H])`` output the routing weight times the mean instead of f_p(x). Returns the
    hook handles. Expert and router weights are not changed (the router still chooses the novices)."""
    handles = []
    blocks = adapter.moe_blocks(model)
    for i, (experts, means) in novices.items():
        block = blocks[i]
        layer = adapter.layer(model, i, block)

        def hook(module, args, kwargs, out, layer=layer, experts=list(experts), means=means):
            x = args[0] if args else kwargs["hidden_states"]
            idx = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k)
            wt = args[2] if len(args) > 2 else next(v for k, v in kwargs.items() if "weight" in k or "score" in k)
            adj = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            for p, mu in zip(experts, means.to(device=out.device, dtype=torch.float32)):
                tok, slot = torch.nonzero(idx == p, as_tuple=True)
                if tok.numel():
                    f = expert_forward(layer.experts, p, x[tok], layer.activation).float()
                    adj.index_add_(0, tok, wt[tok, slot, None].float() * (mu - f))
            return out + adj.to(out.dtype)

        handles.append(block.experts.register_forward_hook(hook, with_kwargs=True))
    return handles
