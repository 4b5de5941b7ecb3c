"""Driving `moe-compress` (and `python -m tools.testbed`) in-process, as the console script does (shared by the
CLI-facing tests)."""

from __future__ import annotations

import sys

from moe_compress import cli


def run_cli(monkeypatch, capsys, *args, cwd=None) -> tuple[int, str, str]:
    """Run `moe-compress ARGS` (in ``cwd`` if given) through `cli.main`; returns (exit code, stdout, stderr)."""
    return _run_main(monkeypatch, capsys, cli.main, ["moe-compress"], args, cwd)


def run_testbed_cli(monkeypatch, capsys, *args, cwd=None) -> tuple[int, str, str]:
    """Run `python -m tools.testbed ARGS` in-process (`tools.testbed.cli.main`); returns (code, stdout, stderr)."""
    from tools.testbed.cli import main

    return _run_main(monkeypatch, capsys, main, ["python -m tools.testbed"], args, cwd)


def _run_main(monkeypatch, capsys, main, prog: list[str], args, cwd) -> tuple[int, str, str]:
    if cwd is not None:
        monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [*prog, *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:  # as the interpreter maps it: None -> 0, an int as is, anything else -> 1
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_user_error(code, err, pattern):
    """A user mistake: exit code 2, exactly one line on stderr that contains ``pattern``, no traceback."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def run_cli_in(monkeypatch, capsys, cwd, *args) -> tuple[int, str, str]:
    """`run_cli` with the working folder first (tests whose paths are relative to it)."""
    return run_cli(monkeypatch, capsys, *args, cwd=cwd)
