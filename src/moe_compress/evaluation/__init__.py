"""Measuring what compression cost.

- `metrics`: perplexity, KL(reference ‖ model) and top-1 agreement in one streaming pass over token windows
  (`evaluate_lm`), greedy generations side by side, parameter counts and forward-pass throughput.
- `lm_eval_bridge`: zero-shot tasks through lm-evaluation-harness (optional dependency, offline task files) and a
  direct log-likelihood scorer for multiple-choice files.
"""

from moe_compress.evaluation.lm_eval_bridge import ChoiceScores, run_lm_eval, score_choices, score_task_file
from moe_compress.evaluation.metrics import (
    EvalResult,
    InferenceCost,
    LMMetrics,
    check_same_tokenizer,
    compare_costs,
    evaluate_lm,
    generate_side_by_side,
    inference_cost,
)

__all__ = [
    "ChoiceScores",
    "EvalResult",
    "InferenceCost",
    "LMMetrics",
    "check_same_tokenizer",
    "compare_costs",
    "evaluate_lm",
    "generate_side_by_side",
    "inference_cost",
    "run_lm_eval",
    "score_choices",
    "score_task_file",
]
