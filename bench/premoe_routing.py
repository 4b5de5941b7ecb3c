"""Routing accuracy of a premoe output: for each evaluation window, the domain checkpoint `moe-compress route`
would pick from the window's first P tokens, against the window's own domain, for several prefix lengths P.

    .venv/bin/python bench/premoe_routing.py OUT --data builtin:demo-eval --seq-len 256 --prefixes 8,16,32,64,128,256

Prints one line per prefix length (accuracy overall and per domain). Evaluation domains without a checkpoint of
the same name are skipped.
"""

from __future__ import annotations

import argparse

import torch

from moe_compress.calibration.data import evaluation_windows, read_documents
from moe_compress.models.loading import load_model, load_tokenizer
from moe_compress.route import load_family


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--data", default="builtin:demo-eval")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--prefixes", default="8,16,32,64,128,256")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    family = load_family(args.out)
    model = load_model(args.out, dtype=torch.float32)
    windows = evaluation_windows(read_documents(args.data), load_tokenizer(args.out), args.seq_len)
    windows = {d: w[: args.max_windows] for d, w in windows.items() if d in family.chooser.patterns and len(w)}
    print(f"{args.out}: {sum(len(w) for w in windows.values())} windows of {args.seq_len} tokens from {args.data}, "
          f"domains {', '.join(windows)}")
    for p in (int(x) for x in args.prefixes.split(",")):
        hits = {}
        for d, w in windows.items():
            picks = []
            for s in range(0, len(w), args.batch_size):
                picks += [name for name, _ in family.chooser.choose(model, w[s:s + args.batch_size, :p])]
            hits[d] = sum(n == d for n in picks) / len(picks)
        total = sum(hits[d] * len(windows[d]) for d in windows) / sum(len(w) for w in windows.values())
        print(f"prefix {p:4d}: {total:.3f}  " + "  ".join(f"{d} {h:.2f}" for d, h in hits.items()))


if __name__ == "__main__":
    main()
