"""Seconds of the dense factorisations inside the randomized Sub-MoE route, per backend (cusolver / magma):
Cholesky of one [n, n] SPD matrix, of a batch of 4 (torch's batched call) and of the same 4 one by one; the
triangular solve Y R^-1 for Y [m, n]; the triangular inverse R^-1 followed by the product Y @ R^-1 (TF32); and
eigh of one [n, n] matrix (float32).

Usage: python3 bench/linalg_probe.py --device cuda --n 2304 4096 --m 12288
"""
import argparse
import json
import time

import torch


def timed(fn, device, repeats=3):
    fn()
    best = None
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        s = time.perf_counter() - t0
        best = s if best is None else min(best, s)
    return round(best, 5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, nargs="+", default=[2304, 4096])
    ap.add_argument("--m", type=int, default=12288)
    args = ap.parse_args()
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in args.n:
        y = torch.randn(args.m, n, generator=gen, device=dev)
        spd = y.T @ y
        batch = torch.stack([spd + i * torch.eye(n, device=dev) for i in range(4)])
        r = torch.linalg.cholesky(spd, upper=True)
        for lib in ("cusolver", "magma"):
            torch.backends.cuda.preferred_linalg_library(lib)
            row = {"n": n, "m": args.m, "lib": lib}
            try:
                row["cholesky_s"] = timed(lambda: torch.linalg.cholesky_ex(spd, upper=True), dev)
                row["cholesky_batch4_s"] = timed(lambda: torch.linalg.cholesky_ex(batch, upper=True), dev)
                row["cholesky_loop4_s"] = timed(lambda: [torch.linalg.cholesky_ex(b, upper=True) for b in batch],
                                                dev)
                row["solve_triangular_s"] = timed(
                    lambda: torch.linalg.solve_triangular(r, y, upper=True, left=False), dev)

                def inv_mm():
                    ri = torch.linalg.solve_triangular(r, torch.eye(n, device=dev), upper=True)
                    torch.set_float32_matmul_precision("high")
                    try:
                        return y @ ri
                    finally:
                        torch.set_float32_matmul_precision("highest")
                row["tri_inverse_tf32_mm_s"] = timed(inv_mm, dev)
                row["eigh_s"] = timed(lambda: torch.linalg.eigh(spd), dev, repeats=2)
                row["eigh_batch4_s"] = timed(lambda: torch.linalg.eigh(batch), dev, repeats=1)
            except Exception as e:  # noqa: BLE001
                row["error"] = str(e)[:200]
            print(json.dumps(row), flush=True)
        torch.backends.cuda.preferred_linalg_library("default")


if __name__ == "__main__":
    main()
