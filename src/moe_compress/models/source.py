"""Where a decoder layer's weights come from while the layer-by-layer runner works on it.

`LayerSource` (the default) keeps the model's own in-memory layers and moves each one to the device before it
runs and back afterwards; `moe_compress.models.lazy.LazyCheckpoint` reads each layer from the safetensors
shards instead. It lives in `models/` (below `calibration/`) because both the runner
(`calibration.runner.LayerRunner`, whose other hooks are `BatchSplit` and `LayerSink`) and the lazy checkpoint
(`models.lazy`) use it.
"""

from __future__ import annotations

import torch

Device = str | torch.device


class LayerSource:
    """Brings decoder layer ``index`` to ``device`` before it runs and puts it away afterwards (in memory: move
    it back to ``offload_device``)."""

    def load(self, index: int, layer: torch.nn.Module, device: Device) -> None:
        layer.to(device)

    def release(self, index: int, layer: torch.nn.Module, offload_device: Device) -> None:
        layer.to(offload_device)
