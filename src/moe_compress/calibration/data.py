"""Calibration and evaluation text: documents from a SPEC, calibration token sets and perplexity windows.

Data SPECs (``--calib`` / ``calibration.data`` / ``evaluation.data``)
-------------------------------------------------------------------
``PATH``
    A file or a folder. Files by suffix:

    - ``.jsonl`` / ``.jsonl.xz`` (lzma): one JSON object per line with the text under ``"text"`` and an optional
      ``"domain"``; blank lines are skipped.
    - ``.parquet`` (needs ``pyarrow``): a ``text`` column and an optional ``domain`` column.
    - ``.txt``: the whole file is one document.
    - ``.raw``: WikiText raw format, one row per line, built as the Hugging Face ``wikitext`` loader builds them
      (a row keeps its line ending; a blank line is the empty row ""), so that joining the rows with ``"\\n\\n"``
      (`evaluation_windows`) reproduces the perplexity protocol of the compression papers.

    A document's domain is its ``domain`` field, else the file name without its suffix (``wiki.jsonl.xz`` ->
    ``wiki``); for ``.raw`` files a trailing split tag is dropped as well (``wikitext2_test.raw`` ->
    ``wikitext2``). A folder holds such files (not sub-folders); they are read in name order, hidden files and
    files of other types are ignored.
``hf:NAME[:CONFIG[:SPLIT]]``
    A Hugging Face dataset through `datasets` (optional dependency), split ``train`` by default; an empty
    CONFIG is none (``hf:NAME::test``). SPLIT takes everything after the second ``:``, so slices work:
    ``hf:wikitext:wikitext-2-raw-v1:train[:2000]`` (load a slice rather than a whole large corpus). Text column
    ``text``; domain from a ``domain`` column, else NAME.
``builtin:NAME``
    ``NAME.jsonl`` or ``NAME.jsonl.xz`` shipped in the package under ``moe_compress/data/calib/``.
``SPEC*W+SPEC*W+...``
    A weighted mixture: components separated by ``+``, each optionally ending in ``*W``, a positive decimal
    weight (relative: ``a*7+b*3`` is ``a*0.7+b*0.3``). Give a weight to every component or to none (equal
    weights). ``+`` and ``*`` are not special in a SPEC that names an existing path, so a file called ``a+b.txt``
    can be used on its own, but not inside a mixture (rename it). A Windows drive (``C:\\data``) is a path, and
    the ``:`` of ``hf:`` specs needs no escaping. HF split arithmetic (``train+test``) is not available: write
    a mixture of two ``hf:`` specs instead.

Calibration sampling (`build_calibration`)
------------------------------------------
Documents are grouped by domain within each mixture component; a component's weight is shared equally by its
domains, so a folder (or a file with several domains) is sampled evenly across its domains (by default, its
files). ``n_samples`` rows are apportioned to the groups by weight (largest remainders); a group that runs out
gives what it has and the rest is re-apportioned among the others. Each group's documents are shuffled with
the seed and tokenized lazily, only as far as needed, so a large corpus costs little.

- packing (default): each document is tokenized without special tokens and followed by the eos token; the
  group's rows are consecutive non-overlapping ``seq_len`` windows of that stream (the partial tail is dropped).
- per document: one document per row, tokenized with the tokenizer's special tokens, truncated to ``seq_len``
  and right-padded with the pad token (eos when there is none) under attention mask 0.

Rows are ordered by group (mixture components in order, domains in order of first appearance).
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import math
import os
import random
import re
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_compress.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "data" / "calib"
"""Where ``builtin:NAME`` files live (``NAME.jsonl`` or ``NAME.jsonl.xz``)."""

FILE_SUFFIXES = (".jsonl.xz", ".jsonl", ".parquet", ".txt", ".raw")
"""File types a SPEC may name (and a folder's files that are read)."""

CHAT_PROMPT = "Write a text."
"""With ``chat_template=True`` a document becomes the assistant's reply to this one user message."""

_BUILTIN_SUFFIXES = (".jsonl", ".jsonl.xz")
_SPLIT_TAG = re.compile(r"[._-](train|valid|validation|test)$")
_SCHEME = re.compile(r"^[A-Za-z][\w.-]+:")  # two or more characters: a Windows drive letter is not a scheme
_WEIGHT = re.compile(r"^(\d+(\.\d*)?|\.\d+)$")
_FORMS = "a file or folder of .txt/.raw/.jsonl/.jsonl.xz/.parquet, hf:NAME[:CONFIG[:SPLIT]], builtin:NAME"
_TOKENIZE_BATCH = 32  # documents tokenized per call when a sample source needs more text


@dataclass(frozen=True)
class Document:
    """One text and the domain it belongs to (a label for per-domain sampling, statistics and perplexity)."""

    text: str
    domain: str


@dataclass
class CalibrationSet:
    """Token rows for calibration.

    Attributes:
        input_ids: LongTensor [N, L] (L = ``seq_len``).
        attention_mask: LongTensor [N, L], 1 on real tokens, 0 on padding (all ones when packed).
        domains: the domain of each row (length N).
        spec: the data SPEC the rows came from (``"<K documents>"`` when built from documents).
        sha256: hex digest of the spec text, the token ids, the mask and the row domains, to record the exact
            calibration data (e.g. in compression.json or a statistics cache key).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    domains: list[str]
    spec: str
    sha256: str

    @property
    def n_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum())


# -- reading documents ---------------------------------------------------------------------------------------

def split_mixture(spec: str | os.PathLike) -> list[tuple[str, float]]:
    """The components of a SPEC with their weights, normalised to sum to 1 (see the module docstring).

    A SPEC that is not a mixture is one component of weight 1.
    """
    spec = os.fspath(spec).strip()
    if not spec:
        raise UserError(f"empty data spec: give {_FORMS}, or a mixture SPEC*W+SPEC*W")
    if os.path.exists(spec) or ("+" not in spec and "*" not in spec):
        return [(spec, 1.0)]
    parts: list[tuple[str, float | None]] = []
    example = "e.g. a.jsonl*0.7+b.jsonl*0.3"
    for part in spec.split("+"):
        name, star, weight = part.rpartition("*") if "*" in part else (part, "", "")
        name, weight = name.strip(), weight.strip()
        if not name:
            raise UserError(f"bad mixture {spec!r}: empty component; write SPEC*W+SPEC*W ({example})")
        if star and not (_WEIGHT.match(weight) and float(weight) > 0):
            raise UserError(f"bad mixture weight {weight!r} in {spec!r}: a weight is a positive decimal number "
                            f"after '*' ({example})")
        parts.append((name, float(weight) if star else None))
    weighted = [w is not None for _, w in parts]
    if any(weighted) and not all(weighted):
        raise UserError(f"bad mixture {spec!r}: give a weight to every component or to none (equal weights)")
    weights = [w if w is not None else 1.0 for _, w in parts]
    total = sum(weights)
    return [(name, w / total) for (name, _), w in zip(parts, weights)]


def read_documents(spec: str | os.PathLike) -> list[Document]:
    """All documents of a data SPEC (module docstring), in file / row order.

    For a mixture, the documents of every component in turn (weights only matter for `build_calibration`).
    Documents are returned as read: empty texts are kept (WikiText's blank rows belong to its protocol).

    Raises:
        UserError: a missing path, an empty or unreadable file or folder, an invalid JSON line, a record
            without text, an unknown SPEC form or builtin name, bad mixture weights, or a missing optional
            dependency (``pyarrow``, ``datasets``).
    """
    return [doc for part, _ in split_mixture(spec) for doc in _read_component(part)]


def check_spec(spec: str | os.PathLike) -> None:
    """What `read_documents` would refuse before reading any text (for ``--dry-run`` and early checks): the
    mixture syntax, builtin names, that every local path exists and is a data file or a folder holding data
    files, and for ``hf:`` components a dataset name and the `datasets` package (the hub itself is not asked:
    whether the dataset downloads, or is in the local cache offline, shows only when the run reads it)."""
    import importlib.util

    for part, _ in split_mixture(spec):
        if part.startswith("hf:"):
            rest = part[3:]
            if not rest.split(":", 1)[0]:
                raise UserError(f"hf:{rest} has no dataset name: write hf:NAME[:CONFIG[:SPLIT]]")
            if importlib.util.find_spec("datasets") is None:
                raise UserError(f"hf:{rest} needs the datasets package: pip install 'moe-compress[hf]'")
            continue
        if part.startswith("builtin:"):
            name = part[len("builtin:"):]
            if name not in builtin_names():
                raise UserError(f"unknown builtin data {name!r}: available are {', '.join(builtin_names()) or 'none'}")
            continue
        path = Path(part)
        if path.is_dir():
            if not any(p.is_file() and not p.name.startswith(".") and p.name.endswith(FILE_SUFFIXES)
                       for p in path.iterdir()):
                raise UserError(f"folder {path} has no data files: put .txt, .raw, .jsonl, .jsonl.xz or .parquet "
                                "files in it")
        elif path.is_file():
            if not path.name.endswith(FILE_SUFFIXES):
                raise UserError(f"unsupported data file {path}: use .txt, .raw, .jsonl, .jsonl.xz or .parquet")
            if not os.access(path, os.R_OK):
                raise UserError(f"cannot read {path}: permission denied")
        elif _SCHEME.match(part):
            raise UserError(f"unknown data spec form {part!r}: give {_FORMS}")
        else:
            raise UserError(f"data path not found: {part} (give {_FORMS})")


def builtin_names() -> list[str]:
    """Names usable as ``builtin:NAME``, sorted."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted({p.name[: -len(s)] for p in BUILTIN_DIR.iterdir() for s in _BUILTIN_SUFFIXES
                   if p.name.endswith(s)})


def _read_component(spec: str) -> list[Document]:
    if spec.startswith("hf:"):
        return _read_hf(spec[3:])
    if spec.startswith("builtin:"):
        return _read_builtin(spec[len("builtin:"):])
    path = Path(spec)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_file(path)
    if _SCHEME.match(spec):
        raise UserError(f"unknown data spec form {spec!r}: give {_FORMS}")
    raise UserError(f"data path not found: {spec} (give {_FORMS})")


def _read_folder(path: Path) -> list[Document]:
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.endswith(FILE_SUFFIXES))
    if not files:
        raise UserError(f"folder {path} has no data files: put .txt, .raw, .jsonl, .jsonl.xz or .parquet files in it")
    return [doc for file in files for doc in _read_file(file)]


def _read_file(path: Path) -> list[Document]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.xz")):
        docs = _read_jsonl(path)
    elif name.endswith(".parquet"):
        docs = _read_parquet(path)
    elif name.endswith(".txt"):
        docs = [Document(_read_utf8(path), _file_domain(path))]
    elif name.endswith(".raw"):
        docs = _read_wikitext(path)
    else:
        raise UserError(f"unsupported data file {path}: use .txt, .raw, .jsonl, .jsonl.xz or .parquet")
    if not any(doc.text.strip() for doc in docs):
        raise UserError(f"data file {path} has no text: give a file with at least one non-empty document")
    return docs


def _file_domain(path: Path) -> str:
    """Default domain of a file's documents: its name without the data suffix (and split tag for ``.raw``)."""
    name = path.name
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            if suffix == ".raw":
                return _SPLIT_TAG.sub("", stem) or stem
            return stem
    return path.stem


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e


def _read_wikitext(path: Path) -> list[Document]:
    """Rows of a WikiText ``.raw`` file as the Hugging Face loader yields them: each line with its line ending,
    blank lines as ""."""
    domain = _file_domain(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return [Document(line if line.strip() else "", domain) for line in fh]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: convert it to UTF-8") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e


def _read_jsonl(path: Path) -> list[Document]:
    domain = _file_domain(path)
    opener = lzma.open if path.name.endswith(".xz") else open
    docs = []
    try:
        with opener(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{n}: not UTF-8 text: convert the file to UTF-8") from e
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno}): each line must be a "
                                    'JSON object such as {"text": "..."}') from e
                docs.append(_record_document(record, domain, f"{path}:{n}"))
    except (OSError, lzma.LZMAError, EOFError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    return docs


def _read_parquet(path: Path) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"reading {path} needs pyarrow: pip install 'moe-compress[parquet]'") from e
    try:
        columns = pq.read_schema(path).names
        if "text" not in columns:
            raise UserError(f"{path} has no 'text' column (columns: {', '.join(columns)}); put the text in 'text'")
        table = pq.read_table(path, columns=[c for c in ("text", "domain") if c in columns])
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as parquet: {e}") from e
    return _column_documents(table.to_pydict(), _file_domain(path), f"{path} row")


def _read_hf(rest: str) -> list[Document]:
    name, config, split = (rest.split(":", 2) + ["", ""])[:3]
    if not name:
        raise UserError(f"hf:{rest} has no dataset name: write hf:NAME[:CONFIG[:SPLIT]]")
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"hf:{rest} needs the datasets package: pip install 'moe-compress[hf]'") from e
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except (OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load hf:{rest}: {first_line}") from e
    columns = list(ds.column_names)
    if "text" not in columns:
        raise UserError(f"hf:{rest} has no 'text' column (columns: {', '.join(columns)})")
    data = {c: list(ds[c]) for c in ("text", "domain") if c in columns}
    docs = _column_documents(data, name, f"hf:{rest} row")
    if not any(doc.text.strip() for doc in docs):
        raise UserError(f"hf:{rest} has no text: every 'text' value is empty")
    return docs


def _read_builtin(name: str) -> list[Document]:
    names = builtin_names()
    if name not in names:
        raise UserError(f"unknown builtin data {name!r}: available are {', '.join(names) or 'none'}")
    suffix = next(s for s in _BUILTIN_SUFFIXES if (BUILTIN_DIR / f"{name}{s}").is_file())
    return _read_file(BUILTIN_DIR / f"{name}{suffix}")


def _column_documents(columns: dict[str, list], domain: str, where: str) -> list[Document]:
    """Documents from ``{"text": [...], optional "domain": [...]}``; null values count as missing fields."""
    rows = zip(*columns.values())
    return [_record_document({k: v for k, v in zip(columns, row) if v is not None}, domain, f"{where} {i}")
            for i, row in enumerate(rows, 1)]


def _record_document(record, default_domain: str, where: str) -> Document:
    """A `Document` from one JSON record; ``where`` (``file:line``) locates errors."""
    if not isinstance(record, dict):
        raise UserError(f'{where}: expected a JSON object such as {{"text": "..."}}, got {type(record).__name__}')
    if "text" not in record:
        raise UserError(f'{where}: no "text" field (fields: {", ".join(record) or "none"}); put the text under "text"')
    text = record["text"]
    domain = default_domain if record.get("domain") is None else record["domain"]
    if not isinstance(text, str):
        raise UserError(f'{where}: "text" must be a string, not {type(text).__name__}')
    if not isinstance(domain, str) or not domain:
        raise UserError(f'{where}: "domain" must be a non-empty string, not {domain!r}')
    return Document(text, domain)


# -- calibration sets ----------------------------------------------------------------------------------------

@dataclass
class _Group:
    """The non-empty texts of one domain of one mixture component, and the group's sampling weight."""

    domain: str
    weight: float
    texts: list[str]


_Encoder = Callable[[list[str]], list[list[int]]]


class _PackedSource:
    """Consecutive non-overlapping windows of one group's token stream: shuffled documents, each followed by eos,
    tokenized only as far as the windows taken so far need."""

    def __init__(self, texts: list[str], encode: _Encoder, seq_len: int, eos: int):
        self.texts, self.encode, self.seq_len, self.eos = texts, encode, seq_len, eos
        self.next_text = 0
        self.tokens = array("q")  # the stream so far (int64)
        self.rows = 0

    def take(self, k: int) -> int:
        """Take up to ``k`` more windows; returns how many (fewer once the documents run out)."""
        need = (self.rows + k) * self.seq_len
        while len(self.tokens) < need and self.next_text < len(self.texts):
            batch = self.texts[self.next_text:self.next_text + _TOKENIZE_BATCH]
            self.next_text += len(batch)
            for ids in self.encode(batch):
                self.tokens.extend(ids)
                self.tokens.append(self.eos)
        got = min(k, len(self.tokens) // self.seq_len - self.rows)
        self.rows += got
        return got

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both LongTensor [rows, seq_len]."""
        stream = np.frombuffer(self.tokens, dtype=np.int64, count=self.rows * self.seq_len)
        ids = torch.from_numpy(stream.copy()).view(self.rows, self.seq_len)
        return ids, torch.ones_like(ids)


class _DocumentSource:
    """One shuffled document per row, truncated to ``seq_len`` and right-padded with ``pad`` (mask 0)."""

    def __init__(self, texts: list[str], encode: _Encoder, seq_len: int, pad: int):
        self.texts, self.encode, self.seq_len, self.pad = texts, encode, seq_len, pad
        self.rows: list[list[int]] = []

    def take(self, k: int) -> int:
        """Take up to ``k`` more documents; returns how many (fewer once the documents run out)."""
        start = len(self.rows)
        self.rows += [ids[: self.seq_len] for ids in self.encode(self.texts[start:start + k])]
        return len(self.rows) - start

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both LongTensor [rows, seq_len]."""
        ids = torch.full((len(self.rows), self.seq_len), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(self.rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask


def build_calibration(
    spec_or_docs: str | os.PathLike | Sequence[Document],
    tokenizer,
    *,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    packing: bool = True,
    chat_template: bool = False,
) -> CalibrationSet:
    """Calibration rows ``[N, seq_len]`` from a data SPEC or a list of documents (sampling: module docstring).

    Args:
        spec_or_docs: a data SPEC (module docstring) or documents (grouped by domain, equal weights).
        tokenizer: a Hugging Face tokenizer; packing needs its eos token.
        n_samples: rows wanted. Fewer come back (with a warning) when the data has fewer windows / documents.
        seq_len: row length L.
        seed: shuffles each group's documents; the same inputs and seed give the same rows.
        packing: True: windows of the documents joined by eos; False: one padded document per row.
        chat_template: wrap each document as the assistant's reply to `CHAT_PROMPT` in the tokenizer's chat
            template (no other special tokens are added).

    Returns:
        A `CalibrationSet` with N <= ``n_samples`` rows.

    Raises:
        UserError: a bad SPEC (see `read_documents`), no text, fewer tokens than one packed row, a tokenizer
            without eos (packing) or chat template (``chat_template``), or ``n_samples`` / ``seq_len`` < 1.
    """
    if n_samples < 1 or seq_len < 1:
        raise UserError(f"n_samples and seq_len must be at least 1, got {n_samples} and {seq_len}")
    if packing and tokenizer.eos_token_id is None:
        raise UserError("packing needs a tokenizer with an eos token to separate documents; "
                        "use per-document rows (--per-document) or a tokenizer with eos")
    encode = _encoder(tokenizer, chat_template=chat_template, special_tokens=not packing,
                      max_length=None if packing else seq_len)
    spec, groups = _groups(spec_or_docs)
    texts = [random.Random(f"{seed}/{g}").sample(group.texts, len(group.texts)) for g, group in enumerate(groups)]
    packed: list[_PackedSource] = []
    sources: Sequence[_PackedSource | _DocumentSource]
    if packing:
        sources = packed = [_PackedSource(t, encode, seq_len, tokenizer.eos_token_id) for t in texts]
    else:
        pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        sources = [_DocumentSource(t, encode, seq_len, pad) for t in texts]

    counts = _take(sources, [g.weight for g in groups], n_samples)
    n_rows = sum(counts)
    if n_rows == 0:  # only when packing: every group holds at least one document
        longest = max(len(s.tokens) for s in packed)
        raise UserError(f"calibration data {spec} is too short for one row of seq_len={seq_len} (its largest "
                        f"domain has {longest} tokens): lower --seq-len or give more text")
    if n_rows < n_samples:
        log.warning("calibration data %s gave %d of the %d samples asked for (not enough text)", spec, n_rows,
                    n_samples)
    parts = [s.tensors() for s in sources]
    ids = torch.cat([p[0] for p in parts])
    mask = torch.cat([p[1] for p in parts])
    domains = [g.domain for g, c in zip(groups, counts) for _ in range(c)]
    return CalibrationSet(ids, mask, domains, spec, _digest(spec, ids, mask, domains))


def _groups(spec_or_docs: str | os.PathLike | Sequence[Document]) -> tuple[str, list[_Group]]:
    """(spec text, sampling groups): one group per domain of each mixture component."""
    if isinstance(spec_or_docs, (str, os.PathLike)):
        spec = os.fspath(spec_or_docs)
        components = [(weight, texts_by_domain(_read_component(part))) for part, weight in split_mixture(spec)]
    else:
        spec = f"<{len(spec_or_docs)} documents>"
        components = [(1.0, texts_by_domain(spec_or_docs))]
    groups = [_Group(domain, weight / len(by_domain), texts)
              for weight, by_domain in components for domain, texts in by_domain.items()]
    if not groups:
        raise UserError(f"calibration data {spec} has no text: every document is empty")
    return spec, groups


def texts_by_domain(docs: Iterable[Document]) -> dict[str, list[str]]:
    """Non-blank texts by domain, domains in order of first appearance."""
    out: dict[str, list[str]] = {}
    for doc in docs:
        if doc.text.strip():
            out.setdefault(doc.domain, []).append(doc.text)
    return out


def _encoder(tokenizer, *, chat_template: bool, special_tokens: bool, max_length: int | None) -> _Encoder:
    """texts -> token id lists (optionally through the chat template, optionally truncated)."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template: drop --chat-template or use a model whose "
                        "tokenizer has one")
    truncation = {"truncation": True, "max_length": max_length} if max_length else {}

    def encode(texts: list[str]) -> list[list[int]]:
        if chat_template:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT},
                                                    {"role": "assistant", "content": t}], tokenize=False)
                     for t in texts]
        return tokenizer(texts, add_special_tokens=special_tokens and not chat_template, verbose=False,
                         **truncation)["input_ids"]

    return encode


def _take(sources: Sequence[_PackedSource | _DocumentSource], weights: Sequence[float], n: int) -> list[int]:
    """Take ``n`` rows from the sources in proportion to ``weights``, re-apportioning the share of a source that
    runs out among the others; returns the rows taken from each source."""
    counts = [0] * len(sources)
    active = list(range(len(sources)))
    need = n
    while need and active:
        exhausted = set()
        for g, k in zip(active, _apportion(need, [weights[g] for g in active])):
            if k:
                got = sources[g].take(k)
                counts[g] += got
                need -= got
                if got < k:
                    exhausted.add(g)
        active = [g for g in active if g not in exhausted]
    return counts


def _apportion(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` into integers proportional to ``weights`` (largest remainders, ties to the earlier entry)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _digest(spec: str, ids: torch.Tensor, mask: torch.Tensor, domains: list[str]) -> str:
    h = hashlib.sha256()
    h.update(spec.encode("utf-8") + b"\0")
    h.update(repr(tuple(ids.shape)).encode("ascii"))
    h.update(ids.numpy().astype("<i8").tobytes())
    h.update(mask.numpy().astype("<i8").tobytes())
    h.update("\n".join(domains).encode("utf-8"))
    return h.hexdigest()


# -- evaluation ----------------------------------------------------------------------------------------------

def evaluation_windows(docs: Iterable[Document], tokenizer, seq_len: int, *, join: str = "\n\n"
                       ) -> dict[str, torch.Tensor]:
    """Perplexity windows per domain, the standard protocol (WikiText-2 in the compression papers).

    The texts of each domain are joined with ``join`` in document order, tokenized once (with the tokenizer's
    special tokens, as ``tokenizer(text)`` gives them) and cut into non-overlapping windows of ``seq_len``; the
    last partial window is dropped.

    Returns:
        ``{domain: LongTensor [n, seq_len]}``, domains in order of first appearance; a domain shorter than one
        window maps to an empty ``[0, seq_len]`` tensor.
    """
    if seq_len < 1:
        raise UserError(f"seq_len must be at least 1, got {seq_len}")
    texts: dict[str, list[str]] = {}
    for doc in docs:
        texts.setdefault(doc.domain, []).append(doc.text)
    out = {}
    for domain, parts in texts.items():
        ids = tokenizer(join.join(parts), verbose=False)["input_ids"]
        n = len(ids) // seq_len
        out[domain] = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return out
