"""The README.md model card written beside a compressed checkpoint."""

from __future__ import annotations


def model_card(manifest: dict) -> str:
    m, e = manifest["method"], manifest["experts"]
    calib = manifest.get("calibration") or {}
    lines = [
        "---",
        "tags: [moe, expert-pruning, expert-merging, moe-compress]",
        "---",
        f"# {manifest['model']} compressed with moe-compress ({m['name']}, {e['original']} -> {e['kept']} experts)",
        "",
        f"This checkpoint was produced by moe-compress {manifest['version']} from `{manifest['model']}` with the "
        f"`{m['name']}` {m['kind']} method: every MoE layer keeps {e['kept']} of its {e['original']} routed experts. "
        "It is a standard Hugging Face checkpoint: transformers and vLLM load it with no custom code.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{m['name']}` ({m['kind']}) |",
        f"| method parameters | `{m['params']}` |",
        f"| calibration | {calib.get('spec', 'none')} "
        f"({calib.get('n_samples', 0)} x {calib.get('seq_len', 0)} tokens) |",
        f"| mode | {manifest.get('mode')} |",
        *_export_rows(manifest.get("export")),
        *_companion_lines(manifest),
        "",
        "`compression.json` records, for every layer, which original experts each new expert comes from and with "
        "what weights, the calibration data hash, timings and the full recipe to re-run this compression:",
        "",
        "```bash",
        "moe-compress compress --recipe recipe.yaml   # recipe = compression.json['recipe'] as YAML",
        "```",
        "",
    ]
    return "\n".join(lines)


def _companion_lines(manifest: dict) -> list[str]:
    """What a checkpoint of a family (premoe: one per calibration domain) is, for the card."""
    c, own = manifest.get("companions"), manifest.get("companion")
    if c:
        names = ", ".join(f"`{n}`" for n in c["checkpoints"])
        return ["", f"This is the all-domain checkpoint of a family of {c['count']} of the same size: the experts "
                f"kept for every calibration domain together. `{c['folder']}/` holds one checkpoint per domain "
                f"({names}); `moe-compress route . --prompt TEXT` picks the one for a prompt ({c['index']} holds "
                f"the stored patterns); {c['bytes']['total']:,} bytes of weights in all."]
    if own:
        return ["", f"This is the `{own['name']}` domain checkpoint of a family: the all-domain checkpoint and the "
                "patterns that pick a domain checkpoint for a prompt are in `../..`."]
    return []


def _export_rows(x: dict | None) -> list[str]:
    """Table rows for the written dtype and size (``manifest["export"]``)."""
    if not x:
        return []
    dtypes = ", ".join(f"{n} {k}" for k, n in x["tensors_by_dtype"].items())
    p, b = x["parameters"], x["bytes"]
    rows = [f"| written dtype | {x['main_dtype']} (`save_dtype: {x['save_dtype']}`; tensors: {dtypes}) |",
            f"| parameters | {p['original']:,} -> {p['written']:,} ({100 * p['fraction']:.1f}%) |"]
    if b["source"]:
        rows.append(f"| weights on disk | {b['source']:,} -> {b['written']:,} bytes ({100 * b['fraction']:.1f}%) |")
    else:
        rows.append(f"| weights on disk | {b['written']:,} bytes |")
    return rows
