"""Streaming compression: models bigger than the GPU (and than CPU RAM), resumable, on one or several GPUs.

`compress_streaming(recipe)` does what `pipeline.compress` does, without ever building the whole model:

1. the model is a `LazyCheckpoint` skeleton (parameters on the meta device; embeddings and final norm real);
2. the calibration set goes through the embeddings once (input capture, as in the runner);
3. for each decoder layer in order: its weights are read from the safetensors shards straight onto the
   device, every calibration batch runs through it with the statistics observers installed, the method plans
   the layer and surgery writes the new experts, the compressed layer is converted to hub key names and
   written as its own shard (``model-0000{i+1}-of-0000{L+1}.safetensors``), and the layer goes back to meta;
   ``oneshot``/``sequential`` feeding exactly as in the in-memory runner;
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
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moe_compress import __version__
from moe_compress.calibration.observers import InputCapture, LayerObserver, ObservedExperts, make_observers
from moe_compress.calibration.runner import capture_layer_inputs
from moe_compress.distributed import DistContext, broadcast_object, init_from_env, reduce_observer
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
from moe_compress.models.layer import MoELayer
from moe_compress.sizes import fmt_bytes

Progress = Callable[[str, int, int], None]
STATE_FILE = "progress.json"
STATE_VERSION = 1

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6,
          "mib": 2 ** 20, "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_size(text: str | int | float) -> int:
    """``"20GiB"``, ``"20GB"`` (10^9), ``"512MiB"``, ``"1.5G"`` (binary), ``1000`` (bytes) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read memory size {text!r}: use e.g. 20GiB, 20GB, 512MiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise UserError(f"memory size {text!r} must be positive")
    return value


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


# -- helpers -----------------------------------------------------------------------------------------------------
def _move(obj, device, memo: dict | None = None):
    """Tensors inside args/kwargs (tuples, lists, dicts) moved to ``device``; shared tensors stay shared."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device))
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_move(x, device, memo) for x in obj)
    if isinstance(obj, list):
        return [_move(x, device, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def _forward(layer, hidden, calls, masks, observer, device, offload, domains, offsets, progress):
    """Every local batch through ``layer`` (as the runner's `_forward_batches`; kwargs live on ``offload``
    and move per batch; subsample selectors get the global real-token offset of each batch)."""
    outs = []
    with torch.inference_mode():
        for b, (h, (args, kwargs), mask, dom, off) in enumerate(zip(hidden, calls, masks, domains, offsets)):
            if observer is not None:
                observer.token_mask = mask.to(device)
                observer.token_domain = None if dom is None else dom.to(device)
                for obs in observer.extra:
                    sel = getattr(obs, "select", None)
                    if sel is not None and hasattr(sel, "seen"):
                        sel.seen = off
            out = layer(h.to(device), *_move(args, device), **_move(kwargs, device))
            out = out[0] if isinstance(out, tuple) else out
            outs.append(out.detach().to(offload))
            if progress:
                progress("batches", b + 1, len(hidden))
    return outs


def _fingerprint(recipe, source: str, calib, batch_size: int, world: int, n_layers: int) -> tuple[str, dict]:
    from moe_compress.calibration.collect import model_fingerprint, tokens_sha256

    rec = json.loads(recipe.model_dump_json())
    rec.pop("overwrite", None)
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
def compress_streaming(recipe, *, max_gpu_memory: str | int | None = None, progress: Progress | None = None,
                       log: Callable[[str], None] | None = None, offload_device: str = "cpu") -> StreamResult:
    """Compress ``recipe.model`` (a local safetensors checkpoint folder or builtin) into ``recipe.output``
    layer by layer (see the module docstring). Joins a torch.distributed group when launched by torchrun."""
    dev_name = recipe.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = init_from_env(dev_name)
    try:
        return _run(recipe, ctx, max_gpu_memory, progress, log, offload_device)
    finally:
        ctx.close()


def _run(recipe, ctx: DistContext, max_gpu_memory, progress, log, offload) -> StreamResult:
    from moe_compress.calibration.collect import calibration_domains
    from moe_compress.devices import pick_device, pick_dtype
    from moe_compress.methods.base import get_method
    from moe_compress.models.lazy import LazyCheckpoint
    from moe_compress.models.loading import load_tokenizer, resolve_model
    from moe_compress.pipeline import (
        MethodApplier,
        build_manifest,
        calibration_set,
        require_calibration,
        validate_budget,
    )
    from moe_compress.sizes import estimated_output_bytes

    t_start = time.perf_counter()
    out = Path(recipe.output)
    check_output_dir(out, recipe.overwrite)
    method = get_method(recipe.method, **recipe.params)
    require_calibration(recipe, method)
    if method.needs_teacher:
        raise UserError(f"method {method.name}: the distillation stage needs the whole model in memory; "
                        "run without --stream/--max-gpu-memory/torchrun, or set distill_steps=0")
    if method.writes_companions:
        raise UserError(f"method {method.name} writes one checkpoint per calibration domain beside the main one, "
                        "which the streaming writer does not support; run without --stream/--max-gpu-memory/torchrun")
    if method.keeps_experts:
        raise UserError(f"method {method.name} narrows every expert (a new intermediate size), which the streaming "
                        "writer does not support yet; run without --stream/--max-gpu-memory/torchrun")
    device = pick_device(recipe.device)
    if ctx.active and device.startswith("cuda"):
        device = f"cuda:{ctx.local_rank}"
    source = resolve_model(recipe.model)
    if not Path(source).is_dir():
        raise UserError(f"streaming compression reads a local checkpoint folder; {recipe.model} is not one "
                        "(download it first, e.g. `hf download ID --local-dir DIR`)")
    cap = None if max_gpu_memory is None else parse_size(max_gpu_memory)
    lazy = LazyCheckpoint(source, dtype=pick_dtype(recipe.dtype), trust_remote_code=recipe.trust_remote_code)
    model, adapter = lazy.model, lazy.adapter
    n_orig = adapter.n_experts()
    n_new = validate_budget(recipe, adapter)
    original_params = sum(p.numel() for p in model.parameters())  # meta tensors count too
    policy = resolve_policy(recipe.save_dtype, source, model.config, type(model))
    tokenizer = calib = None
    if method.needs_data:
        tokenizer = load_tokenizer(source, trust_remote_code=recipe.trust_remote_code)
        calib = calibration_set(recipe, tokenizer)
    mem = plan_memory(lazy, method, calib, recipe.calibration.batch_size, cap, device, n_new)
    bs = mem.batch_size
    if log and cap is not None and ctx.is_writer:
        log(f"max GPU memory {fmt_bytes(cap)}: batch size {bs}, estimated peak {fmt_bytes(mem.estimate())} "
            f"(one layer {fmt_bytes(mem.layer)})")

    layers = adapter.decoder_layers(model)
    blocks = adapter.moe_blocks(model)
    n_layers, n_files = len(layers), len(layers) + 1
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

    applier = MethodApplier(method, adapter, model, n_new, recipe.seed)
    timings = {"load": 0.0, "statistics": 0.0, "write": 0.0}
    start = 0
    if state is not None:
        start = int(state["done"]) + 1
        applier.infos = {int(i): v for i, v in state["infos"].items()}
        applier.generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["generator"])),
                                                     dtype=torch.uint8).clone())
        for k, v in state["timings"].items():
            (applier.timings if k in applier.timings else timings)[k] = float(v)
        if log and ctx.is_writer:
            log(f"resuming the interrupted run in {partial}: layers 0..{start - 1} done, continuing at {start}")
    timings["load"] += time.perf_counter() - t_start

    # calibration batches of this rank, their inputs and masks -------------------------------------------------
    mine: list[int] = []
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple]] = [[] for _ in layers]
    masks, domains, offsets = [], [], []
    options = dict(method.observer_options())
    if calib is not None and start < n_layers:
        t0 = time.perf_counter()
        ids, am = calib.input_ids, calib.attention_mask
        n_rows = int(ids.shape[0])
        n_batches = math.ceil(n_rows / bs)
        mine = [b for b in range(n_batches) if b % ctx.world == ctx.rank]
        dom_ids, _ = calibration_domains(calib)
        all_masks = [(torch.ones((min(n_rows, (b + 1) * bs) - b * bs) * ids.shape[1], dtype=torch.bool)
                      if am is None else am[b * bs:(b + 1) * bs].reshape(-1).bool()) for b in range(n_batches)]
        real = [int(m.sum()) for m in all_masks]
        options["total_tokens"] = sum(real)
        starts = [sum(real[:b]) for b in range(n_batches)]
        masks = [all_masks[b] for b in mine]
        offsets = [starts[b] for b in mine]
        domains = [None if dom_ids is None else dom_ids[b * bs:(b + 1) * bs].repeat_interleave(ids.shape[1])
                   for b in mine]
        if mine:
            model.eval()
            embeds = []
            for b in mine:  # one batch at a time: only one batch's embeddings and kwargs on the device
                emb, per_layer = capture_layer_inputs(model, ids[b * bs:(b + 1) * bs],
                                                      None if am is None else am[b * bs:(b + 1) * bs], device, bs)
                memo: dict = {}
                embeds.append(emb[0].to(offload))
                for i, per in enumerate(per_layer):
                    calls[i].append(_move(per[0], offload, memo))
                del emb, per_layer, memo
            base = getattr(model, "model", model)
            for name, m in base.named_children():
                if name != "layers":
                    m.to("cpu")
            if start == 0:
                hidden = [e.to(offload) for e in embeds]
            else:
                from safetensors.torch import load_file

                saved = load_file(str(_hidden_file(partial, start - 1, ctx.rank)))
                hidden = [saved[f"b{b}"].to(offload) for b in mine]
                del saved
            del embeds
        timings["statistics"] += time.perf_counter() - t0

    # layer by layer -------------------------------------------------------------------------------------------
    prefix = lazy._prefix
    for i in range(start, n_layers):
        layer = layers[i]
        t0 = time.perf_counter()
        lazy.load(i, layer, device)
        observer: ObservedExperts | None = None
        capture: InputCapture | None = None
        view: MoELayer | None = None
        extra: list[LayerObserver] = []
        stats: dict[str, torch.Tensor] = {}
        plan_before = sum(applier.timings.values())
        if calib is not None and i in blocks:
            view = adapter.layer(model, i, blocks[i])
            extra = make_observers(view, tuple(method.needs), **options)
            if method.needs_inputs:
                capture = InputCapture(view, offload_device=offload)
                extra.append(capture)
            observer = ObservedExperts(view, extra).install()
        outputs = hidden
        if calib is not None:
            outputs = _forward(layer, hidden, calls[i], masks, observer, device, offload, domains, offsets,
                               progress)
        if observer is not None:
            observer.remove()
            reduce_observer(ctx, observer, capture, mine)
        if i in blocks:
            if calib is None:
                applier.apply(i)
            else:
                assert observer is not None  # installed above on every MoE layer of a calibrated run
                stats = {k: v.float() for k, v in observer.results().items()}
                applier.apply(i, stats, None if capture is None else capture.inputs(),
                              None if capture is None else capture.domains())
                if recipe.mode == "sequential":
                    outputs = _forward(layer, hidden, calls[i], masks, None, device, offload, domains, offsets,
                                       progress)
            # drop this layer's observers, inputs and statistics before it is written
            observer, capture, view, extra, stats = None, None, None, [], {}  # noqa: F841
        hidden = outputs
        calls[i] = []
        t1 = time.perf_counter()
        timings["statistics"] += t1 - t0 - (sum(applier.timings.values()) - plan_before)
        # write the layer, the hidden states that feed the next one, then commit the progress
        if ctx.is_writer:
            write_shard(partial / shard_name(i, n_files),
                        policy.cast(hub_tensors(model.config.model_type, adapter.spec.layout, f"{prefix}{i}.",
                                                layer.state_dict())))
        lazy.release(i, layer, offload)
        if calib is not None and mine:
            write_shard(_hidden_file(partial, i, ctx.rank), {f"b{b}": h.contiguous() for b, h in zip(mine, hidden)})
        ctx.barrier()
        timings["write"] += time.perf_counter() - t1
        if ctx.is_writer:
            all_t = {**timings, **applier.timings}
            _atomic_json(partial / STATE_FILE, {
                "fingerprint": key, "fingerprint_data": key_data, "done": i,
                "infos": {str(k): v for k, v in sorted(applier.infos.items())},
                "generator": base64.b64encode(applier.generator.get_state().numpy().tobytes()).decode(),
                "timings": all_t})
        ctx.barrier()
        old = _hidden_file(partial, i - 1, ctx.rank)
        if old.exists():
            old.unlink()
        if progress:
            progress("layers", i + 1, n_layers)
    del hidden

    missing = set(blocks) - set(applier.infos)
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
    from moe_compress.models.lazy import memory_to_disk
    from moe_compress.models.registry import get_adapter
    from moe_compress.pipeline import source_size

    model = lazy.model
    layer_disk_prefix = memory_to_disk(lazy._prefix, lazy.names)
    rest = {}
    for k in sorted(lazy.files.keys()):
        if k.startswith(layer_disk_prefix):
            continue
        code = lazy.files.entries[k][1]
        floating = code in ("F64", "F32", "F16", "BF16")
        rest[k] = lazy.files.read(k, dtype=lazy.dtype if floating else None).contiguous()
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
