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
from typing import Iterator

from moe_compress.errors import UserError, is_disk_full

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


def export_checkpoint(model, out: str | Path, *, manifest: dict, tokenizer_source: str | Path | None = None,
                      tokenizer=None, model_card: str | None = None, overwrite: bool = False,
                      extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` + tokenizer + compression.json (``manifest``) + README.md to ``out`` atomically."""
    with atomic_output_dir(out, overwrite) as tmp:
        save_model(model, tmp)
        copy_tokenizer(tokenizer_source, tmp, tokenizer)
        write_json(tmp / "compression.json", manifest)
        if model_card:
            (tmp / "README.md").write_text(model_card)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out)
