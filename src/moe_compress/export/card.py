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
        f"| parameters | `{m['params']}` |",
        f"| calibration | {calib.get('spec', 'none')} ({calib.get('n_samples', 0)} x {calib.get('seq_len', 0)} tokens) |",
        f"| mode | {manifest.get('mode')} |",
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
