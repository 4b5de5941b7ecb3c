"""`moe-compress eval` as a function: load the model (and reference), evaluate, and present the results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moe_compress.errors import UserError

Progress = Callable[[str, int, int], None]
DEFAULT_PROMPTS = ("The history of the city", "def main():", "The patient presented with",
                   "Let $X$ be a scheme and", "It was late in the evening when", "The court held that")


@dataclass
class EvalReport:
    """JSON-ready ``data`` (keys ``ppl``, ``tokens``, [``ppl_reference``, ``ppl_ratio``, ``kld``, ``top1``],
    ``domains``, [``tasks``], [``generations``]) and a rich table view."""

    data: dict = field(default_factory=dict)

    def table(self):
        from rich.table import Table

        t = Table("data", "tokens", "ppl", "ppl ref", "ppl ratio", "KL", "top-1", title="evaluation")
        fmt = lambda v, d=4: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
        rows = [(name, m) for name, m in self.data.get("domains", {}).items()]
        if "ppl" in self.data:
            rows.append(("all", self.data))
        for name, m in rows:
            t.add_row(name, fmt(m.get("tokens")), fmt(m.get("ppl"), 3), fmt(m.get("ppl_reference"), 3),
                      fmt(m.get("ppl_ratio")), fmt(m.get("kld")), fmt(m.get("top1")))
        for task, res in self.data.get("tasks", {}).items():
            t.add_row(f"task {task}", "", "", "", "", "", ", ".join(f"{k}={fmt(v)}" for k, v in res.items()))
        return t


def evaluate_model(model: str, *, reference: str | None = None, data: str | None = None, tasks=(),
                   tasks_dir: str | Path | None = None, limit: int | None = None, seq_len: int = 512,
                   max_windows: int | None = None, batch_size: int = 8, generate: int = 0, device: str = "auto",
                   dtype: str = "float32", progress: Progress | None = None) -> EvalReport:
    from moe_compress.calibration.data import evaluation_windows, read_documents
    from moe_compress.evaluation.metrics import check_same_tokenizer, evaluate_lm, generate_side_by_side
    from moe_compress.models.loading import load_model, load_tokenizer
    from moe_compress.pipeline import pick_device, pick_dtype

    dev = pick_device(device)
    m = load_model(model, dtype=pick_dtype(dtype), device=dev)
    tok = load_tokenizer(model)
    ref = None
    if reference is not None:
        ref = load_model(reference, dtype=pick_dtype(dtype), device=dev)
        check_same_tokenizer(tok, load_tokenizer(reference))
    out: dict = {}
    if data is not None:
        windows = evaluation_windows(read_documents(data), tok, seq_len)
        windows = {d: (w[:max_windows] if max_windows else w) for d, w in windows.items() if len(w)}
        if not windows:
            raise UserError(f"{data} has fewer tokens than one window of {seq_len}; lower --seq-len or add text")
        out.update(evaluate_lm(m, windows, reference=ref, batch_size=batch_size, progress=progress).to_dict())
    if tasks:
        from moe_compress.evaluation.lm_eval_bridge import run_lm_eval

        out["tasks"] = run_lm_eval(m, list(tasks), tokenizer=tok, tasks_dir=tasks_dir, limit=limit,
                                   batch_size=batch_size)["tasks"]
    if generate:
        out["generations"] = generate_side_by_side(m, ref, tok, list(DEFAULT_PROMPTS[:generate]))
    return EvalReport(out)
