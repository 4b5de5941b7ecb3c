"""Where the merge statistics spend their time: one MoE layer of a real shape (bench/scale.py's blocks and tokens),
the observed forward with each similarity observer alone and all together, timed and under torch.profiler.

    PYTHONPATH=src python3 bench/profile_merge_stats.py --device cuda --shape mixtral --out DIR

Prints, per variant, the seconds of the pass over all tokens (min of --repeats) and its ratio to the plain
forward (the faster of transformers' eager and grouped_mm), then the torch.profiler table (top operators by
device time) of the slowest variant; with --out, writes them to DIR/merge-stats-SHAPE.{json,txt}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from scale import FULL, TINY, TOKENS, Step, build_block  # noqa: E402


def subsample_errors(view, stats: dict[str, dict], n_new: int) -> dict:
    """For each subsample after the first (largest): max |difference| of output_similarity and of
    expert_output_mean (relative to the largest |mean|) against the largest, and whether submoe's and hcsmoe's
    groups at ``n_new`` experts are the same."""
    from moe_compress.methods.base import LayerContext, get_method

    def groups(method, st):
        plan = get_method(method).plan(LayerContext(view, n_new, st, None, torch.Generator().manual_seed(0)))
        return sorted(sorted(g) for g in plan.info.get("groups", []))

    labels = list(stats)
    ref = stats[labels[0]]
    ref_groups = {m: groups(m, ref) for m in ("submoe", "hcsmoe")}
    out = {}
    for label in labels[1:]:
        st = stats[label]
        mean_scale = float(ref["expert_output_mean"].abs().max().clamp(min=1e-30))
        out[label] = {
            "output_similarity_max_abs_diff": float((st["output_similarity"] - ref["output_similarity"]).abs().max()),
            "expert_output_mean_max_rel_diff": float((st["expert_output_mean"] - ref["expert_output_mean"]).abs().max())
            / mean_scale,
            **{f"{m}_same_groups": groups(m, st) == ref_groups[m] for m in ref_groups}}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="mixtral", choices=sorted(FULL))
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--similarity-tokens", type=int, nargs="+", default=[32768])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from moe_compress.calibration.observers import ObservedExperts, make_observers
    from moe_compress.models.registry import ARCHS, Adapter

    device, cuda = args.device, args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = (FULL if args.size == "full" else TINY)[args.shape]
    tok = TOKENS[args.size]
    cfg, block = build_block(shape, device, dtype)
    view = Adapter(ARCHS[shape["arch"]], cfg).layer(None, 0, block)
    gen = torch.Generator(device=device).manual_seed(1)
    n_batches = max(1, tok["n_seqs"] // tok["batch_size"])
    xs = [torch.randn(tok["batch_size"], tok["seq_len"], shape["hidden"], generator=gen, device=device, dtype=dtype)
          for _ in range(n_batches)]
    tokens = n_batches * tok["batch_size"] * tok["seq_len"]

    def run(make):
        obs = make()
        if obs is not None:
            obs.install()
        try:
            for x in xs:
                block(x)
        finally:
            if obs is not None:
                obs.remove()
        return obs

    variants = {"plain eager": None, "plain grouped_mm": None, "routed": lambda: ObservedExperts(view),
                "routed + router_similarity":
                    lambda: ObservedExperts(view, make_observers(view, ["router_similarity"]))}
    for n in args.similarity_tokens:
        variants[f"routed + output_similarity ({n} tokens)"] = (
            lambda n=n: ObservedExperts(view, make_observers(view, ["output_similarity"], total_tokens=tokens,
                                                             similarity_tokens=n)))
        variants[f"merge statistics ({n} tokens)"] = (
            lambda n=n: ObservedExperts(view, make_observers(view, ["output_similarity", "router_similarity"],
                                                             total_tokens=tokens, similarity_tokens=n)))
    seconds, stats = {}, {}
    with torch.inference_mode():
        for label, make in variants.items():
            if label.startswith("plain"):
                cfg._experts_implementation = label.split()[1]
            make = make or (lambda: None)
            run(make)  # warm-up
            best = None
            for _ in range(args.repeats):
                with Step(device) as s:
                    run(make)
                best = s.seconds if best is None else min(best, s.seconds)
            seconds[label] = best
            if label.startswith("merge statistics"):
                stats[label] = {k: v.detach() for k, v in run(make).results().items()}
            cfg._experts_implementation = "grouped_mm"
        plain = min(seconds["plain eager"], seconds["plain grouped_mm"])
        lines = [f"{args.shape} layer ({shape}), {tokens} tokens, {dtype}, {device}"]
        lines += [f"{label:55s} {s:8.4f} s  {s / plain:6.2f}x" for label, s in seconds.items()]
        errors = subsample_errors(view, stats, shape["experts"] // 2)
        lines += ["", f"subsample error against the largest subsample ({next(iter(stats))}):"]
        lines += [f"  {k}: {v}" for k, v in errors.items()]
        slowest = max((k for k in variants if k.startswith("merge")), key=seconds.get)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            run(variants[slowest])
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                          row_limit=args.rows)
    text = "\n".join(lines) + f"\n\nprofile of '{slowest}':\n" + table
    print(text)
    result = {"errors": errors, "shape": args.shape, "tokens": tokens, "dtype": str(dtype),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "seconds": seconds, "plain": plain,
              "ratios": {k: round(v / plain, 3) for k, v in seconds.items()}}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"merge-stats-{args.shape}.txt").write_text(text + "\n")
        (out / f"merge-stats-{args.shape}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
