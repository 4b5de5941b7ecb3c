"""The ``moe-compress`` command. It parses and validates arguments, calls the pipeline and prints results;
it does no math. User mistakes print one line and exit with code 2; internal errors print a short message
and the path of a log holding the traceback."""

from __future__ import annotations

import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moe_compress.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune and merge the experts of MoE language models into smaller standard checkpoints.")
console = Console(stderr=True)
out_console = Console()


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """A rich progress display; yields a callback ``progress(stage, done, total)``."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _method_params(items: list[str]) -> dict:
    from moe_compress.recipe import parse_overrides

    return dict(parse_overrides(items))


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="checkpoint folder, builtin:NAME or hub id"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="see `moe-compress methods`"),
    experts: Optional[int] = typer.Option(None, "--experts", "-e", help="experts kept per MoE layer"),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="fraction of routed experts removed"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration SPEC: file/folder, builtin:demo, hf:NAME"),
    n_samples: Optional[int] = typer.Option(None, "--n-samples"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    per_document: bool = typer.Option(False, "--per-document", help="one document per sequence (no packing)"),
    chat_template: bool = typer.Option(False, "--chat-template", help="wrap calibration text in the chat template"),
    mode: Optional[str] = typer.Option(None, "--mode", help="oneshot | sequential"),
    param: list[str] = typer.Option([], "--param", "-p", help="method parameter key=value (repeatable)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (must not exist)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda[:N]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 | auto"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="YAML recipe"),
    set_: list[str] = typer.Option([], "--set", help="recipe override key.sub=value (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and write nothing"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Compress MODEL's experts with one method and write a smaller standard checkpoint."""
    from moe_compress.pipeline import compress as run_compress
    from moe_compress.plan import describe_plan
    from moe_compress.recipe import build_recipe, load_recipe_file, parse_overrides

    data = load_recipe_file(recipe) if recipe else {}
    flags = {"model": model, "method": method, "output": out, "mode": mode, "device": device, "dtype": dtype,
             "seed": seed, "calibration.data": calib, "calibration.n_samples": n_samples,
             "calibration.seq_len": seq_len, "calibration.batch_size": batch_size, "calibration.seed": seed,
             "calibration.packing": False if per_document else None,
             "calibration.chat_template": True if chat_template else None,
             "overwrite": True if overwrite else None, "trust_remote_code": True if trust_remote_code else None}
    overrides = [(k, v) for k, v in flags.items() if v is not None]
    if experts is not None or ratio is not None:  # a budget flag replaces the recipe's budget
        data = {k: v for k, v in data.items() if k not in ("experts", "ratio")}
        overrides += [(k, v) for k, v in (("experts", experts), ("ratio", ratio)) if v is not None]
    overrides += [(f"params.{k}", v) for k, v in _method_params(param).items()]
    for key, label in (("model", "MODEL"), ("method", "--method"), ("output", "--out")):
        if not (data.get(key) or flags[key]):
            raise UserError(f"missing {label} (give it on the command line or in --recipe)")
    r = build_recipe(data, overrides + parse_overrides(set_))
    if dry_run:
        out_console.print(describe_plan(r))
        return
    with progress_bar(not quiet) as progress:
        result = run_compress(r, progress=progress)
    e = result.manifest["experts"]
    out_console.print(f"wrote {r.output}: {r.method}, {e['original']} -> {e['kept']} experts per layer "
                      f"({sum(result.timings.values()):.1f} s)")


@app.command("methods")
def methods_cmd(names: bool = typer.Option(False, "--names", help="print only the method names")) -> None:
    """List the compression methods with a one-line description and their parameters."""
    from moe_compress.methods.base import all_methods

    methods = all_methods()
    if names:
        for name in methods:
            out_console.print(name)
        return
    table = Table("method", "kind", "what it does", "parameters (defaults)")
    for cls in methods.values():
        d = cls.describe()
        table.add_row(d["name"], d["kind"], d["summary"], ", ".join(f"{k}={v}" for k, v in d["params"].items()))
    out_console.print(table)


def _log_traceback() -> Path:
    log_dir = Path(tempfile.gettempdir()) / "moe-compress-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="error-", suffix=".log", dir=log_dir)
    with open(fd, "w") as fh:
        fh.write(" ".join(sys.argv) + "\n\n" + traceback.format_exc())
    return Path(path)


def _quiet_libraries() -> None:
    """Our own progress bars and messages only: silence transformers' loading bars and warnings."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main() -> None:
    """Console entry point: maps errors to exit codes (2 = user mistake, 1 = internal error)."""
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written", highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(2)
    except Exception as e:  # click usage errors have their own exit code
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        log = _log_traceback()
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                      f"(traceback in {log}; please report it)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
