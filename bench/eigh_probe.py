"""Seconds of torch.linalg.eigh on one [n, n] symmetric matrix per backend (cusolver / magma) and dtype.

Usage: python3 bench/eigh_probe.py --device cuda --n 8192 4096
"""
import argparse
import json
import time

import torch


def timed(fn, device):
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 4096])
    args = ap.parse_args()
    gen = torch.Generator(device=args.device).manual_seed(0)
    rows = []
    for n in args.n:
        a = torch.randn(n, n, generator=gen, device=args.device, dtype=torch.float64)
        a = a @ a.T
        for lib in ("cusolver", "magma"):
            torch.backends.cuda.preferred_linalg_library(lib)
            for dt in (torch.float64, torch.float32):
                m = a.to(dt)
                try:
                    torch.linalg.eigh(m[:512, :512])
                    s = min(timed(lambda: torch.linalg.eigh(m), args.device) for _ in range(2))
                    s_vals = timed(lambda: torch.linalg.eigvalsh(m), args.device)
                    rows.append({"n": n, "lib": lib, "dtype": str(dt)[6:], "eigh_s": round(s, 4),
                                 "eigvalsh_s": round(s_vals, 4)})
                except Exception as e:  # noqa: BLE001
                    rows.append({"n": n, "lib": lib, "dtype": str(dt)[6:], "error": str(e)[:200]})
                print(json.dumps(rows[-1]), flush=True)
        torch.backends.cuda.preferred_linalg_library("default")


if __name__ == "__main__":
    main()
