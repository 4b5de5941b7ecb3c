"""Where the observed forward spends its time: torch.profiler over a few batches of one MoE block, plain
(transformers' grouped_mm backend) vs. moe-compress's `ObservedExperts` (routed statistics).

Usage: PYTHONPATH=src python3 bench/profile_observer.py --device cuda --shape mixtral
Prints the top operators by device time (CUDA) or CPU time for each variant.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from observer_overhead import SHAPES, build_block  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="testbed", choices=sorted(SHAPES))
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from moe_compress.calibration.observers import ObservedExperts
    from moe_compress.models.registry import ARCHS, Adapter

    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SHAPES[args.shape]
    cfg, block = build_block(shape, device, dtype)
    view = Adapter(ARCHS["mixtral"], cfg).layer(None, 0, block)
    gen = torch.Generator(device=device).manual_seed(1)
    xs = [torch.randn(args.batch_size, args.seq_len, shape["hidden"], generator=gen, device=device, dtype=dtype)
          for _ in range(args.batches)]
    cfg._experts_implementation = "grouped_mm"
    obs = ObservedExperts(view)

    def plain():
        for x in xs:
            block(x)

    def observed():
        obs.install()
        try:
            for x in xs:
                block(x)
        finally:
            obs.remove()

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "cuda_time_total" if cuda else "cpu_time_total"
    with torch.inference_mode():
        plain(), observed()  # warm-up
        for name, fn in (("plain grouped_mm", plain), ("observed", observed)):
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                fn()
                if cuda:
                    torch.cuda.synchronize()
            print(f"\n=== {name} ({args.batches} batches of {args.batch_size} x {args.seq_len}) ===")
            print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
