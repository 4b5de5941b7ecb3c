"""The written dtype (`Recipe.save_dtype`, `--save-dtype`): a bfloat16 source stays bfloat16 tensor by tensor, the
math runs in float32 before the cast, the file shrinks with the parameters, and the size is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import assert_user_error, run_cli
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moe_compress.execute import compress
from moe_compress.export.dtypes import SavePolicy, resolve_policy
from moe_compress.export.writer import save_model
from moe_compress.models.loading import resolve_model
from moe_compress.models.tiny import tiny_model
from moe_compress.recipe import build_recipe


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _recipe(tmp_path, model, method, experts, **kw):
    data = {"model": model, "method": method, "experts": experts, "output": str(tmp_path / "out"),
            "device": "cpu", "calibration": {"data": "builtin:demo", "n_samples": 4, "seq_len": 64}}
    data.update(kw)
    return build_recipe(data)


@pytest.mark.parametrize("method", ["random", "msmoe"])
def test_bf16_source_writes_bf16_and_shrinks_with_the_parameters(tmp_path, method):
    """The acceptance case: a bfloat16 model compressed 8 -> 4 writes bfloat16 tensors, config dtype bfloat16, and
    weights within 10% of (kept params / original params) x the original size; compression.json and the card say so."""
    src = Path(resolve_model("builtin:mixtral-8e"))
    assert {t.dtype for t in _tensors(src).values()} == {torch.bfloat16}
    res = compress(_recipe(tmp_path, "builtin:mixtral-8e", method, 4))
    out = tmp_path / "out"
    written = _tensors(out)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    x = res.manifest["export"]
    assert x["save_dtype"] == "source" and x["main_dtype"] == "bfloat16"
    assert x["tensors_by_dtype"] == {"bfloat16": len(written)}
    assert x["bytes"] == {"source": _weights_bytes(src), "written": _weights_bytes(out),
                          "fraction": pytest.approx(_weights_bytes(out) / _weights_bytes(src), abs=1e-6)}
    assert x["parameters"]["written"] == sum(t.numel() for t in written.values())
    expected = x["parameters"]["fraction"] * _weights_bytes(src)
    assert abs(_weights_bytes(out) - expected) <= 0.10 * expected
    assert x["bytes"]["fraction"] < 0.7  # really smaller: 8 -> 4 experts of a model that is mostly experts
    card = (out / "README.md").read_text()
    assert "| written dtype | bfloat16" in card and "weights on disk" in card
    assert json.loads((out / "compression.json").read_text())["export"] == x


def test_math_runs_in_fp32_then_the_result_is_cast(tmp_path):
    """The written bf16 tensors are exactly the float32 computation cast once (not a bf16 computation)."""
    r = _recipe(tmp_path, "builtin:mixtral-8e", "msmoe", 4)
    fp32 = compress(r, write=False).model
    assert next(fp32.parameters()).dtype == torch.float32
    ref = {k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()}
    compress(r)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    got = reloaded.state_dict()
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_source_dtype_is_kept_tensor_by_tensor(tmp_path):
    """deepseek-fine stores its correction biases in float32 beside bfloat16 weights: both stay as they were,
    in memory and streaming alike (the two outputs are identical)."""
    src = _tensors(Path(resolve_model("builtin:deepseek-fine")))
    res = compress(_recipe(tmp_path, "builtin:deepseek-fine", "random", 16))
    written = _tensors(tmp_path / "out")
    assert all(written[k].dtype == src[k].dtype for k in written)
    fp32 = [k for k, t in written.items() if t.dtype == torch.float32]
    assert fp32 and all(k.endswith("e_score_correction_bias") for k in fp32)
    assert res.manifest["export"]["tensors_by_dtype"] == {"bfloat16": len(written) - len(fp32), "float32": len(fp32)}

    from moe_compress.streaming import compress_streaming

    compress_streaming(_recipe(tmp_path, "builtin:deepseek-fine", "random", 16, output=str(tmp_path / "streamed")))
    streamed = _tensors(tmp_path / "streamed")
    assert set(streamed) == set(written)
    assert all(streamed[k].dtype == written[k].dtype and torch.equal(streamed[k], written[k]) for k in written)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "streamed" / "compression.json").read_text())["export"]["main_dtype"] == "bfloat16"


def test_explicit_save_dtype_keeps_what_transformers_keeps_in_fp32(tmp_path, tokenizer):
    """--save-dtype bfloat16 of a float32 DeepSeek-V3: everything bfloat16 except the router weight and the
    correction bias (transformers' _keep_in_fp32_modules_strict); the reload gives the in-memory logits."""
    src = tmp_path / "src"
    save_model(tiny_model("deepseek_v3", vocab_size=len(tokenizer)), src)
    tokenizer.save_pretrained(src)
    res = compress(_recipe(tmp_path, str(src), "random", 4, save_dtype="bfloat16"))
    written = _tensors(tmp_path / "out")
    for k, t in written.items():
        kept_fp32 = k.endswith("mlp.gate.weight") or k.endswith("e_score_correction_bias")
        assert t.dtype == (torch.float32 if kept_fp32 else torch.bfloat16), k
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").eval()
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, res.model.eval()(ids).logits)


def test_save_dtype_float32_of_a_bf16_source(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "compress", "builtin:mixtral-8e", "--method", "random",
                             "--experts", 6, "--save-dtype", "float32", "--out", tmp_path / "o", "-q")
    assert code == 0, err
    assert {t.dtype for t in _tensors(tmp_path / "o").values()} == {torch.float32}
    assert "float32" in out and "of the source's bytes" in out


def test_compress_reports_the_written_size(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "compress", "builtin:mixtral-8e", "--method", "random",
                             "--experts", 4, "--out", tmp_path / "o", "-q")
    assert code == 0, err
    x = json.loads((tmp_path / "o" / "compression.json").read_text())["export"]
    assert f"{100 * x['bytes']['fraction']:.1f}% of the source's bytes" in out and "bfloat16" in out


def test_bad_save_dtype(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compress", "builtin:mixtral-8e", "--method", "random",
                           "--experts", 4, "--save-dtype", "float8", "--out", tmp_path / "o")
    assert_user_error(code, err, "save_dtype")
    assert not (tmp_path / "o").exists()


def test_policy_rules():
    p = SavePolicy("source", torch.bfloat16, {"a.weight": torch.float32})
    assert p.dtype_for("a.weight", torch.float32) == torch.float32
    assert p.dtype_for("b.weight", torch.float32) == torch.bfloat16  # not in the source: its main dtype
    assert p.dtype_for("ids", torch.int64) == torch.int64           # integers never cast
    q = SavePolicy("float16", torch.float16, keep_fp32=("gate.weight",))
    assert q.dtype_for("model.layers.1.mlp.gate.weight", torch.float32) == torch.float32
    assert q.dtype_for("model.layers.1.mlp.gate_proj.weight", torch.float32) == torch.float16


def test_policy_without_source_files_uses_the_config_dtype():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("mixtral", dtype="bfloat16")
    p = resolve_policy("source", "no-org/not-cached-model", cfg)
    assert p.mode == "source" and p.main == torch.bfloat16 and p.source == {}
    assert p.describe()["dtypes_from"] == "config"


def test_source_architectures_name_is_kept(tmp_path, tokenizer):
    """Phi-3.5-MoE is `PhiMoEForCausalLM` on the hub and in vLLM's registry, `PhimoeForCausalLM` in transformers:
    the output keeps the source's name (vLLM would otherwise fall back to its generic backend), and transformers
    still loads it."""
    src = tmp_path / "src"
    save_model(tiny_model("phimoe", vocab_size=len(tokenizer)), src)
    tokenizer.save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["PhimoeForCausalLM"]
    cfg["architectures"] = ["PhiMoEForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    compress(_recipe(tmp_path, str(src), "random", 4))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["PhiMoEForCausalLM"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_local_experts == 4


def test_dry_run_states_the_written_dtype_and_size(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "compress", "builtin:mixtral-8e", "--method", "random",
                             "--experts", 4, "--out", tmp_path / "o", "--dry-run")
    assert code == 0, err
    assert "written" in out and "in bfloat16 (save dtype source" in out
    code, out, err = run_cli(monkeypatch, capsys, "compress", "builtin:mixtral-8e", "--method", "random",
                             "--experts", 4, "--out", tmp_path / "o", "--dry-run", "--save-dtype", "float32")
    assert code == 0 and "in float32 (save dtype float32)" in out
