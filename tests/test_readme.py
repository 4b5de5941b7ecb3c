"""Every shell command of README.md (its ```bash blocks) runs as written in a fresh clone with nothing beside it.

The commands are taken from the README itself, so a command that stops working, or a new one, fails here. They
run in a copy of the repository's files (``git ls-files``: what a clone holds, hard-linked) in a temporary
folder, so nothing beside the checkout (the project's ../shared corpus) can be reached through a relative path.
Differences from a user's shell, all mechanical:

- ``.venv/bin/moe-compress ARGS`` runs through the console entry point in this process (`clitools.run_cli`:
  same exit codes and output); ``.venv/bin/python`` is this interpreter, in a subprocess.
- ``/tmp/...`` outputs are redirected into the test's temporary folder (consistently, so that `eval /tmp/reap4`
  reads what `compress ... output=/tmp/reap4` wrote).
- ``make demo`` runs the command the Makefile's demo target runs (read from the Makefile).

Cheap commands run in `make test`; the ones that take minutes on 2 CPU cores run with the slow tests
(`test_readme_slow_commands`). `SKIPPED` lists the commands that are not run at all, and why.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import run_cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# (pattern matched against the command line, why it is not run)
SKIPPED = [
    (r"^make (install|test)\b", "sets up .venv / runs this very test suite"),
    (r"pip install|-m venv", "installs packages from PyPI or another index (what `make install` did for this run)"),
    (r"vllm", "vLLM: a separate environment with its own torch, and a GPU"),
    (r"\bhf:|mistralai/|Qwen/|deepseek-ai/|allenai/|recipes/(mixtral-8x7b|qwen|deepseek-v2|olmoe)",
     "a hub model or hub data: network access and, for the full-size models, GPUs (the hub recipes' dry runs "
     "are checked offline on their configs in tests/test_recipes_dir.py)"),
]
# commands that take minutes on 2 CPU cores: run by the slow test, in README order
SLOW = [
    r"^make demo\b",
    r"demo-out/",
    r"compress --recipe recipes/testbed-reap\.yaml --set output=",
    r"compress --recipe recipes/testbed-premoe\.yaml",
    r"\broute /tmp/premoe4\b",
    r"\beval /tmp/reap4\b",
    r"\bbench\b",
    r"\banalyze\b",
    r"\btestbed (train|sample)\b",
]


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments dropped, `a && b` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                if words[:cut]:
                    commands.append(shlex.join(words[:cut]))
                words = words[cut + 1:]
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED if re.search(pattern, command)), None)


def is_slow(command: str) -> bool:
    return any(re.search(p, command) for p in SLOW)


COMMANDS = readme_commands(README.read_text())
RUN = [c for c in COMMANDS if skip_reason(c) is None]
FAST = [c for c in RUN if not is_slow(c)]
SLOW_RUN = [c for c in RUN if is_slow(c)]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's files as a fresh clone has them, nothing beside them."""
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell which files a clone holds")
    dest = tmp_path_factory.mktemp("fresh") / "moe-compress"
    for name in dict.fromkeys(filter(None, files)):  # a file with merge conflicts is listed once per stage
        src, dst = ROOT / name, dest / name
        if not src.is_file() or dst.exists():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    assert not (dest.parent / "shared").exists()
    return dest


def make_target(name: str) -> list[str]:
    """The moe-compress arguments of a Makefile target's command (``$(BIN)/moe-compress ARGS``)."""
    text = (ROOT / "Makefile").read_text()
    body = re.search(rf"^{name}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    line = next(x for x in body.splitlines() if "moe-compress" in x)
    return shlex.split(line.split("moe-compress", 1)[1])


def run_command(command: str, clone: Path, tmp: Path, monkeypatch, capsys) -> tuple[int, str]:
    words = [w.replace("/tmp/", f"{tmp}/") for w in shlex.split(command)]
    if words[:2] == ["make", "demo"]:
        words = [".venv/bin/moe-compress", *make_target("demo")]
    if words[0] == ".venv/bin/moe-compress":
        code, out, err = run_cli(monkeypatch, capsys, *words[1:], cwd=clone)
        return code, out + err
    if words[0] == ".venv/bin/python":
        proc = subprocess.run([sys.executable, *words[1:]], cwd=clone, capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout + proc.stderr
    raise AssertionError(f"README command {command!r}: neither skipped (SKIPPED) nor runnable here; add it to "
                         "SKIPPED with the reason or teach run_command how to run it")


def test_readme_commands_are_found_and_classified():
    """The extraction sees the README's commands, and the skipped ones are only those SKIPPED names."""
    assert len(COMMANDS) >= 15, COMMANDS
    assert any(c.startswith(".venv/bin/moe-compress compress --recipe recipes/testbed-reap.yaml --dry-run")
               for c in FAST)
    assert any("eval /tmp/reap4" in c for c in SLOW_RUN)
    for c in COMMANDS:
        print(f"{'skip' if skip_reason(c) else 'slow' if is_slow(c) else 'fast'}: {c}"
              + (f"   ({skip_reason(c)})" if skip_reason(c) else ""))
    for c in RUN:
        words = shlex.split(c)
        assert words[0] in (".venv/bin/moe-compress", ".venv/bin/python") or words[:2] == ["make", "demo"], c


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_needs_nothing_beside_the_clone(command):
    """No README command reads the project's corpus or any other folder beside the checkout."""
    assert "../" not in command and "/work/" not in command and "shared/data" not in command, command


def test_readme_fast_commands(clone, tmp_path, monkeypatch, capsys):
    for command in FAST:
        code, output = run_command(command, clone, tmp_path, monkeypatch, capsys)
        assert code == 0, f"README command failed in a fresh clone: {command}\n{output}"
    assert (tmp_path / "m6" / "model.safetensors").is_file()


@pytest.mark.slow
def test_readme_slow_commands(clone, tmp_path, monkeypatch, capsys):
    for command in SLOW_RUN:
        code, output = run_command(command, clone, tmp_path, monkeypatch, capsys)
        assert code == 0, f"README command failed in a fresh clone: {command}\n{output}"
    assert (clone / "demo-out" / "best-model" / "compression.json").is_file()
    assert (tmp_path / "reap4-eval.json").is_file()
