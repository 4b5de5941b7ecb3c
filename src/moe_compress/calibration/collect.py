"""Collecting expert statistics over a calibration set, with an on-disk cache.

`collect_statistics` runs the layer-by-layer runner (one-shot: statistics of the original model) with the
observers the statistic names need and returns a `Statistics` ({layer: {name: tensor}} + meta). With a
``cache_dir`` the result is stored as ``stats.safetensors`` + ``stats.json`` in ``cache_dir/<key>/`` and reused
when the same key comes again. The key is the sha256 of: the model (local folder: its config.json bytes and
the name, size and mtime of each weight file; otherwise the id given), the model dtype, the calibration set
(its sha256, a sha256 of the token ids and mask, spec, n_samples, seq_len, seed), the statistic names and the
observer options. Without a model id nothing is cached (an in-memory model has no stable identity).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from moe_compress.calibration.observers import ROUTED_STATS
from moe_compress.calibration.runner import LayerRun, run_layers
from moe_compress.calibration.stats import Statistics
from moe_compress.models.registry import Adapter
from moe_compress.models.source import LayerSource

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$MOE_COMPRESS_CACHE`` or ``~/.cache/moe-compress``, subfolder ``stats``."""
    root = os.environ.get("MOE_COMPRESS_CACHE") or Path.home() / ".cache" / "moe-compress"
    return Path(root) / "stats"


def model_fingerprint(model_id: str) -> dict:
    """What identifies a model's weights: for a local folder its config bytes and weight files' (name, size,
    mtime); for anything else (a hub id) the id."""
    path = Path(model_id)
    if not path.is_dir():
        return {"id": model_id}
    cfg = path / "config.json"
    files = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")))
    return {"path": str(path.resolve()),
            "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None,
            "weights": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def tokens_sha256(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    h = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    if attention_mask is not None:
        h.update(attention_mask.to(torch.int8).contiguous().numpy().tobytes())
    return h.hexdigest()


def row_domains(domains, n_rows: int) -> tuple[torch.Tensor | None, list[str]]:
    """Per-row domain labels (a sequence of length N, or None) -> ([N] int64 ids, names in id order); ids follow
    the sorted names. (None, []) when there are no labels."""
    if domains is None or len(domains) != n_rows or n_rows == 0:
        return None, []
    labels = [str(d) for d in domains]
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[d] for d in labels], dtype=torch.long), names


def calibration_domains(calib) -> tuple[torch.Tensor | None, list[str]]:
    """`row_domains` of a calibration set (its optional ``domains`` labels, one per row of ``input_ids``)."""
    return row_domains(getattr(calib, "domains", None), int(calib.input_ids.shape[0]))


def calibration_info(calib) -> dict:
    ids = calib.input_ids
    mask = getattr(calib, "attention_mask", None)
    return {"spec": str(getattr(calib, "spec", "")), "sha256": getattr(calib, "sha256", None),
            "tokens_sha256": tokens_sha256(ids, mask), "n_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
            "seed": getattr(calib, "seed", None),
            "tokens": int(mask.sum()) if mask is not None else int(ids.numel())}


def cache_key(model_id: str, dtype: str, calib_info: dict, names: Sequence[str], options: dict) -> str:
    payload = {"version": CACHE_VERSION, "model": model_fingerprint(model_id), "dtype": dtype,
               "calibration": {k: v for k, v in calib_info.items() if k != "tokens"},
               "stats": sorted(set(names)), "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _model_dtype(model) -> str:
    p = next(model.parameters(), None)
    return str(p.dtype) if p is not None else "unknown"


def collect_statistics(
    model,
    adapter: Adapter,
    calib,
    names: Sequence[str] = ROUTED_STATS,
    *,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    observer_options: dict | None = None,
    layer_source: LayerSource | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Statistics:
    """Statistics ``names`` (routed ones always included) of every MoE layer of ``model`` on ``calib``.

    Args:
        calib: a calibration set (``input_ids`` [N, L], ``attention_mask`` [N, L] or None, optional ``domains``
            (one label per row), ``spec``, ``sha256``, ``seed``).
        names: statistics wanted, e.g. ``("output_similarity", "frequency_by_domain")``.
        model_id: the model's folder or hub id (enables the cache); cache_dir: cache root (None: no cache).
        layer_source: e.g. a `LazyCheckpoint` to read layers from disk one at a time.

    Returns:
        `Statistics` with tensors on CPU and meta: model, calibration, stats, options, domains, tokens,
        n_experts, top_k, cache_key, seconds, and ``cached`` (True when read from the cache).
    """
    names = list(dict.fromkeys([*ROUTED_STATS, *names]))
    options = dict(observer_options or {})
    dom_ids, dom_names = calibration_domains(calib)
    if "frequency_by_domain" in names:
        options.setdefault("n_domains", max(1, len(dom_names)))
    info = calibration_info(calib)
    key = None
    if cache_dir is not None and model_id is not None:
        key = cache_key(model_id, _model_dtype(model), info, names, options)
        hit = Path(cache_dir) / key
        if (hit / "stats.safetensors").is_file() and (hit / "stats.json").is_file():
            stats = Statistics.load(hit)
            if stats.meta.get("cache_key") == key:
                stats.meta["cached"] = True
                return stats

    t0 = time.perf_counter()
    layers: dict[int, dict[str, torch.Tensor]] = {}

    def on_layer(run: LayerRun) -> bool:
        if run.observer is not None:
            layers[run.index] = {k: v.detach().cpu() for k, v in run.observer.results().items()}
        return False

    run_layers(model, adapter, calib.input_ids, getattr(calib, "attention_mask", None), on_layer=on_layer,
               mode="oneshot", device=device, batch_size=batch_size, stats=tuple(names), observer_options=options,
               progress=progress, domains=dom_ids, layer_source=layer_source)
    meta = {"model": model_id, "calibration": info, "stats": names,
            "options": json.loads(json.dumps(options, default=str)), "domains": dom_names or None,
            "tokens": info["tokens"], "n_experts": adapter.n_experts(), "top_k": adapter.rule().top_k,
            "dtype": _model_dtype(model), "cache_key": key, "seconds": round(time.perf_counter() - t0, 3)}
    stats = Statistics(layers, meta)
    if key is not None and cache_dir is not None:
        _store(stats, Path(cache_dir), key)
    stats.meta["cached"] = False
    return stats


def _store(stats: Statistics, root: Path, key: str) -> None:
    """Write into ``root/key`` atomically (a temporary folder renamed into place; a concurrent writer wins)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.tmp-", dir=root))
    try:
        stats.save(tmp)
        try:
            tmp.rename(root / key)
        except OSError:
            pass  # already there (written by another run): keep that one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
