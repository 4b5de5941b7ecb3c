"""The `compress` command as a user drives it: results, and one-line errors with exit code 2 that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from clitools import assert_user_error, run_cli
from transformers import AutoConfig, AutoModelForCausalLM


def test_random_pruning_end_to_end(monkeypatch, capsys, saved_models, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "random",
                                "--experts", 6, "--out", out, "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["method"]["name"] == "random" and manifest["experts"] == {"original": 8, "kept": 6}
    assert set(manifest["layers"]) == {"0", "1", "2"}
    assert all(len(l["sources"]) == 6 for l in manifest["layers"].values())
    assert manifest["recipe"]["experts"] == 6
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_random_pruning_is_seeded(monkeypatch, capsys, saved_models, tmp_path):
    kept = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["olmoe"], "--method", "random",
                               "--experts", 4, "--seed", seed, "--out", tmp_path / name, "-q")
        assert code == 0, err
        kept.append(json.loads((tmp_path / name / "compression.json").read_text())["layers"]["0"]["kept"])
    assert kept[0] == kept[1] != kept[2]


def test_missing_model_folder(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compress", tmp_path / "nope", "--method", "random",
                           "--experts", 2, "--out", tmp_path / "out")
    assert_user_error(code, err, "model folder not found")
    assert not (tmp_path / "out").exists()


def test_dense_model_is_refused(monkeypatch, capsys, tmp_path, tokenizer):
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    code, _, err = run_cli(monkeypatch, capsys, "compress", tmp_path / "dense", "--method", "random",
                           "--experts", 2, "--out", tmp_path / "out")
    assert_user_error(code, err, "not a supported MoE architecture")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("experts,pattern", [(8, "must be smaller than"), (9, "must be smaller than"),
                                             (1, "fewer than the 2 each token uses")])
def test_invalid_budget(monkeypatch, capsys, saved_models, tmp_path, experts, pattern):
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "random",
                           "--experts", experts, "--out", tmp_path / "out")
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_deepseek_group_count_refused_with_valid_counts(monkeypatch, capsys, saved_models, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["deepseek_v3"], "--method", "random",
                           "--experts", 5, "--out", tmp_path / "out")
    assert_user_error(code, err, "valid counts below 8: 4, 6")


def test_existing_output_is_refused_unless_overwrite(monkeypatch, capsys, saved_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("compress", saved_models["qwen3_moe"], "--method", "random", "--experts", 6, "--out", out, "-q")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_user_error(code, err, "already exists")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    code, _, err = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "compression.json").is_file()


def test_unknown_method_suggests(monkeypatch, capsys, saved_models, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "frequncy",
                           "--experts", 6, "--out", tmp_path / "out")
    assert_user_error(code, err, "did you mean frequency")


def test_method_needing_data_without_calib(monkeypatch, capsys, saved_models, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "frequency",
                           "--experts", 6, "--out", tmp_path / "out")
    assert_user_error(code, err, "needs calibration data")


def test_dry_run_writes_nothing(monkeypatch, capsys, saved_models, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "compress", saved_models["deepseek_v3"], "--method", "random",
                             "--experts", 4, "--out", tmp_path / "out", "--dry-run")
    assert code == 0, err
    assert "8 -> 4 routed experts" in out and "nothing written" in out
    assert not list(tmp_path.iterdir())


def test_console_script_exit_code_and_one_line():
    """The installed entry point itself (a real process): exit code 2 and a single line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "moe_compress.cli", "compress", "/definitely/missing",
                           "--method", "random", "--experts", "2", "--out", "/tmp/unused-moe-out"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model folder not found" in proc.stderr


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
@pytest.mark.parametrize("stream", [False, True])
def test_output_modes_follow_the_umask(monkeypatch, capsys, saved_models, tmp_path, umask, folder_mode, file_mode,
                                       stream):
    """The output folder and every file in it (model.safetensors included, which the weights writer creates
    privately) get the modes of a plain mkdir/open under the user's umask, as save_pretrained's own output
    would; in memory and streamed (.OUT.partial)."""
    import os
    import stat

    out = tmp_path / "m"
    old = os.umask(umask)
    try:
        code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "random",
                               "--experts", "4", "--out", out, "-q", *(["--stream"] if stream else []))
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    weights = sorted(out.glob("*.safetensors"))
    assert weights and (out / "config.json").is_file()
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == file_mode, f


def test_piped_progress_is_one_line_per_finished_stage():
    """Without a terminal: no bars and no placeholders; a stage run once per layer (batches) is one line with its
    pass count, written when another stage finishes; an unfinished stage writes nothing."""
    from moe_compress.cli import _StageLog

    lines = []
    log = _StageLog(lambda text, **kw: lines.append(text))
    for layer in range(3):
        for b in range(4):
            log.update("batches", b + 1, 4)
        log.update("layers", layer + 1, 3)
    for d in ("eval code", "eval wiki"):
        for w in range(2):
            log.update(d, w + 1, 2)
    log.update("distill", 3, 10)  # interrupted
    log.close()
    assert [line.split(" (")[0] for line in lines] == ["batches: 4/4 in each of 3 passes", "layers: 3/3",
                                                       "eval code: 2/2", "eval wiki: 2/2"]
    assert all(line.endswith(" s)") for line in lines)


def test_piped_compress_log(monkeypatch, capsys, saved_models, text_file, tmp_path):
    """The whole command with stderr not a terminal (as under capsys): clean lines, no `stage ...` placeholders."""
    code, out, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "reap",
                             "--experts", "4", "--calib", text_file, "--n-samples", "4", "--seq-len", "16",
                             "--batch-size", "2", "--out", tmp_path / "m")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == ["batches", "layers"], err
    assert "..." not in err and "━" not in err
    assert lines[0].startswith("batches: 2/2 in each of ") and lines[1].startswith("layers: ")
    assert out.startswith("wrote ")
