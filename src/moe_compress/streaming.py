"""Streaming compression: models bigger than the GPU (and than CPU RAM), resumable, on one or several GPUs.

`compress_streaming(recipe)` (what `execute.compress` runs for ``execution.mode: stream``) does what the in-memory
compression does, without ever building the whole model. It is the layer runner
(`moe_compress.calibration.runner.LayerRunner`) with the `LazyCheckpoint` as its source, the torchrun
`DistContext` as its batch split and `StreamSink` as its sink:

1. the model is a `LazyCheckpoint` skeleton (parameters on the meta device; embeddings and final norm real);
2. the calibration set goes through the embeddings once (the runner's input capture);
3. for each decoder layer in order: its weights are read from the safetensors shards straight onto the
   device, every calibration batch runs through it with the statistics observers installed, the method plans
   the layer and surgery writes the new experts (`pipeline.ApplySink`), the compressed layer is converted to hub
   key names and written as its own shard (``model-0000{i+1}-of-0000{L+1}.safetensors``; `StreamSink.commit`),
   and the layer goes back to meta; ``oneshot``/``sequential`` feeding as in memory (the same runner);
4. the weights outside the layers are copied into the last shard, then the index, the config with the new
   expert count, the tokenizer, compression.json and the model card; the folder is renamed into place.

Device memory: one decoder layer + the activations of one calibration batch + planning temporaries. With a
cap (``max_gpu_memory``, e.g. ``"20GiB"``) the calibration batch size is chosen so that the estimate
(`plan_memory`) fits, and a cap that cannot hold one layer + one sequence is refused with a `UserError`.

Resuming: everything is written into ``.{out}.partial`` beside the output folder. After each layer it holds
the layer's shard, the hidden states that feed the next layer (one file per rank) and ``progress.json`` (the
last completed layer, the per-layer plan records, the method's random generator state, and a fingerprint of
the recipe, the model files, the calibration tokens, the batch size and the number of ranks), written in
that order so that an interruption at any point leaves a consistent state. Re-running the same command
continues after the last completed layer; the weights, index and config are byte-identical to an
uninterrupted run (compression.json differs only in ``timings_s``). A partial run made with anything else
(another recipe, model, calibration, batch size or rank count) is refused, or discarded and restarted with
``overwrite``.

Several GPUs: under ``torchrun`` (see `moe_compress.distributed`) each rank runs the calibration batches
b = rank, rank + N, ...; the statistics are all-reduced so every rank plans the same; rank 0 writes.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moe_compress import __version__
from moe_compress.distributed import DistContext, broadcast_object, init_from_env
from moe_compress.errors import UserError
from moe_compress.export.card import model_card
from moe_compress.export.dtypes import SavePolicy, resolve_policy
from moe_compress.export.shards import hub_tensors, shard_name, write_index, write_shard
from moe_compress.export.writer import (
    apply_umask_modes,
    check_output_dir,
    copy_tokenizer,
    export_record,
    keep_source_architectures,
    move_into_place,
    write_json,
)
from moe_compress.methods.base import Method
from moe_compress.models.lazy import LazyCheckpoint
from moe_compress.pipeline import ApplySink, MethodApplier
from moe_compress.recipe import Execution, Recipe, parse_size
from moe_compress.sizes import fmt_bytes

__all__ = ["MemoryPlan", "StreamResult", "StreamSink", "compress_streaming", "parse_size", "plan_memory"]

Progress = Callable[[str, int, int], None]
STATE_FILE = "progress.json"
STATE_VERSION = 1

# -- memory planning ---------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Estimated device memory (bytes) of a streaming run and the calibration batch size chosen to fit ``cap``.

    layer: the largest decoder layer's weights; outside: weights outside the layers (on the device during the
    input capture only); fixed: per-MoE-layer extras independent of the batch (the new experts, planning
    temporaries, statistic plug-ins); per_row: activations of one calibration sequence inside a layer;
    capture_row: the same during the input capture.
    """

    cap: int | None
    layer: int
    outside: int
    fixed: int
    per_row: int
    capture_row: int
    batch_size: int
    margin: float = 0.9

    def estimate(self, rows: int | None = None) -> int:
        rows = self.batch_size if rows is None else rows
        return max(self.outside + rows * self.capture_row, self.layer + self.fixed + rows * self.per_row)

    def as_dict(self) -> dict:
        return {"max_gpu_memory": self.cap, "batch_size": self.batch_size, "estimated_peak": self.estimate(),
                "layer_bytes": self.layer, "outside_bytes": self.outside, "fixed_bytes": self.fixed,
                "bytes_per_sequence": self.per_row}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def plan_memory(lazy, method, calib, batch_size: int, cap: int | None, device: str,
                n_new: int | None = None) -> MemoryPlan:
    """Estimate device memory per layer and choose the largest batch size <= ``batch_size`` whose estimate fits
    ``margin * cap`` (see `MemoryPlan`). The activation estimate is deliberately generous (every intermediate
    of attention, the router, the routed rows of the observed expert forward and the shared experts alive at
    once, x1.25); the bench (bench/streaming.py) checks it against the measured peak."""
    model, adapter = lazy.model, lazy.adapter
    cfg = model.config
    layers = adapter.decoder_layers(model)
    blocks = adapter.moe_blocks(model)
    dtype_bytes = torch.empty(0, dtype=lazy.dtype).element_size()
    layer_bytes = max(_nbytes(list(l.parameters()) + list(l.buffers())) for l in layers)
    base = getattr(model, "model", model)
    outside = sum(_nbytes(list(m.parameters()) + list(m.buffers())) for n, m in base.named_children() if n != "layers")
    hidden = int(cfg.hidden_size)
    rule = adapter.rule()
    k, n_orig = rule.top_k, adapter.n_experts()
    seq = int(calib.input_ids.shape[1]) if calib is not None else 1
    per_token = 0
    moe_bytes = 0
    for i, layer in enumerate(layers):
        experts = blocks[i].experts if i in blocks else None
        lin = sum(m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear)
                  and (experts is None or not any(m is x for x in experts.modules())))
        tok = 2 * dtype_bytes * lin + 8 * hidden * dtype_bytes + 16 * hidden
        if experts is not None:
            inter = adapter.read_experts(blocks[i]).gate.shape[1]
            tok += k * (5 * hidden + 4 * inter) * max(dtype_bytes, 4) + 64 * n_orig
            moe_bytes = max(moe_bytes, _nbytes(experts.parameters()))
        if not str(device).startswith("cuda"):  # CPU attention materialises the score matrix
            tok += int(getattr(cfg, "num_attention_heads", 1)) * seq * 4
        per_token = max(per_token, tok)
    per_token = int(per_token * 1.25)
    has_pad = calib is not None and calib.attention_mask is not None and not bool(calib.attention_mask.all())
    head_dim = getattr(cfg, "head_dim", None) or hidden // max(1, int(getattr(cfg, "num_attention_heads", 1)))
    per_row = seq * (per_token + 8 * int(head_dim)) + (seq * seq if has_pad else 0)
    capture_row = seq * (3 * hidden * dtype_bytes + 8 * int(head_dim) + 16) + (seq * seq * 4 if has_pad else 0)
    # the new experts (model dtype) exist beside the old ones during surgery; merging works in fp32
    fixed = moe_bytes * (n_new or n_orig) // max(1, n_orig)
    if method.kind == "merge":
        fixed += 2 * moe_bytes * 4 // dtype_bytes
    needs = set(method.needs)
    opts = method.observer_options()
    if needs & {"output_similarity", "expert_output_mean"}:
        inter = max(adapter.read_experts(b).gate.shape[1] for b in blocks.values())
        sub = int(opts.get("similarity_tokens", 2048))
        if calib is not None:
            sub = min(sub, int(calib.n_tokens))
        from moe_compress.calibration.similarity import CHUNK_ELEMENTS, chunk_bytes

        fixed += chunk_bytes(n_orig, hidden, inter, sub, int(opts.get("chunk_elements", CHUNK_ELEMENTS)),
                             dtype_bytes) + n_orig * hidden * 8  # all experts on a chunk of subsample tokens
    if needs & {"input_moment", "input_moment_all"}:
        from moe_compress.calibration.moments import moment_bytes

        fixed += moment_bytes(n_orig, hidden, getattr(torch, opts.get("moment_dtype", "float32")))
    if method.needs_inputs and calib is not None:
        fixed += int(calib.n_tokens) * hidden * dtype_bytes
    plan = MemoryPlan(cap, layer_bytes, outside, fixed, per_row, capture_row, batch_size)
    if cap is None:
        return plan
    room = plan.margin * cap
    if calib is None:
        if layer_bytes + fixed > room:
            raise UserError(f"--max-gpu-memory {fmt_bytes(cap)} is too small: one decoder layer needs "
                            f"{fmt_bytes(layer_bytes)} + {fmt_bytes(fixed)} for its compression "
                            f"(at least {fmt_bytes((layer_bytes + fixed) / plan.margin)} with the 10% margin)")
        return plan
    fit = min(int((room - layer_bytes - fixed) // per_row), int((room - outside) // capture_row))
    if fit < 1:
        need = max(layer_bytes + fixed + per_row, outside + capture_row) / plan.margin
        raise UserError(f"--max-gpu-memory {fmt_bytes(cap)} is too small for this model: one decoder layer "
                        f"({fmt_bytes(layer_bytes)}) + compression temporaries ({fmt_bytes(fixed)}) + the "
                        f"activations of one {seq}-token sequence ({fmt_bytes(per_row)}) need about "
                        f"{fmt_bytes(need)}; raise it or use a shorter --seq-len")
    plan.batch_size = max(1, min(batch_size, fit))
    return plan


# -- resuming ----------------------------------------------------------------------------------------------------
def _fingerprint(recipe: Recipe, source: str, calib, batch_size: int, world: int, n_layers: int) -> tuple[str, dict]:
    """What a partial run must match to be resumed. Not the execution: it changes nothing in the results beyond
    the batch size and the number of processes, which are in the fingerprint."""
    from moe_compress.calibration.collect import model_fingerprint, tokens_sha256

    rec = json.loads(recipe.model_dump_json())
    rec.pop("overwrite", None)
    rec.pop("execution", None)
    data = {"state_version": STATE_VERSION, "tool_version": __version__, "recipe": rec,
            "model": model_fingerprint(source), "n_layers": n_layers, "batch_size": batch_size, "world": world,
            "calibration": None if calib is None else {
                "sha256": getattr(calib, "sha256", None),
                "tokens_sha256": tokens_sha256(calib.input_ids, getattr(calib, "attention_mask", None))}}
    data["model"].pop("path", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest(), data


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _hidden_file(partial: Path, layer: int, rank: int) -> Path:
    return partial / f"hidden-{layer:05d}-r{rank}.safetensors"


def _open_partial(partial: Path, key: str, overwrite: bool, log) -> dict | None:
    """The saved progress of a matching partial run (None: start fresh). A partial run of another recipe is
    refused (or discarded with ``overwrite``)."""
    state_path = partial / STATE_FILE
    if partial.exists():
        state = None
        if state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
            except json.JSONDecodeError:
                state = None
        if state is not None and state.get("fingerprint") == key:
            return state
        if state is not None and not overwrite:
            raise UserError(f"{partial} holds an interrupted run of a different recipe, model, calibration set, "
                            "batch size or number of processes: re-run that exact command to resume it, or pass "
                            "--overwrite to discard it and start over")
        if log and state is not None:
            log(f"discarding the interrupted run in {partial} (different recipe; --overwrite)")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return None


@dataclass
class StreamResult:
    output: Path
    manifest: dict
    memory: MemoryPlan
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None        # first layer computed by this run when it resumed, else None
    peak_materialised: int = 0             # bytes of checkpoint weights materialised at once (LazyCheckpoint)
    rank: int = 0
    world: int = 1


# -- the run -----------------------------------------------------------------------------------------------------
def compress_streaming(recipe: Recipe, *, max_gpu_memory: str | int | None = None, progress: Progress | None = None,
                       log: Callable[[str], None] | None = None, offload_device: str = "cpu") -> StreamResult:
    """Compress ``recipe.model`` (a local safetensors checkpoint folder or builtin) into ``recipe.output``
    layer by layer (see the module docstring). Joins a torch.distributed group when launched by torchrun.
    ``max_gpu_memory`` (default: the recipe's ``execution.max_gpu_memory``) caps the device memory."""
    dev_name = recipe.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = init_from_env(dev_name)
    try:
        return _run(recipe, ctx, max_gpu_memory, progress, log, offload_device)
    finally:
        ctx.close()


def _check_streamable(method: Method) -> None:
    if method.needs_teacher:
        raise UserError(f"method {method.name}: the distillation stage needs the whole model in memory; "
                        "run without --stream/--max-gpu-memory/torchrun, or set distill_steps=0")
    if method.writes_companions:
        raise UserError(f"method {method.name} writes one checkpoint per calibration domain beside the main one, "
                        "which the streaming writer does not support; run without --stream/--max-gpu-memory/torchrun")
    if method.keeps_experts:
        raise UserError(f"method {method.name} narrows every expert (a new intermediate size), which the streaming "
                        "writer does not support yet; run without --stream/--max-gpu-memory/torchrun")


class StreamSink(ApplySink):
    """Streaming's sink of the layer runner: plan + surgery as in memory (`ApplySink`), then commit each layer:
    its shard (rank 0, hub names, written dtypes), the hidden states that feed the next layer (every rank, one
    file each), then ``progress.json`` (rank 0: last completed layer, plan records, the method's generator state,
    timings, the run's fingerprint), in that order, so that an interruption anywhere leaves a resumable state."""

    def __init__(self, applier: MethodApplier, ctx: DistContext, lazy: LazyCheckpoint, partial: Path,
                 policy: SavePolicy, n_files: int, key: str, key_data: dict, timings: dict[str, float]):
        super().__init__(applier)
        self.ctx, self.lazy, self.partial, self.policy, self.n_files = ctx, lazy, partial, policy, n_files
        self.key, self.key_data, self.timings = key, key_data, timings
        self.local: list[int] = []  # this rank's calibration batches (the names of its saved hidden states)
        self.mark()

    def mark(self) -> None:
        """Start timing the next layer's statistics (the time to its commit, less planning)."""
        self._t, self._plan = time.perf_counter(), sum(self.applier.timings.values())

    def resume(self, state: dict) -> int:
        """Take over a partial run's plan records, generator state and timings; the first layer to compute."""
        applier = self.applier
        applier.infos = {int(i): v for i, v in state["infos"].items()}
        applier.generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["generator"])),
                                                     dtype=torch.uint8).clone())
        for k, v in state["timings"].items():
            (applier.timings if k in applier.timings else self.timings)[k] = float(v)
        return int(state["done"]) + 1

    def commit(self, index: int, layer: torch.nn.Module, hidden: list[torch.Tensor]) -> None:
        ctx, partial, applier = self.ctx, self.partial, self.applier
        t1 = time.perf_counter()
        self.timings["statistics"] += t1 - self._t - (sum(applier.timings.values()) - self._plan)
        if ctx.is_writer:
            write_shard(partial / shard_name(index, self.n_files),
                        self.policy.cast(hub_tensors(self.lazy.adapter.spec, f"{self.lazy.layer_prefix}{index}.",
                                                     layer.state_dict())))
        if hidden:
            write_shard(_hidden_file(partial, index, ctx.rank),
                        {f"b{b}": h.contiguous() for b, h in zip(self.local, hidden)})
        ctx.barrier()
        self.timings["write"] += time.perf_counter() - t1
        if ctx.is_writer:
            _atomic_json(partial / STATE_FILE, {
                "fingerprint": self.key, "fingerprint_data": self.key_data, "done": index,
                "infos": {str(k): v for k, v in sorted(applier.infos.items())},
                "generator": base64.b64encode(applier.generator.get_state().numpy().tobytes()).decode(),
                "timings": {**self.timings, **applier.timings}})
        ctx.barrier()
        old = _hidden_file(partial, index - 1, ctx.rank)
        if old.exists():
            old.unlink()
        self.mark()


def _run(recipe: Recipe, ctx: DistContext, max_gpu_memory: str | int | None, progress: Progress | None,
         log: Callable[[str], None] | None, offload: str) -> StreamResult:
    """The streaming configuration of the layer runner: `LazyCheckpoint` source, ``ctx`` split, `StreamSink`."""
    from moe_compress.calibration.runner import LayerRunner
    from moe_compress.devices import pick_device, pick_dtype
    from moe_compress.methods.base import get_method
    from moe_compress.models.loading import load_tokenizer, resolve_model
    from moe_compress.pipeline import (
        build_manifest,
        calibration_batches,
        calibration_set,
        check_domains,
        require_calibration,
        validate_budget,
    )
    from moe_compress.sizes import estimated_output_bytes

    t_start = time.perf_counter()
    out = Path(recipe.output)
    check_output_dir(out, recipe.overwrite)
    method = get_method(recipe.method, **recipe.params)
    require_calibration(recipe, method)
    _check_streamable(method)
    device = pick_device(recipe.device)
    if ctx.active and device.startswith("cuda"):
        device = f"cuda:{ctx.local_rank}"
    source = resolve_model(recipe.model)
    if not Path(source).is_dir():
        raise UserError(f"streaming compression reads a local checkpoint folder; {recipe.model} is not one "
                        "(download it first, e.g. `hf download ID --local-dir DIR`)")
    if max_gpu_memory is None:
        max_gpu_memory = recipe.execution.max_gpu_memory
    cap = None if max_gpu_memory is None else parse_size(max_gpu_memory)
    recipe = recipe.model_copy(update={"execution": Execution(mode="stream", max_gpu_memory=max_gpu_memory)})
    lazy = LazyCheckpoint(source, dtype=pick_dtype(recipe.dtype), trust_remote_code=recipe.trust_remote_code)
    model, adapter = lazy.model, lazy.adapter
    n_orig = adapter.n_experts()
    n_new = validate_budget(recipe, adapter, method)
    original_params = sum(p.numel() for p in model.parameters())  # meta tensors count too
    policy = resolve_policy(recipe.save_dtype, source, model.config, type(model))
    tokenizer = calib = None
    if method.needs_data:
        tokenizer = load_tokenizer(source, trust_remote_code=recipe.trust_remote_code)
        calib = calibration_set(recipe, tokenizer)
    names = check_domains(method, calib)
    mem = plan_memory(lazy, method, calib, recipe.calibration.batch_size, cap, device, n_new)
    bs = mem.batch_size
    if log and cap is not None and ctx.is_writer:
        log(f"max GPU memory {fmt_bytes(cap)}: batch size {bs}, estimated peak {fmt_bytes(mem.estimate())} "
            f"(one layer {fmt_bytes(mem.layer)})")

    n_layers = len(adapter.decoder_layers(model))
    n_files = n_layers + 1
    key, key_data = _fingerprint(recipe, source, calib, bs, ctx.world, n_layers)
    partial = out.parent / f".{out.name}.partial"
    state = error = None
    if ctx.is_writer:
        try:  # room for the weights not yet written (a partial run's shards already hold part of them)
            estimate = estimated_output_bytes(recipe, model.config, n_new)
            done = sum(f.stat().st_size for f in partial.glob("model-*.safetensors")) if partial.is_dir() else 0
            check_output_dir(out, recipe.overwrite, max(0, estimate - done) if estimate else None)
            out.parent.mkdir(parents=True, exist_ok=True)
            state = _open_partial(partial, key, recipe.overwrite, log)
        except UserError as e:
            error = str(e)
    state, error = broadcast_object(ctx, (state, error))  # every rank stops on the writer's refusal
    if error is not None:
        raise UserError(error)

    applier = MethodApplier(method, adapter, model, n_new, recipe.seed, names)
    timings = {"load": 0.0, "statistics": 0.0, "write": 0.0}
    sink = StreamSink(applier, ctx, lazy, partial, policy, n_files, key, key_data, timings)
    start = 0
    if state is not None:
        start = sink.resume(state)
        if log and ctx.is_writer:
            log(f"resuming the interrupted run in {partial}: layers 0..{start - 1} done, continuing at {start}")
    batches = calibration_batches(calib, bs, ctx)
    hidden = None
    if batches is not None and batches.local and 0 < start < n_layers:
        from safetensors.torch import load_file

        saved = load_file(str(_hidden_file(partial, start - 1, ctx.rank)))
        hidden = [saved[f"b{b}"].to(offload) for b in batches.local]
        del saved
    sink.local = batches.local if batches is not None else []
    timings["load"] += time.perf_counter() - t_start
    sink.mark()
    runner = LayerRunner(model, adapter, source=lazy, split=ctx, mode=recipe.mode, device=device,
                         offload_device=offload, keep_moe_inputs=method.needs_inputs, stats=tuple(method.needs),
                         observer_options=method.observer_options())
    runner.run(batches, sink, start=start, hidden=hidden, progress=progress)
    del hidden

    missing = set(applier.blocks) - set(applier.infos)
    if missing:
        raise RuntimeError(f"MoE layers {sorted(missing)} were not compressed")
    all_timings = {**timings, **applier.timings}
    manifest = build_manifest(recipe, method, n_orig, n_new, applier.infos, calib, all_timings)
    manifest["streaming"] = {"world_size": ctx.world, **mem.as_dict()}
    if ctx.is_writer:
        t0 = time.perf_counter()
        _finish(partial, out, lazy, adapter, n_new, n_files, source, tokenizer, manifest, recipe.overwrite, policy,
                original_params)
        all_timings["write"] += time.perf_counter() - t0
    ctx.barrier()
    return StreamResult(out, manifest, mem, all_timings, start if state is not None else None, lazy.peak_bytes,
                        ctx.rank, ctx.world)


def _finish(partial: Path, out: Path, lazy, adapter, n_new: int, n_files: int, source: str, tokenizer,
            manifest: dict, overwrite: bool, policy: SavePolicy, original_params: int) -> None:
    """Write the non-layer weights (in their written dtypes), index, config, tokenizer, manifest (with the
    written dtypes and sizes) and card; rename into ``out``."""
    from moe_compress.models.registry import get_adapter
    from moe_compress.pipeline import source_size

    model = lazy.model
    rest = lazy.outside_tensors()
    write_shard(partial / shard_name(n_files - 1, n_files), policy.cast(rest))
    del rest
    write_index(partial, [shard_name(i, n_files) for i in range(n_files)])
    cfg = copy.deepcopy(model.config)
    get_adapter(cfg).set_n_experts(n_new)
    cfg.architectures = [type(model).__name__]
    cfg.dtype = policy.main
    cfg.save_pretrained(partial)
    keep_source_architectures(partial, source)
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.can_generate():
        gen.save_pretrained(partial)
    copy_tokenizer(source, partial, tokenizer)
    for f in list(partial.glob("hidden-*.safetensors")) + [partial / STATE_FILE]:
        if f.exists():
            f.unlink()
    manifest["export"] = export_record(policy, original_params, source_size(source), partial)  # hidden-*: gone
    write_json(partial / "compression.json", manifest)
    (partial / "README.md").write_text(model_card(manifest))
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    apply_umask_modes(partial)  # the modes of a plain mkdir/open, as the in-memory export
    move_into_place(partial, out)
