"""Write the smallest copy of a corpus folder that gives the same calibration rows as the whole folder.

The device machine takes at most 64 MiB of files, and the shared training corpus (31 MB of .jsonl.xz) does not
fit beside the larger testbed. `build_calibration` shuffles each domain's documents with
``random.Random(f"{seed}/{group}")`` and tokenizes them in that order only until the packed rows it needs are
full, so a copy that holds just the documents it consumed, placed where the same shuffle of the shorter list puts
them first and in the same order, gives identical rows (and, read under the same path, the same digest).

    PYTHONPATH=src python3 bench/calib_subset.py ../shared/data/train .device/data/train \
        --tokenizer src/moe_compress/data/testbeds/mixtral-8e --n-samples 1024 --seq-len 512 --seed 0

The script checks its own result: it rebuilds the calibration from the copy and compares the rows.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moe_compress.calibration import data as cdata


def consumed(spec: str, tokenizer, n_samples: int, seq_len: int, seed: int) -> tuple[list[cdata._Group], list[int]]:
    """The sampling groups of ``spec`` and how many (shuffled) documents each packed source tokenized."""
    used: list[int] = []
    original = cdata._PackedSource.tensors

    def record(self):
        used.append(self.next_text)
        return original(self)

    cdata._PackedSource.tensors = record  # type: ignore[method-assign]
    try:
        cdata.build_calibration(spec, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
    finally:
        cdata._PackedSource.tensors = original  # type: ignore[method-assign]
    _, groups = cdata._groups(spec)
    return groups, used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--n-samples", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    groups, used = consumed(a.src, tok, a.n_samples, a.seq_len, a.seed)
    dst = Path(a.dst)
    dst.mkdir(parents=True, exist_ok=False)
    for g, (group, m) in enumerate(zip(groups, used)):
        order = random.Random(f"{a.seed}/{g}").sample(group.texts, len(group.texts))[:m]
        perm = random.Random(f"{a.seed}/{g}").sample(range(m), m)  # sample(pop, m)[i] = pop[perm[i]]
        placed: list[str] = [""] * m
        for i, j in enumerate(perm):
            placed[j] = order[i]
        with lzma.open(dst / f"{group.domain}.jsonl.xz", "wt", encoding="utf-8") as fh:
            for text in placed:
                fh.write(json.dumps({"text": text, "domain": group.domain}) + "\n")
        print(f"{group.domain}: {m} of {len(group.texts)} documents")
    full = cdata.build_calibration(a.src, tok, n_samples=a.n_samples, seq_len=a.seq_len, seed=a.seed)
    part = cdata.build_calibration(a.dst, tok, n_samples=a.n_samples, seq_len=a.seq_len, seed=a.seed)
    same = (torch.equal(full.input_ids, part.input_ids) and torch.equal(full.attention_mask, part.attention_mask)
            and full.domains == part.domains)
    print(f"rows identical: {same}; {sum(f.stat().st_size for f in dst.iterdir()) / 1e6:.2f} MB")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
