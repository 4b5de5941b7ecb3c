"""Per-layer expert statistics as named tensors (``layers.{i}.{statistic}``), saved as safetensors + JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Statistics:
    """{layer index: {statistic: tensor}} plus a JSON-able ``meta`` (model, calibration spec, tokens, ...)."""

    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def flat(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{k}": v.detach().cpu().contiguous()
                for i, d in sorted(self.layers.items()) for k, v in d.items()}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.flat(), str(folder / "stats.safetensors"))
        (folder / "stats.json").write_text(json.dumps(self.summary(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "Statistics":
        folder = Path(folder)
        flat = load_file(str(folder / "stats.safetensors"))
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            _, idx, name = key.split(".", 2)
            layers.setdefault(int(idx), {})[name] = value
        meta = json.loads((folder / "stats.json").read_text()).get("meta", {})
        return cls(layers, meta)

    def summary(self) -> dict:
        """A JSON summary: meta, and per layer the routed statistics as lists (matrices summarised)."""
        out = {"meta": self.meta, "layers": {}}
        for i, d in sorted(self.layers.items()):
            out["layers"][str(i)] = {k: [round(float(x), 6) for x in v.flatten()] if v.dim() == 1
                                     else {"shape": list(v.shape)} for k, v in d.items()}
        return out
