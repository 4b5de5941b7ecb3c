"""The layer-by-layer calibration runner.

Embeddings first, then for each decoder layer: bring the layer to the device, run every calibration batch
through it, let the layer's callback act (collect statistics, plan and apply a compression), keep the outputs
as the next layer's inputs, and move the layer back. Peak device memory is one decoder layer plus the
activations of the calibration set (kept on ``offload_device``, CPU by default, between layers).

How the per-layer keyword arguments (rotary embeddings, attention masks per attention type, ...) are obtained
without re-implementing each family's forward: every decoder layer is temporarily replaced by a recorder that
stores its inputs and returns them unchanged, and the base model is called once per batch. This costs the
embeddings and mask construction only, and works for any architecture whose layers are called in order.

Modes: ``oneshot`` (default) feeds layer i+1 with the outputs of the ORIGINAL layer i; ``sequential`` feeds it
with the outputs of layer i after the callback changed it (compressed), so later decisions see earlier
compression.

Where the weights come from is a `LayerSource` (`moe_compress.models.source`): by default the model's own
(in-memory) layers, moved to the device and back; `moe_compress.models.lazy.LazyCheckpoint` instead reads each
decoder layer from the safetensors shards just before it runs and drops it afterwards, so the whole model never
has to fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from moe_compress.calibration.observers import InputCapture, ObservedExperts, make_observers
from moe_compress.models.loading import CausalLM
from moe_compress.models.registry import Adapter
from moe_compress.models.source import Device, LayerSource


@dataclass
class LayerRun:
    """What the callback of one decoder layer receives.

    observer: the statistics observer of an MoE layer (None for dense layers; ``observer.results()`` gives
    every statistic); moe_inputs: the MoE block's input hidden states of real tokens [T, H] (only if
    ``keep_moe_inputs``); moe_domains: their calibration domain ids [T] int64 (with ``keep_moe_inputs`` and
    ``domains``; else None).
    """

    index: int
    layer: torch.nn.Module
    observer: ObservedExperts | None
    moe_inputs: torch.Tensor | None
    moe_domains: torch.Tensor | None = None


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
    with. Runs the base model with recorder layers; the real layers never run here."""
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


def run_layers(
    model: CausalLM,
    adapter: Adapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    on_layer: Callable[[LayerRun], bool | None] | None = None,
    mode: Literal["oneshot", "sequential"] = "oneshot",
    device: str | torch.device = "cpu",
    offload_device: str | torch.device = "cpu",
    batch_size: int = 8,
    keep_moe_inputs: bool = False,
    stats: tuple[str, ...] | list[str] = (),
    observer_options: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    domains: torch.Tensor | None = None,
    layer_source: LayerSource | None = None,
) -> list[torch.Tensor]:
    """Run the calibration set through the decoder layers one at a time.

    Args:
        input_ids: [N, L] token ids; attention_mask: [N, L] (1 = real token) or None.
        on_layer: called after all batches went through layer i; may change the layer (compression). Its
            return value True means "the layer changed": in ``sequential`` mode its outputs are recomputed.
        keep_moe_inputs: also hand the callback the MoE block's inputs of the real tokens [T, H] (for methods
            that reconstruct layer outputs).
        stats: statistics wanted beyond the routed ones (installs their `LayerObserver` plug-ins);
            observer_options: keyword options passed to those plug-ins (the runner adds ``total_tokens``, the
            number of real calibration tokens, for plug-ins that subsample).
        progress: called as progress(stage, done, total) with stage "layers" (once per layer) and "batches"
            (done = 1..total within each pass over the batches of a layer).
        domains: [N] int64 domain id of each row, or None: observers see per-token ids as ``token_domain``.
        layer_source: where layer weights come from (default: the model's layers, moved to ``device``).

    Returns:
        the final hidden states per batch ([B, L, H] each, before the final norm), on ``offload_device``.
    """
    model.eval()
    embeds, per_layer_inputs = capture_layer_inputs(model, input_ids, attention_mask, device, batch_size)
    hidden = [h.to(offload_device) for h in embeds]
    n_rows = input_ids.shape[0]
    token_masks = [
        (torch.ones(h.shape[0] * h.shape[1], dtype=torch.bool) if attention_mask is None
         else attention_mask[s:s + batch_size].reshape(-1).bool())
        for h, s in zip(hidden, range(0, n_rows, batch_size))
    ]
    token_domains = [None] * len(hidden) if domains is None else [
        domains[s:s + batch_size].to(torch.long).repeat_interleave(h.shape[1])
        for h, s in zip(hidden, range(0, n_rows, batch_size))
    ]
    options = {**(observer_options or {}), "total_tokens": int(sum(int(m.sum()) for m in token_masks))}
    source = layer_source or LayerSource()
    moe_blocks = adapter.moe_blocks(model)
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):
        observer = capture = view = extra = run = None  # drop the previous layer's views before loading
        source.load(i, layer, device)
        if i in moe_blocks:
            view = adapter.layer(model, i, moe_blocks[i])
            extra = make_observers(view, stats, **options)
            if keep_moe_inputs:
                capture = InputCapture(view, offload_device=offload_device)
                extra.append(capture)
            observer = ObservedExperts(view, extra).install()
        outputs = _forward_batches(layer, hidden, per_layer_inputs[i], token_masks, observer, device,
                                   offload_device, token_domains, progress)
        if observer is not None:
            observer.remove()
        changed = False
        if on_layer is not None:
            run = LayerRun(i, layer, observer, None if capture is None else capture.inputs(),
                           None if capture is None else capture.domains())
            changed = bool(on_layer(run))
        if changed and mode == "sequential":
            outputs = _forward_batches(layer, hidden, per_layer_inputs[i], token_masks, None, device,
                                       offload_device, token_domains, progress)
        hidden = outputs
        source.release(i, layer, offload_device)
        per_layer_inputs[i] = []
        if progress:
            progress("layers", i + 1, len(layers))
    return hidden


def _forward_batches(layer: torch.nn.Module, hidden: list[torch.Tensor], calls: list[tuple],
                     token_masks: list[torch.Tensor], observer: ObservedExperts | None, device: Device,
                     offload_device: Device, token_domains: Sequence[torch.Tensor | None] | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> list[torch.Tensor]:
    outs = []
    token_domains = token_domains or [None] * len(hidden)
    with torch.inference_mode():
        for b, (h, (args, kwargs), mask, dom) in enumerate(zip(hidden, calls, token_masks, token_domains)):
            if observer is not None:
                observer.token_mask = mask.to(device)
                observer.token_domain = None if dom is None else dom.to(device)
            out = layer(h.to(device), *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            outs.append(out.detach().to(offload_device))
            if progress:
                progress("batches", b + 1, len(hidden))
    return outs
