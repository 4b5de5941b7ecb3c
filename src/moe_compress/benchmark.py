"""The side-by-side benchmark: every method x budget from ONE statistics pass, each result evaluated against the
original model on the same windows in the same run (perplexity ratio, KL divergence, top-1 agreement, per
domain), with timings per stage.

Method variants are written ``NAME[key=value,key=value]`` (e.g. ``submoe[whiten=true,rank_ratio=0.5]``) so
ablations of one method sit in the same table.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moe_compress.calibration.runner import LayerRun, LayerRunner, LayerSink
from moe_compress.devices import pick_device
from moe_compress.errors import UserError
from moe_compress.export.writer import atomic_output_dir, check_output_dir, save_model
from moe_compress.methods.base import Method, get_method, parse_method_spec, split_method_list
from moe_compress.models.loading import load_config, load_model, load_tokenizer
from moe_compress.models.registry import get_adapter
from moe_compress.pipeline import (
    MethodApplier,
    build_calibration_set,
    calibration_batches,
    check_budget,
    check_domains,
)
from moe_compress.recipe import Calibration

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Variant:
    """One column of the benchmark: a method and its parameters; ``label`` is how it was written."""

    label: str
    name: str
    params: dict


def parse_variants(spec: str) -> list[Variant]:
    """``"frequency,submoe[whiten=true,rank_ratio=0.5]"`` -> variants (commas inside [] belong to the params);
    each one is parsed by `moe_compress.methods.base.parse_method_spec`, as ``compress --method`` and recipes."""
    out = []
    for part in split_method_list(spec):
        name, params = parse_method_spec(part)
        out.append(Variant(part, name, params))
    if not out:
        raise UserError("--methods is empty")
    return out


@dataclass
class BenchSpec:
    model: str
    variants: list[Variant]
    budgets: list[int]
    calibration: Calibration
    eval_data: str
    eval_seq_len: int = 512
    max_windows: int | None = None     # per domain
    eval_batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    save_models: bool = False
    save_best: str | None = None       # a folder name: keep the lowest-KL variant at the smallest budget there
    extra: dict = field(default_factory=dict)


def _eval_windows(spec: BenchSpec, tokenizer) -> dict[str, torch.Tensor]:
    from moe_compress.calibration.data import evaluation_windows, read_documents

    windows = evaluation_windows(read_documents(spec.eval_data), tokenizer, spec.eval_seq_len)
    windows = {d: w[: spec.max_windows] if spec.max_windows else w for d, w in windows.items() if len(w)}
    if not windows:
        raise UserError(f"evaluation data {spec.eval_data} has fewer tokens than one window of "
                        f"{spec.eval_seq_len}; lower --eval-seq-len or add text")
    return windows


def resolve_budgets(n_experts: int, experts: list[int] | None = None, ratios: list[float] | None = None) -> list[int]:
    """Experts kept per layer, from explicit counts or from fractions of the ``n_experts`` routed experts removed."""
    if (experts is None) == (ratios is None):
        raise UserError("give exactly one budget list: --experts (kept per layer) or --ratio (fraction removed)")
    if ratios is not None:
        bad = [r for r in ratios if not 0 < r < 1]
        if bad:
            raise UserError(f"--ratio values must lie strictly between 0 and 1, got {bad[0]}")
        return [max(1, round(n_experts * (1.0 - r))) for r in ratios]
    return list(experts)


def check_bench(spec: BenchSpec) -> list[tuple[Variant, Method]]:
    """Validate methods and budgets from the config alone (before any weights are read); the methods."""
    methods = [(v, get_method(v.name, **v.params)) for v in spec.variants]
    adapter = get_adapter(load_config(spec.model))
    for _, m in methods:
        m.check_model(adapter)
    observer_options(methods)
    for n in spec.budgets:
        for _, m in methods:
            check_budget(adapter, n, m, label=f"{spec.model}: budget {n}")
    return methods


def observer_options(methods: list[tuple[Variant, Method]]) -> dict:
    """The observer options of every method, merged: one statistics pass serves them all, so two methods that
    set the same option to different values cannot share it (a `UserError`: bench them in separate runs)."""
    options: dict = {}
    owner: dict[str, str] = {}
    for v, m in methods:
        for key, value in m.observer_options().items():
            if key in options and options[key] != value:
                raise UserError(f"{owner[key]} and {v.label} need different statistics ({key}={options[key]} vs "
                                f"{value}) and bench computes them in one pass: run them in separate bench runs")
            options[key], owner[key] = value, v.label
    return options


def run_bench(spec: BenchSpec, out: str | Path, overwrite: bool = False,
              progress: Progress | None = None) -> list[dict]:
    """Run the benchmark and write results.csv, results.md, results.json and plots into ``out``."""
    check_output_dir(out, overwrite)
    methods = check_bench(spec)
    with atomic_output_dir(out, overwrite) as tmp:
        return _run_into(spec, methods, tmp, progress)


def run_benches(specs: list[BenchSpec], out: str | Path, overwrite: bool = False,
                progress: Progress | None = None) -> dict[str, list[dict]]:
    """Several models, each into ``out/<model>/`` as `run_bench` writes it, plus ``out/results.md`` joining them.

    Every model's methods and budgets are checked before the first one runs.
    """
    check_output_dir(out, overwrite)
    checked = [(spec, check_bench(spec)) for spec in specs]
    names = [_slug(spec.model.rstrip("/").split(":")[-1].split("/")[-1]) for spec in specs]
    if len(set(names)) != len(names):
        raise UserError(f"two models would share a results folder name: {', '.join(names)}")
    results = {}
    with atomic_output_dir(out, overwrite) as tmp:
        for name, (spec, methods) in zip(names, checked):
            (tmp / name).mkdir()
            results[spec.model] = _run_into(spec, methods, tmp / name, progress)
        parts = [(tmp / n / "results.md").read_text().replace("](", f"]({n}/") for n in names]
        (tmp / "results.md").write_text("\n".join(parts))
    return results


class SharedStatistics(LayerSink):
    """Bench's sink of the layer runner: one statistics pass serves every method x budget, so each MoE layer's
    statistics (float32), MoE inputs [T, H] and their domain ids [T] are kept; the methods plan afterwards, each
    on its own copy of the original. The layers are not changed."""

    def __init__(self) -> None:
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.domains: dict[int, torch.Tensor | None] = {}

    def after_layer(self, run: LayerRun) -> bool:
        if run.observer is not None:
            self.stats[run.index] = {k: v.float() for k, v in run.observer.results().items()}
            if run.moe_inputs is not None:
                self.inputs[run.index], self.domains[run.index] = run.moe_inputs, run.moe_domains
        return False


def _run_into(spec: BenchSpec, methods: list[tuple[Variant, Method]], folder: Path,
              progress: Progress | None) -> list[dict]:
    from moe_compress.calibration.collect import calibration_domains
    from moe_compress.evaluation.metrics import evaluate_lm, parameter_counts

    device = pick_device(spec.device)
    t0 = time.perf_counter()
    original = load_model(spec.model)
    tokenizer = load_tokenizer(spec.model)
    adapter = get_adapter(original)
    n_orig = adapter.n_experts()
    c = spec.calibration
    calib = build_calibration_set(c, tokenizer)
    windows = _eval_windows(spec, tokenizer)
    load_s = time.perf_counter() - t0

    # one statistics pass for every method (the union of what they need, MoE inputs if any method wants them)
    needs = sorted(set().union(*(m.needs for _, m in methods)))
    options = observer_options(methods)
    keep_inputs = any(m.needs_inputs for _, m in methods)
    shared = SharedStatistics()
    layer_stats, layer_inputs, layer_domains = shared.stats, shared.inputs, shared.domains

    t0 = time.perf_counter()
    domain_names = calibration_domains(calib)[1]
    for _, m in methods:
        check_domains(m, calib)
    runner = LayerRunner(original, adapter, device=device, keep_moe_inputs=keep_inputs, stats=tuple(needs),
                         observer_options=options)
    runner.run(calibration_batches(calib, c.batch_size), shared, progress=progress)
    stats_s = time.perf_counter() - t0
    original.to(device)
    params_orig = parameter_counts(original)

    rows: list[dict] = []
    total, done = len(methods) * len(spec.budgets), 0
    best: dict | None = None  # spec.save_best: the lowest-KL compressed model at the smallest budget so far
    for n_new in spec.budgets:
        for variant, method in methods:
            model = copy.deepcopy(original).to("cpu")
            applier = MethodApplier(method, get_adapter(model), model, n_new, spec.seed, domain_names)
            for i in applier.blocks:
                applier.apply(i, layer_stats.get(i), layer_inputs.get(i), layer_domains.get(i))
            applier.finish()
            t1 = time.perf_counter()
            refined = method.refine(model, original, applier.adapter, calib, device=device, seed=spec.seed)
            refine_s = {"refine": time.perf_counter() - t1} if refined is not None else {}
            export_s = _timed_export(model, folder / "checkpoints" / f"{_slug(variant.label)}-{n_new}e"
                                     if spec.save_models else None)
            model.to(device)
            t2 = time.perf_counter()
            res = evaluate_lm(model, windows, reference=original, batch_size=spec.eval_batch_size).to_dict()
            eval_s = time.perf_counter() - t2
            times = {"statistics": stats_s, **applier.timings, **refine_s, "export": export_s, "eval": eval_s}
            n_before = len(rows)
            if method.writes_companions:  # premoe: the routed, oracle and all-domain rows (not a save_best candidate)
                companions = method.companions(applier.infos, original, adapter)
                rows += _companion_rows(spec, variant, method, companions, model, original, adapter, windows,
                                        res, n_orig, n_new, parameter_counts(model), params_orig, times, folder)
            else:
                rows.append(_row(variant, method, n_orig, n_new, res, parameter_counts(model), params_orig, times,
                                 applier.infos))
            paper = None
            if type(method).in_memory_model is not Method.in_memory_model:  # copy the original only when asked
                twin = copy.deepcopy(original)
                paper = method.in_memory_model(twin, get_adapter(twin), layer_stats, applier.infos)
                del twin
            if paper is not None:  # the paper's model that a standard checkpoint cannot hold (MoNE's novices)
                paper_model, paper_params = paper
                t2 = time.perf_counter()
                res_mem = evaluate_lm(paper_model, windows, reference=original,
                                      batch_size=spec.eval_batch_size).to_dict()
                label = Variant(f"{variant.label} (in memory)", variant.name, variant.params)
                rows.append(_row(label, method, n_orig, n_new, res_mem, {"params": paper_params}, params_orig,
                                 {"eval": time.perf_counter() - t2}))
                del paper_model
            with open(folder / "rows.partial.jsonl", "a") as fh:  # survives an interrupted run
                fh.writelines(json.dumps(r) + "\n" for r in rows[n_before:])
            if spec.save_best and not method.writes_companions and n_new == min(spec.budgets) and (
                    best is None or res["kld"] < best["kld"]):
                best = {"kld": res["kld"], "model": model.to("cpu"), "variant": variant, "method": method,
                        "n_new": n_new,
                        "infos": applier.infos, "refined": refined, "original_params": params_orig["params"],
                        "timings": {"statistics": stats_s, **applier.timings, **refine_s}}
            del model
            done += 1
            if progress:
                progress("methods", done, total)
    meta = {"model": spec.model, "calibration": json.loads(c.model_dump_json()), "calibration_sha256": calib.sha256,
            "eval_data": spec.eval_data, "eval_seq_len": spec.eval_seq_len, "max_windows": spec.max_windows,
            "eval_tokens": {d: int(w.shape[0] * (w.shape[1] - 1)) for d, w in windows.items()},
            "budgets": spec.budgets, "methods": [v.label for v in spec.variants], "seed": spec.seed,
            "device": device, "load_s": round(load_s, 3), "statistics_s": round(stats_s, 3),
            "torch": torch.__version__}
    if best is not None:
        meta["best_model"] = {"folder": spec.save_best, "method": best["variant"].label, "experts": best["n_new"],
                              "kld": best["kld"]}
        _export_best(spec, best, calib, tokenizer, n_orig, folder / spec.save_best)
    write_results(folder, rows, meta)
    (folder / "rows.partial.jsonl").unlink(missing_ok=True)
    return rows


def _companion_rows(spec: BenchSpec, variant: Variant, method: Method, companions, model, original, adapter,
                    windows: dict[str, torch.Tensor], res_main: dict, n_orig: int, n_new: int, params: dict,
                    params_orig: dict, times: dict, folder: Path) -> list[dict]:
    """The rows of a method with companions (premoe): ``LABEL`` scores each evaluation window on the companion
    `Companions.choose` picks from the window's first ``route_tokens`` tokens (read by the main checkpoint);
    ``LABEL:oracle`` scores every window on the companion named like its domain (when every evaluation domain
    has one); ``LABEL:all-domain`` is the main checkpoint (the same size). ``route_accuracy`` = share of windows
    routed to their own domain's companion (None when no domain matches a companion)."""
    from moe_compress.evaluation.metrics import evaluate_assigned
    from moe_compress.models.surgery import pruned_copy

    prefix = max(1, int(getattr(method.params, "route_tokens", 32)))
    t0 = time.perf_counter()
    routed = {}
    for d, w in windows.items():
        routed[d] = []
        for s in range(0, w.shape[0], spec.eval_batch_size):
            routed[d] += [name for name, _ in companions.choose(model, w[s:s + spec.eval_batch_size, :prefix])]
    route_s = time.perf_counter() - t0
    names = list(companions.kept)
    matched = [d for d in windows if d in companions.kept]
    assignments = {"routed": routed}
    if len(matched) == len(windows):
        assignments["oracle"] = {d: [d] * w.shape[0] for d, w in windows.items()}
    saved = folder / "checkpoints" / f"{_slug(variant.label)}-{n_new}e" / companions.folder

    def load(name: str):
        m = pruned_copy(adapter, original, companions.kept[name])
        if spec.save_models:
            save_model(m, saved / _slug(name))
        return m

    t0 = time.perf_counter()
    results = {a: r.to_dict() for a, r in evaluate_assigned(windows, assignments, load, reference=original,
                                                            batch_size=spec.eval_batch_size).items()}
    eval_s = time.perf_counter() - t0
    hits = [r == d for d in matched for r in routed[d]]
    accuracy = sum(hits) / len(hits) if hits else None
    base = {**times, "route": route_s, "eval_companions": eval_s}
    rows = [_row(variant, method, n_orig, n_new, results["routed"], params, params_orig, base)]
    rows[0].update({"route_accuracy": None if accuracy is None else round(accuracy, 4), "route_tokens": prefix,
                    "checkpoints": 1 + len(names)})
    for d in matched:
        rows[0][f"{d}.route_accuracy"] = round(sum(r == d for r in routed[d]) / len(routed[d]), 4)
    rows[0]["routed_to"] = json.dumps({d: dict(sorted({n: routed[d].count(n) for n in set(routed[d])}.items()))
                                       for d in windows})
    if "oracle" in results:
        rows.append(_row(Variant(f"{variant.label}:oracle", variant.name, variant.params), method, n_orig, n_new,
                         results["oracle"], params, params_orig, {**times, "eval_companions": eval_s}))
    rows.append(_row(Variant(f"{variant.label}:all-domain", variant.name, variant.params), method, n_orig, n_new,
                     res_main, params, params_orig, times))
    return rows


def _export_best(spec: BenchSpec, best: dict, calib, tokenizer, n_orig: int, out: Path) -> None:
    """Write the kept variant as `moe-compress compress` writes a checkpoint (the project's exporter, a model
    card, compression.json with a recipe that re-runs it)."""
    from moe_compress.export.card import model_card
    from moe_compress.export.writer import export_checkpoint
    from moe_compress.models.loading import resolve_model
    from moe_compress.pipeline import build_manifest
    from moe_compress.recipe import Recipe

    v = best["variant"]
    recipe = Recipe(model=spec.model, method=v.name, params=v.params, experts=best["n_new"],
                    calibration=spec.calibration, output=str(out), device=spec.device, seed=spec.seed)
    from moe_compress.export.dtypes import resolve_policy
    from moe_compress.pipeline import source_size

    manifest = build_manifest(recipe, best["method"], n_orig, best["n_new"], best["infos"], calib, best["timings"],
                              best["refined"])
    model = best["model"].to("cpu")
    source = resolve_model(spec.model)
    export_checkpoint(model, out, manifest=manifest, adapter=get_adapter(model),
                      policy=resolve_policy(recipe.save_dtype, source, model.config, type(model)),
                      original_params=best["original_params"], source_bytes=source_size(source),
                      tokenizer_source=source, tokenizer=tokenizer, model_card=model_card)


def _timed_export(model, folder: Path | None) -> float:
    """Seconds to write ``model``'s checkpoint (into ``folder``, or a scratch folder removed afterwards)."""
    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        save_model(model, folder or Path(scratch))
        return time.perf_counter() - t0


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def _row(variant: Variant, method: Method, n_orig: int, n_new: int, res: dict, params: dict, params_orig: dict,
         timings: dict, infos: dict[int, dict] | None = None) -> dict:
    row = {"method": variant.label, "kind": method.kind, "experts": n_new, "experts_original": n_orig,
           "params_M": round(params["params"] / 1e6, 3),
           "params_ratio": round(params["params"] / params_orig["params"], 4),
           "ppl": res["ppl"], "ppl_reference": res["ppl_reference"], "ppl_ratio": res["ppl_ratio"],
           "kld": res["kld"], "top1": res["top1"], "tokens": res["tokens"]}
    for d, m in res["domains"].items():
        for k in ("ppl_ratio", "kld", "top1"):
            row[f"{d}.{k}"] = m[k]
    errors = {i: info["layer_error"] for i, info in sorted((infos or {}).items()) if "layer_error" in info}
    if errors:  # per MoE layer, before any end-to-end refinement (pipeline.MethodApplier)
        row["layer_error"] = round(sum(errors.values()) / len(errors), 6)
        row.update({f"layer_error.{i}": v for i, v in errors.items()})
    row.update({f"time_{k}_s": round(v, 4) for k, v in timings.items()})
    return row


def write_results(folder: Path, rows: list[dict], meta: dict) -> None:
    """results.csv, results.json, results.md and the plots."""
    from moe_compress.report.bench import markdown_report, plot_domains, plot_vs_experts

    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(folder / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (folder / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plots = [plot_vs_experts(rows, "ppl_ratio", folder / "ppl_ratio.png"),
             plot_vs_experts(rows, "kld", folder / "kld.png")]
    plots += [plot_domains(rows, n, folder / f"domains_{n}e.png") for n in meta["budgets"]]
    (folder / "results.md").write_text(markdown_report(rows, meta, [p.name for p in plots]))
