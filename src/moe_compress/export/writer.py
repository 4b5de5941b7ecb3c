"""Writing a compressed checkpoint: weights with hub-style key names, config, tokenizer, compression.json and a
model card, all written into a temporary folder beside the destination and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from moe_compress.errors import UserError, is_disk_full
from moe_compress.export.dtypes import SavePolicy, cast_model, written_bytes, written_summary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def check_output_dir(out: str | Path, overwrite: bool, needed_bytes: int | None = None) -> Path:
    """Refuse an output that cannot be written, before any work: an existing folder unless ``overwrite``, a
    path whose nearest existing ancestor is a file or a folder this process cannot write (permissions, a
    read-only file system), and, given ``needed_bytes`` (the estimated size of what will be written), a file
    system with less free space than that. Every refusal is a one-line `UserError`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    anchor = _nearest_existing(out.parent)
    if not anchor.is_dir():
        raise UserError(f"cannot create {out}: {anchor} is a file, not a folder; choose another --out")
    if not _writable(anchor):
        raise UserError(f"cannot write {out}: no permission to write in {anchor.resolve()} (or it is on a "
                        "read-only file system); choose another --out (nothing was written)")
    if needed_bytes:
        free = shutil.disk_usage(anchor).free
        if free < needed_bytes:
            raise UserError(f"no space left on the device of {anchor.resolve()} for {out.name}: it needs about "
                            f"{_size(needed_bytes)} and {_size(free)} are free; free some space or choose another "
                            "--out (nothing was written)")
    return out


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what ``mkdir(parents=True)`` would create folders in)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    """True when this process may create entries in ``folder``: write + search permission (``os.access``, which
    also answers False on a read-only file system, even for root) and a file system not mounted read-only."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        return not os.statvfs(folder).f_flag & os.ST_RDONLY
    except (AttributeError, OSError):  # no statvfs (Windows)
        return True


def _size(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def current_umask() -> int:
    """The process umask, read by setting it and restoring it at once (POSIX has no call that only reads it; the
    moment in between is harmless here: no other thread creates files while an output folder is set up)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` / ``open`` would give them (folders
    0777, files 0666, minus the umask). `tempfile.mkdtemp` makes the folder 0700, and the weights writer creates
    ``model.safetensors`` through a private temporary file (0600): left so, nobody else on a shared machine
    could read the compressed model."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def move_into_place(finished: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an existing ``out`` is moved aside first and removed after."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{finished.name[-8:]}")
        out.rename(old)
        finished.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        finished.rename(out)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is removed."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask_modes(tmp)
        move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise UserError(f"no space left on the device of {out.parent.resolve()} while writing {out.name}: free "
                            "some space or choose another --out (nothing was written)") from e
        raise


def save_model(model, folder: Path, max_shard_size: str = "2GB") -> None:
    """``save_pretrained`` with hub-style per-expert key names (what transformers and vLLM read).

    A model loaded from a checkpoint in transformers' fused format keeps ``_weight_conversions == []`` and
    would re-save fused names; resetting it to None restores the hub conversion.
    """
    if getattr(model, "_weight_conversions", None) == []:
        model._weight_conversions = None
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)


def keep_source_architectures(folder: Path, source: str | Path | None) -> None:
    """Write the source config's ``architectures`` back into ``folder/config.json``.

    `save_pretrained` records transformers' class name, which is not always the name the hub checkpoint (and so
    vLLM's model registry) uses: Phi-3.5-MoE is ``PhiMoEForCausalLM`` on the hub and in vLLM but
    ``PhimoeForCausalLM`` in transformers, and vLLM would fall back to its generic Transformers backend for the
    latter. Both names load the same class in transformers (it picks the class by ``model_type``)."""
    if source is None or not (Path(source) / "config.json").is_file():
        return
    original = json.loads((Path(source) / "config.json").read_text()).get("architectures")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if original and cfg.get("architectures") != original:
        cfg["architectures"] = original
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(source: str | Path | None, folder: Path, tokenizer=None) -> list[str]:
    """Copy tokenizer files from a local checkpoint folder (or save ``tokenizer``); returns the file names."""
    copied = []
    if source is not None and Path(source).is_dir():
        for name in TOKENIZER_FILES:
            src = Path(source) / name
            if src.is_file() and not (folder / name).exists():
                shutil.copy2(src, folder / name)
                copied.append(name)
    if not copied and tokenizer is not None:
        copied = [Path(p).name for p in tokenizer.save_pretrained(folder)]
    return copied


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def export_record(policy: SavePolicy, original_params: int, source_bytes: int | None, folder: Path) -> dict:
    """compression.json's ``export`` entry: the dtypes and parameter count of the tensors written into ``folder``
    (read back from the safetensors headers), against ``original_params`` and ``source_bytes``."""
    written, (n, by_dtype) = written_bytes(folder), written_summary(folder)
    return {**policy.describe(), "tensors_by_dtype": by_dtype,
            "parameters": {"original": original_params, "written": n, "fraction": round(n / original_params, 6)},
            "bytes": {"source": source_bytes, "written": written,
                      "fraction": None if not source_bytes else round(written / source_bytes, 6)}}


def write_checkpoint(model, folder: Path, *, manifest: dict, adapter=None, policy: SavePolicy | None = None,
                     original_params: int | None = None, source_bytes: int | None = None,
                     tokenizer_source: str | Path | None = None, tokenizer=None,
                     model_card: Callable[[dict], str] | None = None, extra_files: dict[str, bytes] | None = None,
                     companions: Callable[[Path, dict], dict] | None = None) -> None:
    """Write ``model`` + tokenizer + compression.json (``manifest``) + README.md into the existing empty
    ``folder`` (not atomic: `export_checkpoint` wraps it in a temporary folder renamed at the end).

    With a ``policy`` (and the model's ``adapter``) the model's tensors are first cast in place to their written
    dtypes (`moe_compress.export.dtypes`), and ``manifest["export"]`` records the dtypes, the parameters
    (``original_params`` -> written) and the bytes (``source_bytes`` -> written); ``companions(folder,
    manifest)``, if given, writes further checkpoints into ``folder`` after the weights and returns what
    ``manifest["companions"]`` records; the card is made from the completed manifest."""
    if policy is not None:
        cast_model(model, adapter, policy)
    save_model(model, folder)
    keep_source_architectures(folder, tokenizer_source)
    if policy is not None:
        n = original_params or sum(p.numel() for p in model.parameters())
        manifest["export"] = export_record(policy, n, source_bytes, folder)
    if companions is not None:
        manifest["companions"] = companions(folder, manifest)
    copy_tokenizer(tokenizer_source, folder, tokenizer)
    write_json(folder / "compression.json", manifest)
    if model_card is not None:
        (folder / "README.md").write_text(model_card(manifest))
    for name, data in (extra_files or {}).items():
        (folder / name).write_bytes(data)


def export_checkpoint(model, out: str | Path, *, manifest: dict, adapter=None, policy: SavePolicy | None = None,
                      original_params: int | None = None, source_bytes: int | None = None,
                      tokenizer_source: str | Path | None = None, tokenizer=None,
                      model_card: Callable[[dict], str] | None = None, overwrite: bool = False,
                      extra_files: dict[str, bytes] | None = None,
                      companions: Callable[[Path, dict], dict] | None = None) -> Path:
    """`write_checkpoint` into ``out`` atomically (a temporary folder beside it, renamed at the end; companions
    included)."""
    with atomic_output_dir(out, overwrite) as tmp:
        write_checkpoint(model, tmp, manifest=manifest, adapter=adapter, policy=policy,
                         original_params=original_params, source_bytes=source_bytes,
                         tokenizer_source=tokenizer_source, tokenizer=tokenizer, model_card=model_card,
                         extra_files=extra_files, companions=companions)
    return Path(out)
