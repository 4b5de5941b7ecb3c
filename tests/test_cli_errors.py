"""Every user mistake, as a user makes it: the real `moe-compress` process (subprocess), and what it must do.

A user mistake prints at most a few lines (the last one `error: ...` saying what is wrong and how to fix it),
exits with code 2, prints no traceback and writes nothing: no output folder, no temporary folder. Ctrl-C exits
with 130 and one line `interrupted`, leaving nothing behind either. An internal error prints one line with the
path of a log that holds the traceback, and exits with code 1.

Each test runs the command with the test's own empty folder as the working directory, so "writes nothing" is
checked as "that folder is left exactly as it was".
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import run_cli
from transformers import AutoConfig, AutoModelForCausalLM

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "COLUMNS": "200",
       "OMP_NUM_THREADS": "1"}


def moe(*args, cwd: Path, timeout: int = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `moe-compress ARGS` as a separate process in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "moe_compress.cli", *map(str, args)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def run(monkeypatch, capsys):
    """``run(*args, cwd=..., real=False)``: `moe-compress ARGS` in ``cwd`` as a separate process when ``real``,
    else in this process through the same entry point (`cli.main`, same exit codes and output) to keep the suite
    fast: each test group runs its first case as a real process."""
    def go(*args, cwd: Path, real: bool = False) -> subprocess.CompletedProcess:
        if real:
            return moe(*args, cwd=cwd)
        code, out, err = run_cli(monkeypatch, capsys, *args, cwd=cwd)
        return subprocess.CompletedProcess(args, code, out, err)

    return go


def compress_with_failing_writer(monkeypatch, capsys, cwd: Path, model: Path, error: BaseException):
    """`compress MODEL --out out` in ``cwd`` with a weights writer that leaves a partial file, then raises
    ``error``; returns (exit code, stderr)."""
    from moe_compress.export import writer

    def failing(model, folder, max_shard_size="2GB"):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(writer, "save_model", failing)
    code, _, err = run_cli(monkeypatch, capsys, "compress", model, "--method", "random", "--experts", "6",
                           "--out", "out", "-q", cwd=cwd)
    return code, err


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_user_error(proc: subprocess.CompletedProcess, *patterns: str, max_lines: int = 2) -> str:
    """Exit code 2, no traceback, nothing on stdout, a short stderr whose last line is the error; returns it."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err, proc.stdout)
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err
    assert "internal error" not in err, err
    assert proc.stdout == "", proc.stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= max_lines, err
    last = lines[-1]
    assert last.startswith("error:"), err
    for p in patterns:
        assert p in last, (p, last)
    return last


def assert_usage_error(proc: subprocess.CompletedProcess, *patterns: str) -> None:
    """A command-line usage mistake (click): exit code 2, one `error:` line with click's reason and where help
    is, no usage block, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--help`)" in lines[0], proc.stderr
    for p in patterns:
        assert p in lines[0], (p, lines[0])


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture()
def work(tmp_path) -> Path:
    """An empty working folder for one command; the test checks that it stays empty."""
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tokenizer, saved_models) -> dict[str, Path]:
    """Checkpoints a user might point at by mistake."""
    root = tmp_path_factory.mktemp("bad_models")
    out = {}
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    out["dense"] = root / "dense"
    # a real MoE family that moe-compress does not support
    cfg = AutoConfig.for_model("granitemoe", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, num_local_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "granitemoe")
    tokenizer.save_pretrained(root / "granitemoe")
    out["unsupported"] = root / "granitemoe"
    shutil.copytree(saved_models["mixtral"], root / "corrupt")
    for f in (root / "corrupt").glob("*.safetensors"):
        f.write_bytes(b"\x00garbage" * 16)
    out["corrupt"] = root / "corrupt"
    shutil.copytree(saved_models["mixtral"], root / "truncated")
    for f in (root / "truncated").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # an interrupted download
    out["truncated"] = root / "truncated"
    shutil.copytree(saved_models["mixtral"], root / "badconfig")
    (root / "badconfig" / "config.json").write_text("{not json")
    out["badconfig"] = root / "badconfig"
    (root / "noconfig").mkdir()
    out["noconfig"] = root / "noconfig"
    (root / "afile.safetensors").write_bytes(b"x")
    out["file"] = root / "afile.safetensors"
    return out


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("short") / "short.txt"
    p.write_text("hi there\n")
    return p


# ------------------------------------------------------------------------------------------------- model paths


@pytest.mark.parametrize("real,which,pattern", [
    (True, "missing", "model folder not found"),
    (False, "file", "is a file; give the checkpoint folder"),
    (False, "noconfig", "has no config.json"),
    (False, "badconfig", "cannot read the config"),
    (True, "corrupt", "damaged or incomplete"),
    (False, "truncated", "damaged or incomplete"),
    (False, "dense", "'llama' is not a supported MoE architecture"),
    (False, "unsupported", "'granitemoe' is not a supported MoE architecture"),
])
def test_compress_bad_model(run, work, bad_models, real, which, pattern):
    model = work.parent / "nope" if which == "missing" else bad_models[which]
    proc = run("compress", model, "--method", "random", "--experts", 2, "--out", "out", "-q", cwd=work, real=real)
    last = assert_user_error(proc, pattern)
    if "supported" in pattern:
        assert "mixtral" in last  # says what is supported
    assert listing(work) == set()


@pytest.mark.parametrize("real,which,pattern", [(True, "corrupt", "damaged or incomplete"),
                                                (False, "truncated", "damaged or incomplete"),
                                                (False, "missing", "model folder not found"),
                                                (False, "dense", "not a supported MoE architecture")])
def test_analyze_bad_model(run, work, bad_models, real, which, pattern):
    """analyze reads layers lazily from the shards: a damaged file must still be a clear error."""
    model = work.parent / "nope" if which == "missing" else bad_models[which]
    proc = run("analyze", model, "--calib", "builtin:demo", "--n-samples", 2, "--seq-len", 16, "--out", "out",
               "--no-cache", "-q", cwd=work, real=real)
    assert_user_error(proc, pattern, max_lines=3)  # may first warn that the data gave fewer samples
    assert listing(work) == set()


def test_eval_bad_model(run, work, bad_models):
    assert_user_error(run("eval", work / "nope", "--data", "builtin:demo", "-q", cwd=work, real=True),
                      "model folder not found")
    assert_user_error(run("eval", bad_models["corrupt"], "--data", "builtin:demo", "-q", cwd=work),
                      "damaged or incomplete")
    assert listing(work) == set()


# ------------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("real,model,budget,pattern", [
    (True, "mixtral", ("--experts", 8), "--experts 8 must be smaller than the model's 8 experts"),
    (False, "mixtral", ("--experts", 9), "must be smaller than the model's 8 experts"),
    (False, "mixtral", ("--experts", 1), "fewer than the 2 each token uses"),
    (False, "mixtral", ("--ratio", 0.99), "fewer than the 2 each token uses"),
    (False, "mixtral", ("--ratio", 1.5), "ratio: Input should be less than 1"),
    (False, "deepseek_v3", ("--experts", 5), "valid counts below 8: 4, 6"),
])
def test_invalid_budget(run, work, saved_models, real, model, budget, pattern):
    proc = run("compress", saved_models[model], "--method", "random", *budget, "--out", "out", cwd=work, real=real)
    assert_user_error(proc, pattern)
    assert listing(work) == set()


def test_invalid_budget_in_dry_run_too(run, work, saved_models):
    proc = run("compress", saved_models["deepseek_v3"], "--method", "random", "--experts", 3, "--out", "out",
               "--dry-run", cwd=work)
    assert_user_error(proc, "valid counts below 8: 4, 6")


def test_bench_invalid_budgets(run, work, saved_models):
    common = ("--methods", "frequency", "--calib", "builtin:demo", "--data", "builtin:demo", "--out", "b", "-q")
    assert_user_error(run("bench", saved_models["mixtral"], "--experts", "6,8", *common, cwd=work, real=True),
                      "budget 8 must be smaller than the model's 8 experts")
    assert_user_error(run("bench", saved_models["mixtral"], "--experts", "6,x", *common, cwd=work),
                      "--experts must be a comma list of numbers")
    assert listing(work) == set()


# ------------------------------------------------------------------------------------------------- options


def test_experts_and_ratio_together(run, work, saved_models):
    proc = run("compress", saved_models["mixtral"], "--method", "random", "--experts", 6, "--ratio", 0.5,
               "--out", "out", cwd=work)
    assert_user_error(proc, "give one budget: --experts N", "or --ratio R", "not both")
    proc = run("bench", saved_models["mixtral"], "--methods", "random", "--experts", 6, "--ratio", 0.5, "--calib",
               "builtin:demo", "--data", "builtin:demo", "--out", "b", cwd=work)
    assert_user_error(proc, "exactly one budget list: --experts", "or --ratio")
    assert listing(work) == set()


@pytest.mark.parametrize("real,args,pattern", [
    (True, ("--method", "frequncy", "--experts", 6), "unknown method 'frequncy' (did you mean frequency?)"),
    (False, ("--method", "frequency", "--experts", 6), "needs calibration data: pass --calib SPEC"),
    (False, ("--experts", 6), "missing --method"),
    (False, ("--method", "random", "--experts", 6, "--param", "protect_super=maybe"),
     "invalid parameter protect_super"),
    (False, ("--method", "random", "--experts", 6, "--param", "protect_super"), "--param expects key=value"),
    (False, ("--method", "random", "--experts", 6, "--set", "calibration.n_sample=3"),
     "calibration.n_sample: unknown key"),
    (False, ("--method", "random", "--experts", 6, "--device", "cuda:0"), "CUDA is not available"),
    (False, ("--method", "refit", "--experts", 6, "--calib", "builtin:demo", "--stream", "-p", "distill_steps=5"),
     "the distillation stage needs the whole model in memory"),
])
def test_compress_bad_options(run, work, saved_models, real, args, pattern):
    if "cuda:0" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: the no-CUDA refusal cannot happen here")
    assert_user_error(run("compress", saved_models["mixtral"], *args, "--out", "out", cwd=work, real=real), pattern)
    assert listing(work) == set()


def test_usage_errors_exit_2(run, work, saved_models):
    """Mistakes the argument parser catches: exit code 2 with its own short message, never 'internal error'."""
    assert_usage_error(run("compress", saved_models["mixtral"], "--method", "random", "--experts", "six",
                           "--out", "out", cwd=work, real=True), "Invalid value for '--experts'")
    assert_usage_error(run("compress", saved_models["mixtral"], "--method", "random", "--expert", 6,
                           "--out", "out", cwd=work), "No such option: --expert")
    assert_usage_error(run("bench", saved_models["mixtral"], "--methods", "random", "--experts", 6,
                           "--calib", "builtin:demo", "--out", "b", cwd=work), "Missing option '--data'")
    assert listing(work) == set()


def test_bench_unknown_method_suggests(run, work, saved_models):
    proc = run("bench", saved_models["mixtral"], "--methods", "frequency,randm", "--experts", 6, "--calib",
               "builtin:demo", "--data", "builtin:demo", "--out", "b", cwd=work)
    assert_user_error(proc, "unknown method 'randm' (did you mean random?)")
    assert listing(work) == set()


@pytest.mark.parametrize("real,args,pattern", [
    (True, ("--data", "builtin:demo", "--metrics", "kld"), "pass --reference MODEL"),
    (False, ("--data", "builtin:demo", "--metrics", "ppl,bogus"), "--metrics: unknown bogus"),
    (False, (), "nothing to evaluate: pass --data SPEC"),
    (False, ("--data", "nosuch:thing"), "unknown data spec form 'nosuch:thing'"),
    (False, ("--data", "missing.jsonl"), "data path not found: missing.jsonl"),
    (False, ("--data", "builtin:demo", "--json", "no/such/dir/r.json"), "folder no/such/dir does not exist"),
])
def test_eval_bad_options(run, work, saved_models, real, args, pattern):
    assert_user_error(run("eval", saved_models["mixtral"], *args, "-q", cwd=work, real=real), pattern)
    assert listing(work) == set()


def test_eval_reference_with_another_tokenizer(run, work, saved_models):
    proc = run("eval", saved_models["mixtral"], "--reference", "builtin:mixtral-8e", "--data", "builtin:demo",
               "--seq-len", 16, "--max-windows", 1, "-q", cwd=work)
    assert_user_error(proc, "tokenizer differs", "compare against the original model")


def test_analyze_without_calibration(run, work, saved_models):
    assert_user_error(run("analyze", saved_models["mixtral"], "--out", "a", cwd=work),
                      "analyze needs calibration data")
    assert listing(work) == set()


# ------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("real,text,pattern", [
    (True, "model: M\nmethod: random\nexperts: 6\noutput: out\nmethdo: reap\n",
     "methdo: unknown key (check the spelling)"),
    (False, "model: M\nmethod: frequnecy\nexperts: 6\noutput: out\n", "did you mean frequency?"),
    (False, "model: M\nmethod: random\nexperts: six\noutput: out\n", "experts: Input should be a valid integer"),
    (False, "model: M\nmethod: random\nexperts: 6\noutput: out\ncalibration: 12\n",
     "calibration: Input should be a valid"),
    (False, "model: M\nmethod: random\nexperts: 6\noutput: out\nparams: {protect_supr: true}\n",
     "invalid parameter protect_supr"),
    (False, "model: M\nmethod: random\nexperts: 6\nratio: 0.5\noutput: out\n", "exactly one budget"),
    (False, "- model: M\n- method: random\n", "must be a YAML mapping"),
    (False, "model: [M\n", "is not valid YAML"),
])
def test_bad_recipe(run, work, saved_models, real, text, pattern):
    recipe = work.parent / "recipe.yaml"
    recipe.write_text(text.replace("model: M", f"model: {saved_models['mixtral']}"))
    assert_user_error(run("compress", "--recipe", recipe, cwd=work, real=real), pattern)
    assert listing(work) == set()


def test_missing_recipe_file(run, work):
    assert_user_error(run("compress", "--recipe", "nope.yaml", cwd=work), "recipe file not found: nope.yaml")


# ------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("real,calib,pattern", [
    (False, "nosuch:spec", "unknown data spec form 'nosuch:spec'"),
    (False, "builtin:nope", "unknown builtin data 'nope': available are demo"),
    (False, "missing.txt", "data path not found: missing.txt"),
    (True, "SHORT", "too short for one row of seq_len=512"),
])
def test_bad_calibration_data(run, work, saved_models, short_text, real, calib, pattern):
    calib = str(short_text) if calib == "SHORT" else calib
    proc = run("compress", saved_models["mixtral"], "--method", "frequency", "--experts", 6, "--calib", calib,
               "--out", "out", "-q", cwd=work, real=real)
    last = assert_user_error(proc, pattern)
    if "too short" in pattern:
        assert "lower --seq-len or give more text" in last
    assert listing(work) == set()


def test_eval_too_little_text(run, work, saved_models, short_text):
    proc = run("eval", saved_models["mixtral"], "--data", short_text, "-q", cwd=work)
    assert_user_error(proc, "fewer tokens than one window of 512", "lower --seq-len or add text")


# ------------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("real,command", [(True, "compress"), (False, "analyze"), (False, "bench")])
def test_existing_output_is_refused(run, work, saved_models, real, command):
    out = work / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = {"compress": ("--method", "random", "--experts", 6),
            "analyze": ("--calib", "builtin:demo"),
            "bench": ("--methods", "random", "--experts", 6, "--calib", "builtin:demo", "--data", "builtin:demo")}
    proc = run(command, saved_models["mixtral"], *args[command], "--out", "out", "-q", cwd=work, real=real)
    assert_user_error(proc, "output folder out already exists; choose another --out or pass --overwrite")
    assert listing(work) == {"out", "out/mine.txt"} and (out / "mine.txt").read_text() == "keep me"


def _can_mount_tmpfs(target: Path) -> bool:
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    target.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def test_disk_full_real_filesystem(tmp_path, saved_models):
    """A tiny tmpfs (when this machine lets us mount one): the checkpoint does not fit."""
    disk = tmp_path / "tiny-disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN); the in-process test covers it")
    try:
        proc = moe("compress", saved_models["mixtral"], "--method", "random", "--experts", 6, "--out", disk / "out",
                   "-q", cwd=tmp_path)
        assert_user_error(proc, "no space left on the device", "free some space or choose another --out",
                          "nothing was written")
        assert list(disk.iterdir()) == []  # neither the output nor the temporary folder
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("Error while serializing: I/O error: No space left on device "
                                                "(os error 28)")])  # the form safetensors' Rust writer raises
def test_disk_full_in_process(monkeypatch, capsys, tmp_path, saved_models, error):
    """Fault injection: the weights writer fails with ENOSPC half-way; one line, exit 2, nothing left."""
    code, err = compress_with_failing_writer(monkeypatch, capsys, tmp_path, saved_models["mixtral"], error)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on the device"), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder


def test_interrupted_run(work):
    """Ctrl-C in the middle of calibration: exit code 130, one line 'interrupted', nothing left behind."""
    # enough calibration text that the layer pass takes many seconds even on a fast machine, so the signal
    # always lands inside it (with builtin:demo a fast machine finished before the signal arrived)
    calib = work.parent / "calib.txt"
    calib.write_text("".join(f"Line {i}: the court held that the contract was void.\n" for i in range(60000)))
    # The real console entry point in a real process (signal handling is what is tested), with one addition: the
    # first progress update prints a marker, so the signal is sent once calibration runs (a log shows a stage
    # only when it has finished, which here is the end of the run).
    hook = ("import sys\nimport moe_compress.cli as cli\nupdate = cli._StageLog.update\n"
            "def marked(self, stage, done, total):\n"
            "    if not getattr(self, 'marked', False):\n"
            "        self.marked = True\n"
            "        print(f'started {stage}', file=sys.stderr, flush=True)\n"
            "    update(self, stage, done, total)\n"
            "cli._StageLog.update = marked\nsys.argv = ['moe-compress', *sys.argv[1:]]\ncli.main()\n")
    proc = subprocess.Popen([sys.executable, "-c", hook, "compress", "builtin:mixtral-8e", "--method",
                             "frequency", "--experts", "6", "--calib", str(calib), "--n-samples", "2048",
                             "--seq-len", "256", "--out", "out"], cwd=work, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a shell's background job inherits SIGINT ignored, and then Python installs no
                            # KeyboardInterrupt handler: give the child the default disposition a terminal has
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("started batches"):
                break
        else:
            pytest.fail("the run ended before calibration started: " + "".join(seen))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted:") and sum("interrupted" in line for line in lines) == 1, err
    assert "wrote" not in out
    assert listing(work) == set()  # no output folder, no temporary folder


def test_interrupted_while_writing(monkeypatch, capsys, tmp_path, saved_models):
    """Ctrl-C while the checkpoint is being written: the half-written temporary folder is removed."""
    code, err = compress_with_failing_writer(monkeypatch, capsys, tmp_path, saved_models["mixtral"],
                                             KeyboardInterrupt())
    assert code == 130, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("interrupted:"), err
    assert list(tmp_path.iterdir()) == []


def test_internal_error_prints_log_path(monkeypatch, capsys, tmp_path, saved_models):
    """A bug (not a user mistake): one line with the exception and the path of a log holding the traceback."""
    import tempfile

    from moe_compress import cli, pipeline

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug deep inside")

    monkeypatch.setattr(pipeline, "plan_and_apply", bug)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["moe-compress", "compress", str(saved_models["mixtral"]), "--method", "random",
                                      "--experts", "6", "--out", "out", "-q"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("internal error: ZeroDivisionError: a bug deep inside"), err
    assert "Traceback" not in err
    log = Path(lines[0].split("traceback in ")[1].split(";")[0])
    assert log.is_file() and log.parent == tmp_path / "tmp" / "moe-compress-logs"
    text = log.read_text()
    assert "Traceback" in text and "ZeroDivisionError: a bug deep inside" in text and "compress" in text
    assert not (tmp_path / "out").exists()


def test_error_text_with_brackets_is_printed_verbatim(monkeypatch, capsys):
    """Messages such as "pip install 'moe-compress[eval]'" must not lose their [brackets] to console markup."""
    from moe_compress import cli
    from moe_compress.errors import UserError

    def fail():
        raise UserError("lm-eval is not installed: pip install 'moe-compress[eval]'")

    monkeypatch.setattr(cli, "app", lambda **kw: fail())
    monkeypatch.setattr(sys, "argv", ["moe-compress"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert "pip install 'moe-compress[eval]'" in capsys.readouterr().err


def test_json_output_of_eval_has_inference_cost(run, work, saved_models, tmp_path):
    """`eval --json` holds parameters, weight memory and tokens/s of the model and the reference, with ratios."""
    out = tmp_path / "m4"
    assert run("compress", saved_models["mixtral"], "--method", "random", "--experts", 4, "--out", out, "-q",
               cwd=work).returncode == 0
    proc = moe("eval", out, "--reference", saved_models["mixtral"], "--data", "builtin:demo", "--seq-len", 32,
               "--max-windows", 1, "--cost-runs", 3, "--json", work / "e.json", "-q", cwd=work)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((work / "e.json").read_text())
    cost = data["cost"]
    for side in ("model", "reference"):
        c = cost[side]
        assert c["batch"] == 1 and c["seq_len"] == 32 and c["device"] == "cpu" and len(c["run_seconds"]) == 3
        assert c["tokens_per_s"] > 0 and c["weight_bytes"] == 4 * c["params"]
    assert cost["model"]["params_experts"] * 2 == cost["reference"]["params_experts"]  # 4 of 8 experts
    assert cost["ratio"]["params_experts"] == 0.5 and 0 < cost["ratio"]["params"] < 1
    assert cost["warmup"] == 1
    assert "inference cost" in proc.stdout and "tokens/s" in proc.stdout and "median of 3" in proc.stdout
    proc = run("eval", out, "--data", "builtin:demo", "--seq-len", 32, "--max-windows", 1, "--no-cost",
               "--json", work / "f.json", "-q", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "cost" not in json.loads((work / "f.json").read_text()) and "tokens/s" not in proc.stdout


def test_measure_cost_protocol():
    """The cost numbers say how they were measured: N timed runs per model, batch x seq stated, ratios."""
    from moe_compress.evaluation.api import measure_cost
    from moe_compress.models.tiny import tiny_model

    small, big = tiny_model("mixtral", num_local_experts=4), tiny_model("mixtral")
    c = measure_cost(small, big, seq_len=16, batch=2, runs=3, warmup=1)
    assert c["warmup"] == 1 and set(c) == {"model", "reference", "ratio", "warmup"}
    for side in ("model", "reference"):
        assert len(c[side]["run_seconds"]) == 3 and c[side]["batch"] == 2 and c[side]["seq_len"] == 16
        assert c[side]["tokens_per_s"] == pytest.approx(2 * 16 / c[side]["seconds_per_forward"])
    assert c["ratio"]["params_experts"] == 0.5
    alone = measure_cost(small, seq_len=16, runs=1, warmup=0)
    assert set(alone) == {"model", "warmup"} and alone["model"]["params"] == c["model"]["params"]


# ------------------------------------------------------------------------------------------------- output location


@pytest.fixture()
def no_work(monkeypatch):
    """Loading weights or calibrating fails the test: a refusal must come before any work."""
    from moe_compress import pipeline

    def work_started(*args, **kwargs):
        raise AssertionError("the run started working before refusing the output")

    for name in ("load_model", "calibration_set", "plan_and_apply"):
        monkeypatch.setattr(pipeline, name, work_started)


def test_unwritable_output_under_a_file_is_refused_before_any_work(run, work):
    """--out below a regular file: a place nobody can create a folder in, root included (os.access is always
    true for root, so a permission-only test would pass vacuously there). A real process: exit 2, one line."""
    (work.parent / "a-file").write_text("x")
    before = listing(work.parent)
    proc = run("compress", "builtin:mixtral-8e", "--method", "random", "--experts", 4, "--out",
               work.parent / "a-file" / "out", cwd=work, real=True)
    assert_user_error(proc, "cannot create", "is a file, not a folder", max_lines=1)
    assert listing(work.parent) == before


@pytest.mark.parametrize("command", ["compress", "dry-run", "bench"])
def test_read_only_output_folder_is_refused_before_any_work(run, work, saved_models, monkeypatch, no_work, command):
    """A folder this process may not write in (os.access mocked to say so, as it does for a non-root user on a
    0555 folder or for anyone on a read-only mount): refused with one line before the model is loaded, in a
    dry run too, and by bench; nothing is written."""
    real_access = os.access
    ro = work / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK
                        else real_access(p, mode, **kw))
    before = listing(work)
    if command == "bench":
        args = ("bench", saved_models["mixtral"], "--methods", "random", "--experts", 6, "--calib", "builtin:demo",
                "--data", "builtin:demo", "--out", ro / "sub" / "b")
    else:
        args = ("compress", saved_models["mixtral"], "--method", "random", "--experts", 6, "--out",
                ro / "sub" / "out", *(("--dry-run",) if command == "dry-run" else ()))
    assert_user_error(run(*args, cwd=work), "cannot write", "no permission to write in", "nothing was written",
                      max_lines=1)
    assert listing(work) == before


def test_read_only_folder_for_a_normal_user(run, work, saved_models):
    """The same with real permissions (only meaningful for a non-root user: root may write a 0555 folder)."""
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0555 folder; the mocked test above covers the refusal")
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = run("compress", saved_models["mixtral"], "--method", "random", "--experts", 6, "--out", ro / "out",
                   cwd=work)
        assert_user_error(proc, "no permission to write in", max_lines=1)
        assert listing(ro) == set()
    finally:
        ro.chmod(0o755)


def test_too_little_free_space_is_refused_before_any_work(run, work, saved_models, monkeypatch, no_work):
    """Free space below the plan's estimate of the weights (shutil.disk_usage mocked): one line with both sizes."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    proc = run("compress", saved_models["mixtral"], "--method", "random", "--experts", 6, "--out", "out", cwd=work)
    last = assert_user_error(proc, "no space left on the device", "it needs about", "1000 bytes are free",
                             "nothing was written", max_lines=1)
    assert "KiB" in last.split("needs about")[1].split("and")[0]
    assert listing(work) == set()


# ------------------------------------------------------------------------------------------------- method specs


def test_bracket_parameters_in_compress_method(run, work, saved_models, tmp_path):
    """`--method NAME[key=value]` is `--method NAME --param key=value`: the same weights, and compression.json
    records one form (method name + params, and the canonical spec)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("compress", saved_models["mixtral"], "--method", "random[protect_super=false]", "--experts", 4,
               "--out", a, "-q", cwd=work).returncode == 0
    assert run("compress", saved_models["mixtral"], "--method", "random", "-p", "protect_super=false", "--experts", 4,
               "--out", b, "-q", cwd=work).returncode == 0
    ma, mb = (json.loads((d / "compression.json").read_text()) for d in (a, b))
    assert ma["recipe"]["method"] == "random" and ma["recipe"]["params"] == {"protect_super": False}
    assert ma["method"]["spec"] == "random[protect_super=false]" and ma["method"]["params"]["protect_super"] is False
    assert ma["recipe"] == {**mb["recipe"], "output": str(a)}
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("real,spec,extra,pattern", [
    (True, "refit[selec=naee]", (), "method refit: invalid parameter selec: unknown parameter (did you mean select?)"),
    (False, "refit[select=nae]", (), "invalid parameter select: Input should be 'naee'"),
    (False, "refit[select]", (), "parameter 'select' is not key=value"),
    (False, "refit[select=naee", (), "cannot parse method 'refit[select=naee'"),
    (False, "refit[select=naee,select=ean]", (), "parameter select is given twice"),
    (False, "refit[select=naee]", ("-p", "select=ean"), "sets select=naee but --param has select=ean"),
    (False, "refti[select=naee]", (), "unknown method 'refti' (did you mean refit?)"),
])
def test_bad_bracket_parameters_in_compress_method(run, work, saved_models, real, spec, extra, pattern):
    proc = run("compress", saved_models["mixtral"], "--method", spec, *extra, "--experts", 4, "--calib",
               "builtin:demo", "--out", "out", cwd=work, real=real)
    assert_user_error(proc, pattern, max_lines=1)
    assert listing(work) == set()


def test_recipe_method_with_brackets_equals_params():
    """In a recipe `method: refit[select=naee]` is `method: refit` + `params: {select: naee}`; both together must
    agree."""
    from moe_compress.errors import UserError
    from moe_compress.recipe import build_recipe

    base = {"model": "M", "experts": 4, "output": "o"}
    a = build_recipe({**base, "method": "refit[select=naee,distill_steps=40]"})
    b = build_recipe({**base, "method": "refit", "params": {"select": "naee", "distill_steps": 40}})
    c = build_recipe({**base, "method": "refit[select=naee]", "params": {"distill_steps": 40, "select": "naee"}})
    assert a == b == c and a.method == "refit" and a.params == {"select": "naee", "distill_steps": 40}
    with pytest.raises(UserError, match="sets select=naee but params has select=ean: give select once"):
        build_recipe({**base, "method": "refit[select=naee]", "params": {"select": "ean"}})
    # --set method=... on top of a recipe goes through the same parser
    d = build_recipe({**base, "method": "reap"}, [("method", "refit[select=naee]")])
    assert (d.method, d.params) == ("refit", {"select": "naee"})


# ------------------------------------------------------------------------------------------------- order of checks


@pytest.mark.parametrize("text,pattern", [
    ("model: M\nmethod: random\nexperts: 6\nbogus: 1\n", "bogus: unknown key (check the spelling)"),
    ("model: M\nmethod: frequnecy\nexperts: 6\n", "unknown method 'frequnecy' (did you mean frequency?)"),
    ("model: M\nmethod: random\nexperts: 6\nparams: {protect_supr: true}\n", "invalid parameter protect_supr"),
    ("model: M\nmethod: random\nexperts: 6\n", "missing --out (give it on the command line or in --recipe)"),
])
def test_recipe_is_validated_before_asking_for_more(run, work, saved_models, text, pattern):
    """A recipe without `output` (and no --out): what is wrong in it comes first, `missing --out` only after."""
    recipe = work.parent / "recipe.yaml"
    recipe.write_text(text.replace("model: M", f"model: {saved_models['mixtral']}"))
    assert_user_error(run("compress", "--recipe", recipe, cwd=work), pattern, max_lines=1)
    assert listing(work) == set()


def test_experts_that_is_not_a_whole_number_says_why(run, work, saved_models):
    """`--experts 2.5`: one line with the reason, not only typer's usage block."""
    proc = run("compress", saved_models["mixtral"], "--method", "random", "--experts", "2.5", "--out", "out",
               cwd=work, real=True)
    assert_usage_error(proc, "'2.5' is not a whole number", "experts kept per MoE layer", "--ratio")
    assert listing(work) == set()


def test_dry_run_checks_every_path_it_would_read(run, work, saved_models):
    """`--dry-run` refuses calibration data that does not exist (and does not plan on it), as the run would."""
    recipe = work.parent / "recipe.yaml"
    recipe.write_text(f"model: {saved_models['mixtral']}\nmethod: reap\nexperts: 4\noutput: out\n"
                      "calibration: {data: ../shared/data/train, n_samples: 64, seq_len: 256}\n")
    proc = run("compress", "--recipe", recipe, "--dry-run", cwd=work)
    assert_user_error(proc, "data path not found: ../shared/data/train", max_lines=1)
    proc = run("compress", "--recipe", recipe, "--dry-run", "--calib", "builtin:demo+missing.jsonl", cwd=work)
    assert_user_error(proc, "data path not found: missing.jsonl", max_lines=1)
    proc = run("compress", "--recipe", recipe, "--dry-run", "--calib", "builtin:nope", cwd=work)
    assert_user_error(proc, "unknown builtin data 'nope'", max_lines=1)
    assert listing(work) == set()


def test_eval_json_in_an_unwritable_folder_is_refused_first(run, work, saved_models, monkeypatch):
    """`eval --json` into a folder this process may not write (os.access mocked, as for root any folder is
    writable): refused before the evaluation runs."""
    real_access = os.access
    ro = work / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK
                        else real_access(p, mode, **kw))
    from moe_compress.evaluation import api

    monkeypatch.setattr(api, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before refusing --json"))
    proc = run("eval", saved_models["mixtral"], "--data", "builtin:demo", "--json", ro / "e.json", "-q", cwd=work)
    assert_user_error(proc, "no permission to write in", max_lines=1)
    assert listing(ro) == set()
