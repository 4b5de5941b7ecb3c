"""Merging: grouping, merge rules (average, Sub-MoE subspace, alignment, whitening), router adaptation, and the
msmoe / hcsmoe / submoe methods end-to-end on tiny models of every architecture."""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import helpers
import pytest
import torch
from conftest import ARCHS
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_compress.calibration.runner import run_layers
from moe_compress.methods.base import LayerContext, get_method
from moe_compress.methods.merging.align import align_groups, neuron_features, neuron_permutation, permute_expert
from moe_compress.methods.merging.base import MergeParams, merge_plan
from moe_compress.methods.merging.grouping import Signal, dominant, group_experts, hierarchical, kmeans
from moe_compress.methods.merging.merge import (
    frequency_average,
    group_weights,
    joint_svd_merge_reference,
    submoe_merge,
    subspace_project,
)
from moe_compress.methods.merging.router import adapt_router, routing_mass_error
from moe_compress.methods.merging.signals import expert_output_signals, frequency
from moe_compress.methods.merging.submoe import group_tokens
from moe_compress.models.layer import ExpertWeights, clamped_swiglu, expert_forward, swiglu
from moe_compress.models.registry import get_adapter
from moe_compress.models.surgery import write_block
from moe_compress.models.tiny import tiny_model
from moe_compress.pipeline import plan_and_apply
from moe_compress.recipe import build_recipe

ids = partial(helpers.ids, seed=0)


def moe_inputs(model, x=None) -> dict[int, torch.Tensor]:
    """{layer: MoE block inputs [T, H]} of the calibration tokens x."""
    adapter, out = get_adapter(model), {}

    def on_layer(run):
        if run.observer is not None:
            out[run.index] = run.moe_inputs

    run_layers(model, adapter, ids() if x is None else x, on_layer=on_layer, keep_moe_inputs=True)
    return out


def random_experts(e=4, inter=12, hidden=8, bias=False, seed=0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return ExpertWeights(r(e, inter, hidden), r(e, inter, hidden), r(e, hidden, inter),
                         r(e, inter) if bias else None, r(e, inter) if bias else None, r(e, hidden) if bias else None)


def tensors(w: ExpertWeights):
    return [t for t in (w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias) if t is not None]


# -- grouping ---------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), k_frac=st.floats(0.0, 1.0), d=st.integers(1, 4), dup=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kmeans_never_empty_and_deterministic(n, k_frac, d, dup, seed):
    k = max(1, min(n, round(k_frac * n)))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    if dup:  # many coincident points: k-means++ must still seed k centres, Lloyd must refill empty clusters
        x = x.round()
        x[: n // 2] = x[0].clone()
    a = kmeans(x, k, torch.Generator().manual_seed(seed), n_init=3)
    b = kmeans(x, k, torch.Generator().manual_seed(seed), n_init=3)
    assert torch.equal(a, b)
    assert torch.bincount(a, minlength=k).min() >= 1 and int(a.max()) == k - 1


def test_kmeans_and_hierarchical_find_separated_clusters():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels_true = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    x = centres[labels_true] + 0.1 * torch.randn(9, 2, generator=g)
    want = labels_true  # canonical numbering = order of smallest member
    assert torch.equal(kmeans(x, 3, torch.Generator().manual_seed(0)), want)
    for link in ("average", "single", "complete"):
        assert torch.equal(hierarchical(torch.cdist(x, x), 3, link), want)
    with pytest.raises(ValueError, match="linkage"):
        hierarchical(torch.cdist(x, x), 3, "avrage")


def test_hierarchical_cut_gives_exactly_k_clusters_with_ties():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])  # every neighbour distance ties
    for k in range(1, 7):
        labels = hierarchical(torch.cdist(x, x), k, "single")
        assert len(set(labels.tolist())) == k


def test_dominant_grouping_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(8, 8, generator=g)
    s = (s + s.T) / 2
    freq = torch.tensor([5.0, 9.0, 1.0, 7.0, 3.0, 2.0, 8.0, 4.0])
    labels = dominant(s, freq, 3)
    centres = [1, 6, 3]
    for e in range(8):
        want = e if e in centres else max(centres, key=lambda c: float(s[e, c]))
        assert labels[e] == labels[want]
    assert len(set(labels.tolist())) == 3


@pytest.mark.parametrize("clustering", ["kmeans", "hierarchical", "dominant"])
def test_routing_groups_are_respected(clustering):
    sim = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    sim[:4, 4:] = sim[4:, :4] = 1.0  # across-group pairs look most alike: must still not be merged
    groups = group_experts(Signal(similarity=sim), 4, clustering, n_group=2, freq=torch.arange(8.0))
    assert len(groups) == 4 and sorted(e for g in groups for e in g) == list(range(8))
    assert all(max(g) < 4 for g in groups[:2]) and all(min(g) >= 4 for g in groups[2:])


# -- merge rules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("rule", ["average", "submoe", "submoe_whiten", "submoe_low_rank"])
def test_identical_experts_merge_to_that_expert(rule, align, bias):
    w = random_experts(e=4, bias=bias)
    if rule == "submoe_low_rank":  # a rank-3 expert survives truncation to rank >= 3 exactly
        g = torch.Generator().manual_seed(5)
        for t, (o, i) in ((w.gate, (12, 8)), (w.up, (12, 8)), (w.down, (8, 12))):
            t[0] = torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g)
    for t in tensors(w):
        t[1] = t[0]
        t[2] = t[0]
    groups = [[0, 1, 2], [3]]
    weights = group_weights(torch.tensor([3.0, 1.0, 5.0, 2.0]), groups)
    if align:
        w, moved = align_groups(w, groups, [2, 3])
        assert all(n == 0 for n in moved.values())
    x = [torch.randn(50, 8, generator=torch.Generator().manual_seed(2))] * 2
    if rule == "average":
        merged = frequency_average(w, groups, weights)
    else:
        merged, _ = submoe_merge(w, groups, weights, rank_ratio={"submoe_low_rank": 0.4}.get(rule, 1.0),
                                 whiten=rule == "submoe_whiten", group_inputs=x, activation=swiglu)
    for m, t in zip(tensors(merged), tensors(w)):
        torch.testing.assert_close(m[0], t[0], rtol=1e-5, atol=1e-5)
        if rule != "submoe_low_rank":  # (truncation applies to singletons too)
            assert torch.equal(m[1], t[3])  # the singleton is copied bit for bit


def _weighted_matrices(n: int, out_dim: int, in_dim: int, seed: int, whiten_tokens: int):
    """(w [n, out, in], frequencies f [n] summing to 1, input second moment [in, in] of ``whiten_tokens``
    anisotropic random inputs or None), fp64 from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, out_dim, in_dim, generator=g, dtype=torch.float64)
    f = torch.rand(n, generator=g, dtype=torch.float64)
    f = f / f.sum()
    moment = None
    if whiten_tokens:
        x = torch.randn(whiten_tokens, in_dim, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, in_dim)
        moment = x.T @ x / whiten_tokens
    return w, f, moment


@pytest.mark.parametrize("n,out_dim,in_dim", [(3, 6, 5), (2, 12, 4), (4, 5, 9)])
@pytest.mark.parametrize("whiten", [False, True])
def test_full_rank_submoe_is_the_frequency_weighted_average(n, out_dim, in_dim, whiten):
    w, f, moment = _weighted_matrices(n, out_dim, in_dim, seed=n, whiten_tokens=40 if whiten else 0)
    avg = torch.einsum("n,noi->oi", f, w)
    torch.testing.assert_close(joint_svd_merge_reference(w, f, None, moment), avg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,out_dim,in_dim,rank", [(3, 6, 5, 3), (2, 12, 4, 5), (4, 5, 9, 2), (1, 7, 7, 4)])
@pytest.mark.parametrize("whiten", [False, True])
def test_gram_route_equals_the_papers_joint_svd_and_P_r(n, out_dim, in_dim, rank, whiten):
    """Sub-MoE at rank r == P_r sum_i f_i W_i, computed by Gram eigh (either side) == the literal paper SVD."""
    w, f, moment = _weighted_matrices(n, out_dim, in_dim, seed=out_dim, whiten_tokens=60 if whiten else 0)
    ref = joint_svd_merge_reference(w, f, rank, moment)
    avg = torch.einsum("n,noi->oi", f, w)
    got = subspace_project([w], avg[None], rank, None if moment is None else [moment])[0]
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_alignment_recovers_a_planted_permutation():
    w = random_experts(e=3, inter=16, hidden=8, bias=True, seed=1)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(4))
    for t in tensors(w):  # expert 1 = expert 0 with its neurons shuffled (+ a little noise)
        t[1] = t[0] + 0.01 * torch.randn(t[0].shape, generator=torch.Generator().manual_seed(6))
    x = torch.randn(20, 8)
    act = clamped_swiglu(1.702, 7.0)
    y = expert_forward(w, 1, x, act)
    permute_expert(w, 1, perm)
    torch.testing.assert_close(expert_forward(w, 1, x, act), y)  # permuting neurons keeps the function
    found = neuron_permutation(neuron_features(w, 0), neuron_features(w, 1))
    assert torch.equal(perm[found], torch.arange(16))  # undoes the planted permutation exactly
    aligned, moved = align_groups(w, [[0, 1], [2]], [0, 2])
    assert moved == {1: int((perm != torch.arange(16)).sum())}
    assert (aligned.gate[1] - w.gate[0]).abs().max() < 0.1  # neuron a of expert 1 is neuron a of expert 0 again
    torch.testing.assert_close(expert_forward(aligned, 1, x, act), y)  # same function


def test_whitened_truncation_has_lower_calibration_error():
    model = tiny_model("mixtral")
    layer = get_adapter(model).layers(model)[0]
    x = moe_inputs(model)[layer.index]
    x = x * torch.linspace(0.05, 3.0, x.shape[1])  # anisotropic inputs: whitening must matter
    groups = [[0, 1], [2, 3, 4], [5], [6, 7]]
    weights = group_weights(frequency(layer, {}, x), groups)
    toks = group_tokens(layer, x, groups)
    full = frequency_average(layer.experts, groups, weights)
    errors = {}
    for whiten in (False, True):
        merged, info = submoe_merge(layer.experts, groups, weights, rank_ratio=0.4, whiten=whiten,
                                    group_inputs=toks, activation=layer.activation)
        assert info["ranks"] == {"gate": 13, "up": 13, "down": 13} and info["whiten"] == whiten
        errors[whiten] = sum(float((expert_forward(merged, j, t, swiglu) - expert_forward(full, j, t, swiglu))
                                   .pow(2).sum()) for j, t in enumerate(toks))
    assert errors[True] < 0.8 * errors[False], errors


def test_whitening_is_optimal_for_a_single_projection():
    """SVD-LLM: for one matrix, whitened truncation minimises ||(W - W_r) X|| over rank-r W_r (Eckart-Young)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 10, 12, generator=g, dtype=torch.float64)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(0.05, 4, 12)
    moment = x.T @ x / 200
    err = lambda m: float(((m - w[0]) @ x.T).pow(2).sum())  # noqa: E731
    plain = subspace_project([w], w, 4)[0].double()
    white = subspace_project([w], w, 4, [moment])[0].double()
    assert err(white) < err(plain)
    u, s, vh = torch.linalg.svd(w[0] @ torch.linalg.cholesky(moment))  # the optimum, computed directly
    best = (u[:, :4] * s[:4]) @ vh[:4] @ torch.linalg.inv(torch.linalg.cholesky(moment))
    assert err(white) <= err(best) * (1 + 1e-3) + 1e-9


# -- router -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_lstsq_router_reduces_routing_mass_error(arch):
    model = tiny_model(arch)
    layer = get_adapter(model).layers(model)[0]
    x = moe_inputs(model)[layer.index]
    groups = [[0, 1], [2], [3], [4, 5], [6, 7]] if arch != "deepseek_v3" else [[0, 1], [2], [3], [4, 5], [6], [7]]
    weights = group_weights(frequency(layer, {}, x), groups)
    err = {rule: routing_mass_error(layer, x, groups, adapt_router(layer, groups, weights, rule, x=x))
           for rule in ("freq_avg", "lstsq")}
    assert err["lstsq"] < err["freq_avg"], err


def test_routing_mass_error_is_zero_for_singletons_and_logit_adjust_offsets():
    model = tiny_model("gpt_oss")
    layer = get_adapter(model).layers(model)[0]
    x = moe_inputs(model)[layer.index]
    singles = [[e] for e in range(8)]
    rows = adapt_router(layer, singles, group_weights(torch.ones(8), singles), "lstsq", x=x)
    assert routing_mass_error(layer, x, singles, rows) == 0.0
    groups = [[0, 1], [2, 3, 4], [5], [6], [7]]
    freq = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    w = group_weights(freq, groups)
    adj = adapt_router(layer, groups, w, "logit_adjust", freq=freq, tau=0.5)
    avg = adapt_router(layer, groups, w, "freq_avg")
    offsets = adj.bias - avg.bias  # tau ln(n) for n equally used members, 0 for singletons
    torch.testing.assert_close(offsets, 0.5 * torch.log(torch.tensor([2.0, 3.0, 1.0, 1.0, 1.0])))
    torch.testing.assert_close(adj.weight, avg.weight)


# -- whole layers and models ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_singleton_groups_leave_the_logits_unchanged(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    x = ids(seed=3)
    inputs = moe_inputs(model)
    with torch.no_grad():
        before = model(x).logits
    singles = [[e] for e in range(adapter.n_experts())]
    methods = [("freq_avg", False, None), ("lstsq", True, None), ("logit_adjust", False, "submoe"),
               ("keep_dominant", True, "submoe")]
    for rule, align, which in methods:
        model_i = tiny_model(arch)
        for layer in adapter.layers(model_i):
            params = MergeParams(router=rule, align=align)
            ctx = LayerContext(layer, len(singles))
            fn = None
            if which == "submoe":
                fn = get_method("submoe", router=rule, align=align).merge_experts
            plan = merge_plan(ctx, singles, params, torch.arange(1.0, 9.0), inputs[layer.index], fn)
            write_block(adapter, layer.block, plan.expert_set)
        with torch.no_grad():
            assert torch.equal(model_i(x).logits, before), (rule, align, which)


def calib(n=4, length=32):
    x = ids(n, length, seed=7)
    return SimpleNamespace(input_ids=x, attention_mask=torch.ones_like(x))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,params", [("msmoe", {}), ("hcsmoe", {}), ("submoe", {}),
                                           ("submoe", {"rank_ratio": 0.5, "whiten": True, "align": True,
                                                       "router": "lstsq"})])
def test_merge_methods_end_to_end(arch, method, params):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    originals = {l.index: ExpertWeights(*[None if t is None else t.detach().clone() for t in
                                          (l.experts.gate, l.experts.up, l.experts.down, l.experts.gate_bias,
                                           l.experts.up_bias, l.experts.down_bias)])
                 for l in adapter.layers(model)}
    recipe = build_recipe({"model": "tiny", "method": method, "params": params, "experts": 6, "output": "unused",
                           "calibration": {"data": "unused"}})
    m = get_method(method, **params)
    infos, stats, _ = plan_and_apply(m, adapter, model, 6, calib=calib(), recipe=recipe, device="cpu")
    assert adapter.n_experts() == 6
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()
    for i, info in infos.items():
        groups = info["groups"]
        assert len(groups) == 6 and sorted(e for g in groups for e in g) == list(range(8))
        assert info["router"]["rule"] == params.get("router", "freq_avg")
        assert set(info["routing_mass_error"]) >= {params.get("router", "freq_avg")}
        assert len(info["frequencies"]) == 6 and len(info["sources"]) == 6
        layer = adapter.layer(model, i)
        assert layer.n_experts == 6
        if arch == "deepseek_v3":  # 3 merged experts per routing group, from that routing group
            assert all(max(g) < 4 for g in groups[:3]) and all(min(g) >= 4 for g in groups[3:])
            assert layer.correction_bias.shape == (6,)
        if method == "submoe" and not params:  # full rank: exactly the frequency-weighted average
            assert info["ranks"] == {"gate": "full", "up": "full", "down": "full"}
            want = frequency_average(originals[i], groups, [torch.tensor(w, dtype=torch.float64)
                                                            for w in info["merge_weights"]])
            torch.testing.assert_close(layer.experts.gate.detach(), want.gate, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.experts.down.detach(), want.down, rtol=1e-5, atol=1e-6)
        if params.get("rank_ratio"):
            assert info["ranks"]["gate"] != "full" and info["whiten"] and info["align"]


def test_submoe_is_seeded():
    def run(seed):
        model = tiny_model("qwen3_moe")
        recipe = build_recipe({"model": "t", "method": "submoe", "experts": 4, "output": "o", "seed": seed,
                               "calibration": {"data": "x"}})
        infos, _, _ = plan_and_apply(get_method("submoe", similarity="weight"), get_adapter(model), model, 4,
                                     calib=calib(), recipe=recipe, device="cpu")
        return [info["groups"] for info in infos.values()]

    assert run(1) == run(1)


def test_output_signals_match_brute_force():
    model = tiny_model("olmoe")
    layer = get_adapter(model).layers(model)[0]
    x = torch.randn(30, 32)
    sim, mean = expert_output_signals(layer, x)
    ys = [expert_forward(layer.experts, e, x, layer.activation).detach().double() for e in range(8)]
    for i in (0, 3):
        for j in (1, 3, 7):
            cos = torch.nn.functional.cosine_similarity(ys[i], ys[j], dim=-1).mean()
            assert abs(float(sim[i, j]) - float(cos)) < 1e-5
        torch.testing.assert_close(mean[i], ys[i].mean(0), rtol=1e-5, atol=1e-6)


def test_bad_switches_are_user_errors():
    from moe_compress.errors import UserError

    with pytest.raises(UserError, match="clustering"):
        get_method("submoe", clustering="kmean")
    with pytest.raises(UserError, match="linkage"):
        get_method("hcsmoe", linkage="avg")
    with pytest.raises(UserError, match="rank_ratio"):
        get_method("submoe", rank_ratio=0.0)


@pytest.mark.parametrize("method", ["msmoe", "hcsmoe", "submoe"])
def test_cli_compress_with_merging(method, monkeypatch, capsys, saved_models, text_file, tmp_path):
    import sys

    from transformers import AutoModelForCausalLM

    from moe_compress import cli

    for arch in ("mixtral", "deepseek_v3", "gpt_oss"):
        out = tmp_path / f"{arch}-{method}"
        monkeypatch.setattr(sys, "argv", ["moe-compress", "compress", str(saved_models[arch]), "--method", method,
                                          "--experts", "4", "--calib", str(text_file), "--n-samples", "4",
                                          "--seq-len", "32", "--out", str(out), "-q", "-p", "router=lstsq"])
        try:
            cli.main()
        except SystemExit as e:
            assert not e.code, capsys.readouterr().err
        manifest = json.loads((out / "compression.json").read_text())
        assert manifest["method"]["kind"] == "merge" and manifest["experts"]["kept"] == 4
        for info in manifest["layers"].values():
            assert len(info["groups"]) == 4 and info["router"]["rule"] == "lstsq"
            assert "frequencies" in info and "routing_mass_error" in info
            assert info.get("ranks") is not None
        model = AutoModelForCausalLM.from_pretrained(out)
        assert get_adapter(model).n_experts() == 4
