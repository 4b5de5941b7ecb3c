"""The fast truncated Sub-MoE route (randomized subspace iteration with low-precision power products, TF32
Grams for bfloat16 experts): its reported error is right and, on small flat-spectrum (random) shapes shaped like
a Mixtral layer, within 1.02x of the exact optimum; deterministic; the exact route is unchanged."""

from __future__ import annotations

import pytest
import torch

from moe_compress.methods.merging import merge as merge_mod
from moe_compress.methods.merging.merge import group_weights, submoe_merge, subspace_project
from moe_compress.models.layer import ExpertWeights


def _experts(e, inter, hidden, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (0.02 * torch.randn(*s, generator=g)).to(dtype)  # noqa: E731  flat spectrum, like the bench
    return ExpertWeights(r(e, inter, hidden), r(e, inter, hidden), r(e, hidden, inter))


def _optimum(t: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(torch.cat(list(t.double()), dim=1))
    return float((s[rank:].square().sum() / s.square().sum()).sqrt())


# A Mixtral layer scaled by 1/32 (H 128, I 448, groups of 2, 2, 3, 1), r = min / 2, p = r / 8 as at full size.
SHAPE = dict(e=8, inter=448, hidden=128)
GROUPS = [[0, 1], [2, 3], [4, 5, 6], [7]]


@pytest.mark.parametrize("precision,ritz", [("gram", "gram"), ("tf32", "gram"), ("bfloat16", "gram"),
                                             ("bfloat16", "tf32")])
def test_fast_route_is_within_two_percent_of_the_exact_optimum(precision, ritz):
    w = _experts(seed=0, **SHAPE)
    weights = group_weights(torch.arange(1.0, 9.0), GROUPS)
    kw = dict(rank_ratio=0.5, gram_dtype=torch.float32, svd="randomized", oversample=8, power_iters=4,
              power_precision=precision, ritz_precision=ritz)
    fast, info = submoe_merge(w, GROUPS, weights, **kw)
    _, exact = submoe_merge(w, GROUPS, weights, rank_ratio=0.5)
    assert info["svd"]["power_precision"] == precision and info["svd"]["ritz_precision"] == ritz
    for name in ("gate", "up", "down"):
        r = info["ranks"][name]
        t = getattr(w, name)
        for j, g in enumerate(GROUPS):
            opt = _optimum(t[g], r)
            got = info["svd_residual_groups"][name][j]
            assert exact["svd_residual_groups"][name][j] == pytest.approx(opt, rel=1e-6)
            assert opt - 1e-6 <= got <= 1.02 * opt, (name, j, got / opt)
            # the reported residual is the one of the returned weights: ||B - U U^T B|| via the merged average
        e = info["svd_error"][name]
        assert e["optimal_residual_rel_lower"] <= max(_optimum(t[g], r) for g in GROUPS) + 1e-6
    torch.testing.assert_close(fast.gate.norm(), exact_gate_norm(w, weights), rtol=0.05, atol=0)


def exact_gate_norm(w, weights):
    merged, _ = submoe_merge(w, GROUPS, weights, rank_ratio=0.5)
    return merged.gate.norm()


def test_reported_residual_is_the_returned_projection():
    """residual_rel = ||B - P B||_F / ||B||_F for the projector P the route applied (checked through the merge of
    a single-member group, whose result is P W itself)."""
    w = _experts(seed=1, **SHAPE)
    groups = [[0], [1]]
    merged, info = submoe_merge(w, groups, group_weights(torch.ones(8), groups), rank_ratio=0.5,
                                gram_dtype=torch.float32, svd="randomized", oversample=8, power_iters=2,
                                power_precision="bfloat16")
    for name in ("gate", "down"):
        for j, g in enumerate(groups):
            src = getattr(w, name)[g[0]].double()
            res = float((src - getattr(merged, name)[j].double()).norm() / src.norm())
            assert res == pytest.approx(info["svd_residual_groups"][name][j], rel=1e-3)


def test_fast_route_is_deterministic_under_the_seed():
    w = _experts(seed=2, e=4, inter=96, hidden=32)
    groups = [[0, 1], [2, 3]]
    weights = group_weights(torch.ones(4), groups)
    run = lambda seed: submoe_merge(w, groups, weights, rank_ratio=0.5, gram_dtype=torch.float32,  # noqa: E731
                                    svd="randomized", oversample=4, power_iters=3, power_precision="bfloat16",
                                    seed=seed)[0].gate
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_bf16_experts_enable_the_tf32_gram_and_it_changes_nothing_on_cpu(monkeypatch):
    """bfloat16 experts and float32 Grams: the Gram products run under TF32 (exact for bfloat16 entries); on CPU
    (no TF32) the result is the float32 one bit for bit; the matmul precision is restored afterwards."""
    seen = []
    real = merge_mod._project_batch
    monkeypatch.setattr(merge_mod, "_project_batch",
                        lambda *a, **k: seen.append(a[6] if len(a) > 6 else k.get("tf32_gram")) or real(*a, **k))
    w = _experts(seed=3, e=4, inter=96, hidden=32, dtype=torch.bfloat16)
    groups = [[0, 1], [2, 3]]
    weights = group_weights(torch.ones(4), groups)
    before = torch.get_float32_matmul_precision()
    a, _ = submoe_merge(w, groups, weights, rank_ratio=0.5, gram_dtype=torch.float32)
    assert seen and all(seen) and torch.get_float32_matmul_precision() == before
    seen.clear()
    b, _ = submoe_merge(w.map(lambda t: t.float()), groups, weights, rank_ratio=0.5, gram_dtype=torch.float32)
    assert seen and not any(seen)
    torch.testing.assert_close(a.gate, b.gate, rtol=0, atol=0)
    seen.clear()
    submoe_merge(w, groups, weights, rank_ratio=0.5)  # float64 Grams: never TF32
    assert not any(seen)


@pytest.mark.parametrize("gram_dtype,expected", [(torch.float32, True), (torch.float64, False)])
def test_ritz_precision_tf32_runs_the_final_products_under_tf32(monkeypatch, gram_dtype, expected):
    """ritz_precision="tf32": the products after the power iterations enter the TF32 context (float32 Grams
    only); the default never does outside the steering steps."""
    entered = []
    real = merge_mod._tf32

    def spy(enabled=True):
        entered.append(bool(enabled))
        return real(enabled)
    monkeypatch.setattr(merge_mod, "_tf32", spy)
    w = _experts(seed=5, **SHAPE)
    weights = group_weights(torch.ones(8), GROUPS)
    kw = dict(rank_ratio=0.5, gram_dtype=gram_dtype, svd="randomized", oversample=8, power_iters=2)
    submoe_merge(w, GROUPS, weights, ritz_precision="gram", **kw)
    assert not any(entered)
    entered.clear()
    submoe_merge(w, GROUPS, weights, ritz_precision="tf32", **kw)
    assert any(entered) == expected


def test_tf32_context_restores_the_precision_on_error():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError):
        with merge_mod._tf32():
            assert torch.get_float32_matmul_precision() == "high"
            raise RuntimeError
    assert torch.get_float32_matmul_precision() == before


def test_low_precision_power_products_leave_a_gapped_spectrum_exact():
    """With a gap after r, the subspace is found to rounding whatever the precision of the steering products."""
    g = torch.Generator().manual_seed(4)
    rank, out_dim, in_dim = 6, 60, 40
    members = []
    for n in (2, 3):
        u = torch.linalg.qr(torch.randn(out_dim, rank, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(n * in_dim, rank, generator=g, dtype=torch.float64))[0]
        b = (u * 0.7 ** torch.arange(rank, dtype=torch.float64)) @ v.T
        members.append(torch.stack(b.split(in_dim, dim=1)))
    merged = torch.stack([m.mean(0) for m in members]).float()
    exact = subspace_project(members, merged, rank)
    run = lambda precision: subspace_project(members, merged, rank, gram_dtype=torch.float32,  # noqa: E731
                                             svd="randomized", oversample=4, power_iters=2,
                                             power_precision=precision)
    fp32 = run("gram")
    torch.testing.assert_close(fp32, exact, rtol=0, atol=5e-4)  # float32 Grams vs float64: rounding
    for precision in ("tf32", "bfloat16"):
        torch.testing.assert_close(run(precision), exact, rtol=0, atol=5e-4)


def test_scale_bench_table_runs_on_small_shapes(tmp_path, capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale_table", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--device", "cpu", "--shapes", "small", "--only", "mixtral", "--table", "--repeats", "1",
                      "--plan-repeats", "1", "--similarity-tokens", "512", "--similarity-budget", "0.25",
                      "--profile", str(tmp_path / "prof"), "--out", str(tmp_path / "t.json")])
    printed = capsys.readouterr().out
    (r,) = res
    assert {"plain forward", "routed statistics", "merge statistics", "submoe full rank",
            "submoe r=0.5 exact"} <= set(r["rows"])
    assert r["similarity_error"]["tokens"] == 64 and r["similarity_error"]["ref_tokens"] == 512
    fast = [v for k, v in r["rows"].items() if "fast" in k]
    assert fast and all(1.0 - 1e-6 <= v["error_ratio_vs_exact"] < 1.05 for v in fast)
    assert r["verdict"]["best_fast"] and r["verdict"]["best_fast_error_ratio"] <= 1.02
    assert r["profiles"] and all(pathlib.Path(p).read_text() for p in r["profiles"])
    assert "Targets:" in printed and (tmp_path / "t.json").exists()


@pytest.mark.parametrize("tf32_rounds", [0, 1])
def test_orth_gives_an_orthonormal_basis_of_the_same_span(tf32_rounds):
    """CholeskyQR (triangular solve, or the triangular inverse product of the TF32 rounds): Q^T Q = I and
    Q Q^T Y = Y, batched."""
    y = torch.randn(3, 200, 24, generator=torch.Generator().manual_seed(6))
    q = merge_mod._orth(y, rounds=1, tf32_rounds=tf32_rounds)
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(24).expand(3, 24, 24), rtol=0, atol=1e-5)
    torch.testing.assert_close(q @ (q.transpose(1, 2) @ y), y, rtol=0, atol=1e-4)
