"""Speed at real sizes: one random-weight MoE layer per model shape, statistics and every method timed.

For each shape the MoE block is transformers' own class built from a config (bf16 on CUDA, fp32 on CPU,
weights ~ N(0, 0.02), DeepSeek-V3's correction bias ~ N(0, 0.01)):

- ``mixtral``      Mixtral-8x7B:   H 4096, I 14336, E 8, top-2 (`MixtralSparseMoeBlock`), 32 MoE layers;
- ``qwen3``        Qwen3-30B-A3B:  H 2048, I 768, E 128, top-8 (`Qwen3MoeSparseMoeBlock`), 48 MoE layers;
- ``deepseek_v3``  DeepSeek-V3:    H 7168, I 2048, E 256 + 1 shared, top-8, 8 groups (top-4 groups), sigmoid
  with correction bias, routed scaling 2.5 (`DeepseekV3MoE`), 58 MoE layers.

Per layer, on ``--n-seqs`` x ``--seq-len`` random hidden states (batches of ``--batch-size`` sequences):

1. ``forward``: the plain block forward over all tokens, the faster of transformers' ``eager`` and
   ``grouped_mm`` experts backends (both reported);
2. ``routed statistics``: the same forward with moe-compress's `ObservedExperts` (frequency, soft_count,
   ean, reap, max_activation) - what every pruning method needs;
3. ``merge statistics``: routed + the similarity observers the merging methods read (output_similarity /
   expert_output_mean on ``--similarity-tokens`` tokens, router_similarity);
4. per method at 50% of the experts: ``Method.plan`` on that layer (planning + pruning/merging, statistics
   excluded), the MoE inputs being an even subsample of ``max_tokens`` (32768) calibration tokens. NAEE is run
   only where its search is tractable (E <= ``--naee-max-experts``), else reported as skipped.
   Sub-MoE runs at its default (rank_ratio 1: the merge is exactly the frequency-weighted average) and
   truncated (rank_ratio 0.5; plain and whitened, Gram eigendecomposition in float64, and float32 with its
   largest deviation from float64 reported; randomized subspace iteration, ``svd="randomized"``, float64 and
   float32, with its a-posteriori error measures and its deviation from the exact float64 result).

Whole-model time = MoE layers x (statistics + planning) for the method (statistics: routed for pruning,
merge statistics for merging). Peak GPU memory is torch's max_memory_allocated during each step (the
layer's weights and the token batches included). Prints a markdown table and writes JSON with ``--out``.

``--table`` (issue 22) runs only the statistics and Sub-MoE rows per shape: plain forward, routed statistics,
merge statistics on the subsample bounded by ``--similarity-budget`` (its sampling error against a
``--similarity-tokens`` reference subsample), Sub-MoE full rank (+ the merge statistics' overhead beyond the
forward), rank 0.5 exact and the `FAST` randomized variants (their per-group residual over the exact optimum's),
whole-model minutes, the targets met or not, and with ``--profile DIR`` torch-profiler summaries of the merge
statistics, the best fast variant and the slowest non-exact plan.

Usage:  PYTHONPATH=src python3 bench/scale.py --device cuda --shapes full --table --similarity-tokens 32768 \
            --similarity-budget 0.25 --profile OUT/profiles --out OUT/table.json
        .venv/bin/python bench/scale.py --device cpu --shapes small --table --similarity-tokens 512 \
            --similarity-budget 0.25                                                  (CPU, < 1 minute)
        PYTHONPATH=src python3 bench/scale.py --device cuda --shapes full --out scale.json
        .venv/bin/python bench/scale.py --device cpu --shapes tiny                (CPU, < 1 minute)
Needs torch, transformers and pydantic (the methods' parameters) beside this package; no typer/rich.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

FULL = {
    "mixtral": dict(arch="mixtral", hidden=4096, inter=14336, experts=8, top_k=2, layers=32),
    "qwen3": dict(arch="qwen3_moe", hidden=2048, inter=768, experts=128, top_k=8, layers=48),
    "deepseek_v3": dict(arch="deepseek_v3", hidden=7168, inter=2048, experts=256, top_k=8, layers=58,
                        n_group=8, topk_group=4, shared=1),
}
TINY = {
    "mixtral": dict(arch="mixtral", hidden=64, inter=96, experts=8, top_k=2, layers=32),
    "qwen3": dict(arch="qwen3_moe", hidden=48, inter=32, experts=16, top_k=4, layers=48),
    "deepseek_v3": dict(arch="deepseek_v3", hidden=64, inter=32, experts=32, top_k=4, layers=58,
                        n_group=4, topk_group=2, shared=1),
}
TOKENS = {"full": dict(n_seqs=128, seq_len=2048, batch_size=8), "tiny": dict(n_seqs=8, seq_len=64, batch_size=4)}

PLAIN_BACKENDS = ("eager", "grouped_mm")  # transformers' experts backends timed for the plain forward
PRUNE = ["frequency", "soft-count", "ean", "reap", "naee"]
MERGE = ["msmoe", "hcsmoe", "submoe"]
VARIANTS = {  # label -> (method, params)
    "submoe r=0.5": ("submoe", {"rank_ratio": 0.5}),
    "submoe r=0.5 float32": ("submoe", {"rank_ratio": 0.5, "gram_dtype": "float32"}),
    "submoe r=0.5 whiten": ("submoe", {"rank_ratio": 0.5, "whiten": True}),
    "submoe r=0.5 randomized": ("submoe", {"rank_ratio": 0.5, "svd": "randomized"}),
    "submoe r=0.5 randomized float32": ("submoe", {"rank_ratio": 0.5, "svd": "randomized", "gram_dtype": "float32"}),
}
# fixed-pair merge variants (`pair_merge`): label -> submoe_merge keywords
PAIR_VARIANTS = {
    "full rank": dict(rank_ratio=1.0),
    "r=0.5 float64": dict(rank_ratio=0.5),
    "r=0.5 float32": dict(rank_ratio=0.5, gram_dtype=torch.float32),
    "r=0.5 randomized q=1 float32": dict(rank_ratio=0.5, gram_dtype=torch.float32, svd="randomized", power_iters=1),
    "r=0.5 randomized q=2 float32": dict(rank_ratio=0.5, gram_dtype=torch.float32, svd="randomized", power_iters=2),
    "r=0.5 randomized q=4 float32": dict(rank_ratio=0.5, gram_dtype=torch.float32, svd="randomized", power_iters=4),
    "r=0.5 randomized q=2 float64": dict(rank_ratio=0.5, svd="randomized", power_iters=2),
    "r=0.5 randomized q=2 p=64 float32": dict(rank_ratio=0.5, gram_dtype=torch.float32, svd="randomized",
                                              power_iters=2, oversample=64),
}


def diff_vs(got, ref) -> dict:
    """Deviation of merged experts from a reference: largest |difference| relative to the largest |weight|, and
    the relative Frobenius difference, worst over gate/up/down."""
    pairs = [(getattr(got, n).float(), getattr(ref, n).float()) for n in ("gate", "up", "down")]
    return {"max_rel_diff": max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in pairs),
            "fro_rel_diff": max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in pairs)}


def build_block(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """(config, block) for one shape: transformers' own MoE block class with random weights."""
    arch = shape["arch"]
    if arch == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = MixtralConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                            num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    elif arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        cfg = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                             num_experts=shape["experts"], num_experts_per_tok=shape["top_k"], norm_topk_prob=True)
    elif arch == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
        cfg = DeepseekV3Config(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                               n_routed_experts=shape["experts"], n_shared_experts=shape["shared"],
                               num_experts_per_tok=shape["top_k"], n_group=shape["n_group"],
                               topk_group=shape["topk_group"], norm_topk_prob=True, routed_scaling_factor=2.5)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    with torch.device(device):
        block = Block(cfg).to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():  # drawn in float32, a slice of at most ~2^28 elements at a time
            step = max(1, (1 << 28) // max(1, p[0].numel())) if p.dim() > 1 else p.shape[0]
            for s in range(0, p.shape[0], step):
                p[s:s + step].copy_(torch.randn(p[s:s + step].shape, generator=gen, device=device,
                                                dtype=torch.float32).mul_(0.02))
        bias = getattr(getattr(block, "gate", None), "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.01))
    return cfg, block


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Step:
    """Times one step (wall clock, synchronised) and its peak GPU memory."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        self.peak_gb = (torch.cuda.max_memory_allocated() / 2**30) if self.device.startswith("cuda") else None
        return False


def layer_and_batches(shape: dict, tok: dict, seed: int, device: str, dtype: torch.dtype):
    """The shape's MoE block (``build_block``), its `MoELayer` view, and the seeded random calibration batches
    [batch_size, seq_len, H] (n_seqs // batch_size of them, at least one) with their token count:
    (cfg, block, view, batches, tokens)."""
    from moe_compress.models.registry import ARCHS, Adapter

    cfg, block = build_block(shape, device, dtype, seed)
    view = Adapter(ARCHS[shape["arch"]], cfg).layer(None, 0, block)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    n_batches = max(1, tok["n_seqs"] // tok["batch_size"])
    batches = [torch.randn(tok["batch_size"], tok["seq_len"], shape["hidden"], generator=gen, device=device,
                           dtype=dtype) for _ in range(n_batches)]
    return cfg, block, view, batches, n_batches * tok["batch_size"] * tok["seq_len"]


def bench_shape(name: str, shape: dict, tok: dict, args, device: str, dtype: torch.dtype) -> dict:
    from moe_compress.calibration.observers import ObservedExperts, make_observers
    from moe_compress.methods.base import LayerContext, get_method
    from moe_compress.methods.merging.signals import subsample_tokens

    cfg, block, view, batches, tokens = layer_and_batches(shape, tok, args.seed, device, dtype)
    n_new = shape["experts"] // 2
    out = {"shape": name, **shape, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
           "n_new": n_new, "steps": {}, "methods": {}}
    weights_gb = sum(p.numel() * p.element_size() for p in block.parameters()) / 2**30
    out["layer_weights_gb"] = round(weights_gb, 3)

    def forward_all(observer=None, backend=None):
        if backend is not None:
            cfg._experts_implementation = backend
        for x in batches:
            if observer is None:
                block(x)
            else:
                observer.install()
                try:
                    block(x)
                finally:
                    observer.remove()

    methods = [m for m in PRUNE + MERGE]
    merge_extra = set()
    for m in MERGE:
        merge_extra |= set(get_method(m).needs)
    merge_extra -= {"frequency", "soft_count", "ean", "reap", "max_activation"}
    merge_extra = sorted(merge_extra)
    out["merge_statistics"] = merge_extra

    with torch.inference_mode():
        for backend in PLAIN_BACKENDS:  # warm-up (kernels, allocator)
            forward_all(backend=backend)
        ObservedExperts(view).install().remove()
        warm = ObservedExperts(view)
        warm.install()
        try:
            block(batches[0])
        finally:
            warm.remove()
        reps = {}
        for label in [f"forward {b}" for b in PLAIN_BACKENDS] + ["routed statistics", "merge statistics"]:
            reps[label] = []
        for _ in range(args.repeats):
            for backend in PLAIN_BACKENDS:
                with Step(device) as s:
                    forward_all(backend=backend)
                reps[f"forward {backend}"].append(s)
            obs = ObservedExperts(view)
            with Step(device) as s:
                forward_all(obs)
            reps["routed statistics"].append(s)
            routed = obs.results()
            obs = ObservedExperts(view, make_observers(view, merge_extra, total_tokens=tokens,
                                                        similarity_tokens=args.similarity_tokens))
            with Step(device) as s:
                forward_all(obs)
            reps["merge statistics"].append(s)
            merged_stats = obs.results()
        for label, steps in reps.items():
            best = min(steps, key=lambda st: st.seconds)
            out["steps"][label] = {"seconds": round(best.seconds, 4), "peak_gb": _r(best.peak_gb)}
        fastest = min((out["steps"][f"forward {b}"] for b in PLAIN_BACKENDS), key=lambda v: v["seconds"])
        out["steps"] = {"forward": dict(fastest), **out["steps"]}
        out["routed_ratio"] = round(out["steps"]["routed statistics"]["seconds"]
                                    / out["steps"]["forward"]["seconds"], 3)
        out["frequency_total_ok"] = int(routed["frequency"].sum()) == tokens * shape["top_k"]

    # calibration inputs for the merging methods: an even subsample of max_tokens rows of all tokens
    flat = (torch.cat([b.reshape(-1, shape["hidden"]) for b in batches]) if len(batches) > 1
            else batches[0].reshape(-1, shape["hidden"]))
    inputs = subsample_tokens(flat, 32768).clone()
    del flat
    batches.clear()  # the methods need only the subsample: frees 3.8 GB for DeepSeek-V3
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    rows = [(m, m, {}) for m in methods] + [(label, m, p) for label, (m, p) in VARIANTS.items()]
    if args.methods:
        rows = [row for row in rows if row[0] in args.methods.split(",")]
    results64 = {}
    for label, mname, params in rows:
        rec = {}
        if mname == "naee" and shape["experts"] > args.naee_max_experts:
            rec["skipped"] = (f"E={shape['experts']} > {args.naee_max_experts}: greedy search runs every expert on "
                              f"every token and re-routes per candidate; not tractable here")
            out["methods"][label] = rec
            continue
        if label.startswith("submoe r=") and not _variants_for(name, args):
            rec["skipped"] = "truncated Sub-MoE variants not requested for this shape (--truncated-shapes)"
            out["methods"][label] = rec
            continue
        method = get_method(mname, **params)
        stats = dict(merged_stats if method.kind == "merge" else routed)
        times = []
        plan = None
        for r in range(args.plan_repeats):
            ctx = LayerContext(view, n_new, stats, inputs if method.needs_inputs else None,
                               torch.Generator().manual_seed(args.seed))
            with torch.no_grad(), Step(device) as s:
                plan = method.plan(ctx)
            times.append(s)
        best = min(times, key=lambda st: st.seconds)
        stat_label = "merge statistics" if method.kind == "merge" else "routed statistics"
        stat_s = out["steps"][stat_label]["seconds"]
        rec.update(kind=method.kind, plan_s=round(best.seconds, 4), plan_first_s=round(times[0].seconds, 4),
                   statistics=stat_label, statistics_s=stat_s,
                   peak_gb=_r(best.peak_gb if best.peak_gb is None else max(t.peak_gb for t in times)),
                   layer_s=round(stat_s + best.seconds, 4),
                   model_min=round(shape["layers"] * (stat_s + best.seconds) / 60, 3),
                   experts_after=plan.expert_set.n_experts)
        if mname == "submoe":
            info = plan.info
            rec["ranks"] = info.get("ranks")
            rec["groups"] = [len(g) for g in info.get("groups", [])]
            if params.get("rank_ratio", 1.0) < 1 and "gram_dtype" not in params and not params.get("whiten"):
                results64[label] = plan.expert_set.experts
            if "svd_error" in info:
                rec["svd"], rec["svd_error"] = info["svd"], info["svd_error"]
                if params.get("svd") == "randomized" and "submoe r=0.5" in results64:
                    rec["vs_exact_float64"] = diff_vs(plan.expert_set.experts, results64["submoe r=0.5"])
            if (params.get("gram_dtype") == "float32" and params.get("svd") != "randomized"
                    and "submoe r=0.5" in results64):
                ref = results64["submoe r=0.5"]
                got = plan.expert_set.experts
                rec["max_rel_diff_vs_float64"] = max(
                    float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))
                    for a, b in ((got.gate, ref.gate), (got.up, ref.up), (got.down, ref.down)))
        out["methods"][label] = rec
        del plan
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.pair_merge and shape["experts"] % 2 == 0 and shape["experts"] <= 16:
        out["pair_merge"] = pair_merge(view, device, args)
    batches = inputs = block = view = None  # free the layer and the tokens before the next shape
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def pair_merge(view, device: str, args) -> dict:
    """`submoe_merge` alone on fixed groups of two (0+1, 2+3, ...), frequency weights from a fixed draw:
    the Sub-MoE merge cost without the grouping, at full rank and at rank_ratio 0.5 (float64 / float32 Grams;
    the float32 result's largest deviation from float64, relative to the largest |weight|; randomized subspace
    iteration with q = 1, 2, 4 power iterations: its error measures and its deviation from exact float64)."""
    from moe_compress.methods.merging.merge import group_weights, submoe_merge

    e = view.n_experts
    groups = [[i, i + 1] for i in range(0, e, 2)]
    freq = torch.arange(1, e + 1, dtype=torch.float64)
    weights = group_weights(freq, groups)
    out, ref = {}, None
    for label, kw in PAIR_VARIANTS.items():
        if args.pair_variants and label not in args.pair_variants.split(","):
            continue
        times = []
        for _ in range(args.plan_repeats):
            with torch.no_grad(), Step(device) as s:
                merged, info = submoe_merge(view.experts, groups, weights, **kw)
            times.append(s)
        best = min(times, key=lambda st: st.seconds)
        rec = {"seconds": round(best.seconds, 4), "first_s": round(times[0].seconds, 4), "peak_gb": _r(best.peak_gb),
               "ranks": info["ranks"]}
        if "svd_error" in info:
            rec["svd"], rec["svd_error"] = info["svd"], info["svd_error"]
            if ref is not None and kw.get("svd") == "randomized":
                rec["vs_exact_float64"] = diff_vs(merged, ref)
        if label == "r=0.5 float64":
            ref = merged
        elif label == "r=0.5 float32" and ref is not None:
            rec["max_rel_diff_vs_float64"] = max(
                float((a - b).abs().max() / b.abs().max()) for a, b in
                ((merged.gate, ref.gate), (merged.up, ref.up), (merged.down, ref.down)))
        out[label] = rec
        del merged
    return out


def _randomized_notes(m: dict) -> list[str]:
    """Markdown notes for a randomized Sub-MoE record: its error measures and its deviation from exact."""
    out = []
    errs = m.get("svd_error")
    if errs:
        worst = [e for e in errs.values() if isinstance(e, dict)]
        if worst and m.get("svd", {}).get("mode") == "exact":
            out.append("optimal residual_rel {:.4f}".format(max(e["residual_rel"] for e in worst)))
        elif worst:
            out.append("residual_rel <= {:.4f} (excess ratio vs optimal <= {:.4f}; ritz residual {:.1e}; "
                       "complement max {:.2f})".format(
                           max(e["residual_rel"] for e in worst), max(e["excess_ratio"] for e in worst),
                           max(e["ritz_residual"] for e in worst), max(e["complement_max"] for e in worst)))
    if m.get("vs_exact_float64"):
        v = m["vs_exact_float64"]
        out.append(f"vs exact float64: max rel diff {v['max_rel_diff']:.1e}, "
                   f"Frobenius rel diff {v['fro_rel_diff']:.1e}")
    return out


def _variants_for(name: str, args) -> bool:
    return args.truncated_shapes == "all" or name in args.truncated_shapes.split(",")


def _r(x):
    return None if x is None else round(x, 2)


def eigh_probe(device: str, sizes=(4096, 8192)) -> list[dict]:
    """Seconds of one torch.linalg.eigh of a random symmetric [n, n] matrix per dtype (context for Sub-MoE)."""
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen, device=device, dtype=torch.float64)
        a = a @ a.T
        for dt in (torch.float64, torch.float32):
            m = a.to(dt)
            torch.linalg.eigh(m[:256, :256])
            with Step(device) as s:
                torch.linalg.eigh(m)
            out.append({"n": n, "dtype": str(dt).replace("torch.", ""), "seconds": round(s.seconds, 4)})
        if device.startswith("cuda") and n == max(sizes):  # do independent eighs overlap on streams?
            import threading
            mats = [a + i * torch.eye(n, device=device, dtype=a.dtype) for i in range(4)]

            def work(m, stream):
                with torch.cuda.stream(stream):
                    torch.linalg.eigh(m)
            with Step(device) as seq:
                for m in mats:
                    torch.linalg.eigh(m)
            streams = [torch.cuda.Stream() for _ in mats]
            with Step(device) as par:
                threads = [threading.Thread(target=work, args=(m, st)) for m, st in zip(mats, streams)]
                [t.start() for t in threads]
                [t.join() for t in threads]
            out.append({"n": n, "dtype": "float64", "four_sequential_s": round(seq.seconds, 4),
                        "four_on_streams_s": round(par.seconds, 4)})
    return out


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        st = r["steps"]
        lines.append(f"\n### {r['shape']}: H {r['hidden']}, I {r['inter']}, E {r['experts']}"
                     f"{' + ' + str(r['shared']) + ' shared' if r.get('shared') else ''}, top-{r['top_k']}, "
                     f"{r['layers']} MoE layers, {r['tokens']} tokens, {r['dtype']}, layer weights "
                     f"{r['layer_weights_gb']} GiB, -> {r['n_new']} experts\n")
        lines.append("| step | seconds / layer | peak GPU GiB |")
        lines.append("|---|---:|---:|")
        for label, v in st.items():
            lines.append(f"| {label} | {v['seconds']:.3f} | {v['peak_gb'] if v['peak_gb'] is not None else '-'} |")
        lines.append(f"\nforward = the faster plain backend; routed statistics / forward = {r['routed_ratio']}; "
                     f"merge statistics = routed + {', '.join(r['merge_statistics'])}\n")
        lines.append("| method | plan + prune/merge s | statistics s | per layer s | whole model (min) | "
                     "peak GPU GiB | note |")
        lines.append("|---|---:|---:|---:|---:|---:|---|")
        for label, m in r["methods"].items():
            if "skipped" in m:
                lines.append(f"| {label} | skipped | | | | | {m['skipped']} |")
                continue
            note = []
            if "ranks" in m:
                note.append(f"ranks {m['ranks']}")
            if "max_rel_diff_vs_float64" in m:
                note.append(f"max rel diff vs float64 {m['max_rel_diff_vs_float64']:.1e}")
            note += _randomized_notes(m)
            if m["plan_first_s"] > 1.5 * m["plan_s"] and m["plan_first_s"] - m["plan_s"] > 0.05:
                note.append(f"first call {m['plan_first_s']:.3f} s")
            lines.append(f"| {label} | {m['plan_s']:.3f} | {m['statistics_s']:.3f} | {m['layer_s']:.3f} | "
                         f"{m['model_min']:.2f} | {m['peak_gb'] if m['peak_gb'] is not None else '-'} | "
                         f"{'; '.join(note)} |")
        if r.get("pair_merge"):
            lines.append("\nSub-MoE merge alone (`submoe_merge`, fixed groups of two, "
                         "statistics and grouping excluded):\n")
            lines.append("| variant | seconds | first call s | peak GPU GiB | note |")
            lines.append("|---|---:|---:|---:|---|")
            for label, v in r["pair_merge"].items():
                d = v.get("max_rel_diff_vs_float64")
                extra = "".join("; " + n for n in _randomized_notes(v))
                lines.append(f"| {label} | {v['seconds']:.3f} | {v['first_s']:.3f} | "
                             f"{v['peak_gb'] if v['peak_gb'] is not None else '-'} | "
                             f"ranks {v['ranks']}{'' if d is None else f'; max rel diff vs float64 {d:.1e}'}{extra} |")
    return "\n".join(lines)



# -- issue 22: one table per shape (--table) ---------------------------------------------------------------

SMALL = {  # CPU check of --table: large enough that the randomized route is not exact (r + p < Gram size)
    "mixtral": dict(arch="mixtral", hidden=128, inter=448, experts=8, top_k=2, layers=32),
    "qwen3": dict(arch="qwen3_moe", hidden=128, inter=64, experts=16, top_k=4, layers=48),
    "deepseek_v3": dict(arch="deepseek_v3", hidden=160, inter=64, experts=32, top_k=4, layers=58,
                        n_group=4, topk_group=2, shared=1),
}
TOKENS["small"] = dict(n_seqs=8, seq_len=128, batch_size=4)
# fast truncated Sub-MoE variants of --table: label -> (power_iters q, oversample p as a fraction of r, precision)
FAST = {
    "q=4 p=r/8 bf16": (4, 1 / 8, "bfloat16", "gram"),
    "q=4 p=r/8 bf16 ritz tf32": (4, 1 / 8, "bfloat16", "tf32"),
    "q=3 p=r/8 bf16 ritz tf32": (3, 1 / 8, "bfloat16", "tf32"),
    "q=3 p=r/16 bf16 ritz tf32": (3, 1 / 16, "bfloat16", "tf32"),
}


def fast_variants(args) -> dict:
    """The fast rank-0.5 variants of the table: `FAST`, or those of ``--fast-variants``
    ("q:p_fraction:power_precision[:ritz_precision]" items, comma-separated, e.g. "3:0.125:bfloat16:tf32")."""
    spec = getattr(args, "fast_variants", "") or ""
    if not spec:
        return FAST
    out = {}
    for item in spec.split(","):
        q, frac, prec, *rest = item.split(":")
        ritz = rest[0] if rest else "gram"
        label = f"q={int(q)} p={float(frac):g}r {prec}" + (f" ritz {ritz}" if ritz != "gram" else "")
        out[label] = (int(q), float(frac), prec, ritz)
    return out


TARGETS = {"merge_ratio": 1.3, "fast_s": 1.0, "fast_error_ratio": 1.02, "full_rank_s": 0.3}


def _profile(fn, device: str, path: str, title: str, rows: int = 40) -> None:
    """One call of fn under torch.profiler; the key_averages table (by device time, else CPU time) -> path."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    with open(path, "w") as f:
        f.write(f"{title}\n\n{table}\n")


def _similarity_error(got: dict, ref: dict, n_sub: int, n_ref: int) -> dict:
    """Budgeted subsample vs the reference subsample: the largest |difference| of output_similarity (off the
    diagonal), the largest reported standard errors, and the share of pairs within 2 combined standard errors."""
    a, b = got["output_similarity"], ref["output_similarity"]
    sa, sb = got["output_similarity_stderr"], ref["output_similarity_stderr"]
    off = ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    d = (a - b).abs()[off]
    comb = (sa.square() + sb.square()).sqrt()[off]
    m, mr = got["expert_output_mean"], ref["expert_output_mean"]
    return {"tokens": n_sub, "ref_tokens": n_ref, "max_abs_diff": float(d.max()),
            "max_stderr": float(sa[off].max()), "ref_max_stderr": float(sb[off].max()),
            "within_2se": float((d <= 2 * comb).double().mean()),
            "mean_max_abs_diff_rel": float((m - mr).abs().max() / mr.abs().max().clamp(min=1e-30)),
            "mean_max_stderr_rel": float(got["expert_output_mean_stderr"].max() / mr.abs().max().clamp(min=1e-30))}


def table_shape(name: str, shape: dict, tok: dict, args, device: str, dtype: torch.dtype) -> dict:
    """The issue-22 rows for one shape: plain forward, routed statistics, merge statistics (budgeted subsample,
    with its sampling error against a --similarity-tokens reference), Sub-MoE full rank, rank 0.5 exact and the
    fast variants (error ratio vs exact per group), whole-model extrapolations; profiles of the slowest steps."""
    import math
    import os

    from moe_compress.calibration.observers import ObservedExperts, make_observers
    from moe_compress.methods.base import LayerContext, get_method
    from moe_compress.methods.merging.signals import subsample_tokens

    cfg, block, view, batches, tokens = layer_and_batches(shape, tok, args.seed, device, dtype)
    n_new, layers = shape["experts"] // 2, shape["layers"]
    out = {"shape": name, **shape, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "n_new": n_new,
           "rows": {}, "profiles": []}
    merge_names = sorted((set(get_method("submoe").needs) | set(get_method("msmoe").needs)
                          | set(get_method("hcsmoe").needs)) - {"frequency", "soft_count", "ean", "reap",
                                                                  "max_activation"})
    out["merge_statistics"] = merge_names

    def run_pass(obs=None, backend=None):
        if backend is not None:
            cfg._experts_implementation = backend
        for x in batches:
            if obs is None:
                block(x)
                continue
            obs.install()
            try:
                block(x)
            finally:
                obs.remove()

    def timed(fn, repeats):
        best = None
        for _ in range(repeats):
            with Step(device) as s:
                res = fn()
            if best is None or s.seconds < best[0].seconds:
                best = (s, res)
        return best

    def merge_obs(**opts):
        return ObservedExperts(view, make_observers(view, merge_names, total_tokens=tokens, **opts))

    budget_opts = dict(similarity_tokens=args.similarity_tokens, similarity_budget=args.similarity_budget)
    rows = out["rows"]
    with torch.inference_mode():
        # warm-up of every timed pass (kernel loading, cuBLAS heuristics), so that a single repeat is warm too
        for b in PLAIN_BACKENDS:
            run_pass(backend=b)
        run_pass(ObservedExperts(view))
        run_pass(merge_obs(**budget_opts))
        fwd = {b: timed(lambda b=b: run_pass(backend=b), args.repeats)[0] for b in PLAIN_BACKENDS}
        fast_b = min(fwd, key=lambda b: fwd[b].seconds)
        cfg._experts_implementation = fast_b
        rows["plain forward"] = {"seconds": fwd[fast_b].seconds, "peak_gb": fwd[fast_b].peak_gb,
                                 "note": "; ".join(f"{b} {fwd[b].seconds:.3f} s" for b in PLAIN_BACKENDS)}

        def routed():
            o = ObservedExperts(view)
            run_pass(o)
            return o
        s, _ = timed(routed, args.repeats)
        rows["routed statistics"] = {"seconds": s.seconds, "peak_gb": s.peak_gb}

        def merged(**opts):
            o = merge_obs(**opts)
            run_pass(o)
            return o
        s, obs = timed(lambda: merged(**budget_opts), args.repeats)
        n_sub = obs.extra[[type(e).__name__ for e in obs.extra].index("ExpertOutputs")].select.size
        stats = obs.results()
        rows["merge statistics"] = {"seconds": s.seconds, "peak_gb": s.peak_gb,
                                    "note": f"S = {n_sub} tokens (budget {args.similarity_budget})"}
        if args.similarity_budget is not None and n_sub < min(args.similarity_tokens, tokens):
            s_ref, obs_ref = timed(lambda: merged(similarity_tokens=args.similarity_tokens), 1)
            ref = obs_ref.results()
            err = _similarity_error(stats, ref, n_sub, min(args.similarity_tokens, tokens))
            rows["merge statistics, reference S"] = {"seconds": s_ref.seconds, "peak_gb": s_ref.peak_gb,
                                                     "note": f"S = {err['ref_tokens']} tokens"}
            out["similarity_error"] = err
            del ref, obs_ref
        del obs
    print(json.dumps({"shape": name, "statistics": {k: round(v["seconds"], 4) for k, v in rows.items()}}),
          file=sys.stderr, flush=True)
    fwd_s = rows["plain forward"]["seconds"]
    merge_over = rows["merge statistics"]["seconds"] - fwd_s

    flat = torch.cat([b.reshape(-1, shape["hidden"]) for b in batches])
    inputs = subsample_tokens(flat, 32768).clone()
    del flat
    if not args.profile:
        batches.clear()

    r = math.ceil(0.5 * min(shape["hidden"], shape["inter"]))
    plans = {"submoe full rank": {}, "submoe r=0.5 exact": {"rank_ratio": 0.5}}
    twins = {}  # a ritz-tf32 variant -> the same variant with float32 Rayleigh-Ritz, when both run
    for label, (q, frac, prec, ritz) in fast_variants(args).items():
        plans[f"submoe r=0.5 fast {label}"] = {"rank_ratio": 0.5, "svd": "randomized", "gram_dtype": "float32",
                                               "power_iters": q, "oversample": max(1, math.ceil(frac * r)),
                                               "power_precision": prec, "ritz_precision": ritz}
        if ritz != "gram":
            twins[f"submoe r=0.5 fast {label}"] = (q, frac, prec, "gram")
    keys = {f"submoe r=0.5 fast {lab}": v for lab, v in fast_variants(args).items()}
    kept_weights = {}  # merged experts of the float32-Ritz twins, to compare the TF32 ones with
    exact_info = None
    plan_calls = {}
    plans_info = {}
    for label, params in plans.items():
        method = get_method("submoe", **params)
        repeats = args.plan_repeats if not (label.endswith("exact") and shape["experts"] > 64) else 1

        def call(method=method):
            ctx = LayerContext(view, n_new, dict(stats), inputs, torch.Generator().manual_seed(args.seed))
            with torch.no_grad():
                return method.plan(ctx)
        plan_calls[label] = call
        if not label.endswith("exact"):
            call()  # warm-up (the exact route is the slow reference: its min over repeats suffices)
        s, plan = timed(call, repeats)
        info = plan.info
        rec = {"seconds": s.seconds, "peak_gb": s.peak_gb, "groups": [len(g) for g in info.get("groups", [])]}
        if label == "submoe full rank":
            rec["with_statistics_overhead_s"] = s.seconds + merge_over
        if "svd_error" in info:
            rec["svd_error"] = info["svd_error"]
            rec["ranks"] = info["ranks"]
        if label.endswith("exact"):
            exact_info = info
        elif "svd_residual_groups" in info and exact_info is not None:
            if info.get("groups") == exact_info.get("groups"):
                ratios = [f / e for p in ("gate", "up", "down")
                          for f, e in zip(info["svd_residual_groups"][p], exact_info["svd_residual_groups"][p])
                          if f is not None and e]
                rec["error_ratio_vs_exact"] = max(ratios) if ratios else 1.0
                rec["error_ratio_by_projection"] = {
                    p: max([f / e for f, e in zip(info["svd_residual_groups"][p],
                                                  exact_info["svd_residual_groups"][p]) if f is not None and e],
                           default=1.0) for p in ("gate", "up", "down")}
            else:
                rec["error_ratio_vs_exact"] = None
                rec["note"] = "groups differ from the exact run's: no per-group comparison"
        if label in keys and keys[label] in twins.values():
            kept_weights[keys[label]] = plan.expert_set.experts
        twin = twins.get(label)
        if twin in kept_weights:
            a, b = plan.expert_set.experts, kept_weights[twin]
            rec["vs_float32_ritz"] = {
                "merged_rel_diff": max(float((getattr(a, p) - getattr(b, p)).norm() / getattr(b, p).norm())
                                       for p in ("gate", "up", "down")),
                "bf16_rounding_rel": max(float((getattr(b, p) - getattr(b, p).bfloat16().float()).norm()
                                               / getattr(b, p).norm()) for p in ("gate", "up", "down")),
                "residual_max_abs_diff": max(abs(x - y) for p in ("gate", "up", "down")
                                             for x, y in zip(plan.info["svd_residual_groups"][p],
                                                             plans_info[twin]["svd_residual_groups"][p])
                                             if x is not None and y is not None)}
        if label in keys:
            plans_info[keys[label]] = plan.info
        rows[label] = rec
        print(json.dumps({"shape": name, "row": label, "seconds": round(s.seconds, 4),
                          "error_ratio_vs_exact": rec.get("error_ratio_vs_exact")}), file=sys.stderr, flush=True)
        del plan
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for rec in rows.values():
        rec["model_min"] = layers * rec["seconds"] / 60
    # the best fast variant: the fastest one meeting the error target, else the most accurate
    fast = {k: v for k, v in rows.items() if "fast" in k and v.get("error_ratio_vs_exact") is not None}
    ok = {k: v for k, v in fast.items() if v["error_ratio_vs_exact"] <= TARGETS["fast_error_ratio"]}
    best = (min(ok, key=lambda k: ok[k]["seconds"]) if ok else
            min(fast, key=lambda k: fast[k]["error_ratio_vs_exact"]) if fast else None)
    fr = rows["submoe full rank"]
    out["verdict"] = {
        "merge_ratio": rows["merge statistics"]["seconds"] / fwd_s,
        "merge_ratio_ok": rows["merge statistics"]["seconds"] / fwd_s <= TARGETS["merge_ratio"],
        "full_rank_with_overhead_s": fr["with_statistics_overhead_s"],
        "full_rank_ok": fr["with_statistics_overhead_s"] <= TARGETS["full_rank_s"],
        "best_fast": best,
        "best_fast_s": rows[best]["seconds"] if best else None,
        "best_fast_error_ratio": rows[best]["error_ratio_vs_exact"] if best else None,
        "fast_ok": bool(best and best in ok and rows[best]["seconds"] <= TARGETS["fast_s"]),
        "model_min_merge_statistics_plus_best_fast": layers * (rows["merge statistics"]["seconds"]
                                                               + (rows[best]["seconds"] if best else 0)) / 60,
    }
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        targets = {"merge statistics": lambda: merged(**budget_opts)}
        if best:
            targets[best] = plan_calls[best]
        slow = max((k for k in rows if k in plan_calls and "exact" not in k), key=lambda k: rows[k]["seconds"])
        targets.setdefault(slow, plan_calls[slow])
        for label, fn in targets.items():
            path = os.path.join(args.profile, "profile-" + re.sub(r"[^A-Za-z0-9._-]", "_", f"{name}-{label}") + ".txt")
            with torch.inference_mode():
                _profile(fn, device, path, f"{name} {label}: {rows[label]['seconds']:.3f} s unprofiled")
            out["profiles"].append(path)
    batches.clear()
    inputs = block = view = None
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def table_markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        fwd = r["rows"]["plain forward"]["seconds"]
        lines.append(f"\n### {r['shape']}: H {r['hidden']}, I {r['inter']}, E {r['experts']}, top-{r['top_k']}, "
                     f"{r['layers']} MoE layers, {r['tokens']} tokens, {r['dtype']}, -> {r['n_new']} experts\n")
        lines.append("| step | s / layer | vs plain forward | whole model (min) | peak GiB | note |")
        lines.append("|---|---:|---:|---:|---:|---|")
        for label, v in r["rows"].items():
            note = [v["note"]] if v.get("note") else []
            if "with_statistics_overhead_s" in v:
                note.append(f"+ merge-statistics overhead beyond the forward = {v['with_statistics_overhead_s']:.3f} s")
            if v.get("error_ratio_vs_exact") is not None:
                bp = v["error_ratio_by_projection"]
                note.append(f"error vs exact optimum (worst group) {v['error_ratio_vs_exact']:.4f} "
                            f"(gate {bp['gate']:.4f}, up {bp['up']:.4f}, down {bp['down']:.4f})")
            if isinstance(v.get("svd_error"), dict) and "fast" in label:
                ex = [e["excess_ratio"] for e in v["svd_error"].values() if isinstance(e, dict)]
                if ex:
                    note.append(f"a-posteriori bound <= {max(ex):.3f}")
            if v.get("vs_float32_ritz"):
                t = v["vs_float32_ritz"]
                note.append(f"vs the same route with float32 Rayleigh-Ritz: merged weights differ by "
                            f"{t['merged_rel_diff']:.1e} (bf16 rounding of the output {t['bf16_rounding_rel']:.1e}), "
                            f"residual_rel by {t['residual_max_abs_diff']:.1e}")
            if v.get("groups") and len(v["groups"]) <= 16:
                note.append(f"groups {v['groups']}")
            elif v.get("groups"):
                note.append(f"{len(v['groups'])} groups of sizes {min(v['groups'])}-{max(v['groups'])}")
            ratio = f"{v['seconds'] / fwd:.2f}x" if "statistics" in label or label == "plain forward" else ""
            peak = "-" if v.get("peak_gb") is None else f"{v['peak_gb']:.1f}"
            lines.append(f"| {label} | {v['seconds']:.3f} | {ratio} | {v['model_min']:.2f} | {peak} | "
                         f"{'; '.join(note)} |")
        e = r.get("similarity_error")
        if e:
            lines.append(f"\nSampling error of output_similarity at S = {e['tokens']} vs S = {e['ref_tokens']}: "
                         f"max |diff| {e['max_abs_diff']:.2e}, reported max standard error {e['max_stderr']:.2e} "
                         f"(reference {e['ref_max_stderr']:.2e}), {100 * e['within_2se']:.1f}% of pairs within 2 "
                         f"combined standard errors; expert_output_mean max |diff| {e['mean_max_abs_diff_rel']:.2f} "
                         f"of its largest entry (standard error {e['mean_max_stderr_rel']:.2f})")
        v = r["verdict"]
        lines.append(f"\nTargets: merge statistics {v['merge_ratio']:.2f}x forward (<= {TARGETS['merge_ratio']}: "
                     f"{'met' if v['merge_ratio_ok'] else 'NOT met'}); Sub-MoE full rank + statistics overhead "
                     f"{v['full_rank_with_overhead_s']:.3f} s (<= {TARGETS['full_rank_s']}: "
                     f"{'met' if v['full_rank_ok'] else 'NOT met'}); best fast r=0.5: {v['best_fast']} "
                     + (f"{v['best_fast_s']:.3f} s, error ratio {v['best_fast_error_ratio']:.4f} "
                        if v["best_fast"] else "")
                     + f"(<= {TARGETS['fast_s']} s and <= {TARGETS['fast_error_ratio']}: "
                     f"{'met' if v['fast_ok'] else 'NOT met'}); whole model, merge statistics + best fast: "
                     f"{v['model_min_merge_statistics_plus_best_fast']:.2f} min")
        for p in r["profiles"]:
            lines.append(f"profile: {p}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    ap.add_argument("--shapes", default="tiny", choices=["full", "tiny", "small"])
    ap.add_argument("--only", default="", help="comma-separated subset of mixtral,qwen3,deepseek_v3")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the tokens per step (min is kept)")
    ap.add_argument("--plan-repeats", type=int, default=2, help="calls of each method's plan (min is kept)")
    ap.add_argument("--similarity-tokens", type=int, default=32768)
    ap.add_argument("--naee-max-experts", type=int, default=16)
    ap.add_argument("--truncated-shapes", default="all", help="shapes that run the truncated Sub-MoE variants")
    ap.add_argument("--pair-merge", action="store_true", help="also time submoe_merge on fixed pairs (E <= 16)")
    ap.add_argument("--eigh-probe", action="store_true", help="also time one eigh of 4096/8192 matrices")
    ap.add_argument("--methods", default="", help="comma-separated subset of the method rows (labels) to plan")
    ap.add_argument("--pair-variants", default="", help="comma-separated subset of the --pair-merge variants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true",
                    help="issue 22: only the statistics / Sub-MoE table per shape (fast variants, targets, errors)")
    ap.add_argument("--similarity-budget", type=float, default=None,
                    help="cap the similarity subsample at budget x T x k / E tokens (ExpertOutputs option)")
    ap.add_argument("--fast-variants", default="",
                    help="--table: fast rank-0.5 variants as q:p_fraction:precision items (default: FAST)")
    ap.add_argument("--profile", default=None, help="--table: write profiler summaries of the slowest steps here")
    args = ap.parse_args(argv)

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shapes = {"full": FULL, "tiny": TINY, "small": SMALL}[args.shapes]
    names = [n for n in shapes if not args.only or n in args.only.split(",")]
    header = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "shapes": args.shapes, **TOKENS[args.shapes]}
    try:
        import transformers
        header["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(json.dumps(header), flush=True)
    results = []
    if args.table:
        for n in names:
            t0 = time.perf_counter()
            r = table_shape(n, shapes[n], TOKENS[args.shapes], args, device, dtype)
            r["bench_wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(json.dumps(r, default=str), flush=True)
        print(table_markdown(results))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"header": header, "results": results}, f, indent=1, default=str)
        return results
    for n in names:
        t0 = time.perf_counter()
        r = bench_shape(n, shapes[n], TOKENS[args.shapes], args, device, dtype)
        r["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
    probe = eigh_probe(device) if args.eigh_probe else None
    print(markdown(results))
    if probe:
        print("\neigh probe:", json.dumps(probe))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "results": results, "eigh_probe": probe}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
