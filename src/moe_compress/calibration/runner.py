"""The layer runner: the one loop over decoder layers behind every way moe-compress executes.

Embeddings first, then for each decoder layer: a `LayerSource` brings the layer to the device, every calibration
batch of this process runs through it with the statistics observers installed, a `BatchSplit` joins the
statistics of all processes, the `LayerSink` acts on the finished layer (collect statistics, plan and apply a
compression) and, once its outputs are final, commits it (write a shard, record progress); the outputs become
the next layer's inputs and the source puts the layer away. Peak device memory is one decoder layer plus the
activations of one calibration batch (every batch's hidden states live on ``offload_device``, CPU by default,
between layers).

The configurations (as llm-compressor's sequential pipeline: one layer on the device at a time, modifiers acting
at layer end):

=====================  ==========================  ======================  ====================================
run                    source                      split                   sink
=====================  ==========================  ======================  ====================================
in-memory compress     `LayerSource` (model's own)  one process            plan + surgery (`pipeline.ApplySink`)
streaming compress     `models.lazy.LazyCheckpoint` one process            plan + layer shard + progress
                                                                           (`streaming.StreamSink`); resumes
                                                                           with ``start`` and ``hidden``
torchrun               `LazyCheckpoint`             `distributed.DistContext` as streaming; rank 0 writes
bench, statistics      `LayerSource`               one process             keep each layer's statistics
=====================  ==========================  ======================  ====================================

How the per-layer keyword arguments (rotary embeddings, attention masks per attention type, ...) are obtained
without re-implementing each family's forward: every decoder layer is temporarily replaced by a recorder that
stores its inputs and returns them unchanged, and the base model is called once per batch. This costs the
embeddings and mask construction only, and works for any architecture whose layers are called in order. The
recorded arguments are kept on ``offload_device`` (tensors shared between layers stay shared) and moved to the
device per batch.

Modes: ``oneshot`` (default) feeds layer i+1 with the outputs of the ORIGINAL layer i; ``sequential`` feeds it
with the outputs of layer i after the sink changed it (compressed), so later decisions see earlier compression.

The default `LayerSource` lives in `moe_compress.models.source` (below `calibration/`, since
`moe_compress.models.lazy.LazyCheckpoint` is one too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence

import torch

from moe_compress.calibration.observers import InputCapture, ObservedExperts, make_observers
from moe_compress.models.loading import CausalLM
from moe_compress.models.registry import Adapter
from moe_compress.models.source import Device, LayerSource

Progress = Callable[[str, int, int], None]
Mode = Literal["oneshot", "sequential"]


@dataclass
class LayerRun:
    """What the sink receives when every batch went through decoder layer ``index``.

    observer: the statistics observer of an MoE layer (None for dense layers and when there is no calibration
    data; ``observer.results()`` gives every statistic, joined over all processes); moe_inputs: the MoE block's
    input hidden states of real tokens [T, H] (only if ``keep_moe_inputs``; all processes' tokens in batch
    order); moe_domains: their calibration domain ids [T] int64 (with ``keep_moe_inputs`` and domains; else
    None); is_moe: the layer has a routed-experts block (also without data).
    """

    index: int
    layer: torch.nn.Module
    observer: ObservedExperts | None
    moe_inputs: torch.Tensor | None
    moe_domains: torch.Tensor | None = None
    is_moe: bool = False


class BatchSplit(Protocol):
    """Which calibration batches this process runs and how the processes' statistics are joined
    (`SingleProcess`; `moe_compress.distributed.DistContext` under torchrun: batch b on rank b mod N)."""

    def local_batches(self, n_batches: int) -> list[int]:
        """The indices (ascending) of the batches this process runs, of ``n_batches``."""
        ...

    def reduce(self, observer: ObservedExperts, capture: InputCapture | None, local: list[int]) -> None:
        """Make ``observer`` (and ``capture``) hold the statistics of every process's batches."""
        ...


class SingleProcess:
    """One process runs every batch; nothing to join."""

    def local_batches(self, n_batches: int) -> list[int]:
        return list(range(n_batches))

    def reduce(self, observer: ObservedExperts, capture: InputCapture | None, local: list[int]) -> None:
        pass


class LayerSink:
    """What happens at the end of each decoder layer. ``after_layer`` sees the statistics and may change the
    layer (return True: in ``sequential`` mode its outputs are then recomputed); ``commit`` is called once the
    layer's outputs are final, before the source releases the layer (``hidden``: this process's outputs, the next
    layer's inputs, [B, L, H] per local batch on the offload device)."""

    def after_layer(self, run: LayerRun) -> bool:
        return False

    def commit(self, index: int, layer: torch.nn.Module, hidden: list[torch.Tensor]) -> None:
        pass


class CallbackSink(LayerSink):
    """A sink from a plain ``on_layer(run) -> changed`` callable (the `run_layers` interface)."""

    def __init__(self, on_layer: Callable[[LayerRun], bool | None] | None):
        self.on_layer = on_layer

    def after_layer(self, run: LayerRun) -> bool:
        return bool(self.on_layer(run)) if self.on_layer is not None else False


@dataclass
class CalibrationBatches:
    """The calibration rows cut into batches of ``batch_size`` rows; ``local``: the batches this process runs.

    input_ids: [N, L] token ids; attention_mask: [N, L] (1 = real token) or None; domains: [N] int64 domain id
    of each row, or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    domains: torch.Tensor | None
    batch_size: int
    local: list[int] = field(default_factory=list)

    @classmethod
    def split(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              domains: torch.Tensor | None = None, batch_size: int = 8,
              split: BatchSplit | None = None) -> CalibrationBatches:
        n = math.ceil(int(input_ids.shape[0]) / batch_size)
        return cls(input_ids, attention_mask, domains, batch_size, (split or SingleProcess()).local_batches(n))

    @property
    def n_batches(self) -> int:
        return math.ceil(int(self.input_ids.shape[0]) / self.batch_size)

    def rows(self, b: int) -> slice:
        return slice(b * self.batch_size, (b + 1) * self.batch_size)

    def token_mask(self, b: int) -> torch.Tensor:
        """[B * L] bool: the real tokens of batch ``b``."""
        if self.attention_mask is None:
            return torch.ones(self.input_ids[self.rows(b)].numel(), dtype=torch.bool)
        return self.attention_mask[self.rows(b)].reshape(-1).bool()

    def token_domains(self, b: int) -> torch.Tensor | None:
        """[B * L] int64: the domain of every token of batch ``b`` (None without domains)."""
        if self.domains is None:
            return None
        return self.domains[self.rows(b)].to(torch.long).repeat_interleave(self.input_ids.shape[1])

    def real_tokens(self) -> list[int]:
        """Real tokens of every batch (all processes')."""
        return [int(self.token_mask(b).sum()) for b in range(self.n_batches)]


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer i during input capture: records (args, kwargs), returns the input."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.store.append((args, kwargs))
        return hidden_states


def capture_layer_inputs(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         device: Device, batch_size: int) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Embeddings of every batch ([B, S, H] each) and, per layer, per batch, the (args, kwargs) it is called
    with. Runs the base model with recorder layers; the real layers never run here. The modules outside the
    layers are left on ``device``."""
    base: Any = getattr(model, "model", model)
    layers = base.layers
    per_layer: list[list[tuple]] = [[] for _ in layers]
    originals = list(layers)
    embeds: list[torch.Tensor] = []
    hook = base.embed_tokens.register_forward_hook(lambda m, a, out: embeds.append(out.detach()))
    moved = [m for name, m in base.named_children() if name != "layers"]
    try:
        for i in range(len(layers)):
            layers[i] = _Recorder(per_layer[i])
        for m in moved:
            m.to(device)
        with torch.inference_mode():
            for s in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[s:s + batch_size].to(device)
                am = None if attention_mask is None else attention_mask[s:s + batch_size].to(device)
                base(input_ids=ids, attention_mask=am, use_cache=False)
    finally:
        hook.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    return embeds, per_layer


def move(obj: Any, device: Device, memo: dict | None = None) -> Any:
    """Tensors inside args/kwargs (tuples, lists, dicts) moved to ``device``; with ``memo``, a tensor shared
    between calls stays shared."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device))
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(move(x, device, memo) for x in obj)
    if isinstance(obj, list):
        return [move(x, device, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: move(v, device, memo) for k, v in obj.items()}
    return obj


@dataclass
class LayerRunner:
    """The layer loop (see the module docstring), configured by its hooks.

    source: where layer weights come from; split: the batches of this process and the join of statistics;
    stats / observer_options: statistics wanted beyond the routed ones (their `LayerObserver` plug-ins) and the
    plug-ins' options (the runner adds ``total_tokens``, all processes' real calibration tokens);
    keep_moe_inputs: hand the sink the MoE block's inputs [T, H].
    """

    model: CausalLM
    adapter: Adapter
    source: LayerSource = field(default_factory=LayerSource)
    split: BatchSplit = field(default_factory=SingleProcess)
    mode: Mode = "oneshot"
    device: Device = "cpu"
    offload_device: Device = "cpu"
    keep_moe_inputs: bool = False
    stats: Sequence[str] = ()
    observer_options: dict = field(default_factory=dict)

    def run(self, batches: CalibrationBatches | None, sink: LayerSink, *, start: int = 0,
            hidden: list[torch.Tensor] | None = None, progress: Progress | None = None) -> list[torch.Tensor]:
        """Run layers ``start``.. of the model on ``batches`` (None: no data, the sink still sees every layer).

        hidden: the inputs of layer ``start`` per local batch ([B, L, H] each; required when ``start`` > 0 with
        data: the outputs of layer ``start - 1`` of an earlier run). progress(stage, done, total): stage
        "layers" once per layer after its commit, "batches" (done = 1..total) within each pass over the batches.

        Returns this process's final hidden states per local batch ([B, L, H], before the final norm), on the
        offload device.
        """
        self.model.eval()
        layers = self.adapter.decoder_layers(self.model)
        moe_blocks = self.adapter.moe_blocks(self.model)
        calls: list[list[tuple]] = [[] for _ in layers]
        masks: list[torch.Tensor] = []
        domains: list[torch.Tensor | None] = []
        offsets: list[int] = []
        options = dict(self.observer_options)
        if batches is not None and start < len(layers):
            real = batches.real_tokens()
            options["total_tokens"] = sum(real)
            masks = [batches.token_mask(b) for b in batches.local]
            domains = [batches.token_domains(b) for b in batches.local]
            offsets = [sum(real[:b]) for b in batches.local]
            embeds = self._capture(batches, calls)
            if start == 0:
                hidden = embeds
            elif hidden is None or len(hidden) != len(batches.local):
                raise ValueError(f"resuming at layer {start} needs the hidden states of the "
                                 f"{len(batches.local)} local batches")
            del embeds
        hidden = list(hidden or [])
        for i in range(start, len(layers)):
            layer = layers[i]
            observer = capture = run = None  # drop the previous layer's views before loading
            self.source.load(i, layer, self.device)
            if batches is not None and i in moe_blocks:
                view = self.adapter.layer(self.model, i, moe_blocks[i])
                extra = make_observers(view, tuple(self.stats), **options)
                if self.keep_moe_inputs:
                    capture = InputCapture(view, offload_device=self.offload_device)
                    extra.append(capture)
                observer = ObservedExperts(view, extra).install()
                del view, extra
            outputs = hidden
            if batches is not None:
                outputs = self._forward(layer, hidden, calls[i], masks, observer, domains, offsets, progress)
            if observer is not None:
                observer.remove()
                self.split.reduce(observer, capture, batches.local if batches is not None else [])
            run = LayerRun(i, layer, observer, None if capture is None else capture.inputs(),
                           None if capture is None else capture.domains(), i in moe_blocks)
            changed = sink.after_layer(run)
            if changed and self.mode == "sequential" and batches is not None:
                outputs = self._forward(layer, hidden, calls[i], masks, None, domains, offsets, progress)
            observer = capture = run = None  # noqa: F841  (the layer's statistics are gone before it is committed)
            hidden = outputs
            calls[i] = []
            sink.commit(i, layer, hidden)
            self.source.release(i, layer, self.offload_device)
            if progress:
                progress("layers", i + 1, len(layers))
        return hidden

    def _capture(self, batches: CalibrationBatches, calls: list[list[tuple]]) -> list[torch.Tensor]:
        """Embeddings of each local batch ([B, L, H] on the offload device), and each layer's recorded call per
        batch appended to ``calls`` (on the offload device). One batch at a time, so that only one batch's
        embeddings and kwargs are on the device; the modules outside the layers go back to the offload device."""
        embeds = []
        for b in batches.local:
            mask = None if batches.attention_mask is None else batches.attention_mask[batches.rows(b)]
            emb, per_layer = capture_layer_inputs(self.model, batches.input_ids[batches.rows(b)], mask, self.device,
                                                  batches.batch_size)
            memo: dict = {}
            embeds.append(emb[0].to(self.offload_device))
            for i, per in enumerate(per_layer):
                calls[i].append(move(per[0], self.offload_device, memo))
            del emb, per_layer, memo
        if batches.local:
            base: Any = getattr(self.model, "model", self.model)
            for name, m in base.named_children():
                if name != "layers":
                    m.to(self.offload_device)
        return embeds

    def _forward(self, layer: torch.nn.Module, hidden: list[torch.Tensor], calls: list[tuple],
                 masks: list[torch.Tensor], observer: ObservedExperts | None,
                 domains: Sequence[torch.Tensor | None], offsets: list[int],
                 progress: Progress | None) -> list[torch.Tensor]:
        """Every local batch through ``layer``: [B, L, H] in -> [B, L, H] out per batch. Subsample selectors get
        each batch's global real-token offset (so that every process subsamples the same tokens)."""
        outs = []
        with torch.inference_mode():
            for b, (h, (args, kwargs), mask, dom, off) in enumerate(zip(hidden, calls, masks, domains, offsets)):
                if observer is not None:
                    observer.token_mask = mask.to(self.device)
                    observer.token_domain = None if dom is None else dom.to(self.device)
                    for obs in observer.extra:
                        sel = getattr(obs, "select", None)
                        if sel is not None and hasattr(sel, "seen"):
                            sel.seen = off
                out = layer(h.to(self.device), *move(args, self.device), **move(kwargs, self.device))
                out = out[0] if isinstance(out, tuple) else out
                outs.append(out.detach().to(self.offload_device))
                if progress:
                    progress("batches", b + 1, len(hidden))
        return outs


def run_layers(
    model: CausalLM,
    adapter: Adapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    on_layer: Callable[[LayerRun], bool | None] | None = None,
    mode: Mode = "oneshot",
    device: Device = "cpu",
    offload_device: Device = "cpu",
    batch_size: int = 8,
    keep_moe_inputs: bool = False,
    stats: tuple[str, ...] | list[str] = (),
    observer_options: dict | None = None,
    progress: Progress | None = None,
    domains: torch.Tensor | None = None,
    layer_source: LayerSource | None = None,
) -> list[torch.Tensor]:
    """`LayerRunner` in one process with a callback sink: run the calibration set through the decoder layers.

    Args:
        input_ids: [N, L] token ids; attention_mask: [N, L] (1 = real token) or None.
        on_layer: called after all batches went through layer i; may change the layer (compression). Its
            return value True means "the layer changed": in ``sequential`` mode its outputs are recomputed.
        keep_moe_inputs, stats, observer_options: as `LayerRunner`.
        progress: as `LayerRunner.run`.
        domains: [N] int64 domain id of each row, or None: observers see per-token ids as ``token_domain``.
        layer_source: where layer weights come from (default: the model's layers, moved to ``device``).

    Returns:
        the final hidden states per batch ([B, L, H] each, before the final norm), on ``offload_device``.
    """
    runner = LayerRunner(model, adapter, source=layer_source or LayerSource(), mode=mode, device=device,
                         offload_device=offload_device, keep_moe_inputs=keep_moe_inputs, stats=tuple(stats),
                         observer_options=dict(observer_options or {}))
    batches = CalibrationBatches.split(input_ids, attention_mask, domains, batch_size)
    return runner.run(batches, CallbackSink(on_layer), progress=progress)
