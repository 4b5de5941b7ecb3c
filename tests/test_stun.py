"""STUN: the clustering against an independent reference (single linkage == cutting the largest edges of a
minimum spanning tree), representatives by a literal loop, Wanda zeros where |W| x ||X|| is lowest (a loop over
routed tokens), the measured sparsity, and the compress command (data-free expert stage == router masking)."""

from __future__ import annotations

import pytest
import torch
from clitools import assert_user_error, run_cli
from conftest import ARCHS
from helpers import ids
from methods_e2e import cli_prune_and_check, layer_stats
from safetensors.torch import load_file
from test_pruning import capture_experts_calls, n_keep_for

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, get_method
from moe_compress.methods.pruning.stun import single_linkage
from moe_compress.models.registry import get_adapter
from moe_compress.models.tiny import tiny_model


def mst_clusters(dist: torch.Tensor, k: int) -> list[list[int]]:
    """Single-linkage clusters as the components left after removing the k-1 heaviest edges of a minimum
    spanning tree (Prim's algorithm)."""
    n = dist.shape[0]
    in_tree, edges = {0}, []
    while len(in_tree) < n:
        w, a, b = min((float(dist[a, b]), a, b) for a in in_tree for b in range(n) if b not in in_tree)
        edges.append((w, a, b))
        in_tree.add(b)
    keep = sorted(edges)[:n - k]
    comp = list(range(n))
    for _, a, b in keep:
        ca, cb = comp[a], comp[b]
        comp = [ca if c == cb else c for c in comp]
    groups = {}
    for e, c in enumerate(comp):
        groups.setdefault(c, []).append(e)
    return sorted(groups.values(), key=lambda g: g[0])


def test_single_linkage_equals_the_spanning_tree_cut():
    gen = torch.Generator().manual_seed(0)
    for n, k in ((8, 4), (8, 6), (12, 3), (6, 1), (5, 5)):
        pts = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        d = torch.cdist(pts, pts)
        assert single_linkage(d, k) == mst_clusters(d, k)


def brute_plan(layer, n_keep) -> tuple[list[int], list[list[int]]]:
    """(kept, clusters) by the definition, each expert's weights read one by one."""
    n, n_group = layer.n_experts, max(layer.rule.n_group, 1)
    per = n // n_group
    kept, clusters = [], []
    for g in range(n_group):
        members = list(range(g * per, (g + 1) * per))
        rows = torch.stack([layer.router_weight[e].detach().double() for e in members])
        for c in mst_clusters(torch.cdist(rows, rows), n_keep // n_group):
            c = [members[i] for i in c]
            flat = [torch.cat([layer.experts.gate[e].detach().flatten(), layer.experts.up[e].detach().flatten(),
                               layer.experts.down[e].detach().flatten()]).double() for e in c]
            mean = sum(flat) / len(flat)
            dists = [float((f - mean).norm()) for f in flat]
            kept.append(c[dists.index(min(dists))])
            clusters.append(c)
    return sorted(kept), clusters


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_experts_are_the_cluster_representatives(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    for n_keep in ({4, n_keep_for(arch)} if arch != "deepseek_v3" else {4, 6}):
        for layer in adapter.layers(model):
            plan = get_method("stun").plan(LayerContext(layer, n_keep))
            kept, clusters = brute_plan(layer, n_keep)
            assert plan.info["kept"] == kept
            assert sorted(plan.info["clusters"]) == sorted(clusters)
            assert "unstructured" not in plan.info
            assert torch.equal(plan.expert_set.experts.gate, layer.experts.gate[kept])  # untouched weights


def brute_feature_sq(model, x) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (sum of x^2 [E, H], sum of a^2 [E, I])} over the tokens routed to each expert, token by token."""
    adapter = get_adapter(model)
    out = {}
    for i, (h, idx, _) in capture_experts_calls(model, x).items():
        layer = adapter.layer(model, i)
        n, inter = layer.n_experts, layer.experts.gate.shape[1]
        xs = torch.zeros(n, h.shape[1], dtype=torch.float64)
        acts = torch.zeros(n, inter, dtype=torch.float64)
        for t in range(h.shape[0]):
            for e in idx[t].tolist():
                with torch.no_grad():
                    a = layer.expert_forward(e, h[t:t + 1], intermediate=True)[0]
                xs[e] += h[t].double() ** 2
                acts[e] += a.double() ** 2
        out[i] = (xs, acts)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_wanda_zeros_the_lowest_metric_per_row(arch):
    model = tiny_model(arch)
    x = ids(2, 16)
    adapter = get_adapter(model)
    stats = layer_stats(model, x, ("expert_input_sq", "expert_act_sq"))
    reference = brute_feature_sq(model, x)
    s = 0.3
    for i, (xs, acts) in reference.items():
        torch.testing.assert_close(stats[i]["expert_input_sq"], xs, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(stats[i]["expert_act_sq"], acts, rtol=1e-5, atol=1e-9)
        layer = adapter.layer(model, i)
        plan = get_method("stun", unstructured_sparsity=s).plan(LayerContext(layer, 4, stats[i]))
        kept = plan.info["kept"]
        assert kept == get_method("stun").plan(LayerContext(layer, 4)).info["kept"]  # same expert stage
        new = plan.expert_set.experts
        zeros = total = 0
        for name, feat in (("gate", xs), ("up", xs), ("down", acts)):
            for j, e in enumerate(kept):
                w_orig, w_new = getattr(layer.experts, name)[e], getattr(new, name)[j]
                for row in range(w_orig.shape[0]):
                    metric = [abs(float(w_orig[row, c].detach())) * float(feat[e, c]) ** 0.5
                              for c in range(w_orig.shape[1])]
                    n_zero = int(s * len(metric))
                    lowest = set(sorted(range(len(metric)), key=lambda c: (metric[c], c))[:n_zero])
                    zeroed = {c for c in range(len(metric)) if float(w_new[row, c].detach()) == 0.0}
                    assert zeroed == lowest, (name, e, row)
                    assert torch.equal(w_new[row][[c for c in range(len(metric)) if c not in lowest]],
                                       w_orig[row][[c for c in range(len(metric)) if c not in lowest]])
                zeros += int((w_new == 0).sum())
                total += w_new.numel()
        info = plan.info["unstructured"]
        assert info["zeros"] == zeros and info["weights"] == total
        assert info["measured"] == pytest.approx(zeros / total, rel=1e-6)
        planned = sum(len(kept) * getattr(new, name).shape[1] * int(s * getattr(new, name).shape[2])
                      for name in ("gate", "up", "down"))
        assert zeros == planned  # floor(s x n_in) per row: a bit below s on tiny matrices, reported as measured
        if new.down_bias is not None:  # biases are not pruned
            assert torch.equal(new.down_bias, layer.experts.down_bias[kept])


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"] + [pytest.param(a, marks=pytest.mark.slow)
                                                                  for a in ARCHS
                                                                  if a not in ("qwen3_moe", "deepseek_v3")])
def test_expert_stage_needs_no_data_and_reloads_as_masked_original(monkeypatch, capsys, saved_models, text_file,
                                                                    tmp_path, arch):
    layers = cli_prune_and_check(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, "stun", calib=False)
    assert all("clusters" in info for info in layers.values())


def test_unstructured_stage_writes_the_reported_zeros(monkeypatch, capsys, saved_models, text_file, tmp_path):
    layers = cli_prune_and_check(monkeypatch, capsys, saved_models, text_file, tmp_path, "olmoe", "stun",
                                 "--param", "unstructured_sparsity=0.5", check=False)
    weights = load_file(tmp_path / "out" / "model.safetensors")
    for i, info in layers.items():
        names = [k for k in weights if f"layers.{i}.mlp.experts." in k]
        assert names
        zeros = sum(int((weights[k] == 0).sum()) for k in names)
        total = sum(weights[k].numel() for k in names)
        assert info["unstructured"]["zeros"] == zeros and info["unstructured"]["weights"] == total
        assert info["unstructured"]["measured"] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("value,pattern", [("1.0", "unstructured_sparsity"), ("-0.1", "unstructured_sparsity"),
                                           ("half", "unstructured_sparsity")])
def test_bad_sparsity_is_a_user_error(monkeypatch, capsys, saved_models, tmp_path, value, pattern):
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "stun", "--experts", 4,
                           "--param", f"unstructured_sparsity={value}", "--out", tmp_path / "out")
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError):
        get_method("stun", unstructured_sparsity=float(value) if value != "half" else value)


def test_unstructured_stage_without_data_is_a_user_error(monkeypatch, capsys, saved_models, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "stun", "--experts", 4,
                           "--param", "unstructured_sparsity=0.5", "--out", tmp_path / "out")
    assert_user_error(code, err, "calibration data")
