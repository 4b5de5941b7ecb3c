"""Router adaptation after merging: one router row (and bias) per merged group, and the routing-mass error.

A group g of experts i with merge weights w_i (summing to 1) becomes one expert; its router row r_g [H] is:

- ``freq_avg``: r_g = sum_i w_i r_i (and the same average of the members' router biases / correction biases).
- ``keep_dominant``: the row (and biases) of the member with the largest weight (M-SMoE's dominant expert).
- ``logit_adjust``: freq_avg plus a constant logit offset a_g = tau (ln F_g - sum_i w_i ln F_i), F the
  frequency shares and F_g = sum_i F_i: the log-prior tau ln f of the group minus the average log-prior its
  averaged row already carries. With frequency weights a_g = tau H(w) = tau ln(effective number of members):
  ln n for n equally used members (exactly what log-sum-exp adds for n equal logits), 0 for a singleton.
  Where the offset goes, per routing family:
    * gpt_oss (``topk_softmax``, router bias): added to the router bias. Exact.
    * every family without a router bias (softmax: mixtral/qwen/olmoe/deepseek_v2, sparsemixer: phimoe;
      sigmoid: deepseek_v3): folded into the row as a_g v, where v = argmin ||X v - 1||^2 + lambda ||v||^2 is
      the direction whose logit is ~1 on every calibration token (ridge least squares on X [T, H]); the fit's
      R^2 is recorded. deepseek_v3's correction bias is NOT used for it: it changes the choice but not the
      weights; the merged correction bias is the w-average of the members' (as for every rule).
- ``lstsq``: the row refit on calibration hidden states X [T, H] so that the group receives the routing mass
  its members received. Target logit per token, every family: t_g(x) = log sum_{i in g} exp(l_i(x)).
  Softmax-type routers (softmax_topk, softmax_group, topk_softmax, sparsemixer): exp(t_g) / Z(x) is exactly
  the members' summed probability, and since singletons keep their logits l_i the softmax denominator is
  unchanged, so an exact fit gives the group exactly its members' summed probability. Sigmoid routers
  (deepseek_v3): t_g is the logit whose odds are the members' summed odds, sigmoid(t_g) = sum_i o_i /
  (1 + sum_i o_i), o_i = exp(l_i): ~ the summed score when scores are small, never above 1 (the logit of the
  clipped summed score, logit(clip(sum_i s_i)), was measured worse: 0.63 vs 0.54 mean routing-mass error on
  tiny deepseek_v3 models, because the clipped targets dominate the squares). Fit, per merged group:
  r_g = argmin sum_x omega_g(x) (x r - t_g(x))^2 + lambda ||r - r_g^avg||^2 (fp64), with token weights
  omega_g(x) = p_g(x) / mean_x p_g + 0.1, p_g(x) the members' summed probability (score): logit errors on
  tokens where the group is far from the top-k move no routing mass (weighting lowered the tiny-model mass
  error further, e.g. 0.48 -> 0.43 on mixtral). lambda = ridge x tr(X^T X) / H; with gpt_oss the router
  bias is fitted too (unpenalised).

Groups of one expert keep their original row and biases under every rule (so singletons change nothing).

Top-k makes no rule exact in general: two members in one token's top-k free a slot for another expert after
merging. `routing_mass_error` measures what is left: with m_g(x) the routing weight the ORIGINAL router gives
the members of g on token x (sum over members in the top-k) and m'_g(x) the weight the NEW router gives g,
    error = sum_x sum_g |m'_g(x) - m_g(x)| / sum_x sum_g m_g(x)     (relative L1; 0 = the same routing mass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from moe_compress.errors import UserError
from moe_compress.methods.merging.merge import average
from moe_compress.models.layer import MoELayer
from moe_compress.models.routing import route

RouterRule = Literal["freq_avg", "logit_adjust", "lstsq", "keep_dominant"]
LSTSQ_FLOOR = 0.1  # token-weight floor of the lstsq refit (relative to the mean weight)


@dataclass
class RouterRows:
    """The merged layer's router: weight [k, H], bias [k] | None (gpt_oss), correction_bias [k] | None
    (deepseek_v3), and a JSON-able record."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    correction_bias: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def _ridge_matrix(z: torch.Tensor, ridge: float, free_last: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(Z^T Z + lambda D, D, lambda) in fp64; D = I with a 0 for an unpenalised last (bias) column."""
    gram = z.T @ z
    d = torch.ones(z.shape[1], dtype=z.dtype, device=z.device)
    if free_last:
        d[-1] = 0.0
    n_feat = int(d.sum().item())
    lam = ridge * float(gram.diagonal()[d > 0].sum()) / max(1, n_feat)
    lam = max(lam, 1e-12)
    return gram + lam * torch.diag(d), d, lam


@torch.no_grad()
def constant_direction(x: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """v [H] float64 with X v ~ 1 (ridge least squares), and the R^2-like fit quality 1 - mean((Xv - 1)^2)."""
    z = x.double()
    a, _, _ = _ridge_matrix(z, ridge, False)
    v = torch.linalg.solve(a, z.sum(0))
    fit = 1.0 - float(((z @ v - 1.0) ** 2).mean())
    return v, fit


@torch.no_grad()
def target_logits(layer: MoELayer, x: torch.Tensor, groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets t_g(x) [T, m], member probability mass p_g(x) [T, m]) float64 for the groups (module docstring)."""
    logits = layer.router_logits(x).double()
    probs = torch.sigmoid(logits) if layer.rule.kind == "sigmoid_group" else torch.softmax(logits, dim=1)
    t = torch.stack([torch.logsumexp(logits[:, g], dim=1) for g in groups], dim=1)
    p = torch.stack([probs[:, g].sum(dim=1) for g in groups], dim=1)
    return t, p


@torch.no_grad()
def adapt_router(layer: MoELayer, groups: list[list[int]], weights: list[torch.Tensor], rule: RouterRule, *,
                 freq: torch.Tensor | None = None, x: torch.Tensor | None = None, tau: float = 1.0,
                 ridge: float = 1e-3) -> RouterRows:
    """Router rows for the merged layer (see the module docstring). x [T, H]: calibration MoE inputs (needed
    by ``lstsq`` and, for families without a router bias, ``logit_adjust``)."""
    w_router = layer.router_weight.detach()
    rows = RouterRows(average(w_router, groups, weights), average(layer.router_bias, groups, weights),
                      average(layer.correction_bias, groups, weights), {"rule": rule})
    merged = [j for j, g in enumerate(groups) if len(g) > 1]
    if rule == "freq_avg" or not merged:
        return rows
    if rule == "keep_dominant":
        dom = [g[int(torch.argmax(w))] for g, w in zip(groups, weights)]
        rows.weight = w_router[dom].float().clone()
        if layer.router_bias is not None:
            rows.bias = layer.router_bias.detach()[dom].float().clone()
        if layer.correction_bias is not None:
            rows.correction_bias = layer.correction_bias.detach()[dom].float().clone()
        rows.info["dominant"] = dom
        return rows
    if rule == "logit_adjust":
        if freq is None:
            raise ValueError("logit_adjust needs the expert frequencies")
        share = freq.detach().double().cpu().clamp(min=0.0)
        share = (share / share.sum().clamp(min=1e-30)).clamp(min=1e-6)
        offset = torch.zeros(len(groups), dtype=torch.float64)
        for j in merged:
            g, w = groups[j], weights[j]
            offset[j] = tau * (torch.log(share[g].sum()) - (w * torch.log(share[g])).sum())
        rows.info["offsets"] = [round(float(a), 6) for a in offset]
        if rows.bias is not None:  # the family has a router bias (rows.bias is its average)
            rows.bias = rows.bias + offset.to(rows.bias.device, torch.float32)
            rows.info["offset_in"] = "router_bias"
            return rows
        if x is None or x.shape[0] == 0:
            raise UserError("router=logit_adjust needs calibration inputs for a router without a bias")
        v, fit = constant_direction(x.to(w_router.device), ridge)
        rows.weight = (rows.weight.double() + offset.to(v.device)[:, None] * v[None, :]).float()
        rows.info.update({"offset_in": "folded_row", "constant_fit_r2": round(fit, 6)})
        return rows
    if rule == "lstsq":
        if x is None or x.shape[0] == 0:
            raise UserError("router=lstsq needs calibration inputs (MoE hidden states)")
        x = x.to(w_router.device)
        t, p = target_logits(layer, x, [groups[j] for j in merged])         # [T, m]
        bias = rows.bias  # the averaged router bias; None when the family has none
        has_bias = bias is not None
        z = x.double()
        prior = rows.weight[merged].double().T                               # [H, m]
        if bias is not None:
            z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], dim=1)
            prior = torch.cat([prior, bias[merged].double()[None, :]], dim=0)
        _, d, lam = _ridge_matrix(z, ridge, has_bias)
        omega = p / p.mean(dim=0, keepdim=True).clamp(min=1e-30) + LSTSQ_FLOOR  # [T, m]
        theta = torch.empty_like(prior)
        for c in range(len(merged)):  # one weighted ridge solve per merged group
            zw = z * omega[:, c:c + 1]
            theta[:, c] = torch.linalg.solve(zw.T @ z + lam * torch.diag(d), zw.T @ t[:, c] + lam * d * prior[:, c])
        idx = torch.tensor(merged, device=rows.weight.device)
        rows.weight = rows.weight.clone()
        rows.weight[idx] = theta[: x.shape[1]].T.float()
        if bias is not None:
            rows.bias = bias.clone()
            rows.bias[idx] = theta[-1].float()
        resid = z @ theta - t
        rows.info.update({"lambda": round(lam, 6),
                          "target_rmse": round(float(resid.pow(2).mean().sqrt()), 6)})
        return rows
    raise ValueError(f"unknown router rule {rule!r}")


def _assign(groups: list[list[int]], n_experts: int, device) -> torch.Tensor:
    a = torch.empty(n_experts, dtype=torch.long)
    for j, g in enumerate(groups):
        a[g] = j
    return a.to(device)


@torch.no_grad()
def group_mass(layer: MoELayer, x: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """[T, k] float64: the routing weight the ORIGINAL router gives the members of each group on each token."""
    idx, w = layer.route(x)
    out = torch.zeros(x.shape[0], len(groups), dtype=torch.float64, device=idx.device)
    return out.scatter_add_(1, _assign(groups, layer.n_experts, idx.device)[idx], w.double())


@torch.no_grad()
def merged_mass(layer: MoELayer, x: torch.Tensor, rows: RouterRows) -> torch.Tensor:
    """[T, k] float64: the routing weight the NEW router (rows, same routing rule) gives each merged expert."""
    logits = F.linear(x.float(), rows.weight.float())
    if rows.bias is not None:
        logits = logits + rows.bias.float()
    idx, w = route(logits, layer.rule, rows.correction_bias)
    out = torch.zeros(x.shape[0], rows.weight.shape[0], dtype=torch.float64, device=idx.device)
    return out.scatter_add_(1, idx, w.double())


@torch.no_grad()
def routing_mass_error(layer: MoELayer, x: torch.Tensor, groups: list[list[int]], rows: RouterRows) -> float:
    """Relative L1 routing-mass error of a merged router on tokens x [T, H] (0 = every group receives exactly
    the routing weight its members received, token by token)."""
    x = x.to(layer.router_weight.device)
    before = group_mass(layer, x, groups)
    after = merged_mass(layer, x, rows)
    return float(((after - before).abs().sum() / before.sum().clamp(min=1e-30)).detach())
