"""Writing a checkpoint layer by layer: one safetensors shard per decoder layer (+ one for the weights outside
the layers), hub-style key names, and the ``model.safetensors.index.json`` that ties them together.

Used by streaming compression (`moe_compress.streaming`), which never holds the whole model: each compressed
decoder layer is converted to hub names and written as soon as it is done. The names are the ones
`save_pretrained` writes for the same model (per-expert ``experts.{e}.{gate,up,down}`` tensors for the fused
families, the family's disk renames such as Mixtral's ``block_sparse_moe``), so transformers and vLLM load the
result like the in-memory export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moe_compress.models.lazy import DISK_NAMES, memory_to_disk


def shard_name(index: int, total: int) -> str:
    """``model-00003-of-00009.safetensors`` for 0-based ``index``."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def hub_tensors(model_type: str, layout: str, prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory (transformers 5) state-dict entries under ``prefix`` -> {hub key: contiguous CPU tensor}.

    Fused expert tensors (``...experts.gate_up_proj [E, 2I, H]``, ``...experts.down_proj [E, H, I]``) are split
    into one tensor per expert and projection (layout ``fused``); gpt_oss keeps its fused hub names.
    """
    names = DISK_NAMES[model_type]
    gate, up, down = names.expert_leaves
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = prefix + name
        t = t.detach().to("cpu")
        leaf = key.rsplit(".", 1)[-1]
        if layout == "fused" and leaf in ("gate_up_proj", "down_proj") and ".experts." in key:
            base = key.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if leaf == "down_proj":
                    out[memory_to_disk(f"{base}.{e}.{down}.weight", names)] = t[e].contiguous().clone()
                else:
                    inter = t.shape[1] // 2
                    out[memory_to_disk(f"{base}.{e}.{gate}.weight", names)] = t[e, :inter].contiguous().clone()
                    out[memory_to_disk(f"{base}.{e}.{up}.weight", names)] = t[e, inter:].contiguous().clone()
        else:
            out[memory_to_disk(key, names)] = t.contiguous().clone()
    return out


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors shard atomically (a temporary file renamed into place), fsynced."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def shard_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file (header only)."""
    import struct

    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    return [k for k in header if k != "__metadata__"]


def write_index(folder: Path, shards: list[str]) -> dict[str, str]:
    """``model.safetensors.index.json`` for the given shard files of ``folder``; returns the weight map."""
    weight_map: dict[str, str] = {}
    total = 0
    for name in shards:
        f = folder / name
        for k in shard_keys(f):
            weight_map[k] = name
        total += f.stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
