"""The measured layer error (methods/reconstruction.py), the oracle grouping (methods/merging/oracle.py) and
refit starting from a merge (refit[merge=...]).

- a set that keeps every expert has error 0; a kept subset's output equals the original routed with the dropped
  experts masked out of the router (pruning == router masking);
- the pipeline records every layer's error, and it equals a direct recomputation;
- the oracle's slot-form error equals the reduced merged layer's;
- the partitions enumerator yields every partition once (Stirling numbers);
- one oracle step (E -> E - 1) is the exhaustive optimum; two identical experts are merged first (into that
  expert, exactly), though the layer output still changes (top-k slots);
  DeepSeek routing groups keep equal shares; the oracle's error is never above M-SMoE's grouping's;
- refit[merge=msmoe] with the down re-fit never has a higher calibration error than msmoe's merged experts.
"""

from __future__ import annotations

from math import comb

import pytest
import torch
from conftest import ARCHS
from test_refit import ctx, first_layer

from moe_compress.methods.base import get_method
from moe_compress.methods.merging.oracle import exhaustive_groups, merged_error, oracle_groups, partitions
from moe_compress.methods.reconstruction import layer_error, original_output, relative_error, set_output
from moe_compress.models.routing import route
from moe_compress.models.surgery import keep_set


def stirling2(n: int, k: int) -> int:
    return sum((-1) ** j * comb(k, j) * (k - j) ** n for j in range(k + 1)) // torch.tensor(range(1, k + 1)).prod()


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_every_expert_has_no_error(arch):
    _, layer, _, x = first_layer(arch)
    assert layer_error(layer, keep_set(layer, list(range(layer.n_experts))), x) < 1e-10


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_pruned_set_output_is_router_masking(arch):
    _, layer, _, x = first_layer(arch)
    kept = list(range(0, layer.n_experts, 2))
    mask = torch.zeros(layer.n_experts, dtype=torch.bool)
    mask[kept] = True
    idx, wt = route(layer.router_logits(x), layer.rule, layer.correction_bias, mask)
    expected = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):  # literal loop over tokens and slots
        for slot in range(idx.shape[1]):
            expected[t] += wt[t, slot] * layer.expert_forward(int(idx[t, slot]), x[t:t + 1].float())[0].float()
    torch.testing.assert_close(set_output(layer, keep_set(layer, kept), x), expected, rtol=1e-4, atol=1e-5)
    assert layer_error(layer, keep_set(layer, kept), x) > 1e-4  # dropping experts changes the output


def test_pipeline_records_each_layer_error():
    from moe_compress.pipeline import MethodApplier

    model, layer, stats, x = first_layer("mixtral")
    from moe_compress.models.registry import get_adapter

    adapter = get_adapter(model)
    method = get_method("msmoe")
    plan = method.plan(ctx(layer, stats, x, 4))
    expected = layer_error(layer, plan.expert_set, x)
    applier = MethodApplier(method, adapter, model, 4, seed=0)
    applier.apply(layer.index, stats, x)
    assert applier.infos[layer.index]["layer_error"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert applier.infos[layer.index]["layer_error"] > 0


@pytest.mark.parametrize("n,k", [(4, 2), (5, 3), (6, 3), (7, 1), (6, 6)])
def test_partitions_are_all_distinct_partitions(n, k):
    parts = [tuple(tuple(b) for b in sorted(p)) for p in partitions(list(range(n)), k)]
    assert len(parts) == len(set(parts)) == int(stirling2(n, k))
    for p in parts:
        assert sorted(e for b in p for e in b) == list(range(n)) and len(p) == k


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_slot_form_error_equals_the_reduced_layer(arch):
    from moe_compress.methods.merging.base import merge_plan

    _, layer, stats, x = first_layer(arch)
    k = layer.n_experts // 2
    method = get_method("msmoe")
    groups = method.plan(ctx(layer, stats, x, k)).info["groups"]
    reduced = merge_plan(ctx(layer, stats, x, k), groups, method.params, stats["frequency"], x).expert_set
    y = original_output(layer, x)
    direct = relative_error(set_output(layer, reduced, x), y)
    assert merged_error(layer, groups, x, y, stats["frequency"]) == pytest.approx(direct, rel=1e-6, abs=1e-9)


def test_one_oracle_step_is_the_exhaustive_optimum():
    _, layer, stats, x = first_layer("mixtral")
    freq = stats["frequency"]
    n = layer.n_experts
    greedy, info = oracle_groups(layer, x, freq, n - 1, n_tokens=x.shape[0])
    best, err = exhaustive_groups(layer, x, freq, n - 1)
    assert greedy == best
    assert info["oracle_errors"][-1] == pytest.approx(err, rel=1e-5)


def test_oracle_merges_identical_experts_first():
    _, layer, stats, x = first_layer("mixtral")
    with torch.no_grad():  # expert 5 := expert 2 (weights and router row): merging them changes nothing
        for t in (layer.experts.gate, layer.experts.up, layer.experts.down):
            t[5] = t[2]
        layer.router_weight[5] = layer.router_weight[2]
    freq = stats["frequency"]
    groups, info = oracle_groups(layer, x, freq, layer.n_experts - 1, n_tokens=x.shape[0])
    assert [2, 5] in groups
    from moe_compress.methods.merging.base import merge_plan

    plan = merge_plan(ctx(layer, stats, x, layer.n_experts - 1), groups, get_method("msmoe").params, freq, x)
    j = groups.index([2, 5])
    torch.testing.assert_close(plan.expert_set.experts.gate[j], layer.experts.gate[2])  # the merge IS expert 2
    # ... yet the layer output changes: where the pair held both top-2 slots, the merged expert holds one and
    # the freed slot goes to another expert. Merging identical experts is not free under top-k routing.
    assert info["oracle_errors"][0] > 1e-4


def test_oracle_respects_deepseek_routing_groups():
    _, layer, stats, x = first_layer("deepseek_v3")
    g = layer.rule.n_group
    assert g > 1
    k = layer.n_experts // 2
    groups, _ = oracle_groups(layer, x, stats["frequency"], k, n_tokens=256)
    per = layer.n_experts // g
    assert len(groups) == k and sorted(e for b in groups for e in b) == list(range(layer.n_experts))
    assert all(len({e // per for e in b}) == 1 for b in groups)
    assert [sum(1 for b in groups if b[0] // per == r) for r in range(g)] == [k // g] * g
    assert [b[0] // per for b in groups] == sorted(b[0] // per for b in groups)  # routing-group order


def test_oracle_is_no_worse_than_msmoe_grouping():
    _, layer, stats, x = first_layer("mixtral")
    freq, k = stats["frequency"], 4
    ms = get_method("msmoe").plan(ctx(layer, stats, x, k)).info["groups"]
    oracle, _ = oracle_groups(layer, x, freq, k, n_tokens=x.shape[0])
    y = original_output(layer, x)
    assert merged_error(layer, oracle, x, y, freq) <= merged_error(layer, ms, x, y, freq) + 1e-9


def test_submoe_oracle_clustering_runs_through_plan():
    _, layer, stats, x = first_layer("mixtral")
    plan = get_method("submoe", clustering="oracle").plan(ctx(layer, stats, x, 4))
    assert plan.info["clustering"] == "oracle" and len(plan.info["groups"]) == 4
    assert plan.expert_set.n_experts == 4


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_refit_from_merge_never_increases_calibration_error(arch):
    _, layer, stats, x = first_layer(arch)
    k = 4 if layer.rule.n_group > 1 else 6
    merged = get_method("msmoe").plan(ctx(layer, stats, x, k))
    refit = get_method("refit", merge="msmoe", holdout=0.0, ridge=0.1).plan(ctx(layer, stats, x, k))
    assert refit.info["merge"] == "msmoe" and refit.info["groups"] == merged.info["groups"]
    assert refit.expert_set.n_experts == k
    before = relative_error(set_output(layer, merged.expert_set, x), original_output(layer, x))
    after = relative_error(set_output(layer, refit.expert_set, x), original_output(layer, x))
    assert refit.info["rel_error"]["pruned"] == pytest.approx(before, rel=1e-4)
    assert after <= before + 1e-9 and after < before


def test_refit_merge_and_fold_conflict_is_a_user_error():
    from moe_compress.errors import UserError

    with pytest.raises(UserError, match="merge and fold"):
        get_method("refit", merge="msmoe", fold=True)


def test_blend_endpoints():
    from moe_compress.methods.merging.oracle import blend

    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    assert torch.equal(blend(w, 0.0), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(blend(w, 1.0), w)
    assert float(blend(w, 0.4).sum()) == pytest.approx(1.0)


def test_all_dominant_blend_is_frequency_pruning():
    """t = 0 in every group of M-SMoE's grouping (centres = the most frequent experts) IS frequency pruning: the
    same experts and router rows, so the same layer output."""
    from moe_compress.methods.merging.merge import group_weights
    from moe_compress.methods.merging.oracle import blend

    _, layer, stats, x = first_layer("mixtral")
    k, freq = 4, stats["frequency"]
    groups = get_method("msmoe").plan(ctx(layer, stats, x, k)).info["groups"]
    y = original_output(layer, x)
    weights = [blend(w, 0.0) for w in group_weights(freq, groups)]
    kept = get_method("frequency", protect_super=False).plan(ctx(layer, stats, x, k)).info["kept"]
    pruned = relative_error(set_output(layer, keep_set(layer, kept), x), y)
    assert sorted(g[int(torch.argmax(w))] for g, w in zip(groups, weights)) == sorted(kept)
    assert merged_error(layer, groups, x, y, freq, weights=weights) == pytest.approx(pruned, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_measured_weighting_is_never_worse_than_average_or_dominant(arch):
    from moe_compress.methods.merging.merge import group_weights
    from moe_compress.methods.merging.oracle import blend, measured_weights

    _, layer, stats, x = first_layer(arch)
    k, freq = layer.n_experts // 2, stats["frequency"]
    groups = get_method("msmoe").plan(ctx(layer, stats, x, k)).info["groups"]
    weights, info = measured_weights(layer, groups, x, freq, n_tokens=x.shape[0])
    y = original_output(layer, x)
    got = merged_error(layer, groups, x, y, freq, weights=weights)
    avg = merged_error(layer, groups, x, y, freq)
    dom = merged_error(layer, groups, x, y, freq, weights=[blend(w, 0.0) for w in group_weights(freq, groups)])
    assert got <= min(avg, dom) + 1e-9
    assert info["blend_error"]["chosen"] == pytest.approx(got, rel=1e-5, abs=1e-8)
    plan = get_method("msmoe", weighting="measured").plan(ctx(layer, stats, x, k))
    assert plan.info["blend"] == info["blend"] and plan.expert_set.n_experts == k
