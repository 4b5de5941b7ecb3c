"""The ``moe-compress`` command. It parses and validates arguments, calls the pipeline and prints results;
it does no math. User mistakes print one line and exit with code 2; internal errors print a short message
and the path of a log holding the traceback."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from moe_compress.errors import UserError, is_disk_full

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune and merge the experts of MoE language models into smaller standard checkpoints.")
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)  # a path or a plan line is never cut by a hard wrap in a log


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """Progress of the running stages; yields a callback ``progress(stage, done, total)``.

    On a terminal: rich's live bars. Otherwise (a log file, a pipe): no bars and no placeholders, one line per
    finished stage (`_StageLog`)."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        log = _StageLog(console.print)
        try:
            yield log.update
        finally:
            log.close()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=False)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:  # started on the first update, so that an early error prints no empty progress line
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        elif done < bar.tasks[tasks[stage]].completed:  # a new pass (e.g. the batches of the next layer)
            bar.reset(tasks[stage], total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


class _StageLog:
    """Progress for a log: one line per finished stage, ``layers: 6/6 (4.2 s)``.

    A stage can run several passes (``batches`` once per layer). A finished stage's line is therefore held
    back until another stage finishes (or the run ends): a stage that starts again meanwhile is a pass, and its
    one line counts the passes, ``batches: 8/8 in each of 6 passes (3.9 s)``. A stage that never finishes (an
    error, Ctrl-C) prints nothing."""

    def __init__(self, emit):
        self.emit = emit
        self.state: dict[str, dict] = {}  # stage -> start, last done/total, passes, finished, printed
        self.order: list[str] = []

    def update(self, stage: str, done: int, total: int) -> None:
        import time

        now = time.perf_counter()
        st = self.state.get(stage)
        if st is None or st["printed"]:
            st = self.state[stage] = {"start": now, "done": 0, "total": total, "passes": 1, "finished": None,
                                      "printed": False}
            self.order = [s for s in self.order if s != stage] + [stage]
        elif done < st["done"]:  # a new pass of the same stage
            st["passes"] += 1
            st["finished"] = None
        st["done"], st["total"] = done, total
        if done >= total:
            st["finished"] = now
            self._flush(keep=stage)

    def _flush(self, keep: str | None = None) -> None:
        for stage in self.order:
            st = self.state[stage]
            if st["finished"] is None or st["printed"] or stage == keep:
                continue
            seconds = st["finished"] - st["start"]
            each = f" in each of {st['passes']} passes" if st["passes"] > 1 else ""
            self.emit(f"{stage}: {st['done']}/{st['total']}{each} ({seconds:.1f} s)", highlight=False,
                      markup=False)
            st["printed"] = True

    def close(self) -> None:
        self._flush()


def _whole_number(value: str, flag: str) -> int:
    """``--experts`` as typed: a whole number, else a usage error that says why (not just the usage lines)."""
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a whole number: {flag} is the number of experts kept per MoE "
                                 f"layer, e.g. {flag} 6 (for a fraction of the experts removed use --ratio 0.25)"
                                 ) from None


def _method_params(items: list[str]) -> dict:
    from moe_compress.recipe import parse_overrides

    return dict(parse_overrides(items, flag="--param"))


def _method_overrides(method: str | None, param: list[str], no_protect_super: bool) -> list[tuple[str, object]]:
    """``--method NAME[k=v,...]``, ``--param k=v`` and ``--no-protect-super`` as recipe overrides: the method's
    name, then each parameter as ``params.KEY`` (so these flags win over a recipe's ``params``; a key set twice
    on the command line must agree)."""
    from moe_compress.methods.base import merge_method_params

    params = _method_params(param)
    if no_protect_super:
        params["protect_super"] = False
    if method is None:
        return [(f"params.{k}", v) for k, v in params.items()]
    name, merged = merge_method_params(method, params, where="--param")
    return [("method", name)] + [(f"params.{k}", v) for k, v in merged.items()]


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="checkpoint folder, builtin:NAME or hub id"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="see `moe-compress methods`"),
    experts: Optional[int] = typer.Option(None, "--experts", "-e", help="experts kept per MoE layer",
                                          parser=lambda v: _whole_number(v, "--experts"), metavar="N"),
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
    no_protect_super: bool = typer.Option(False, "--no-protect-super",
                                          help="allow pruning super experts (= --param protect_super=false)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (must not exist)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda[:N]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="compute dtype while compressing (default float32): "
                                        "float32 | bfloat16 | float16 | auto"),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="dtype of the written checkpoint: source "
                                             "(default: each tensor as in the source) | float32 | bfloat16 | float16"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="YAML recipe"),
    set_: list[str] = typer.Option([], "--set", help="recipe override key.sub=value (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and write nothing"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    max_gpu_memory: Optional[str] = typer.Option(None, "--max-gpu-memory",
                                                 help="stream layer by layer within this GPU memory, e.g. 20GiB "
                                                 "(= --set execution.max_gpu_memory=...)"),
    stream: bool = typer.Option(False, "--stream", help="stream layer by layer (resumable; implied by "
                                "--max-gpu-memory and by torchrun; = --set execution.mode=stream)"),
) -> None:
    """Compress MODEL's experts with one method and write a smaller standard checkpoint."""
    from moe_compress.plan import describe_plan
    from moe_compress.recipe import build_recipe, load_recipe_file, parse_overrides, parse_size

    if max_gpu_memory is not None:
        parse_size(max_gpu_memory)  # a bad size is named as the flag's value, not as a recipe key
    data = load_recipe_file(recipe) if recipe else {}
    flags = {"model": model, "output": out, "mode": mode, "device": device, "dtype": dtype,
             "save_dtype": save_dtype, "seed": seed, "calibration.data": calib, "calibration.n_samples": n_samples,
             "calibration.seq_len": seq_len, "calibration.batch_size": batch_size, "calibration.seed": seed,
             "calibration.packing": False if per_document else None,
             "calibration.chat_template": True if chat_template else None,
             "overwrite": True if overwrite else None, "trust_remote_code": True if trust_remote_code else None,
             "execution.mode": "stream" if stream else None, "execution.max_gpu_memory": max_gpu_memory}
    overrides = [(k, v) for k, v in flags.items() if v is not None]
    if experts is not None and ratio is not None:
        raise UserError("give one budget: --experts N (experts kept per layer) or --ratio R (fraction of experts "
                        "removed), not both")
    if experts is not None or ratio is not None:  # a budget flag replaces the recipe's budget
        data = {k: v for k, v in data.items() if k not in ("experts", "ratio")}
        overrides += [(k, v) for k, v in (("experts", experts), ("ratio", ratio)) if v is not None]
    overrides += _method_overrides(method, param, no_protect_super)
    r = build_recipe(data, overrides + parse_overrides(set_), check_method=True,
                     required={"model": "MODEL", "method": "--method", "output": "--out"})
    if dry_run:
        out_console.print(describe_plan(r), markup=False, highlight=False, soft_wrap=True)
        return
    _run_compress(r, quiet)


def _run_compress(r, quiet: bool) -> None:
    """`moe_compress.execute.compress` (in memory or streamed, as ``r.execution`` says); under torchrun only
    rank 0 prints."""
    from moe_compress.distributed import rank_from_env
    from moe_compress.execute import compress as run_compress

    rank0 = rank_from_env() == 0
    with progress_bar(not quiet and rank0) as progress:
        result = run_compress(r, progress=progress, log=console.print if rank0 and not quiet else None)
    if not rank0:
        return
    e, streamed = result.manifest["experts"], result.streamed
    how = (f", streamed on {streamed.world} process(es), calibration batch {streamed.memory.batch_size}"
           if streamed is not None else companions_line(result.manifest, r.output))
    out_console.print(f"wrote {r.output}: {r.method}, {e['original']} -> {e['kept']} experts per layer, "
                      f"{size_line(result.manifest)}{how} ({sum(result.timings.values()):.1f} s)")


def companions_line(manifest: dict, out: str) -> str:
    """'; plus 6 domain checkpoints of the same size in OUT/domains/ (...): 7 checkpoints, 120.96 MiB in all; ...'
    (empty without companions)."""
    from moe_compress.sizes import fmt_bytes

    c = manifest.get("companions")
    if not c:
        return ""
    return (f"; plus {c['count'] - 1} domain checkpoints of the same size in {Path(out) / c['folder']}/ "
            f"({', '.join(c['checkpoints'])}): {c['count']} checkpoints, {fmt_bytes(c['bytes']['total'])} in all; "
            f"`moe-compress route` picks one for a prompt")


def size_line(manifest: dict) -> str:
    """'28.73 MiB -> 15.12 MiB bfloat16 (52.6% of the source's bytes, 52.4% of its parameters)'."""
    from moe_compress.sizes import fmt_bytes

    x = manifest.get("export")
    if not x:
        return "size not recorded"
    b, p = x["bytes"], x["parameters"]
    size = fmt_bytes(b["written"]) + f" {x['main_dtype']}"
    if b["source"]:
        size = f"{fmt_bytes(b['source'])} -> {size} ({100 * b['fraction']:.1f}% of the source's bytes, "
        return size + f"{100 * p['fraction']:.1f}% of its parameters)"
    return size + f" ({100 * p['fraction']:.1f}% of the source's parameters)"


@app.command()
def route(
    out: Path = typer.Argument(..., help="the output folder of `compress --method premoe`"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="the prompt text"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="a UTF-8 text file: its whole text is "
                                               "the prompt"),
    json_out: bool = typer.Option(False, "--json", help="print the choice and every distance as JSON"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda[:N] | auto"),
) -> None:
    """Pick the domain checkpoint for a prompt: its routing pattern at the first MoE layer (computed by the
    checkpoint at OUT) against each domain's stored pattern; prints the nearest one's path and the distances."""
    import json

    from moe_compress.devices import pick_device
    from moe_compress.route import load_family, route_prompt

    if (prompt is None) == (prompt_file is None):
        raise UserError("give the prompt once: --prompt TEXT or --prompt-file FILE")
    load_family(out)  # a folder that is not a premoe output is refused before the prompt is read
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UserError(f"--prompt-file {prompt_file}: no such file")
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file {prompt_file} is not UTF-8 text") from None
    result = route_prompt(out, prompt, device=pick_device(device))
    if json_out:
        out_console.print_json(json.dumps(result))
        return
    out_console.print(result["checkpoint"], markup=False, highlight=False)
    dist = ", ".join(f"{name} {d:.4g}" for name, d in result["distances"].items())
    used = result["tokens"] if result["tokens"] == result["prompt_tokens"] else \
        f"its first {result['tokens']} of {result['prompt_tokens']}"
    out_console.print(f"domain {result['domain']}: L2 distance of the prompt's pattern ({used} tokens, MoE layer "
                      f"{result['layer']}) to each domain's: {dist}", markup=False, highlight=False)


@app.command()
def analyze(
    model: Optional[str] = typer.Argument(None, help="checkpoint folder, builtin:NAME or hub id"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration SPEC: file/folder, builtin:demo, hf:NAME"),
    n_samples: int = typer.Option(128, "--n-samples", min=1),
    seq_len: int = typer.Option(512, "--seq-len", min=2),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    per_document: bool = typer.Option(False, "--per-document", help="one document per sequence (no packing)"),
    chat_template: bool = typer.Option(False, "--chat-template", help="wrap calibration text in the chat template"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (must not exist)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 | auto"),
    similarity_tokens: int = typer.Option(2048, "--similarity-tokens",
                                          help="tokens per layer on which every expert runs (output similarity)"),
    input_moments: bool = typer.Option(False, "--input-moments", help="also per-expert input second moments "
                                       "(E x H x H floats per layer)"),
    full_load: bool = typer.Option(False, "--full-load", help="load the whole model instead of layer by layer"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="statistics cache (default "
                                             "~/.cache/moe-compress/stats)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the statistics cache"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Expert statistics of MODEL on calibration data: stats files, plots and a markdown report."""
    from moe_compress.analysis import analyze as run_analyze

    if not model:
        raise UserError("missing MODEL (a checkpoint folder, builtin:NAME or hub id)")
    if not out:
        raise UserError("missing --out (the folder to write the statistics, plots and report to)")
    if dtype not in ("float32", "bfloat16", "float16", "auto"):
        raise UserError(f"--dtype must be float32, bfloat16, float16 or auto, not {dtype!r}")
    with progress_bar(not quiet) as progress:
        result = run_analyze(model, calib, out, n_samples=n_samples, seq_len=seq_len, seed=seed,
                             batch_size=batch_size, packing=not per_document, chat_template=chat_template,
                             device=device, dtype=dtype, similarity_tokens=similarity_tokens,
                             input_moments=input_moments, lazy=False if full_load else None, cache_dir=cache_dir,
                             use_cache=not no_cache, overwrite=overwrite, trust_remote_code=trust_remote_code,
                             progress=progress)
    cached = " (statistics from the cache)" if result.stats.meta.get("cached") else ""
    out_console.print(f"wrote {result.out}: {', '.join(result.files)}{cached}")


@app.command("methods")
def methods_cmd(names: bool = typer.Option(False, "--names", help="print only the method names")) -> None:
    """List the compression methods with a one-line description and their parameters."""
    from moe_compress.methods.base import all_methods

    methods = all_methods()
    if names:
        for name in methods:
            out_console.print(name)
        return
    table = Table("method", "kind", "what it does", "parameters (defaults)",
                  caption=Text("set parameters as --method 'NAME[key=value,...]' (or --param key=value); the same "
                               "syntax in recipes (method:) and bench --methods"))
    for cls in methods.values():
        d = cls.describe()
        table.add_row(d["name"], d["kind"], d["summary"], ", ".join(f"{k}={v}" for k, v in d["params"].items()))
    out_console.print(table)


def _split(items: str | None) -> list[str]:
    return [x.strip() for x in (items or "").split(",") if x.strip()]


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="checkpoint folder, builtin:NAME or hub id"),
    reference: Optional[str] = typer.Option(None, "--reference", help="the original model: adds ppl ratio, KL, top-1"),
    data: Optional[str] = typer.Option(None, "--data", help="text SPEC (file/folder/builtin:/hf:); domain-tagged "
                                       "data gives per-domain results"),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="ppl,kld,top1 (default: all that apply; "
                                          "kld/top1 need --reference)"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks, e.g. arc_easy,piqa (local task "
                                        "files are used offline)"),
    tasks_dir: Optional[Path] = typer.Option(None, "--tasks-dir", help="folder of local task .jsonl files"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="at most this many items per task"),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="perplexity window length"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1,
                                              help="at most this many windows per domain"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    generate: int = typer.Option(0, "--generate", min=0,
                                 help="greedy continuations of this many prompts, side by side"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
    cost: bool = typer.Option(True, "--cost/--no-cost", help="inference cost vs. --reference: parameters, weight "
                              "memory, forward tokens/s (median of --cost-runs passes of 1 x --seq-len tokens)"),
    cost_runs: int = typer.Option(5, "--cost-runs", min=1, help="timed forward passes per model for tokens/s"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate MODEL: perplexity (WikiText-2 protocol, per domain), KL divergence and top-1 agreement against
    --reference in one streaming pass, lm-eval tasks, and greedy generations side by side."""
    import json

    from moe_compress.evaluation.api import evaluate_model

    wanted = set(_split(metrics)) if metrics else {"ppl", "kld", "top1"}
    if wanted - {"ppl", "kld", "top1"}:
        raise UserError(f"--metrics: unknown {', '.join(sorted(wanted - {'ppl', 'kld', 'top1'}))} (ppl, kld, top1)")
    if metrics and wanted & {"kld", "top1"} and reference is None:
        raise UserError("--metrics kld/top1 compare with the original model: pass --reference MODEL")
    if data is None and not tasks:
        raise UserError("nothing to evaluate: pass --data SPEC and/or --tasks T,...")
    if json_out is not None:  # checked before a long evaluation, not after it
        if json_out.is_dir():
            raise UserError(f"--json {json_out} is a folder; give a file name, e.g. {json_out / 'eval.json'}")
        if not json_out.parent.is_dir():
            raise UserError(f"--json {json_out}: folder {json_out.parent} does not exist; create it first")
        if not os.access(json_out.parent, os.W_OK | os.X_OK):
            raise UserError(f"--json {json_out}: no permission to write in {json_out.parent}; choose another file")
    with progress_bar(not quiet) as progress:
        result = evaluate_model(model, reference=reference, data=data, tasks=_split(tasks), tasks_dir=tasks_dir,
                                limit=limit, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
                                generate=generate, device=device, dtype=dtype, compare=bool(wanted & {"kld", "top1"}),
                                cost=cost, cost_runs=cost_runs, progress=progress)
    out_console.print(result.table())
    if result.cost_table() is not None:
        out_console.print(result.cost_table())
    if json_out:
        json_out.write_text(json.dumps(result.data, indent=2) + "\n")


@app.command()
def bench(
    models: list[str] = typer.Argument(..., help="one or more checkpoint folders, builtin:NAME or hub ids"),
    methods: str = typer.Option(..., "--methods", help="comma list; variants as NAME[key=value,...]"),
    experts: Optional[str] = typer.Option(None, "--experts", help="comma list of experts kept per layer, e.g. 6,4"),
    ratio: Optional[str] = typer.Option(None, "--ratio", help="comma list of fractions of routed experts removed, "
                                        "e.g. 0.25,0.5 (per model: works across models of different sizes)"),
    calib: str = typer.Option(..., "--calib", help="calibration SPEC"),
    n_samples: int = typer.Option(128, "--n-samples", min=1),
    seq_len: int = typer.Option(512, "--seq-len", min=2),
    data: str = typer.Option(..., "--data", help="evaluation text SPEC (domain-tagged for per-domain results)"),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", min=2),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="evaluation windows per domain"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    save_models: bool = typer.Option(False, "--save-models", help="also keep every compressed checkpoint"),
    out: str = typer.Option(..., "--out", "-o"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Every method x budget from one statistics pass per model, each evaluated against the original:
    results.csv, results.md, plots, timings (several models: one sub-folder each and a joint results.md)."""
    from moe_compress.benchmark import BenchSpec, parse_variants, resolve_budgets, run_bench, run_benches
    from moe_compress.models.loading import load_config
    from moe_compress.models.registry import get_adapter
    from moe_compress.recipe import Calibration
    from moe_compress.report.bench import summary_table

    def numbers(text: str | None, kind, flag: str):
        if text is None:
            return None
        try:
            return [kind(x) for x in _split(text)]
        except ValueError:
            raise UserError(f"{flag} must be a comma list of numbers, got {text!r}") from None

    budgets_experts, budgets_ratio = numbers(experts, int, "--experts"), numbers(ratio, float, "--ratio")
    variants = parse_variants(methods)
    specs = [BenchSpec(model=m, variants=variants,
                       budgets=resolve_budgets(get_adapter(load_config(m)).n_experts(), budgets_experts, budgets_ratio),
                       calibration=Calibration(data=calib, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                               batch_size=batch_size),
                       eval_data=data, eval_seq_len=eval_seq_len, max_windows=max_windows,
                       eval_batch_size=batch_size, device=device, seed=seed, save_models=save_models)
             for m in models]
    with progress_bar(not quiet) as progress:
        if len(specs) == 1:
            results = {specs[0].model: run_bench(specs[0], out, overwrite=overwrite, progress=progress)}
        else:
            results = run_benches(specs, out, overwrite=overwrite, progress=progress)
    for model, rows in results.items():
        out_console.print(f"\n{model}", markup=False)
        out_console.print(summary_table(rows), markup=False, soft_wrap=True)
    out_console.print(f"wrote {out}/results.md, results.csv, plots", markup=False)


@app.command()
def demo(
    out: str = typer.Option("demo-out", "--out", "-o"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Compress the bundled testbed (builtin:mixtral-8e) 8 -> 6 and 8 -> 4 experts with the best available
    methods, evaluate against the original and print the comparison (a few minutes on a laptop CPU)."""
    from moe_compress.demo import demo_spec, next_steps, run_demo
    from moe_compress.report.bench import summary_table

    with progress_bar(not quiet) as progress:
        rows, best = run_demo(out, overwrite=overwrite, progress=progress)
    out_console.print(summary_table(rows), markup=False, soft_wrap=True)
    out_console.print(f"wrote {out}/results.md, plots and the kept checkpoint {best}", markup=False)
    for line in next_steps(best, demo_spec().eval_data):
        out_console.print(line, markup=False, highlight=False, soft_wrap=True)


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


def _click_exceptions() -> tuple[type, ...]:
    """Usage-error classes: click's, and typer's vendored copy (typer >= 0.20 raises its own)."""
    import click

    classes: list[type] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        classes.append(TyperClickException)
    except ImportError:
        pass
    return tuple(classes)


def _usage_message(e) -> str:
    """A usage error on one line: click's message (which names the option and the reason) and where help is."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "moe-compress"
    return f"{message} (see `{command} --help`)"


def _interrupted() -> None:
    console.print("[bold red]interrupted:[/] the output folder was not written (it appears only when a run "
                  "completes)",
                  highlight=False, soft_wrap=True)
    sys.exit(130)


def main() -> None:
    """Console entry point: maps errors to exit codes (2 = user mistake, 130 = interrupted, 1 = internal error)."""
    run_app(app)


def run_app(typer_app: typer.Typer) -> None:
    """Run ``typer_app`` as `main` runs the `moe-compress` command: a `UserError` or usage mistake is one line
    and exit code 2, Ctrl-C 130, anything else an internal error (1) with the traceback in a log file. The
    repository's tools (``python -m tools.testbed``) run their commands through it too."""
    try:
        _quiet_libraries()
        code = typer_app(standalone_mode=False)
    except UserError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(2)
    except Exception as e:
        if isinstance(e, _click_exceptions()):  # usage errors (bad option, missing argument): exit code 2
            console.print(f"[bold red]error:[/] {escape(_usage_message(e))}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if is_disk_full(e):
            first = escape(str(e).splitlines()[0])
            console.print(f"[bold red]error:[/] no space left on the device: {first}; free some space and run again",
                          highlight=False, soft_wrap=True)
            sys.exit(2)
        log = _log_traceback()
        first = escape(str(e).splitlines()[0]) if str(e) else ""
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {first} "
                      f"(traceback in {log}; please report it)", highlight=False, soft_wrap=True)
        sys.exit(1)
    # In non-standalone mode typer turns Ctrl-C into a returned exit code 130 (and `typer.Exit(n)` into n).
    if code == 130:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
