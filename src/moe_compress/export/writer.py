"""Writing a compressed checkpoint: weights with hub-style key names, config, tokenizer, compression.json and a
model card, all written into a temporary folder beside the destination and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from moe_compress.errors import UserError, is_disk_full

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; the parent must be creatable."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    return out


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
