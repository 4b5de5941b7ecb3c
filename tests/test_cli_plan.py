"""`--dry-run` plans, `moe-compress methods [--names]`, and the flags the README uses (as a user runs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from clitools import run_cli_in

from moe_compress import cli
from moe_compress.methods.base import all_methods

ROOT = Path(__file__).resolve().parents[1]




def test_dry_run_plan_prune(monkeypatch, capsys, tmp_path, saved_models):
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, "compress", saved_models["deepseek_v3"], "--method",
                             "reap", "--experts", 4, "--calib", "builtin:demo", "--n-samples", 16, "--seq-len", 64,
                             "--out", "out", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"plan (dry run, nothing written): {saved_models['deepseek_v3']} -> out"
    plan = "\n".join(lines)
    # layers: deepseek_v3's first layer is dense (first_k_dense_replace=1)
    assert "MoE layers  2 of 3 (layers 1-2): 8 -> 4 routed experts each (4 pruned, 4 kept)" in plan
    assert "top-2 routing (sigmoid_group)" in plan
    assert "calibration builtin:demo: 16 x 64 = 1024 tokens, batches of 8, mode oneshot" in plan
    assert "fewer); weights" in plan and "at 4 bytes per parameter" in plan  # memory before -> after
    assert "FLOP" in plan and "on a GPU" in plan  # time estimate, with its assumptions
    assert "memory      device: about one decoder layer" in plan
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert err == ""


def test_dry_run_plan_merge_and_numbers(monkeypatch, capsys, tmp_path, saved_models):
    from transformers import AutoModelForCausalLM

    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, "compress", saved_models["mixtral"], "--method",
                             "hcsmoe", "--ratio", 0.5, "--calib", "builtin:demo", "--out", "out", "--dry-run",
                             "--dtype", "bfloat16")
    assert code == 0, err
    assert "8 -> 4 routed experts each (8 merged into 4 groups)" in out
    assert "at 2 bytes per parameter" in out
    # the parameter counts printed are those of the real model before and after
    model = AutoModelForCausalLM.from_pretrained(saved_models["mixtral"])
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert f"parameters  {total / 1e6:.2f}M -> {(total - experts // 2) / 1e6:.2f}M" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_names_the_memory_of_distillation(monkeypatch, capsys, tmp_path, saved_models):
    args = ("compress", saved_models["mixtral"], "--method", "refit", "--experts", 4, "--calib", "builtin:demo",
            "--out", "out", "--dry-run")
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, *args)
    assert code == 0, err
    assert "distillation" not in out
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, *args, "--param", "distill_steps=10")
    assert code == 0, err
    assert "then        distillation: the device holds the original" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_a_data_free_method(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, "compress", "builtin:mixtral-8e", "--method", "random",
                             "--experts", 6, "--out", "out", "--dry-run")
    assert code == 0, err
    assert "calibration none (this method needs no data)" in out
    assert "MoE layers  6 of 6 (layers 0-5): 8 -> 6 routed experts each (2 pruned, 6 kept)" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_follows_the_data_a_method_needs_from_its_parameters(monkeypatch, capsys, tmp_path):
    """stun reads no data by default but calibration data with unstructured_sparsity > 0 (an instance setting,
    not the class's): the dry run asks for --calib as the run would, and plans the calibration pass."""
    args = ("compress", "builtin:mixtral-8e", "--method", "stun[unstructured_sparsity=0.5]", "--experts", 6,
            "--out", "out", "--dry-run")
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, *args)
    assert code == 2 and out == ""
    assert "needs calibration data: pass --calib SPEC" in err
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, *args, "--calib", "builtin:demo")
    assert code == 0, err
    assert "calibration builtin:demo:" in out and "needs no data" not in out
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, "compress", "builtin:mixtral-8e", "--method", "stun",
                                "--experts", 6, "--out", "out", "--dry-run")
    assert code == 0, err
    assert "calibration none (this method needs no data)" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_refuses_existing_nothing_but_validates(monkeypatch, capsys, tmp_path, saved_models):
    """A dry run validates the method parameters too (a misspelt parameter is an error, not ignored)."""
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, "compress", saved_models["mixtral"], "--method",
                             "hcsmoe", "--experts", 4, "--param", "linkge=single", "--out", "out", "--dry-run")
    assert code == 2 and out == ""
    assert "invalid parameter linkge" in err and "linkage" in err


def test_methods_table_lists_every_method_with_summary_and_parameters(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, "methods")
    assert code == 0, err
    for name, cls in all_methods().items():
        d = cls.describe()
        row = next((line for line in out.splitlines() if line.startswith(f"│ {name} ")), None)
        assert row is not None, f"{name} missing from:\n{out}"
        assert d["kind"] in row and d["summary"][:30] in row
        for param in d["params"]:
            assert param in out


def test_methods_names_is_one_name_per_line():
    """`--names` is for scripts: exactly the method names, one per line, nothing else (real process)."""
    proc = subprocess.run([sys.executable, "-m", "moe_compress.cli", "methods", "--names"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == list(all_methods())
    assert {"frequency", "reap", "hcsmoe", "submoe", "msmoe", "random"} <= set(proc.stdout.split())


@pytest.mark.parametrize("command,flags", [
    ("compress", ["--method", "--experts", "--ratio", "--calib", "--n-samples", "--seq-len", "--dtype", "--out",
                  "--recipe", "--set", "--dry-run", "--overwrite"]),
    ("eval", ["--reference", "--data", "--metrics", "--tasks", "--json", "--seq-len", "--max-windows", "--cost"]),
    ("bench", ["--methods", "--experts", "--ratio", "--calib", "--data", "--out", "--n-samples", "--seq-len"]),
    ("analyze", ["--calib", "--out"]),
    ("demo", ["--out", "--overwrite"]),
])
def test_help_names_the_flags_the_readme_uses(monkeypatch, capsys, tmp_path, command, flags):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli_in(monkeypatch, capsys, tmp_path, command, "--help")
    assert code == 0, err
    for flag in flags:
        assert flag in out, f"{command} --help lacks {flag}"


def test_readme_commands_use_existing_flags():
    """Every `moe-compress SUBCOMMAND --flag` in the README names a flag that SUBCOMMAND has."""
    import re

    import typer.main

    group = typer.main.get_command(cli.app)
    text = (ROOT / "README.md").read_text()
    commands = [c.replace("\\\n", " ") for c in re.findall(r"moe-compress ((?:[^\n]|\\\n)+)", text)]
    checked = 0
    for command in commands:
        words = command.split()
        sub = group.commands.get(words[0])
        if sub is None:
            continue
        n = 1
        while hasattr(sub, "commands") and n < len(words) and words[n] in sub.commands:  # `testbed train`
            sub, n = sub.commands[words[n]], n + 1
        known = {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        for word in words[n:]:
            flag = word.split("=")[0].rstrip("`")
            if flag.startswith("--"):
                assert flag in known, f"README: `moe-compress {' '.join(words[:n])}` has no flag {flag}"
                checked += 1
    assert checked >= 15
