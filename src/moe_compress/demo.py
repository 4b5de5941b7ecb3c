"""`moe-compress demo`: the bundled testbed compressed 8 -> 6 and 8 -> 4 experts by the best available methods,
each evaluated against the original, in a few minutes on a CPU.

The lowest-KL result at 4 experts is kept as a checkpoint in ``OUT/best-model`` (`BEST_MODEL`), written by the
same exporter as ``moe-compress compress``.

Evaluation text: the project's held-out corpus when it lies beside a checkout (``../shared/data/eval``),
otherwise the package's own held-out sample (``builtin:demo-eval``). Calibration: ``builtin:demo``.
"""

from __future__ import annotations

from pathlib import Path

from moe_compress.benchmark import BenchSpec, parse_variants, run_bench
from moe_compress.recipe import Calibration

DEMO_MODEL = "builtin:mixtral-8e"
DEMO_METHODS = "frequency,reap,submoe,submoe[align=true],refit"
BEST_MODEL = "best-model"
SHARED_EVAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"
"""The held-out corpus beside a checkout (``src/moe_compress/demo.py`` -> ``../shared/data/eval``)."""


def demo_spec() -> BenchSpec:
    eval_data = str(SHARED_EVAL) if SHARED_EVAL.is_dir() else "builtin:demo-eval"
    return BenchSpec(
        model=DEMO_MODEL,
        variants=parse_variants(DEMO_METHODS),
        budgets=[6, 4],
        calibration=Calibration(data="builtin:demo", n_samples=32, seq_len=256, seed=0, batch_size=8),
        eval_data=eval_data,
        eval_seq_len=256,
        max_windows=6,
        eval_batch_size=8,
        device="cpu",
        save_best=BEST_MODEL,
    )


def run_demo(out: str | Path, overwrite: bool = False, progress=None) -> tuple[list[dict], Path]:
    """The benchmark rows and the folder of the kept checkpoint."""
    rows = run_bench(demo_spec(), out, overwrite=overwrite, progress=progress)
    return rows, Path(out) / BEST_MODEL


def next_steps(best: Path, eval_data: str) -> list[str]:
    """What to do with the kept checkpoint: evaluate it, load it with transformers, serve it with vLLM."""
    import json
    import shlex

    m = json.loads((best / "compression.json").read_text())
    q = shlex.quote(str(best))
    return [
        f"kept {best}: {m['method']['spec']}, {m['experts']['original']} -> {m['experts']['kept']} experts per layer "
        "(the lowest KL at that budget)",
        f"  evaluate: moe-compress eval {q} --reference {DEMO_MODEL} --data {eval_data} --seq-len 256",
        f"  load:     python -c \"from transformers import AutoModelForCausalLM; "
        f"print(AutoModelForCausalLM.from_pretrained({str(best)!r}))\"",
        f"  serve:    vllm serve {q}   (vLLM in its own environment: README, 'Serve the result with vLLM')",
    ]
