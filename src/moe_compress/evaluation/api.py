"""`moe-compress eval` as a function: load the model (and reference), evaluate, and present the results."""

from __future__ import annotations

import dataclasses
import statistics
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

    def cost_table(self):
        """The ``cost`` entry as a table (model, reference, ratio), or None when it was not measured."""
        from rich.table import Table

        cost = self.data.get("cost")
        if not cost:
            return None
        m, ref = cost["model"], cost.get("reference")
        t = Table("inference cost", "model", *(("reference", "ratio") if ref else ()),
                  caption=f"tokens/s: median of {len(m['run_seconds'])} forward passes of batch {m['batch']} x "
                          f"{m['seq_len']} tokens on {m['device']} after {cost['warmup']} warm-up")
        rows = [("parameters", "params", lambda v: f"{v / 1e6:.2f}M"),
                ("routed-expert parameters", "params_experts", lambda v: f"{v / 1e6:.2f}M"),
                ("weight memory", "weight_bytes", lambda v: f"{v / 2**20:.1f} MiB"),
                ("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"),
                ("peak device memory (weights + forward)", "peak_memory_bytes", lambda v: f"{v / 2**20:.1f} MiB")]
        for label, key, fmt in rows:
            if key not in m:
                continue
            cells = [fmt(m[key])]
            if ref:
                ratio = cost["ratio"].get(key)
                cells += [fmt(ref[key]) if key in ref else "-", "-" if ratio is None else f"{ratio:.3f}"]
            t.add_row(label, *cells)
        return t

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
                   dtype: str = "float32", compare: bool = True, cost: bool = True, cost_runs: int = 5,
                   progress: Progress | None = None) -> EvalReport:
    """Evaluate ``model`` (see the CLI's ``eval``). ``reference`` is used for KL/top-1/ppl ratio when ``compare``
    and for the inference-cost comparison when ``cost``; ``cost`` adds ``data["cost"]`` (`measure_cost`)."""
    from moe_compress.calibration.data import evaluation_windows, read_documents
    from moe_compress.devices import pick_device, pick_dtype
    from moe_compress.evaluation.metrics import check_same_tokenizer, evaluate_lm, generate_side_by_side
    from moe_compress.models.loading import load_model, load_tokenizer

    dev = pick_device(device)
    m = load_model(model, dtype=pick_dtype(dtype), device=dev)
    tok = load_tokenizer(model)
    ref = None
    if reference is not None and not (compare or cost):
        reference = None
    if reference is not None:
        ref = load_model(reference, dtype=pick_dtype(dtype), device=dev)
        if compare:  # KL and top-1 compare next-token distributions; the cost comparison needs no shared tokenizer
            check_same_tokenizer(tok, load_tokenizer(reference))
    out: dict = {}
    if data is not None:
        windows = evaluation_windows(read_documents(data), tok, seq_len)
        windows = {d: (w[:max_windows] if max_windows else w) for d, w in windows.items() if len(w)}
        if not windows:
            raise UserError(f"{data} has fewer tokens than one window of {seq_len}; lower --seq-len or add text")
        out.update(evaluate_lm(m, windows, reference=ref if compare else None, batch_size=batch_size,
                               progress=progress).to_dict())
    if tasks:
        from moe_compress.evaluation.lm_eval_bridge import run_lm_eval

        out["tasks"] = run_lm_eval(m, list(tasks), tokenizer=tok, tasks_dir=tasks_dir, limit=limit,
                                   batch_size=batch_size)["tasks"]
    if generate:
        out["generations"] = generate_side_by_side(m, ref, tok, list(DEFAULT_PROMPTS[:generate]))
    if cost:
        out["cost"] = measure_cost(m, ref, seq_len=seq_len, runs=cost_runs)
    return EvalReport(out)


def measure_cost(model, reference=None, *, seq_len: int = 512, batch: int = 1, runs: int = 5,
                 warmup: int = 1) -> dict:
    """Inference cost of ``model`` (and ``reference``): parameters, weight memory, forward tokens/s.

    Each model runs ``warmup`` untimed forward passes, then ``runs`` timed ones on the same random ``[batch,
    seq_len]`` token ids (no KV cache; CUDA synchronised around each run); tokens/s is ``batch * seq_len /``
    the median time. The two models' runs alternate (model, reference, model, ...) so that a change in machine
    load affects both alike. ``seq_len`` is capped at the model's ``max_position_embeddings``.

    Returns:
        ``{"model": InferenceCost dict, "warmup": n, ["reference": ..., "ratio": {quantity: model / reference}]}``
        (ratio of tokens/s > 1: the model is faster).
    """
    import torch

    from moe_compress.evaluation.metrics import compare_costs, inference_cost

    limit = getattr(model.config, "max_position_embeddings", None)
    seq_len = min(seq_len, limit) if limit else seq_len
    models = {"model": model} if reference is None else {"model": model, "reference": reference}
    for m in models.values():  # warm-up (allocator, kernels), not timed
        if warmup:
            inference_cost(m, seq_len=seq_len, batch=batch, runs=warmup, warmup=0)
    times: dict[str, list[float]] = {k: [] for k in models}
    peaks: dict[str, list[int]] = {k: [] for k in models}
    last = {}
    for _ in range(runs):
        for key, m in models.items():
            dev = m.get_input_embeddings().weight.device
            before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            last[key] = c = inference_cost(m, seq_len=seq_len, batch=batch, runs=1, warmup=0)
            times[key] += c.run_seconds
            if c.peak_memory_bytes is not None:  # this model alone: its weights + its forward's activations
                peaks[key].append(c.weight_bytes + c.peak_memory_bytes - before)
    costs = {}
    for key, c in last.items():
        median = statistics.median(times[key])
        costs[key] = dataclasses.replace(c, run_seconds=times[key], seconds_per_forward=median,
                                         tokens_per_s=batch * seq_len / median,
                                         peak_memory_bytes=max(peaks[key]) if peaks[key] else None)
    out = {"model": costs["model"].to_dict(), "warmup": warmup}
    if reference is not None:
        out["reference"] = costs["reference"].to_dict()
        out["ratio"] = {k: v["ratio"] for k, v in compare_costs(costs["model"], costs["reference"]).items()}
    return out
