"""`moe-compress bench`: one statistics pass, every method x budget against the original, several models."""

from __future__ import annotations

import csv
import json

import pytest
from clitools import assert_user_error, run_cli

from moe_compress.benchmark import parse_variants, resolve_budgets
from moe_compress.errors import UserError


def _bench(monkeypatch, capsys, models, out, *extra, methods="frequency,reap,submoe[rank_ratio=0.5]"):
    return run_cli(monkeypatch, capsys, "bench", *models, "--methods", methods,
                   "--calib", extra[0], "--n-samples", 4, "--seq-len", 32, "--data", extra[0],
                   "--eval-seq-len", 32, "--max-windows", 2, "--batch-size", 2, "--device", "cpu", "--out", out,
                   "--quiet", *extra[1:])


def test_bench_writes_one_row_per_method_and_budget(monkeypatch, capsys, saved_models, text_file, tmp_path):
    out = tmp_path / "b"
    code, stdout, err = _bench(monkeypatch, capsys, [saved_models["mixtral"]], out, text_file, "--experts", "6,4")
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["experts"]) for r in rows] == [
        (m, n) for n in ("6", "4") for m in ("frequency", "reap", "submoe[rank_ratio=0.5]")]
    for r in rows:
        assert 0 <= float(r["top1"]) <= 1 and float(r["kld"]) >= 0 and float(r["ppl_ratio"]) > 0
        assert float(r["params_ratio"]) < 1
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["budgets"] == [6, 4]
    assert {p.name for p in out.glob("*.png")} == {"ppl_ratio.png", "kld.png", "domains_6e.png", "domains_4e.png"}
    assert "## 4 experts kept" in (out / "results.md").read_text()
    assert "submoe[rank_ratio=0.5]" in stdout


def test_bench_is_deterministic(monkeypatch, capsys, saved_models, text_file, tmp_path):
    keys = ("ppl", "kld", "top1")
    runs = []
    for name in ("a", "b"):
        code, _, err = _bench(monkeypatch, capsys, [saved_models["qwen3_moe"]], tmp_path / name, text_file,
                              "--experts", "6", methods="reap,hcsmoe,submoe[rank_ratio=0.5]")
        assert code == 0, err
        runs.append([{k: r[k] for k in keys} for r in csv.DictReader(open(tmp_path / name / "results.csv"))])
    assert runs[0] == runs[1]


def test_bench_several_models_with_ratios(monkeypatch, capsys, saved_models, text_file, tmp_path):
    out = tmp_path / "multi"
    code, stdout, err = _bench(monkeypatch, capsys, [saved_models["mixtral"], saved_models["deepseek_v3"]], out,
                               text_file, "--ratio", "0.25,0.5", methods="frequency")
    assert code == 0, err
    for arch in ("mixtral", "deepseek_v3"):
        meta = json.loads((out / arch / "results.json").read_text())["meta"]
        assert meta["model"] == str(saved_models[arch])
    assert json.loads((out / "mixtral" / "results.json").read_text())["meta"]["budgets"] == [6, 4]
    joint = (out / "results.md").read_text()
    assert joint.count("# Benchmark:") == 2 and "](mixtral/kld.png)" in joint


def test_resolve_budgets():
    assert resolve_budgets(8, ratios=[0.25, 0.5]) == [6, 4]
    assert resolve_budgets(32, ratios=[0.25, 0.5]) == [24, 16]
    assert resolve_budgets(8, experts=[7]) == [7]
    with pytest.raises(UserError, match="exactly one"):
        resolve_budgets(8)
    with pytest.raises(UserError, match="exactly one"):
        resolve_budgets(8, experts=[6], ratios=[0.5])
    with pytest.raises(UserError, match="between 0 and 1"):
        resolve_budgets(8, ratios=[1.0])


def test_parse_variants_keeps_commas_inside_brackets():
    vs = parse_variants("frequency, submoe[whiten=true,rank_ratio=0.5]")
    assert [(v.name, v.params) for v in vs] == [("frequency", {}), ("submoe", {"whiten": True, "rank_ratio": 0.5})]
    with pytest.raises(UserError, match="not key=value"):
        parse_variants("submoe[whiten]")


@pytest.mark.parametrize("args, message", [
    (["--experts", "8"], "budget 8 must be smaller"),
    (["--experts", "6", "--ratio", "0.5"], "exactly one budget list"),
    (["--experts", "six"], "--experts must be a comma list"),
    (["--ratio", "1.5"], "strictly between 0 and 1"),
])
def test_bench_bad_budgets_write_nothing(monkeypatch, capsys, saved_models, text_file, tmp_path, args, message):
    out = tmp_path / "bad"
    code, _, err = _bench(monkeypatch, capsys, [saved_models["mixtral"]], out, text_file, *args, methods="frequency")
    assert_user_error(code, err, message)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bench_unknown_method_is_refused_before_work(monkeypatch, capsys, saved_models, text_file, tmp_path):
    out = tmp_path / "bad"
    code, _, err = run_cli(monkeypatch, capsys, "bench", saved_models["mixtral"], "--methods", "frequncy",
                           "--experts", "6", "--calib", text_file, "--data", text_file, "--out", out, "--quiet")
    assert_user_error(code, err, "frequency")
    assert not out.exists()


def test_save_best_keeps_the_lowest_kl_checkpoint(saved_models, text_file, tokenizer, tmp_path):
    """`BenchSpec.save_best` (what `make demo` uses): the lowest-KL variant at the smallest budget is written with
    the normal exporter; it loads with transformers, evaluates like its row, and its compression.json re-runs
    it with `compress --recipe`."""
    from transformers import AutoModelForCausalLM

    from moe_compress.benchmark import BenchSpec, run_bench
    from moe_compress.demo import next_steps
    from moe_compress.recipe import Calibration

    spec = BenchSpec(model=str(saved_models["mixtral"]), variants=parse_variants("random,reap,frequency"),
                     budgets=[6, 4], calibration=Calibration(data=str(text_file), n_samples=4, seq_len=32,
                                                             batch_size=2),
                     eval_data=str(text_file), eval_seq_len=32, max_windows=2, eval_batch_size=2, device="cpu",
                     save_best="best-model")
    rows = run_bench(spec, tmp_path / "b")
    at4 = [r for r in rows if r["experts"] == 4]
    winner = min(at4, key=lambda r: r["kld"])
    best = tmp_path / "b" / "best-model"
    manifest = json.loads((best / "compression.json").read_text())
    assert manifest["method"]["spec"] == winner["method"] and manifest["experts"] == {"original": 8, "kept": 4}
    assert manifest["recipe"]["method"] == winner["method"] and manifest["recipe"]["experts"] == 4
    assert json.loads((tmp_path / "b" / "results.json").read_text())["meta"]["best_model"]["method"] == winner["method"]
    model = AutoModelForCausalLM.from_pretrained(best)
    assert model.config.num_local_experts == 4
    lines = next_steps(best, str(text_file))
    assert any(line.strip().startswith(f"evaluate: moe-compress eval {best}") for line in lines)
    assert any("vllm serve" in line for line in lines) and any("from_pretrained" in line for line in lines)
