"""Tables and plots of a benchmark run (rows as produced by `moe_compress.benchmark`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_compress.report.plots import figure


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _kl(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def domains_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k.split(".")[0] for r in rows for k in r if k.endswith(".ppl_ratio")))


def markdown_table(rows: list[dict], budget: int | None = None) -> str:
    """One markdown table: overall ppl ratio / KL / top-1, then per-domain ppl ratio and KL."""
    doms = domains_of(rows)
    head = ["method", "experts", "params (M)", "ppl", "ppl ratio", "KL", "top-1"] + \
        [f"{d} ppl ratio" for d in doms] + [f"{d} KL" for d in doms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if budget is not None and r["experts"] != budget:
            continue
        cells = [r["method"], r["experts"], _fmt(r["params_M"], 2), _fmt(r["ppl"], 3), _fmt(r["ppl_ratio"]),
                 _kl(r["kld"]), _fmt(r["top1"])] + [_fmt(r.get(f"{d}.ppl_ratio")) for d in doms] + \
            [_kl(r.get(f"{d}.kld")) for d in doms]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """The terminal view: overall numbers and the worst domain's perplexity ratio, one line per result."""
    doms = domains_of(rows)
    head = ["method", "experts", "params (M)", "ppl", "ppl ratio", "KL", "top-1"]
    head += ["worst domain ppl ratio"] if doms else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["experts"], _fmt(r["params_M"], 2), _fmt(r["ppl"], 3), _fmt(r["ppl_ratio"]),
                 _kl(r["kld"]), _fmt(r["top1"])]
        if doms:
            worst = max(doms, key=lambda d: r.get(f"{d}.ppl_ratio") or 0.0)
            cells.append(f"{_fmt(r.get(f'{worst}.ppl_ratio'), 3)} ({worst})")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def timing_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("time_")))
    head = ["method", "experts"] + [k[5:-2] + " (s)" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["method"], str(r["experts"])] + [_fmt(r.get(k), 3) for k in keys]) + " |")
    return "\n".join(lines)


def layer_error_table(rows: list[dict], budget: int) -> str | None:
    """Per MoE layer, ||Y' - Y||^2 / ||Y||^2 of each method's new experts against the original block's routed
    output on calibration inputs (before any end-to-end refinement); None when no row has it."""
    sel = [r for r in rows if r["experts"] == budget and "layer_error" in r]
    if not sel:
        return None
    layers = sorted({int(k.split(".", 1)[1]) for r in sel for k in r if k.startswith("layer_error.")})
    head = ["method", "mean"] + [f"layer {i}" for i in layers]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in sel:
        cells = [r["method"], _fmt(r["layer_error"], 4)] + [_fmt(r.get(f"layer_error.{i}"), 4) for i in layers]
        lines.append("| " + " | ".join(cells) + " |")
def routing_table(rows: list[dict]) -> str | None:
    """For methods with companions (premoe): route accuracy overall and per domain, and where each domain's
    windows went; None when no row has one."""
    import json

    sel = [r for r in rows if "route_accuracy" in r]
    if not sel:
        return None
    doms = list(dict.fromkeys(k.split(".")[0] for r in sel for k in r if k.endswith(".route_accuracy")))
    head = ["method", "experts", "checkpoints", "route tokens", "route accuracy"] + [f"{d}" for d in doms] + \
        ["windows routed to"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sel:
        went = json.loads(r.get("routed_to") or "{}")
        where = "; ".join(f"{d}: " + ", ".join(f"{n} {c}" for n, c in to.items()) for d, to in went.items())
        cells = [r["method"], r["experts"], r.get("checkpoints"), r.get("route_tokens"), _fmt(r["route_accuracy"], 3)]
        cells += [_fmt(r.get(f"{d}.route_accuracy"), 3) for d in doms] + [where]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def markdown_report(rows: list[dict], meta: dict, plots: list[str]) -> str:
    ref = rows[0]["ppl_reference"] if rows else None
    cal = meta["calibration"]
    parts = [
        f"# Benchmark: {meta['model']}",
        "",
        f"Original: {rows[0]['experts_original'] if rows else '?'} experts per MoE layer, perplexity "
        f"{_fmt(ref, 3)} on {meta['eval_data']} ({sum(meta['eval_tokens'].values())} predicted tokens, windows of "
        f"{meta['eval_seq_len']}). Calibration: {cal['data']} ({cal['n_samples']} x {cal['seq_len']} tokens, seed "
        f"{cal['seed']}, sha256 {meta['calibration_sha256'][:12]}). One statistics pass "
        f"({meta['statistics_s']:.1f} s) served every method. Every number is measured against the original in "
        "this run: ppl ratio = ppl / original ppl over all tokens; KL = mean KL(original || compressed) in nats "
        "per token; top-1 = share of positions where both models' most likely next token agree.",
        "",
    ]
    for n in meta["budgets"]:
        parts += [f"## {n} experts kept", "", markdown_table(rows, n), ""]
    for n in meta["budgets"]:
        table = layer_error_table(rows, n)
        if table:
            parts += [f"## Layer output error, {n} experts kept", "",
                      "||Y' - Y||^2 / ||Y||^2 of the new experts against the original block's routed output "
                      "(shared experts excluded), per MoE layer, on up to 4096 calibration inputs of the original "
                      "model, before any end-to-end refinement.", "", table, ""]
    routing = routing_table(rows)
    if routing is not None:
        parts += ["## Routed checkpoints", "",
                  "A method with one checkpoint per calibration domain (premoe) has three rows: `NAME` scores each "
                  "evaluation window on the domain checkpoint chosen from the window's first `route tokens` tokens "
                  "(those tokens are scored too, as in every row), `NAME:oracle` on the checkpoint of the window's "
                  "own domain, `NAME:all-domain` on the one checkpoint of the same size kept for all calibration "
                  "data. Route accuracy = share of windows routed to their own domain's checkpoint.", "",
                  routing, ""]
    parts += ["## Timings", "", timing_table(rows), ""]
    parts += [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def plot_vs_experts(rows: list[dict], key: str, path: Path) -> Path:
    """``key`` (ppl_ratio or kld) against experts kept, one line per method."""
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["experts"], r[key]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("experts kept per layer")
    ax.set_ylabel({"ppl_ratio": "perplexity / original", "kld": "KL(original || compressed), nats/token"}.get(key, key))
    if key == "kld":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def plot_domains(rows: list[dict], budget: int, path: Path) -> Path:
    """Per-domain perplexity ratio bars for one budget, one bar group per domain."""
    doms = domains_of(rows)
    sel = [r for r in rows if r["experts"] == budget]
    fig = figure(max(6.4, 1.2 * len(doms) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(sel))
    x = np.arange(len(doms))
    for j, r in enumerate(sel):
        ax.bar(x + j * width, [r.get(f"{d}.ppl_ratio") or np.nan for d in doms], width, label=r["method"])
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels(doms, fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("perplexity / original")
    ax.set_title(f"{budget} experts kept")
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path
