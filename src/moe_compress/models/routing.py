"""Routing rules as data, and one pure routing function that reproduces every supported family exactly.

A router turns the logits of a token into the indices of the experts it uses and their mixing weights. The
families differ only in a few switches, so a rule is a small frozen dataclass and `route` interprets it:

- ``softmax_topk``  (mixtral, qwen2_moe, qwen3_moe, olmoe): p = softmax(logits); top-k of p; renormalise
  over the k iff ``renormalize``.
- ``softmax_group`` (deepseek_v2): p = softmax(logits) over all experts; choose greedily, or within the
  ``topk_group`` best groups (group score = max p in the group) when ``n_group > 1``; weights = p x scaling.
- ``sigmoid_group`` (deepseek_v3, Kimi-K2, Moonlight): s = sigmoid(logits); choose on s + correction bias
  within the ``topk_group`` best groups (group score = sum of the two best choice scores of the group);
  weights = s (no bias), renormalised iff ``renormalize`` (+1e-20), x scaling.
- ``topk_softmax`` (gpt_oss): top-k on the logits (router bias included), softmax over the k chosen.
- ``sparsemixer`` (phimoe, inference path): two rounds of "argmax, softmax over the logits within a relative
  threshold of the current maximum".

``mask`` [E] (bool, True = expert allowed) removes experts from the choice exactly as if they did not exist:
this is the router-masking reference that pruning must equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

RoutingKind = Literal["softmax_topk", "softmax_group", "sigmoid_group", "topk_softmax", "sparsemixer"]


@dataclass(frozen=True)
class RoutingRule:
    """How one MoE block turns router logits into (expert indices, weights)."""

    kind: RoutingKind
    top_k: int
    renormalize: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    jitter_eps: float = 0.0  # sparsemixer threshold (phimoe `router_jitter_noise`)

    def valid_expert_counts(self, n_experts: int) -> list[int]:
        """Every expert count E' < n_experts this rule can run with, in a standard checkpoint."""
        return [e for e in range(1, n_experts) if self.count_problem(e) is None]

    def count_problem(self, n_experts: int) -> str | None:
        """Why a block with this rule cannot hold ``n_experts`` experts, or None if it can."""
        if n_experts < self.top_k:
            return f"{n_experts} experts is fewer than the {self.top_k} each token uses (num_experts_per_tok)"
        if self.kind == "sparsemixer" and n_experts < 2:
            return "sparsemixer routing needs at least 2 experts"
        if self.n_group > 1 and self.kind in ("sigmoid_group", "softmax_group"):
            if n_experts % self.n_group:
                return f"{n_experts} experts cannot be split into n_group={self.n_group} equal groups"
            per_group = n_experts // self.n_group
            if self.kind == "sigmoid_group" and per_group < 2:
                return f"each of the {self.n_group} groups needs at least 2 experts (group score = sum of top-2)"
            if per_group * self.topk_group < self.top_k:
                return (f"{self.topk_group} groups of {per_group} experts hold fewer than the "
                        f"{self.top_k} experts a token uses")
        return None


def route(
    logits: torch.Tensor,
    rule: RoutingRule,
    correction_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens exactly as the model does.

    Args:
        logits: [T, E] router logits (for gpt_oss including the router bias).
        rule: the block's routing rule.
        correction_bias: [E] choice-only bias (deepseek_v3), or None.
        mask: [E] bool, False for experts that must never be chosen, or None.

    Returns:
        (indices [T, k] int64, weights [T, k] float32).
    """
    logits = logits.float()
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if mask is not None:
        logits = torch.where(mask, logits, neg_inf)
    k = rule.top_k

    if rule.kind == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        weights, idx = torch.topk(probs, k, dim=-1)
        if rule.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return idx, weights * rule.scaling

    if rule.kind == "topk_softmax":
        top, idx = torch.topk(logits, k, dim=-1)
        return idx, torch.softmax(top, dim=-1) * rule.scaling

    if rule.kind == "softmax_group":
        probs = torch.softmax(logits, dim=-1)
        choice = probs
        if rule.n_group > 1:
            t, e = probs.shape
            group_scores = probs.view(t, rule.n_group, e // rule.n_group).amax(dim=-1)
            choice = probs.masked_fill(~_group_mask(group_scores, rule, e), 0.0)
        weights, idx = torch.topk(choice, k, dim=-1, sorted=False)
        return idx, weights * rule.scaling

    if rule.kind == "sigmoid_group":
        scores = torch.sigmoid(logits)
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if mask is not None:
            choice = torch.where(mask, choice, neg_inf)
        if rule.n_group > 1:
            t, e = choice.shape
            group_scores = choice.view(t, rule.n_group, e // rule.n_group).topk(2, dim=-1)[0].sum(dim=-1)
            choice = choice.masked_fill(~_group_mask(group_scores, rule, e), float("-inf"))
        idx = torch.topk(choice, k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if rule.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weights * rule.scaling

    if rule.kind == "sparsemixer":
        return _sparsemixer(logits, rule.jitter_eps)

    raise ValueError(f"unknown routing kind {rule.kind!r}")


def _group_mask(group_scores: torch.Tensor, rule: RoutingRule, n_experts: int) -> torch.Tensor:
    """[T, G] group scores -> [T, E] bool mask of the experts inside each token's ``topk_group`` best groups."""
    group_idx = torch.topk(group_scores, rule.topk_group, dim=-1, sorted=False)[1]
    chosen = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return chosen.repeat_interleave(n_experts // rule.n_group, dim=1)


def _sparsemixer(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer at inference: [T, E] logits -> idx [T, 2], weights [T, 2]."""

    def one_round(masked_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, top_idx = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        far = ((top - scores) / factor) > (2 * eps)
        gates = torch.softmax(masked_scores.masked_fill(far, float("-inf")), dim=-1)
        return top_idx, gates.gather(-1, top_idx)

    idx1, w1 = one_round(scores)
    idx2, w2 = one_round(torch.scatter(scores, -1, idx1, float("-inf")))
    return torch.cat([idx1, idx2], dim=-1), torch.cat([w1, w2], dim=-1)


def selection_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Number of top-k selections per expert: idx [T, k] -> [E] int64."""
    return torch.bincount(idx.reshape(-1), minlength=n_experts)
