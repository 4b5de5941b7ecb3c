"""DERN: segment assignment against a literal loop over segments and neurons, the recombined experts against a
literal weighted mean per neuron, plain pruning when nothing is assigned or the dropped experts are copies of
kept ones, unchanged widths, and save + reload == the in-memory model (CLI on two architectures)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS
from helpers import ids
from methods_e2e import layer_stats
from test_pruning import n_keep_for, plan_pipeline
from transformers import AutoModelForCausalLM

from moe_compress.methods.base import LayerContext, get_method
from moe_compress.models.registry import get_adapter
from moe_compress.models.surgery import keep_set
from moe_compress.models.tiny import tiny_model

FAST = ("qwen3_moe", "gpt_oss", "deepseek_v3")
SOME_SLOW = [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]


def literal_segment(w, e, j) -> torch.Tensor:
    """Segment j of expert e as one vector: gate row, up row, down column (+ gate/up biases)."""
    parts = [w.gate[e, j].detach(), w.up[e, j].detach(), w.down[e, :, j].detach()]
    parts += [b[e, j:j + 1].detach() for b in (w.gate_bias, w.up_bias) if b is not None]
    return torch.cat(parts).double()


def brute_dern(w, kept, dropped, freq, min_similarity=0.0):
    """(assignment {(p, j): (c, i) or None}, recombined [gate, up, down, gate_bias, up_bias] per kept expert),
    one segment at a time."""
    assign = {}
    for p in dropped:
        for j in range(w.gate.shape[1]):
            s = literal_segment(w, p, j)
            best, where = -2.0, None
            for c in kept:
                for i in range(w.gate.shape[1]):
                    cos = float(F.cosine_similarity(s, literal_segment(w, c, i), dim=0))
                    if cos > best + 1e-7:  # strictly better (ties: the first, lowest (c, i))
                        best, where = cos, (c, i)
            assign[(p, j)] = where if best >= min_similarity else None
    merged = {}
    for c in kept:
        rows = []
        for i in range(w.gate.shape[1]):
            members = [(c, i)] + [pj for pj, t in assign.items() if t == (c, i)]
            wts = torch.tensor([float(freq[e]) for e, _ in members], dtype=torch.float64)
            vec = sum(wt * literal_segment(w, e, j) for wt, (e, j) in zip(wts, members)) / wts.sum()
            rows.append(vec)
        merged[c] = torch.stack(rows)  # [I, F]
    return assign, merged


def plan_vectors(es, ci) -> torch.Tensor:
    w = es.experts
    return torch.stack([literal_segment(w, ci, i) for i in range(w.gate.shape[1])])


@pytest.mark.parametrize("arch", SOME_SLOW)
def test_assignment_and_merge_equal_literal_loop(arch):
    model = tiny_model(arch)
    stats = layer_stats(model, ids(2, 16), ("soft_count",))
    adapter = get_adapter(model)
    n_keep = n_keep_for(arch)
    i = sorted(stats)[0]
    layer = adapter.layer(model, i)
    plan = get_method("dern").plan(LayerContext(layer, n_keep, stats[i]))
    kept = plan.info["kept"]
    dropped = [e for e in range(layer.n_experts) if e not in kept]
    assign, merged = brute_dern(layer.experts, kept, dropped, stats[i]["frequency"])
    assert all(t is not None for t in assign.values())  # min_similarity=0: random experts' best cosines are > 0
    assert plan.info["segments"]["assigned"] == len(assign)
    for p in dropped:
        assert sorted(plan.info["assigned_to"][str(p)]) == sorted({assign[(p, j)][0]
                                                                   for j in range(layer.experts.gate.shape[1])})
    for ci, c in enumerate(kept):
        torch.testing.assert_close(plan_vectors(plan.expert_set, ci), merged[c], rtol=1e-5, atol=1e-6)
    # widths, router rows and down bias unchanged; the experts did change
    ref = keep_set(layer, kept)
    assert plan.expert_set.experts.gate.shape == ref.experts.gate.shape
    assert plan.expert_set.experts.down.shape == ref.experts.down.shape
    torch.testing.assert_close(plan.expert_set.router_weight, ref.router_weight, rtol=0, atol=0)
    if ref.experts.down_bias is not None:
        torch.testing.assert_close(plan.expert_set.experts.down_bias, ref.experts.down_bias, rtol=0, atol=0)
    assert (plan.expert_set.experts.gate - ref.experts.gate).abs().max() > 1e-3


@pytest.mark.parametrize("arch", SOME_SLOW)
def test_threshold_discards_segments(arch):
    """With a threshold, the discarded segments are exactly those below it; above 1 nothing is merged = pruning."""
    model = tiny_model(arch)
    stats = layer_stats(model, ids(2, 16), ("soft_count",))
    adapter = get_adapter(model)
    i = sorted(stats)[0]
    layer = adapter.layer(model, i)
    n_keep = n_keep_for(arch)
    none = get_method("dern", min_similarity=1.01).plan(LayerContext(layer, n_keep, stats[i]))
    ref = keep_set(layer, none.info["kept"])
    for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        a, b = getattr(none.expert_set.experts, name), getattr(ref.experts, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert none.info["segments"]["assigned"] == 0
    some = get_method("dern", min_similarity=0.3).plan(LayerContext(layer, n_keep, stats[i]))
    kept = some.info["kept"]
    dropped = [e for e in range(layer.n_experts) if e not in kept]
    assign, merged = brute_dern(layer.experts, kept, dropped, stats[i]["frequency"], min_similarity=0.3)
    n_assigned = sum(t is not None for t in assign.values())
    assert 0 < n_assigned < len(assign)
    assert some.info["segments"]["assigned"] == n_assigned
    for ci, c in enumerate(kept):
        torch.testing.assert_close(plan_vectors(some.expert_set, ci), merged[c], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_dropped_copies_of_kept_experts_give_plain_pruning(arch):
    """Each dropped expert a copy of a kept one: every segment meets its own copy (cosine 1), the means are the
    kept neurons themselves."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    layer = next(iter(adapter.layers(model)))
    n = layer.n_experts
    n_keep = n_keep_for(arch)
    w = layer.experts
    per = n // adapter.rule().n_group
    kept = [e for e in range(n) if e % per < n_keep // adapter.rule().n_group]
    dropped = [e for e in range(n) if e not in kept]
    with torch.no_grad():
        for d in dropped:
            src = kept[dropped.index(d) % len(kept)]
            for name in ("gate", "up", "down", "gate_bias", "up_bias"):
                t = getattr(w, name)
                if t is not None:
                    t[d] = t[src]
    score = torch.zeros(n)
    score[kept] = 1.0
    stats = {"soft_count": score, "frequency": torch.arange(n, dtype=torch.float32) + 1,
             "max_activation": torch.ones(n)}
    plan = get_method("dern").plan(LayerContext(layer, n_keep, stats))
    assert plan.info["kept"] == kept and plan.info["segments"]["assigned"] == len(dropped) * w.gate.shape[1]
    ref = keep_set(layer, kept)
    for name in ("gate", "up", "down", "gate_bias", "up_bias"):
        a = getattr(plan.expert_set.experts, name)
        if a is not None:
            torch.testing.assert_close(a, getattr(ref.experts, name), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", [a if a in ("qwen2_moe", "deepseek_v3", "gpt_oss") else
                                  pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_pipeline_save_reload_equals_in_memory(saved_models, tmp_path, arch):
    from moe_compress.export.writer import save_model

    model = AutoModelForCausalLM.from_pretrained(saved_models[arch], dtype=torch.float32).eval()
    before = get_adapter(model).layer(model, sorted(get_adapter(model).moe_blocks(model))[0]).experts.gate.shape
    infos, _, _ = plan_pipeline(model, "dern", n_keep_for(arch), ids(3, 16, vocab=90))
    save_model(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    adapter = get_adapter(reloaded)
    assert adapter.n_experts() == n_keep_for(arch)
    for layer in adapter.layers(reloaded):
        assert layer.experts.gate.shape[1:] == before[1:]
    x = ids(2, 12, vocab=90, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=1e-5)
    assert all(info["segments"]["assigned"] > 0 for info in infos.values())


@pytest.mark.parametrize("arch", ["deepseek_v2", "gpt_oss"])
def test_compress_command(monkeypatch, capsys, saved_models, text_file, tmp_path, arch):
    from clitools import run_cli

    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models[arch], "--method", "dern", "--experts",
                           n_keep_for(arch), "--calib", text_file, "--n-samples", 4, "--seq-len", 16,
                           "--param", "min_similarity=0.2", "--out", out, "-q")
    assert code == 0, err
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["method"]["params"]["min_similarity"] == 0.2
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert get_adapter(reloaded).n_experts() == n_keep_for(arch)


@pytest.mark.parametrize("param,pattern", [("min_similarity=-3", "invalid parameter min_similarity"),
                                           ("select=reap", "invalid parameter select"),
                                           ("weighting=size", "invalid parameter weighting")])
def test_bad_parameters_are_user_errors(monkeypatch, capsys, saved_models, tmp_path, param, pattern):
    from clitools import assert_user_error, run_cli

    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "dern", "--experts",
                           4, "--calib", "builtin:demo", "--param", param, "--out", tmp_path / "out")
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "out").exists()
