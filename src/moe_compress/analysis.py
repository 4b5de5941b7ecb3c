"""`moe-compress analyze`: expert statistics of a model on calibration data, with plots and a short report.

`analyze` loads the model (layer by layer from its safetensors shards when it is a local folder, so the whole
model never has to fit in memory), builds the calibration set, collects the statistics (cached, see
`calibration.collect`) and writes, atomically, into the output folder:

- ``stats.safetensors`` (tensors ``layers.{i}.{statistic}``) and ``stats.json`` (meta + routed statistics);
- ``usage.png`` (share of tokens per layer and expert), ``output_similarity.png``, ``router_similarity.png``,
  and ``usage_by_domain.png`` when the calibration data has two or more domains;
- ``report.md``: the run, a table per MoE layer (usage balance, least/most used experts, super-expert
  candidates, most similar pairs) and, with domains, how far each domain's usage is from the overall one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moe_compress.calibration.collect import collect_statistics, default_cache_dir
from moe_compress.calibration.stats import Statistics
from moe_compress.errors import UserError
from moe_compress.export.writer import atomic_output_dir, check_output_dir

DEFAULT_STATS = ("router_similarity", "output_similarity", "expert_output_mean", "frequency_by_domain")
MOMENT_STATS = ("input_moment", "input_moment_all")
SUPER_THRESHOLD = 10.0  # an expert whose max |output| exceeds 10 x its layer's median is a super-expert candidate


@dataclass
class AnalysisResult:
    out: Path
    stats: Statistics
    files: list[str] = field(default_factory=list)


def analyze(
    model: str,
    calib: str | None,
    out: str | Path,
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    packing: bool = True,
    chat_template: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    similarity_tokens: int = 2048,
    input_moments: bool = False,
    lazy: bool | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> AnalysisResult:
    """Statistics, plots and report of ``model`` on calibration SPEC ``calib``, written to ``out``.

    ``lazy`` None: read layers from disk one at a time when the model is a local folder. ``cache_dir`` None:
    the default cache (``$MOE_COMPRESS_CACHE`` or ~/.cache/moe-compress/stats) unless ``use_cache`` is False.
    """
    from moe_compress.calibration.data import build_calibration
    from moe_compress.devices import pick_device, pick_dtype
    from moe_compress.models.loading import load_config, load_model, load_tokenizer, resolve_model
    from moe_compress.models.registry import get_adapter

    if not calib:
        raise UserError("analyze needs calibration data: pass --calib SPEC (a file or folder of .txt/.jsonl, "
                        "builtin:demo, hf:NAME)")
    if similarity_tokens < 1:
        raise UserError("--similarity-tokens must be at least 1")
    check_output_dir(out, overwrite)
    path = resolve_model(model)
    dev = pick_device(device)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    calib_set = build_calibration(calib, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                  packing=packing, chat_template=chat_template)
    if calib_set.input_ids.numel() == 0:
        raise UserError(f"calibration data {calib} gave no tokens")
    vocab = getattr(load_config(model, trust_remote_code=trust_remote_code), "vocab_size", None)
    if vocab is not None and int(calib_set.input_ids.max()) >= vocab:
        raise UserError(f"the tokenizer of {model} produces token id {int(calib_set.input_ids.max())}, beyond the "
                        f"model's vocabulary of {vocab}: tokenizer and weights do not match")
    names = DEFAULT_STATS + (MOMENT_STATS if input_moments else ())
    use_lazy = lazy if lazy is not None else Path(path).is_dir()
    source = None
    if use_lazy:
        from moe_compress.models.lazy import LazyCheckpoint

        if not Path(path).is_dir():
            raise UserError(f"layer-by-layer loading needs a local checkpoint folder, not {model}")
        source = LazyCheckpoint(path, dtype=pick_dtype(dtype), trust_remote_code=trust_remote_code)
        net, adapter = source.model, source.adapter
    else:
        net = load_model(model, dtype=pick_dtype(dtype), device="cpu", trust_remote_code=trust_remote_code)
        adapter = get_adapter(net)
    stats = collect_statistics(net, adapter, calib_set, names, model_id=path,
                               cache_dir=(cache_dir or default_cache_dir()) if use_cache else None, device=dev,
                               batch_size=batch_size, observer_options={"similarity_tokens": similarity_tokens},
                               layer_source=source, progress=progress)
    stats.meta.update({"model_spec": model, "device": dev})
    stats.meta["calibration"]["seed"] = seed
    with atomic_output_dir(out, overwrite) as tmp:
        stats.save(tmp)
        files = ["stats.safetensors", "stats.json"] + write_figures(stats, tmp)
        (tmp / "report.md").write_text(report_markdown(stats, files))
        files.append("report.md")
    return AnalysisResult(Path(out), stats, files)


# -- derived numbers ----------------------------------------------------------------------------------------

def usage_share(stats: Statistics) -> tuple[list[int], torch.Tensor]:
    """(MoE layer ids, [L, E] share of tokens whose top-k contains each expert)."""
    ids = sorted(stats.layers)
    tokens = max(1, int(stats.meta.get("tokens") or 1))
    return ids, torch.stack([stats.layers[i]["frequency"].double() / tokens for i in ids])


def domain_shares(stats: Statistics) -> torch.Tensor | None:
    """[D, L, E] share of each domain's tokens selecting each expert, or None without two or more domains."""
    domains = stats.meta.get("domains") or []
    ids = sorted(stats.layers)
    if len(domains) < 2 or not ids or "frequency_by_domain" not in stats.layers[ids[0]]:
        return None
    k = max(1, int(stats.meta.get("top_k") or 1))
    fbd = torch.stack([stats.layers[i]["frequency_by_domain"].double() for i in ids], dim=1)  # [D, L, E]
    tokens = fbd[:, 0, :].sum(-1) / k  # [D]
    return fbd / tokens.clamp(min=1)[:, None, None]


def _top_pair(m: torch.Tensor) -> tuple[int, int, float]:
    m = m.double().clone()
    m.fill_diagonal_(float("-inf"))
    flat = int(torch.argmax(m))
    e, f = divmod(flat, m.shape[1])
    return min(e, f), max(e, f), float(m[e, f])


def layer_rows(stats: Statistics) -> list[dict]:
    """One summary dict per MoE layer (see `report_markdown`)."""
    ids, share = usage_share(stats)
    rows = []
    for i, s in zip(ids, share):
        d = stats.layers[i]
        p = d["frequency"].double() / d["frequency"].double().sum().clamp(min=1)
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(max(2, p.numel()))
        order = torch.argsort(s)
        peaks = d["max_activation"].double()
        med = float(peaks.median().clamp(min=1e-12))
        row = {"layer": i, "entropy": entropy, "min": float(s.min()), "max": float(s.max()),
               "least": [int(e) for e in order[:3]], "most": [int(e) for e in order.flip(0)[:3]],
               "super": [int(e) for e in torch.nonzero(peaks > SUPER_THRESHOLD * med).flatten()],
               "unused": int((d["frequency"] == 0).sum())}
        for name in ("output_similarity", "router_similarity"):
            if name in d and d[name].shape[0] > 1:
                row[name] = _top_pair(d[name])
        rows.append(row)
    return rows


# -- outputs ------------------------------------------------------------------------------------------------

def write_figures(stats: Statistics, folder: Path) -> list[str]:
    from moe_compress.report import plots

    files = []
    ids, share = usage_share(stats)
    if not ids:
        return files
    plots.usage_heatmap(share.numpy(), ids, folder / "usage.png", top_k=stats.meta.get("top_k"))
    files.append("usage.png")
    for name, title in (("output_similarity", "Mean cosine similarity of expert outputs"),
                        ("router_similarity", "Cosine similarity of router-logit columns")):
        if name in stats.layers[ids[0]]:
            plots.similarity_grid({i: stats.layers[i][name].numpy() for i in ids}, folder / f"{name}.png", title)
            files.append(f"{name}.png")
    shares = domain_shares(stats)
    if shares is not None:
        plots.domain_usage(shares.numpy(), stats.meta["domains"], ids, folder / "usage_by_domain.png")
        files.append("usage_by_domain.png")
    return files


def report_markdown(stats: Statistics, files: list[str]) -> str:
    m = stats.meta
    cal = m.get("calibration") or {}
    lines = [
        f"# Expert statistics: {m.get('model_spec') or m.get('model')}",
        "",
        f"- calibration: `{cal.get('spec')}`, {cal.get('n_samples')} x {cal.get('seq_len')} tokens "
        f"({m.get('tokens')} real tokens), seed {cal.get('seed')}",
        f"- {len(stats.layers)} MoE layers, {m.get('n_experts')} routed experts, top-{m.get('top_k')}; "
        f"dtype {m.get('dtype')}, device {m.get('device')}",
        f"- statistics: {', '.join(m.get('stats') or [])}"
        + (" (from the cache)" if m.get("cached") else f" ({m.get('seconds')} s)"),
        "",
        "## Usage per layer",
        "",
        "Share = fraction of tokens whose top-k contains the expert (uniform = top_k / E). Balance = entropy of "
        "the selection distribution / log E (1 = perfectly balanced). Super-expert candidates: max |output| > "
        f"{SUPER_THRESHOLD:g} x the layer median. Most similar pairs by output cosine and router-logit cosine.",
        "",
        "| layer | balance | min share | max share | least used | most used | unused | super | output sim | "
        "router sim |",
        "|---:|---:|---:|---:|---|---|---:|---|---|---|",
    ]
    pair = lambda r, k: f"{r[k][0]}-{r[k][1]} ({r[k][2]:.3f})" if k in r else "-"  # noqa: E731
    for r in layer_rows(stats):
        lines.append(f"| {r['layer']} | {r['entropy']:.3f} | {r['min']:.4f} | {r['max']:.4f} | "
                     f"{', '.join(map(str, r['least']))} | {', '.join(map(str, r['most']))} | {r['unused']} | "
                     f"{', '.join(map(str, r['super'])) or '-'} | {pair(r, 'output_similarity')} | "
                     f"{pair(r, 'router_similarity')} |")
    shares = domain_shares(stats)
    if shares is not None:
        ids, overall = usage_share(stats)
        k = max(1, int(m.get("top_k") or 1))
        lines += ["", "## Usage per domain", "",
                  "Distance = total variation between the domain's and the overall selection distributions, mean "
                  "over layers (0 = same usage). Most over-used: (layer, expert, domain share / overall share).", "",
                  "| domain | tokens | distance | most over-used experts |", "|---|---:|---:|---|"]
        fbd0 = [stats.layers[ids[0]]["frequency_by_domain"].double()]
        for d, name in enumerate(m["domains"]):
            tv = 0.5 * (shares[d] / k - overall / k).abs().sum(-1).mean()
            ratio = shares[d] / overall.clamp(min=1e-12)
            top = torch.topk(ratio.flatten(), min(3, ratio.numel())).indices
            over = ", ".join(f"({ids[int(j) // ratio.shape[1]]}, {int(j) % ratio.shape[1]}, "
                             f"{float(ratio.flatten()[j]):.2f})" for j in top)
            lines.append(f"| {name} | {int(fbd0[0][d].sum()) // k} | {float(tv):.3f} | {over} |")
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files + ["report.md"]] + [""]
    return "\n".join(lines)
