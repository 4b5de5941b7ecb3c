"""Bounded-memory statistics: collect expert statistics of a checkpoint much larger than a memory budget.

A random-weight Mixtral-shaped checkpoint (hub-style names, one shard per layer) is written by a child process
(never holding more than one layer), then this process opens it with `LazyCheckpoint` (parameters on the meta
device, each decoder layer read from disk just before it runs and dropped after) and collects the routed
statistics on random tokens. It prints one JSON line:

- checkpoint_mb: bytes of all tensors in the checkpoint; layer_mb: one decoder layer; outside_mb: embeddings +
  final norm (materialised for the whole run); activations_mb: the runner's hidden states (inputs + outputs
  of one layer for the whole calibration set);
- workspace_mb: an estimate of the transient tensors of one batch inside a decoder layer, 2 x tokens per batch
  x top_k x (3 I + 2 H) elements (gate, up, activation, gathered inputs and outputs of the routed rows);
- peak_materialised_mb: most parameter bytes materialised at once (counted by the loader);
- rss_growth_mb: peak resident memory (VmHWM, reset just before the run) minus the resident memory before it;
- budget_mb: the limit (default: one layer + outside + activations + workspace + 64 MiB for one-time
  allocations of the first forward: thread pools, kernels); ok: rss_growth <= budget.

Usage: .venv/bin/python bench/memory.py [--layers 12 --hidden 1024 --intermediate 2048 --experts 8]
       [--dtype float32] [--n-samples 4 --seq-len 256] [--ckpt DIR] [--budget-mb N]
Exit code 1 when the budget is exceeded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

MB = 2 ** 20


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def config(args):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "mixtral", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
        head_dim=args.hidden // 8, num_local_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=4096, tie_word_embeddings=False)


def write(args) -> None:
    import torch

    from moe_compress.models.lazy import write_random_checkpoint

    write_random_checkpoint(config(args), args.ckpt, dtype=getattr(torch, args.dtype), seed=0)


def measure(args) -> dict:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from moe_compress.calibration.collect import collect_statistics
    from moe_compress.models.lazy import LazyCheckpoint

    lazy = LazyCheckpoint(args.ckpt, dtype=getattr(torch, args.dtype))
    ids = torch.randint(0, args.vocab, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    calib = SimpleNamespace(input_ids=ids, attention_mask=None, domains=None, spec="random", sha256=None, seed=0)
    outside = lazy.live_bytes
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    activations = 2 * args.n_samples * args.seq_len * args.hidden * elem
    workspace = 2 * args.batch_size * args.seq_len * 2 * (3 * args.intermediate + 2 * args.hidden) * elem
    rss_before = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    stats = collect_statistics(lazy.model, lazy.adapter, calib, batch_size=args.batch_size, layer_source=lazy)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    layer = max(lazy.layer_bytes.values())
    budget = args.budget_mb * MB if args.budget_mb else layer + outside + activations + workspace + 64 * MB
    tokens = args.n_samples * args.seq_len
    assert all(float(s["frequency"].sum()) == tokens * 2 for s in stats.layers.values())
    return {"checkpoint_mb": round(lazy.checkpoint_bytes() / MB, 1), "layers": args.layers,
            "layer_mb": round(layer / MB, 1), "outside_mb": round(outside / MB, 1),
            "activations_mb": round(activations / MB, 1), "workspace_mb": round(workspace / MB, 1),
            "peak_materialised_mb": round(lazy.peak_bytes / MB, 1),
            "rss_before_mb": round(rss_before / MB, 1), "rss_growth_mb": round((peak - rss_before) / MB, 1),
            "budget_mb": round(budget / MB, 1), "ok": peak - rss_before <= budget, "tokens": tokens,
            "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (written if absent; default: a temp folder)")
    ap.add_argument("--budget-mb", type=float, default=None)
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_only:
        write(args)
        return 0
    tmp = None
    if args.ckpt is None:
        tmp = tempfile.TemporaryDirectory(prefix="moe-memory-bench-")
        args.ckpt = str(Path(tmp.name) / "ckpt")
    if not (Path(args.ckpt) / "config.json").is_file():
        cmd = [sys.executable, __file__, "--write-only", *sys.argv[1:]] if argv is None else \
              [sys.executable, __file__, "--write-only", *argv]
        if "--ckpt" not in cmd:
            cmd += ["--ckpt", args.ckpt]
        subprocess.run(cmd, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    try:
        result = measure(args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
