"""The compression pipeline: model -> calibration runner -> statistics -> method plan -> surgery -> export.

`compress_in_memory` runs a validated `Recipe` with the whole model loaded (the layer runner with `ApplySink`);
`moe_compress.execute.compress` dispatches on the recipe's ``execution`` field (`resolve_execution`) between it
and the streamed configuration (`moe_compress.streaming`, which builds on this module). It is the only place
that wires the stages together, and it never parses arguments itself. The one budget check (`check_budget`)
and the one calibration-set builder (`build_calibration_set`) live here for every execution, the dry run and
bench.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from moe_compress import __version__
from moe_compress.calibration.runner import CalibrationBatches, LayerRun, LayerRunner, LayerSink
from moe_compress.calibration.stats import Statistics
from moe_compress.devices import pick_device, pick_dtype
from moe_compress.errors import UserError
from moe_compress.export.card import model_card
from moe_compress.export.dtypes import resolve_policy
from moe_compress.export.writer import check_output_dir, export_checkpoint
from moe_compress.methods.base import LayerContext, Method, format_method_spec, get_method
from moe_compress.methods.reconstruction import layer_error
from moe_compress.models.layer import ExpertSet
from moe_compress.models.loading import CausalLM, Tokenizer, load_config, load_model, load_tokenizer, resolve_model
from moe_compress.models.registry import Adapter, get_adapter
from moe_compress.models.surgery import check_expert_count, write_block
from moe_compress.recipe import Calibration, Execution, Recipe

if TYPE_CHECKING:
    from moe_compress.calibration.data import CalibrationSet

Progress = Callable[[str, int, int], None]


@dataclass
class CompressResult:
    """What a compression produced: the model in memory, the per-layer plans and the manifest written."""

    model: CausalLM
    tokenizer: Tokenizer
    manifest: dict
    stats: Statistics
    timings: dict[str, float] = field(default_factory=dict)
    companions: object = None  # `Method.companions` for a method that writes them (premoe: the domain patterns)
    # a streamed run's `moe_compress.streaming.StreamResult` (set by `moe_compress.execute.compress`; then ``model``
    # is None: it never was in memory). Typed Any: streaming sits above this module (docs/architecture.md, Layers).
    streamed: Any = None


def validate_budget(recipe: Recipe, adapter: Adapter, method: Method | None = None) -> int:
    """The recipe's target expert count, checked by `check_budget`."""
    return check_budget(adapter, recipe.target_experts(adapter.n_experts()), method, mode=recipe.mode)


def check_budget(adapter: Adapter, n_new: int, method: Method | None = None, *, mode: str = "oneshot",
                 label: str | None = None) -> int:
    """The one expert-budget check (compress in memory or streamed, --dry-run, bench): ``n_new`` experts kept per
    MoE layer; a `UserError` if it is not a strict reduction or not a valid count, or if the method's parameters
    or mode do not fit the model (`Method.check_model`, companions need --mode oneshot). ``label`` names the
    budget in the message (default ``--experts N``).

    For a method that keeps every expert (``keeps_experts``) the count is a parameter budget (the routed
    experts' parameters of that many experts), so the routing constraints on counts do not apply."""
    n_orig = adapter.n_experts()
    if method is not None:
        method.check_model(adapter)
        if method.writes_companions and mode == "sequential":
            raise UserError(f"method {method.name} scores every domain on the original model (--mode oneshot); in "
                            "sequential mode later layers would be scored on the all-domain checkpoint, not on "
                            "each domain's own: drop --mode sequential")
    if n_new >= n_orig:
        raise UserError(f"{label or f'--experts {n_new}'} must be smaller than the model's {n_orig} experts per layer")
    if method is None or not method.keeps_experts:
        check_expert_count(adapter, n_new)
    elif adapter.width_problem() is not None:
        raise UserError(f"method {method.name} narrows the routed experts, which this model cannot store: "
                        f"{adapter.width_problem()}")
    return n_new


def require_calibration(recipe: Recipe, method: Method) -> None:
    """A method that needs data has a calibration SPEC, and that SPEC's paths exist (checked before loading)."""
    from moe_compress.calibration.data import check_spec

    if not method.needs_data:
        return
    check_spec(_calibration_spec(recipe))


def _calibration_spec(recipe: Recipe) -> str:
    if recipe.calibration.data is None:
        raise UserError(f"method {recipe.method} needs calibration data: pass --calib SPEC "
                        "(a file or folder of .txt/.jsonl, builtin:demo, hf:NAME)")
    return recipe.calibration.data


def check_domains(method: Method, calib: CalibrationSet | None) -> list[str]:
    """The calibration domains' names; a `UserError` when the method needs more domains than the data has."""
    from moe_compress.calibration.collect import calibration_domains

    names = calibration_domains(calib)[1] if calib is not None else []
    if len(names) < method.min_domains:
        found = f"{len(names)} ({', '.join(names)})" if names else "none"
        raise UserError(f"method {method.name} needs calibration data with at least {method.min_domains} domains "
                        f"(a jsonl 'domain' field, or a folder with one file per domain, e.g. builtin:demo); "
                        f"{getattr(calib, 'spec', 'the calibration data')} has {found}")
    return names


def calibration_set(recipe: Recipe, tokenizer: Tokenizer) -> CalibrationSet:
    """The recipe's calibration rows (a `UserError` when it has no calibration SPEC)."""
    return build_calibration_set(recipe.calibration, tokenizer, _calibration_spec(recipe))


def build_calibration_set(c: Calibration, tokenizer: Tokenizer, spec: str | None = None) -> CalibrationSet:
    """The one calibration-set builder (compress in memory or streamed, bench): the rows of ``spec`` (default
    ``c.data``) as ``c`` says (samples, sequence length, seed, packing, chat template)."""
    from moe_compress.calibration.data import build_calibration

    spec = spec if spec is not None else c.data
    if spec is None:
        raise UserError("no calibration data: pass --calib SPEC (a file or folder of .txt/.jsonl, builtin:demo, "
                        "hf:NAME)")
    return build_calibration(spec, tokenizer, n_samples=c.n_samples, seq_len=c.seq_len, seed=c.seed,
                             packing=c.packing, chat_template=c.chat_template)


class MethodApplier:
    """Plans one method layer by layer and writes each layer's new experts into ``model`` right away.

    ``infos`` collects each layer's plan record (with ``sources``); ``timings`` the planning and surgery time.
    """

    def __init__(self, method: Method, adapter: Adapter, model: torch.nn.Module, n_new: int, seed: int,
                 domain_names: list[str] | None = None):
        self.method, self.adapter, self.model, self.n_new = method, adapter, model, n_new
        self.domain_names = domain_names or None
        self.blocks = adapter.moe_blocks(model)
        self.generator = torch.Generator().manual_seed(seed)
        self.infos: dict[int, dict] = {}
        self.timings = {"planning": 0.0, "layer_error": 0.0, "surgery": 0.0}
        self.counts: set[int] = set()   # experts per layer written
        self.widths: set[int] = set()   # intermediate size written
        self.width_orig = adapter.expert_width()

    def apply(self, index: int, stats: dict[str, torch.Tensor] | None = None,
              inputs: torch.Tensor | None = None, input_domains: torch.Tensor | None = None) -> None:
        """Plan layer ``index`` from its statistics (and MoE inputs [T, H], their domain ids [T]) and write the
        result."""
        block = self.blocks[index]
        ctx = LayerContext(self.adapter.layer(self.model, index, block), self.n_new, stats or {}, inputs,
                           self.generator, input_domains, self.domain_names)
        t0 = time.perf_counter()
        plan = self.method.plan(ctx)
        t1 = time.perf_counter()
        if inputs is not None and inputs.shape[0] and "layer_error" not in plan.info:
            # the routed-output error of the new experts against the original block on calibration inputs
            plan.info["layer_error"] = round(layer_error(ctx.layer, plan.expert_set, inputs), 6)
        t2 = time.perf_counter()
        write_block(self.adapter, block, plan.expert_set)
        self.counts.add(plan.expert_set.n_experts)
        self.widths.add(plan.expert_set.experts.gate.shape[1])
        self.timings["planning"] += t1 - t0
        self.timings["layer_error"] += t2 - t1
        self.timings["surgery"] += time.perf_counter() - t2
        self.infos[index] = {**plan.info, "sources": _sources(plan.expert_set)}

    def finish(self) -> None:
        """Every MoE layer now holds the same number of experts (``n_new``, or all of them for a method that
        keeps them) of one width: record both in the config."""
        missing = set(self.blocks) - set(self.infos)
        if missing:
            raise RuntimeError(f"MoE layers {sorted(missing)} were not compressed")
        if len(self.counts) != 1 or len(self.widths) != 1:
            raise RuntimeError(f"layers were given different expert counts {sorted(self.counts)} or widths "
                               f"{sorted(self.widths)}: a standard checkpoint holds one of each")
        count = self.counts.pop() if self.method.keeps_experts else self.n_new
        self.adapter.set_n_experts(count)
        width = self.widths.pop()
        if width != self.width_orig:
            self.adapter.set_expert_width(width)
        self.n_kept, self.width = count, width


class ApplySink(LayerSink):
    """The layer runner's sink of a compression: at the end of each MoE layer, plan it from its statistics and
    write the new experts into it (`MethodApplier`); ``stats`` (when given) keeps each layer's statistics in
    float32. Without calibration data (``run.observer`` None) the layer is planned from its weights alone.
    Returns "changed" for a calibrated MoE layer (``sequential`` mode then re-runs it)."""

    def __init__(self, applier: MethodApplier, stats: Statistics | None = None):
        self.applier, self.stats = applier, stats

    def after_layer(self, run: LayerRun) -> bool:
        if not run.is_moe:
            return False
        if run.observer is None:
            self.applier.apply(run.index)
            return False
        layer_stats = {k: v.float() for k, v in run.observer.results().items()}
        if self.stats is not None:
            self.stats.layers[run.index] = layer_stats
        self.applier.apply(run.index, layer_stats, run.moe_inputs, run.moe_domains)
        return True


def calibration_batches(calib: CalibrationSet | None, batch_size: int, split: Any = None) -> CalibrationBatches | None:
    """``calib``'s rows (with their domain ids) in batches of ``batch_size``; this process's share under ``split``
    (a `moe_compress.calibration.runner.BatchSplit`). None without data."""
    from moe_compress.calibration.collect import calibration_domains

    if calib is None:
        return None
    return CalibrationBatches.split(calib.input_ids, calib.attention_mask, calibration_domains(calib)[0],
                                    batch_size, split)


def plan_and_apply(method: Method, adapter: Adapter, model: torch.nn.Module, n_new: int, *,
                   calib: CalibrationSet | None = None, recipe: Recipe,
                   device: str, progress: Progress | None = None) -> tuple[dict[int, dict], Statistics, dict]:
    """Run the method on every MoE layer (the layer runner in memory, with `ApplySink`) and write the new
    experts into ``model``. Returns (per-layer info, statistics, timings)."""
    from moe_compress.calibration.collect import calibration_domains

    names = calibration_domains(calib)[1] if calib is not None else []
    applier = MethodApplier(method, adapter, model, n_new, recipe.seed, names)
    stats = Statistics()
    t_start = time.perf_counter()
    # without data nothing runs on the device: each layer is planned where it is (on the CPU)
    runner = LayerRunner(model, adapter, mode=recipe.mode, device=device if calib is not None else "cpu",
                         keep_moe_inputs=method.needs_inputs, stats=tuple(method.needs),
                         observer_options=method.observer_options())
    runner.run(calibration_batches(calib, recipe.calibration.batch_size), ApplySink(applier, stats),
               progress=progress)
    spent = time.perf_counter() - t_start - sum(applier.timings.values())
    timings = {"statistics": spent if calib is not None else 0.0}
    applier.finish()
    return applier.infos, stats, {**timings, **applier.timings}


def resolve_execution(recipe: Recipe) -> Execution:
    """The recipe's ``execution`` made concrete for this process (``auto``: streamed under torchrun or with a
    memory cap); a `UserError` for an in-memory run launched by torchrun."""
    from moe_compress.distributed import world_size

    world = world_size()
    execution = recipe.execution.resolved(world)
    if execution.mode == "memory" and world > 1:
        raise UserError(f"this run was launched by torchrun ({world} processes), which needs streaming: drop "
                        "execution.mode memory (or use --stream)")
    return execution


def compress_in_memory(recipe: Recipe, progress: Progress | None = None, write: bool = True) -> CompressResult:
    """Load the whole model, calibrate, plan, apply, and (if ``write``) export to ``recipe.output``."""
    t0 = time.perf_counter()
    if write:
        check_output_dir(recipe.output, recipe.overwrite)
    method = get_method(recipe.method, **recipe.params)
    require_calibration(recipe, method)
    device = pick_device(recipe.device)
    config = load_config(recipe.model, recipe.trust_remote_code)
    n_new = validate_budget(recipe, get_adapter(config), method)
    from moe_compress.sizes import estimated_output_bytes

    estimate = estimated_output_bytes(recipe, config, n_new)
    if write:  # room for the result, before the weights are loaded
        check_output_dir(recipe.output, recipe.overwrite, estimate)
    model = load_model(recipe.model, dtype=pick_dtype(recipe.dtype), device="cpu",
                       trust_remote_code=recipe.trust_remote_code)
    tokenizer = load_tokenizer(recipe.model, trust_remote_code=recipe.trust_remote_code)
    adapter = get_adapter(model)
    n_orig, width_orig = adapter.n_experts(), adapter.expert_width()
    original_params = sum(p.numel() for p in model.parameters())
    calib = calibration_set(recipe, tokenizer) if method.needs_data else None
    names = check_domains(method, calib)
    if write and method.writes_companions and estimate:  # the main checkpoint and one per domain, all the same size
        check_output_dir(recipe.output, recipe.overwrite, estimate * (1 + len(names)))
    # the original, for `Method.refine` or to cut the companions from
    teacher = copy.deepcopy(model) if method.needs_teacher or method.writes_companions else None
    timings = {"load": time.perf_counter() - t0}
    infos, stats, stage_times = plan_and_apply(method, adapter, model, n_new, calib=calib, recipe=recipe,
                                               device=device, progress=progress)
    timings.update(stage_times)
    t1 = time.perf_counter()
    refined = method.refine(model, teacher, adapter, calib, device=device, seed=recipe.seed, progress=progress)
    if refined is not None:
        timings["refine"] = time.perf_counter() - t1
    companions = None
    if method.writes_companions:
        assert teacher is not None  # copied above for every method that writes companions
        teacher.to("cpu")
        companions = method.companions(infos, teacher, get_adapter(teacher))
    else:
        teacher = None
    model.to("cpu")
    manifest = build_manifest(recipe, method, n_orig, adapter.n_experts(), infos, calib, timings, refined)
    if method.keeps_experts:  # the budget was a share of the experts' parameters: say what was narrowed
        manifest["experts"]["budget"] = n_new
        manifest["intermediate_size"] = {"original": width_orig, "kept": adapter.expert_width()}
    if write:
        t1 = time.perf_counter()
        source = resolve_model(recipe.model)
        policy = resolve_policy(recipe.save_dtype, source, model.config, type(model))
        write_more = None
        if companions is not None:
            def write_more(folder: Any, main_manifest: dict) -> dict:
                return write_companions(folder, companions, teacher, main_manifest, recipe=recipe, method=method,
                                        n_orig=n_orig, calib=calib, policy=policy, source=source,
                                        tokenizer=tokenizer, original_params=original_params)
        export_checkpoint(model, recipe.output, manifest=manifest, adapter=adapter, policy=policy,
                          original_params=original_params, source_bytes=source_size(source),
                          tokenizer_source=source, tokenizer=tokenizer, model_card=model_card,
                          overwrite=recipe.overwrite, companions=write_more)
        timings["export"] = time.perf_counter() - t1
    return CompressResult(model, tokenizer, manifest, stats, timings, companions)


def folder_names(names: Any) -> dict[str, str]:
    """{name: a folder name for it}: letters, digits, ``.``, ``_`` and ``-`` kept, anything else ``_``; made unique
    with a numeric suffix (``code``, ``code_2``)."""
    import re

    out, used = {}, set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "domain"
        slug, n = base, 2
        while slug.lower() in used:
            slug, n = f"{base}_{n}", n + 1
        used.add(slug.lower())
        out[name] = slug
    return out


def write_companions(folder: Any, companions: Any, original: Any, main_manifest: dict, *, recipe: Recipe,
                     method: Method, n_orig: int, calib: Any, policy: Any, source: Any, tokenizer: Any,
                     original_params: int) -> dict:
    """Write each companion checkpoint (the original pruned to its kept experts) into ``folder/<companions.folder>/
    <name>/`` as a complete standard checkpoint, the companions' index as ``folder/<method>.json`` and its
    tensors; returns what the main compression.json records under ``companions`` (paths, bytes, totals)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from moe_compress.export.card import model_card
    from moe_compress.export.dtypes import written_bytes
    from moe_compress.export.writer import write_checkpoint, write_json
    from moe_compress.models.surgery import pruned_copy

    folder = Path(folder)
    root = folder / companions.folder
    root.mkdir()
    adapter = get_adapter(original)
    paths, sizes = {}, {}
    for name, slug in folder_names(companions.kept).items():
        kept = companions.kept[name]
        model = pruned_copy(adapter, original, kept)
        infos = {i: {"kept": k, "sources": [[e, 1.0] for e in k]} for i, k in sorted(kept.items())}
        manifest = build_manifest(recipe, method, n_orig, get_adapter(model).n_experts(), infos, calib,
                                  main_manifest.get("timings_s", {}))
        manifest["companion"] = {"name": name, "of": "..", "folder": f"{companions.folder}/{slug}",
                                 "index": f"../../{method.name}.json"}
        (root / slug).mkdir()
        write_checkpoint(model, root / slug, manifest=manifest, adapter=get_adapter(model), policy=policy,
                         original_params=original_params, source_bytes=main_manifest["export"]["bytes"]["source"],
                         tokenizer_source=source, tokenizer=tokenizer, model_card=model_card)
        del model
        paths[name] = f"{companions.folder}/{slug}"
        sizes[name] = written_bytes(root / slug)
    if companions.tensors:
        save_file({k: v.contiguous() for k, v in companions.tensors.items()}, str(root / companions.tensors_file))
    write_json(folder / f"{method.name}.json", {**companions.index, "checkpoints": {"all domains": ".", **paths}})
    extra = (root / companions.tensors_file).stat().st_size if companions.tensors else 0
    main = main_manifest["export"]["bytes"]["written"]
    return {"folder": companions.folder, "index": f"{method.name}.json",
            "tensors": f"{companions.folder}/{companions.tensors_file}" if companions.tensors else None,
            "count": 1 + len(paths),
            "checkpoints": {name: {"path": paths[name], "bytes": sizes[name]} for name in paths},
            "bytes": {"main": main, "companions": sum(sizes.values()), "index_tensors": extra,
                      "total": main + sum(sizes.values()) + extra}}


def source_size(source: str) -> int | None:
    """Bytes of the source checkpoint's safetensors files (None when they are not on this machine)."""
    from moe_compress.export.dtypes import source_folder, written_bytes

    folder = source_folder(source)
    return written_bytes(folder) if folder is not None else None


def _sources(s: ExpertSet) -> list[list[list]]:
    return [[[int(e), round(float(w), 6)] for e, w in src] for src in s.sources]


def build_manifest(recipe: Recipe, method: Method, n_orig: int, n_new: int, infos: dict[int, dict],
                   calib: CalibrationSet | None, timings: dict[str, float],
                   refined: dict | None = None) -> dict[str, Any]:
    """compression.json: tool version, method and parameters, per-layer provenance, calibration, timings and
    the full equivalent recipe."""
    calib_info = None
    if calib is not None:
        calib_info = {"spec": recipe.calibration.data, "sha256": calib.sha256,
                      "n_samples": int(calib.input_ids.shape[0]),
                      "seq_len": int(calib.input_ids.shape[1]), "tokens": int(calib.n_tokens)}
    recipe_dict = json.loads(recipe.model_dump_json())
    return {
        "tool": "moe-compress",
        "version": __version__,
        "model": recipe.model,
        "method": {"name": method.name, "kind": method.kind, "params": json.loads(method.params.model_dump_json()),
                   "spec": format_method_spec(recipe.method, recipe.params)},
        "experts": {"original": n_orig, "kept": n_new},
        "calibration": calib_info,
        "mode": recipe.mode,
        "seed": recipe.seed,
        "layers": {str(i): info for i, info in sorted(infos.items())},
        **({"refine": refined} if refined is not None else {}),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "recipe": recipe_dict,
        "recipe_sha256": hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode()).hexdigest(),
    }
