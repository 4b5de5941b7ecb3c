"""`moe-compress demo`: the bundled testbed compressed 8 -> 6 and 8 -> 4 experts by the best available methods,
each evaluated against the original, in a few minutes on a CPU.

Evaluation text: the project's held-out corpus when it lies beside a checkout (``../shared/data/eval``),
otherwise the package's own held-out sample (``builtin:demo-eval``). Calibration: ``builtin:demo``.
"""

from __future__ import annotations

from pathlib import Path

from moe_compress.benchmark import BenchSpec, parse_variants, run_bench
from moe_compress.recipe import Calibration

DEMO_MODEL = "builtin:mixtral-8e"
DEMO_METHODS = "frequency,reap,submoe,submoe[align=true],refit"
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
    )


def run_demo(out: str | Path, overwrite: bool = False, progress=None) -> list[dict]:
    return run_bench(demo_spec(), out, overwrite=overwrite, progress=progress)
