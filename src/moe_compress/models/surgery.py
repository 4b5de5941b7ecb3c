"""Exact expert surgery on all MoE layers at once: keep a subset of experts, or replace them by new ones.

A standard checkpoint holds one expert count for every MoE layer (neither transformers nor vLLM reads a
per-layer count for these families), so every call sets the same E' everywhere and writes the count into the
config field the family really uses. DeepSeek group-limited routing also needs E' divisible by ``n_group``
(and, when pruning, the same number of kept experts in every group, else routing silently changes).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from moe_compress.errors import UserError
from moe_compress.models.layer import ExpertSet, ExpertWeights, MoELayer
from moe_compress.models.registry import Adapter
from moe_compress.models.routing import RoutingRule


def check_expert_count(adapter: Adapter, n_experts: int) -> None:
    """Raise `UserError` if ``n_experts`` is not a valid count for this model (lists the valid ones)."""
    rule = adapter.rule()
    problem = rule.count_problem(n_experts)
    if problem is not None:
        valid = rule.valid_expert_counts(adapter.n_experts())
        raise UserError(f"cannot use {n_experts} experts per layer: {problem}; valid counts below "
                        f"{adapter.n_experts()}: {', '.join(map(str, valid)) or 'none'}")


def keep_set(layer: MoELayer, kept: list[int], rule: RoutingRule | None = None) -> ExpertSet:
    """The ExpertSet that keeps the original experts ``kept`` of ``layer`` (sorted; router rows sliced).

    With DeepSeek group-limited routing (``rule.n_group > 1``) every group must keep the same number of
    experts, or the group boundaries move and routing silently changes.
    """
    rule = rule or layer.rule
    kept = sorted(int(e) for e in kept)
    if len(set(kept)) != len(kept) or not all(0 <= e < layer.n_experts for e in kept):
        raise ValueError(f"layer {layer.index}: invalid kept experts {kept}")
    if rule.n_group > 1:
        per_group = layer.n_experts // rule.n_group
        counts = [sum(1 for e in kept if e // per_group == g) for g in range(rule.n_group)]
        if len(set(counts)) != 1:
            raise UserError(f"layer {layer.index}: DeepSeek group routing needs the same number of kept "
                            f"experts in each of the {rule.n_group} groups (got {counts})")
    idx = torch.tensor(kept, dtype=torch.long, device=layer.router_weight.device)
    return ExpertSet(
        experts=layer.experts.select(idx),
        router_weight=layer.router_weight.detach().index_select(0, idx).clone(),
        router_bias=None if layer.router_bias is None else layer.router_bias.detach()[idx].clone(),
        correction_bias=None if layer.correction_bias is None else layer.correction_bias[idx].clone(),
        sources=[[(e, 1.0)] for e in kept],
    )


def keep_sets(adapter: Adapter, model: torch.nn.Module, keep: dict[int, list[int]]) -> dict[int, ExpertSet]:
    """{layer: ExpertSet} keeping the listed original experts of every MoE layer."""
    return {layer.index: keep_set(layer, keep[layer.index]) for layer in adapter.layers(model)}


def keep_experts(adapter: Adapter, model: torch.nn.Module, keep: dict[int, list[int]]) -> None:
    """Prune in place: layer index -> original experts to keep (same count in every MoE layer)."""
    replace_experts(adapter, model, keep_sets(adapter, model, keep))


def pruned_copy(adapter: Adapter, model: Any, keep: dict[int, list[int]]) -> Any:
    """A new model: ``model`` with every MoE layer pruned to the original experts ``keep[layer]``; ``model`` itself
    is not changed. Only the kept experts and router rows are copied (the full routed experts are never
    duplicated): peak memory is ``model`` plus the pruned copy."""
    from moe_compress.models.registry import get_adapter

    sets = keep_sets(adapter, model, keep)
    memo: dict[int, object] = {}
    for block in adapter.moe_blocks(model).values():
        experts: torch.nn.Module = block.experts  # type: ignore[assignment]  # Module.__getattr__ is untyped
        for p in [*experts.parameters(), *adapter.router(block).parameters()]:
            memo[id(p)] = torch.nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device),
                                             requires_grad=p.requires_grad)
    new = copy.deepcopy(model, memo)
    replace_experts(get_adapter(new), new, sets)
    return new


def replace_experts(adapter: Adapter, model: torch.nn.Module, sets: dict[int, ExpertSet]) -> None:
    """Replace the routed experts and router rows of every MoE layer by ``sets`` (in place).

    Every MoE layer must be given, all with the same count E'. Shared experts are not touched. Parameters keep
    their dtype and device; the config count field and the modules' cached counts are updated.
    """
    blocks = adapter.moe_blocks(model)
    if set(sets) != set(blocks):
        raise ValueError(f"expert sets given for layers {sorted(sets)}, the model's MoE layers are {sorted(blocks)}")
    counts = {s.n_experts for s in sets.values()}
    if len(counts) != 1:
        raise UserError(f"every MoE layer must keep the same number of experts (got {sorted(counts)}): a "
                        "standard checkpoint holds one expert count")
    n_new = counts.pop()
    check_expert_count(adapter, n_new)
    for i, block in blocks.items():
        write_block(adapter, block, sets[i])
    adapter.set_n_experts(n_new)


def _param_like(value: torch.Tensor, like: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(value.detach().to(dtype=like.dtype, device=like.device).contiguous(),
                              requires_grad=like.requires_grad)


def write_block(adapter: Adapter, block: torch.nn.Module, s: ExpertSet) -> None:
    """Write one MoE block's new experts and router rows. Callers update the config count afterwards
    (`Adapter.set_n_experts`) once every block has the same count."""
    ex: Any = block.experts  # the family's experts module (its tensors: `ArchSpec.layout`)
    router = adapter.router(block)
    w: ExpertWeights = s.experts
    n = w.n_experts
    try:
        storage = adapter.spec.layout.storage(w)
    except ValueError as e:
        raise ValueError(f"{adapter.spec.model_type} experts have biases: {e}") from None
    for name, value in storage.items():
        setattr(ex, name, _param_like(value, getattr(ex, name)))
    router.weight = _param_like(s.router_weight, router.weight)
    if getattr(router, "bias", None) is not None:
        if s.router_bias is None:
            raise ValueError("this router has a bias: the expert set must give router_bias")
        router.bias = _param_like(s.router_bias, router.bias)
    if hasattr(router, "e_score_correction_bias"):
        old = router.e_score_correction_bias
        new = s.correction_bias if s.correction_bias is not None else torch.zeros(n)
        router.e_score_correction_bias = new.detach().to(dtype=old.dtype, device=old.device).clone()
    for module in (block, router, ex):
        if hasattr(module, "num_experts"):
            setattr(module, "num_experts", n)
    for attr in ("intermediate_dim", "intermediate_size"):  # cached widths (not read by the forward passes)
        if isinstance(getattr(ex, attr, None), int):
            setattr(ex, attr, w.gate.shape[1])
    if hasattr(router, "out_features"):  # phimoe's router is an nn.Linear subclass
        router.out_features = n
