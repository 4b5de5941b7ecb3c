"""Observer overhead: one MoE block's forward with the routed statistics vs. a plain forward, same tokens.

The block is transformers' own `MixtralSparseMoeBlock` with random weights, timed three ways on the same
hidden states (in batches of ``--batch-size`` sequences of ``--seq-len`` tokens):

- plain, transformers' ``eager`` experts backend (one product per expert);
- plain, transformers' ``grouped_mm`` experts backend (the default where torch has grouped_mm);
- observed: moe-compress's `ObservedExperts` installed (routed statistics frequency, soft_count, ean, reap,
  max_activation; plus ``--stats`` plug-ins if given).

Shapes: ``testbed`` = the builtin:mixtral-8e testbed block (H 192, I 384, E 8, top-2); ``mixtral`` = a full-size
Mixtral-8x7B block (H 4096, I 14336, E 8, top-2). Prints one JSON line: plain_s (the faster plain backend),
observed_s, ratio = observed_s / plain_s, both plain timings, the largest output difference observed vs
plain, and the setup. Each time is the minimum over ``--repeats`` passes over all batches (the three variants
interleaved within each repeat, after one warm-up batch each), robust to other load on a shared machine;
the medians are printed too.

Usage: python bench/observer_overhead.py --device cpu --shape testbed
       python bench/observer_overhead.py --device cuda --shape mixtral        (128 x 2048 tokens, bf16)
Needs only torch, transformers and this package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {"testbed": dict(hidden=192, intermediate=384, experts=8, top_k=2),
          "mixtral": dict(hidden=4096, intermediate=14336, experts=8, top_k=2)}


def build_block(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                        num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    torch.manual_seed(seed)
    with torch.device(device):
        block = MixtralSparseMoeBlock(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return cfg, block


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_pass(fn, batches, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for x in batches:
        fn(x)
    sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    ap.add_argument("--shape", default="testbed", choices=sorted(SHAPES))
    ap.add_argument("--n-seqs", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--stats", default="", help="extra statistics, comma-separated (e.g. output_similarity)")
    args = ap.parse_args(argv)

    from moe_compress.calibration.observers import ObservedExperts, make_observers
    from moe_compress.models.registry import ARCHS, Adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                            else torch.float32)
    shape = SHAPES[args.shape]
    cfg, block = build_block(shape, device, dtype)
    n_batches = max(1, args.n_seqs // args.batch_size)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randn(args.batch_size, args.seq_len, shape["hidden"], generator=gen, device=device,
                           dtype=dtype) for _ in range(n_batches)]
    tokens = n_batches * args.batch_size * args.seq_len

    view = Adapter(ARCHS["mixtral"], cfg).layer(None, 0, block)
    extra_names = [s for s in args.stats.split(",") if s]

    def new_observer() -> ObservedExperts:  # one per pass: the similarity subsample spans one pass's tokens
        extra = make_observers(view, extra_names, total_tokens=tokens) if extra_names else []
        return ObservedExperts(view, extra)

    observer = new_observer()

    def run(variant: str, x: torch.Tensor) -> torch.Tensor:
        if variant == "observed":
            observer.install()
            try:
                return block(x)
            finally:
                observer.remove()
        cfg._experts_implementation = variant
        return block(x)

    variants = ("eager", "grouped_mm", "observed")
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        outputs = {v: run(v, batches[0]).float() for v in variants}  # warm-up, and the outputs to compare
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
            for v in variants:
                if v == "observed":
                    observer = new_observer()
                times[v].append(one_pass(lambda x, v=v: run(v, x), batches, device))
    results = {f"plain_{v}_s" if v != "observed" else "observed_s": min(times[v]) for v in variants}
    results["median"] = {v: round(statistics.median(times[v]), 4) for v in variants}
    observed_out = outputs["observed"]
    freq = observer.acc.result()["frequency"]  # the last pass
    batch_tokens = args.batch_size * args.seq_len
    counted = tokens * shape["top_k"]
    plain_s = min(results["plain_eager_s"], results["plain_grouped_mm_s"])
    out = {
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(device),
        "shape": args.shape, **shape, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
        "batch_tokens": batch_tokens, "threads": torch.get_num_threads(),
        "extra_stats": extra_names,
        "plain_s": round(plain_s, 4), "observed_s": round(results["observed_s"], 4),
        "ratio": round(results["observed_s"] / plain_s, 3),
        "plain_eager_s": round(results["plain_eager_s"], 4),
        "plain_grouped_mm_s": round(results["plain_grouped_mm_s"], 4),
        "ratio_vs_eager": round(results["observed_s"] / results["plain_eager_s"], 3),
        "ratio_vs_grouped_mm": round(results["observed_s"] / results["plain_grouped_mm_s"], 3),
        "median_s": results["median"], "repeats": args.repeats,
        "observed_path": "grouped_mm" if observer._grouped else "per-expert",
        "max_abs_diff_vs_grouped_mm": float((observed_out - outputs["grouped_mm"]).abs().max()),
        "max_abs_diff_eager_vs_grouped_mm": float((outputs["eager"] - outputs["grouped_mm"]).abs().max()),
        "frequency_total_ok": int(freq.sum()) == counted,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
