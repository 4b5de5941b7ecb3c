"""The dtype each tensor of a compressed checkpoint is written in.

Compression computes in ``Recipe.dtype`` (float32 by default: statistics, merges and least-squares fits in
full precision), but the written checkpoint takes ``Recipe.save_dtype``:

- ``source`` (default): every tensor in the dtype its counterpart has in the source checkpoint's safetensors
  files (a bfloat16 checkpoint stays bfloat16; a float32 DeepSeek ``e_score_correction_bias`` beside bfloat16
  weights stays float32). Tensors the source does not hold, or a source whose files cannot be found (a hub id
  not in the local cache), take the source's main dtype: the floating dtype holding most bytes on disk, else
  ``config.dtype``, else float32.
- ``float32`` / ``bfloat16`` / ``float16``: every floating tensor in that dtype, except those that transformers
  itself keeps in float32 whatever the load dtype (the model class's ``_keep_in_fp32_modules`` and
  ``_keep_in_fp32_modules_strict``, e.g. DeepSeek-V3's router weight and correction bias).

Integer and boolean tensors are never cast. A `SavePolicy` is resolved once per run and applied both by the
in-memory exporter (`cast_model`) and by the streaming writer (`SavePolicy.cast` per hub-named tensor).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAVE_DTYPES = ("source", "float32", "bfloat16", "float16")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class SavePolicy:
    """``mode``: one of `SAVE_DTYPES`; ``source``: {hub key: dtype} of the source's floating tensors (empty when
    its files are unknown); ``main``: the dtype of tensors without a source entry (``source`` mode) or the
    requested dtype; ``keep_fp32``: module-name fragments kept in float32 under an explicit dtype."""

    mode: str
    main: torch.dtype
    source: dict[str, torch.dtype] = field(default_factory=dict)
    keep_fp32: tuple[str, ...] = ()

    def dtype_for(self, key: str, current: torch.dtype) -> torch.dtype:
        """The dtype hub tensor ``key`` (now in ``current``) is written in."""
        if not current.is_floating_point:
            return current
        if self.mode == "source":
            return self.source.get(key, self.main)
        if any(_matches(key, frag) for frag in self.keep_fp32):
            return torch.float32
        return self.main

    def cast(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{hub key: tensor} with every tensor in its written dtype."""
        return {k: t.to(self.dtype_for(k, t.dtype)) for k, t in tensors.items()}

    def describe(self) -> dict:
        """For compression.json: the mode and the main written dtype."""
        return {"save_dtype": self.mode, "main_dtype": _name(self.main),
                "dtypes_from": "source checkpoint files" if self.source else "config"}


def _matches(key: str, fragment: str) -> bool:
    """transformers' rule for ``_keep_in_fp32_modules``: the fragment is a dotted part of the name."""
    return f".{fragment}." in f".{key}." or key.endswith(f".{fragment}") or key == fragment


def source_folder(spec_path: str) -> Path | None:
    """The local folder holding a model's safetensors files: the folder itself, or the hub cache snapshot of a
    hub id when it is cached; None if neither."""
    p = Path(spec_path)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec_path, "config.json")
    except Exception:  # noqa: BLE001 - no cache, bad id: the policy falls back to the config dtype
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def source_dtypes(folder: Path | None) -> tuple[dict[str, torch.dtype], dict[str, int]]:
    """({hub key: stored dtype}, {hub key: bytes}) of the floating tensors in ``folder``'s safetensors files, from
    one read of their headers; both empty without such files."""
    if folder is None or not any(folder.glob("*.safetensors")):
        return {}, {}
    from moe_compress.models.lazy import SafetensorsFolder

    files = SafetensorsFolder(folder)
    dtypes, sizes = {}, {}
    for key in files.keys():
        dt = files.dtype(key)
        if dt is not None and dt.is_floating_point:
            dtypes[key], sizes[key] = dt, files.entries[key][4]
    return dtypes, sizes


def main_dtype(files: dict[str, torch.dtype], sizes: dict[str, int] | None, config) -> torch.dtype:
    """The floating dtype holding most bytes (most tensors if sizes are unknown), else ``config.dtype``,
    else float32."""
    if files:
        count: Counter = Counter()
        for k, file_dtype in files.items():
            count[file_dtype] += (sizes or {}).get(k, 1)
        return count.most_common(1)[0][0]
    dt: object = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def resolve_policy(save_dtype: str, source_path: str, config, model_class=None) -> SavePolicy:
    """The `SavePolicy` for writing a compression of the model at ``source_path`` (a folder or hub id)."""
    if save_dtype not in SAVE_DTYPES:
        from moe_compress.errors import UserError

        raise UserError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, not {save_dtype!r}")
    if save_dtype != "source":
        keep = tuple(getattr(model_class, "_keep_in_fp32_modules", None) or ()) + tuple(
            getattr(model_class, "_keep_in_fp32_modules_strict", None) or ())
        return SavePolicy(save_dtype, getattr(torch, save_dtype), keep_fp32=keep)
    files, sizes = source_dtypes(source_folder(source_path))
    return SavePolicy("source", main_dtype(files, sizes, config), files)


def cast_model(model, adapter, policy: SavePolicy) -> None:
    """Cast ``model``'s saved tensors (parameters and persistent buffers) in place to their written dtypes and
    set ``config.dtype`` to the policy's main dtype."""
    seen: set[int] = set()
    for key, ref in model.state_dict(keep_vars=True).items():
        target = policy.dtype_for(adapter.spec.hub_name(key), ref.dtype)
        if id(ref) in seen or ref.dtype == target:
            continue
        seen.add(id(ref))
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if isinstance(ref, torch.nn.Parameter):
            ref.data = ref.data.to(target)
        else:
            module._buffers[leaf] = ref.to(target)
    model.config.dtype = policy.main


def written_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def written_summary(folder: Path) -> tuple[int, dict[str, int]]:
    """(number of tensor elements, {dtype name: number of tensors}) of ``folder``'s safetensors files, from one
    read of their headers."""
    import math

    from moe_compress.models.lazy import SafetensorsFolder

    files = SafetensorsFolder(folder)
    count = Counter(_name(dt) if (dt := files.dtype(k)) is not None else files.entries[k][1] for k in files.keys())
    return sum(math.prod(files.shape(k)) for k in files.keys()), dict(sorted(count.items()))
