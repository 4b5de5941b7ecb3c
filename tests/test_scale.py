"""Speed at scale: bench/scale.py on the tiny shapes, and the batched Sub-MoE fast path equal to the paper's SVD."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from moe_compress.methods.merging import merge as merge_mod
from moe_compress.methods.merging.merge import (
    average,
    frequency_average,
    group_weights,
    joint_svd_merge_reference,
    submoe_merge,
    subspace_project,
)
from moe_compress.models.layer import ExpertWeights, swiglu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_bench_tiny_shapes_run_every_method(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "scale.json"
    results = bench.main(["--device", "cpu", "--shapes", "tiny", "--repeats", "1", "--plan-repeats", "1",
                          "--similarity-tokens", "256", "--pair-merge", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| submoe r=0.5 |" in printed and "whole model (min)" in printed
    assert [r["shape"] for r in results] == ["mixtral", "qwen3", "deepseek_v3"]
    for r in results:
        assert r["frequency_total_ok"]
        for step in ("forward", "routed statistics", "merge statistics"):
            assert r["steps"][step]["seconds"] > 0
        for label, m in r["methods"].items():
            if "skipped" in m:
                assert label == "naee" and r["experts"] > 16
                continue
            assert m["experts_after"] == r["n_new"], label
            assert m["model_min"] == pytest.approx(r["layers"] * m["layer_s"] / 60, abs=2e-3)
        assert r["methods"]["submoe r=0.5 float32"]["max_rel_diff_vs_float64"] < 1e-3
    assert results[0]["pair_merge"]["r=0.5 float32"]["max_rel_diff_vs_float64"] < 1e-3
    for r in results:  # randomized truncation: error measures reported and consistent
        for label in ("submoe r=0.5 randomized", "submoe r=0.5 randomized float32"):
            m = r["methods"][label]
            assert m["vs_exact_float64"]["fro_rel_diff"] < 1.0
            for e in m["svd_error"].values():
                assert e == "full" or e["optimal_residual_rel_lower"] <= e["residual_rel"] + 1e-6
    rnd = results[0]["pair_merge"]["r=0.5 randomized q=2 float32"]
    assert set(rnd["svd_error"]) == {"gate", "up", "down"} and "vs_exact_float64" in rnd
    assert "residual_rel <=" in printed
    assert out.exists()


def _members(n, out_dim, in_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, out_dim, in_dim, generator=g, dtype=torch.float64)


def _moment(in_dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * in_dim, in_dim, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, in_dim,
                                                                                          dtype=torch.float64)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("out_dim,in_dim", [(12, 20), (40, 8), (24, 12)])  # out side; in side; in side (n=3 > 2)
@pytest.mark.parametrize("rank", [1, 5, None])
def test_batched_fast_path_equals_the_papers_svd_for_mixed_groups(out_dim, in_dim, rank, whiten):
    """Groups of sizes 1, 2, 3, 2 in one call (batches by size and Gram side) == per-group exact SVD."""
    sizes = [1, 2, 3, 2]
    members = [_members(n, out_dim, in_dim, 10 + j) for j, n in enumerate(sizes)]
    weights = [torch.rand(n, generator=torch.Generator().manual_seed(j), dtype=torch.float64) + 0.1
               for j, n in enumerate(sizes)]
    weights = [w / w.sum() for w in weights]
    moments = [_moment(in_dim, 20 + j) for j in range(len(sizes))] if whiten else None
    merged = torch.stack([(w[:, None, None] * m).sum(0) for w, m in zip(weights, members)]).float()
    got = subspace_project(members, merged, rank, moments)
    for j in range(len(sizes)):
        ref = joint_svd_merge_reference(members[j], weights[j], rank, None if moments is None else moments[j])
        torch.testing.assert_close(got[j].double(), ref, rtol=2e-5, atol=2e-5)


def test_fast_path_chunking_and_float32_grams(monkeypatch):
    members = [_members(2, 30, 10, s) for s in range(6)]
    w = [torch.tensor([0.3, 0.7], dtype=torch.float64)] * 6
    merged = torch.stack([(wi[:, None, None] * m).sum(0) for wi, m in zip(w, members)]).float()
    whole = subspace_project(members, merged, 4)
    monkeypatch.setattr(merge_mod, "GRAM_BATCH_ELEMENTS", 2 * 30 * 10 * 2)  # two groups per batch
    chunked = subspace_project(members, merged, 4)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    f32 = subspace_project(members, merged, 4, gram_dtype=torch.float32)
    torch.testing.assert_close(f32, whole, rtol=1e-3, atol=1e-3)


def _experts(e=6, inter=12, hidden=10, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return ExpertWeights(r(e, inter, hidden), r(e, inter, hidden), r(e, hidden, inter),
                         r(e, inter) if bias else None, r(e, inter) if bias else None, r(e, hidden) if bias else None)


@pytest.mark.parametrize("bias", [False, True])
def test_full_rank_shortcut_is_the_literal_svd_merge(bias):
    """rank_ratio=1 takes no SVD at all; the literal joint SVD gives the same weights."""
    w = _experts(bias=bias)
    groups = [[0, 3], [1], [2, 4, 5]]
    weights = group_weights(torch.tensor([5.0, 1, 2, 3, 4, 6]), groups)
    merged, info = submoe_merge(w, groups, weights, rank_ratio=1.0)
    assert info["ranks"] == {"gate": "full", "up": "full", "down": "full"}
    for name in ("gate", "up", "down"):
        t = getattr(w, name)
        b = getattr(w, f"{name}_bias")
        for j, g in enumerate(groups):
            aug = t[g].double() if b is None else torch.cat([t[g].double(), b[g].double()[..., None]], -1)
            ref = joint_svd_merge_reference(aug, weights[j])
            got = getattr(merged, name)[j].double()
            if b is not None:
                got = torch.cat([got, getattr(merged, f"{name}_bias")[j].double()[..., None]], -1)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_truncated_whitened_layer_merge_equals_per_group_reference():
    """submoe_merge (batched gate+up, then down on the merged expert's activations) == the reference SVD per
    group and projection with the same moments."""
    w = _experts(e=6, inter=16, hidden=8, seed=3)
    groups = [[0, 1], [2, 3, 4], [5]]
    weights = group_weights(torch.tensor([2.0, 1, 3, 1, 1, 4]), groups)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(40, 8, generator=g) for _ in groups]
    merged, info = submoe_merge(w, groups, weights, rank_ratio=0.5, whiten=True, group_inputs=xs, activation=swiglu)
    r_in, r_down = info["ranks"]["gate"], info["ranks"]["down"]
    for j, grp in enumerate(groups):
        c_in = xs[j].double().T @ xs[j].double() / xs[j].shape[0]
        gate = joint_svd_merge_reference(w.gate[grp].double(), weights[j], r_in, c_in)
        up = joint_svd_merge_reference(w.up[grp].double(), weights[j], r_in, c_in)
        torch.testing.assert_close(merged.gate[j].double(), gate, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged.up[j].double(), up, rtol=1e-4, atol=1e-4)
        a = swiglu(xs[j] @ merged.gate[j].T, xs[j] @ merged.up[j].T).double()
        down = joint_svd_merge_reference(w.down[grp].double(), weights[j], r_down, a.T @ a / a.shape[0])
        torch.testing.assert_close(merged.down[j].double(), down, rtol=1e-4, atol=1e-4)


def test_chunked_average_equals_one_einsum(monkeypatch):
    w = _experts(e=7, seed=5)
    groups = [[0, 6], [1, 2, 3], [4], [5]]
    weights = group_weights(torch.tensor([1.0, 2, 3, 4, 5, 6, 7]), groups)
    whole = frequency_average(w, groups, weights)
    monkeypatch.setattr(merge_mod, "AVERAGE_CHUNK_ELEMENTS", 2 * 12 * 10)  # two experts at a time
    chunked = average(w.gate, groups, weights)
    torch.testing.assert_close(chunked, whole.gate, rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked[2], w.gate[4])  # singleton copied exactly


# ---- randomized truncated subspace (svd="randomized") ----------------------------------------------------------

def _gapped_members(n, out_dim, in_dim, rank, seed, noise=1e-7):
    """n members whose joint B = [W_1 | ... | W_n] has rank ``rank`` plus noise: a clear gap after ``rank``."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(out_dim, rank, generator=g, dtype=torch.float64))[0]
    coef = (torch.randn(n, rank, in_dim, generator=g, dtype=torch.float64)
            * torch.linspace(3, 1, rank, dtype=torch.float64)[:, None])
    return basis @ coef + noise * torch.randn(n, out_dim, in_dim, generator=g, dtype=torch.float64)


def _decaying_members(n, out_dim, in_dim, seed, decay=0.97):
    """Slowly decaying joint spectrum: sigma_j = decay^j."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_dim, n * in_dim)
    u = torch.linalg.qr(torch.randn(out_dim, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n * in_dim, k, generator=g, dtype=torch.float64))[0]
    b = (u * decay ** torch.arange(k, dtype=torch.float64)) @ v.T
    return torch.stack(b.split(in_dim, dim=1))


@pytest.mark.parametrize("out_dim,in_dim", [(60, 40), (40, 60)])  # Gram on the in side; on the out side
@pytest.mark.parametrize("whiten", [False, True])
def test_randomized_equals_exact_when_the_spectrum_has_a_gap(out_dim, in_dim, whiten):
    rank, sizes = 6, [2, 2, 3]
    members = [_gapped_members(n, out_dim, in_dim, rank, 30 + j) for j, n in enumerate(sizes)]
    weights = [torch.full((n,), 1.0 / n, dtype=torch.float64) for n in sizes]
    moments = [_moment(in_dim, 40 + j) for j in range(len(sizes))] if whiten else None
    merged = torch.stack([(w[:, None, None] * m).sum(0) for w, m in zip(weights, members)]).float()
    errs: list = []
    got = subspace_project(members, merged, rank, moments, svd="randomized", oversample=4, power_iters=1, errors=errs)
    exact = subspace_project(members, merged, rank, moments)
    for j in range(len(sizes)):
        ref = joint_svd_merge_reference(members[j], weights[j], rank, None if moments is None else moments[j])
        torch.testing.assert_close(got[j].double(), ref, rtol=1e-5, atol=1e-5)
        assert errs[j]["residual_rel"] < 1e-5 and errs[j]["ritz_residual"] < 1e-5
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dim,in_dim", [(50, 20), (20, 50)])
def test_randomized_is_exact_when_rank_plus_oversample_covers_the_gram(out_dim, in_dim):
    members = [_members(2, out_dim, in_dim, s) for s in (1, 2)]
    merged = torch.stack([m.mean(0) for m in members]).float()
    errs: list = []
    got = subspace_project(members, merged, 10, svd="randomized", oversample=40, power_iters=0, errors=errs)
    torch.testing.assert_close(got, subspace_project(members, merged, 10), rtol=1e-6, atol=1e-6)
    assert all(e["ritz_residual"] == 0 for e in errs)


@pytest.mark.parametrize("out_dim,in_dim", [(120, 50), (50, 120)])
def test_randomized_error_bound_holds_on_a_slowly_decaying_spectrum(out_dim, in_dim):
    """Achieved error >= the exact optimum >= the reported lower estimate; with q = 2 within 2% of optimal."""
    rank = 20
    members = [_decaying_members(2, out_dim, in_dim, s) for s in (3, 4)]
    merged = torch.stack([m.mean(0) for m in members]).float()
    errs: list = []
    subspace_project(members, merged, rank, svd="randomized", oversample=10, power_iters=2, errors=errs)
    for m, e in zip(members, errs):
        s = torch.linalg.svdvals(torch.cat(list(m), dim=1))
        opt = float((s[rank:].square().sum() / s.square().sum()).sqrt())
        assert e["optimal_residual_rel_lower"] <= opt + 1e-9 <= e["residual_rel"] + 2e-9
        assert e["residual_rel"] <= 1.02 * opt


def test_randomized_is_deterministic_under_the_seed():
    members = [_members(2, 40, 30, s) for s in (5, 6)]
    merged = torch.stack([m.mean(0) for m in members]).float()
    run = lambda seed: subspace_project(members, merged, 8, svd="randomized", oversample=4, power_iters=1, seed=seed)  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))  # flat spectrum: the seed matters


def test_randomized_identical_experts_still_merge_exactly():
    """Identical members of rank <= r merge to themselves; at full rank randomized takes no SVD at all."""
    g = torch.Generator().manual_seed(9)
    low = lambda o, i: torch.randn(o, 3, generator=g) @ torch.randn(3, i, generator=g)  # noqa: E731
    one = ExpertWeights(low(12, 10), low(12, 10), low(10, 12))
    w = ExpertWeights(*(t[None].repeat(4, 1, 1) for t in (one.gate, one.up, one.down)))
    groups = [[0, 1], [2, 3]]
    weights = group_weights(torch.tensor([1.0, 3, 2, 2]), groups)
    for ratio in (0.5, 1.0):
        merged, info = submoe_merge(w, groups, weights, rank_ratio=ratio, svd="randomized", oversample=2, power_iters=1)
        for name in ("gate", "up", "down"):
            for j in range(2):
                torch.testing.assert_close(getattr(merged, name)[j], getattr(one, name), rtol=1e-5, atol=1e-5)
        if ratio < 1:
            assert info["svd"]["mode"] == "randomized"
            assert all(info["svd_error"][p]["residual_rel"] < 1e-5 for p in ("gate", "up", "down"))
        else:
            assert "svd_error" not in info


def test_exact_route_reports_the_optimal_truncation_error():
    w = _experts(e=4, inter=14, hidden=9, seed=11)
    groups = [[0, 1], [2, 3]]
    weights = group_weights(torch.tensor([1.0, 2, 3, 4]), groups)
    _, info = submoe_merge(w, groups, weights, rank_ratio=0.5)
    assert info["svd"] == {"mode": "exact"}
    for name in ("gate", "down"):
        t = getattr(w, name)
        opt = []
        for g in groups:
            s = torch.linalg.svdvals(torch.cat(list(t[g].double()), dim=1))
            r = info["ranks"][name]
            opt.append(float((s[r:].square().sum() / s.square().sum()).sqrt()))
        e = info["svd_error"][name]
        assert e["residual_rel"] == pytest.approx(max(opt), rel=1e-6)
        assert e["excess_ratio"] == pytest.approx(1.0)
