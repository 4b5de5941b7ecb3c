"""absorb (methods/merging/absorb.py): prune by a selection, merge each removed expert into its successor.

- the successor counts equal a literal per-token reading of their definition;
- every group holds exactly one kept expert, and DeepSeek routing groups are respected;
- all blends at t = 0 give exactly the pruned layer (same tensors as keep_set, so pruning == router masking);
- the measured blend is never worse than that pruning on the measuring tokens, and the plan runs end to end
  on every architecture (also as refit's starting point);
- bad parameters are user errors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS
from test_refit import ctx, first_layer

from moe_compress.errors import UserError
from moe_compress.methods.base import get_method
from moe_compress.methods.merging.absorb import successor_counts, successor_groups
from moe_compress.methods.merging.base import MergeParams, merge_plan
from moe_compress.methods.merging.merge import group_weights
from moe_compress.methods.merging.oracle import blend
from moe_compress.methods.reconstruction import original_output, relative_error, set_output
from moe_compress.models.surgery import keep_set


def n_keep(layer) -> int:
    return layer.n_experts // 2 if layer.rule.n_group > 1 else layer.n_experts - 2


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
@torch.no_grad()
def test_successor_counts_are_the_literal_definition(arch):
    _, layer, _, x = first_layer(arch)
    kept = list(range(0, layer.n_experts, 2))
    mask = torch.zeros(layer.n_experts, dtype=torch.bool)
    mask[kept] = True
    idx, wt = layer.route(x)
    new_idx, _ = layer.route(x, mask)
    expected = torch.zeros(layer.n_experts, layer.n_experts, dtype=torch.float64)
    for t in range(x.shape[0]):
        before, after = set(idx[t].tolist()), set(new_idx[t].tolist())
        entered = sorted(after - before)
        for slot, d in enumerate(idx[t].tolist()):
            if d in kept:
                continue
            for c in entered:
                expected[d, c] += float(wt[t, slot]) / len(entered)
    got = successor_counts(layer, x, kept)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert float(got[kept].abs().sum()) == 0.0 and float(got[:, [e for e in range(layer.n_experts)
                                                                   if e not in kept]].abs().sum()) == 0.0
    assert float(got.sum()) > 0.0


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_each_group_holds_one_kept_expert_within_its_routing_group(arch):
    _, layer, _, x = first_layer(arch)
    per = layer.n_experts // max(1, layer.rule.n_group)
    kept = [e for e in range(layer.n_experts) if e % per < per // 2]  # half of every routing group
    groups, info = successor_groups(layer, x, kept)
    assert sorted(e for g in groups for e in g) == list(range(layer.n_experts))
    assert [sorted(set(g) & set(kept)) for g in groups] == [[c] for c in kept]
    for d, c in info["successor"].items():
        assert int(d) // per == c // per


@pytest.mark.parametrize("arch", ARCHS)
def test_all_zero_blend_is_exactly_the_pruned_layer(arch):
    _, layer, stats, x = first_layer(arch)
    kept = sorted(get_method("reap").plan(ctx(layer, stats, x, n_keep(layer))).info["kept"])
    groups, _ = successor_groups(layer, x, kept)
    weights = [blend(w, 0.0, g.index(c)) for w, g, c in zip(group_weights(stats["frequency"], groups), groups, kept)]
    plan = merge_plan(ctx(layer, stats, x, len(kept)), groups, MergeParams(), stats["frequency"], x, weights=weights)
    pruned = keep_set(layer, kept)
    got = plan.expert_set
    for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        a, b = getattr(got.experts, name), getattr(pruned.experts, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.to(b.dtype), b), name
    assert torch.equal(got.router_weight.to(pruned.router_weight.dtype), pruned.router_weight)
    for name in ("router_bias", "correction_bias"):
        a, b = getattr(got, name), getattr(pruned, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.to(b.dtype), b), name


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_absorb_is_never_worse_than_its_pruning_on_the_measuring_tokens(arch):
    _, layer, stats, x = first_layer(arch)
    k = n_keep(layer)
    plan = get_method("absorb", select="reap", blend_tokens=x.shape[0]).plan(ctx(layer, stats, x, k))
    assert plan.expert_set.n_experts == k and len(plan.info["blend"]) == k
    y = original_output(layer, x)
    pruned = relative_error(set_output(layer, keep_set(layer, plan.info["kept"]), x), y)
    got = relative_error(set_output(layer, plan.expert_set, x), y)
    assert got <= pruned * (1 + 1e-5) + 1e-9
    assert plan.info["blend_error"]["chosen"] == pytest.approx(got, rel=1e-4, abs=1e-7)
    assert sorted(plan.info["kept"]) == plan.info["kept"]


@pytest.mark.parametrize("arch", ARCHS)
def test_absorb_plans_on_every_architecture(arch):
    _, layer, stats, x = first_layer(arch)
    k = n_keep(layer)
    for method in (get_method("absorb"), get_method("absorb", weighting="frequency"),
                   get_method("refit", merge="absorb", holdout=0.0, ridge=0.1)):
        plan = method.plan(ctx(layer, stats, x, k))
        assert plan.expert_set.n_experts == k


def test_bad_absorb_parameters_are_user_errors():
    with pytest.raises(UserError):
        get_method("absorb", select="random")
    with pytest.raises(UserError):
        get_method("absorb", blend_tokens=1)
    with pytest.raises(UserError):
        get_method("absorb", weighting="bogus")


@pytest.mark.parametrize("param,pattern", [("select=random", "invalid parameter select"),
                                           ("blend_tokens=1", "invalid parameter blend_tokens"),
                                           ("weighting=bogus", "invalid parameter weighting")])
def test_bad_absorb_parameters_are_one_line_cli_errors(monkeypatch, capsys, saved_models, tmp_path, param, pattern):
    from clitools import assert_user_error, run_cli

    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "absorb", "--experts",
                           4, "--calib", "builtin:demo", "--param", param, "--out", tmp_path / "out")
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "out").exists()


def test_absorb_compress_reloads_with_the_planned_experts(monkeypatch, capsys, saved_models, text_file, tmp_path):
    """End to end: `compress --method absorb` writes a checkpoint that transformers reloads with E' experts."""
    import json

    from clitools import run_cli
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "absorb",
                           "--experts", 4, "--calib", text_file, "--out", out)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 4
    layers = json.loads((out / "compression.json").read_text())["layers"]
    assert all(len(info["blend"]) == 4 and sorted(info["kept"]) == info["kept"] for info in layers.values())
