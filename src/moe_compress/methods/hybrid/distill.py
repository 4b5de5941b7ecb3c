"""End-to-end distillation of a compressed model against its original (an optional stage after surgery).

Layer-local fits (``refit``) make each MoE block reproduce the original block on the original block's inputs;
errors still add up through the layers, and the per-layer objective (squared error of the block output) is not
what the user measures (the next-token distribution). This stage trains the compressed model (the student) to
reproduce the original model's (the teacher's) next-token distributions on the calibration rows:

    L(theta) = (1 / #real tokens) sum_{rows, real positions} KL( p_teacher(. | prefix) || p_student(. | prefix) )

by minibatch Adam (``schedule``: a constant step size, or ``"cosine"``: a linear warm-up over the first 5% of
the steps, then a cosine decay to zero) over ``params``: ``"moe"`` (default) the parameters of the compressed
MoE blocks (routers, routed and shared experts), ``"all"`` every parameter but the embeddings and the output
head. The student runs in fp32 in eval mode (no dropout, no router jitter); the teacher runs in its own dtype
without gradients.

Over-fitting the calibration rows is the risk (a few hundred rows are a few hundred thousand tokens): every
``every`` steps the KL on ``holdout`` of the rows (every k-th row, never trained on) is measured and the
trainable tensors of the best iterate (the start included) are kept, so the held-out KL never increases.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Literal

import torch

from moe_compress.divergence import token_kl

Progress = Callable[[str, int, int], None]


def trainable_parameters(model, adapter, which: Literal["moe", "all"]) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} trained by the stage: the MoE blocks' (``moe``), or all but embeddings/head (``all``)."""
    if which == "moe":
        blocks = adapter.moe_blocks(model)
        ids = {id(p) for b in blocks.values() for p in b.parameters()}
        return {n: p for n, p in model.named_parameters() if id(p) in ids}
    skip = {id(p) for p in model.get_input_embeddings().parameters()}
    out = model.get_output_embeddings()
    if out is not None:
        skip |= {id(p) for p in out.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in skip}


def step_size_factor(i: int, steps: int, schedule: str) -> float:
    """Multiplier of the step size at optimizer step i (0-based) of ``steps``: 1 (``constant``), or (``cosine``)
    a linear warm-up over the first 5% of the steps, then a half cosine from 1 towards 0 (reached one step after
    the last)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, round(0.05 * steps))
    if i < warm:
        return (i + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))


def float_tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name (what ``model.to(dtype)`` converts, and more)."""
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def distill(student, teacher, adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
            params: Literal["moe", "all"] = "moe", steps: int = 200, lr: float = 3e-4, batch_rows: int = 8,
            holdout: float = 0.1, every: int = 25, schedule: Literal["constant", "cosine"] = "constant",
            seed: int = 0, device: str | torch.device = "cpu", progress: Progress | None = None) -> dict:
    """Train ``student`` in place towards ``teacher`` on calibration rows input_ids [N, L] (mask [N, L]).

    Both models are moved to ``device``; the student is trained in fp32 and every tensor is returned in its own
    dtype (exact for the tensors that were not trained). Returns a JSON-able record: steps, trainable parameters,
    held-out KL at the start and at the kept iterate (``heldout_kl``), the step kept, rows used for training /
    held out, seconds.
    """
    t0 = time.perf_counter()
    n = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    n_hold = min(n - 1, max(1, round(n * holdout))) if holdout > 0 and n > 1 else 0
    held = torch.zeros(n, dtype=torch.bool)
    if n_hold:
        held[torch.linspace(0, n - 1, n_hold).round().long()] = True
    train_rows, held_rows = torch.nonzero(~held).squeeze(1), torch.nonzero(held).squeeze(1)
    if not n_hold:
        held_rows = train_rows

    dtypes = {name: t.dtype for name, t in float_tensors(student).items()}
    student.to(device=device, dtype=torch.float32)
    teacher.to(device)
    named = trainable_parameters(student, adapter, params)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in named.values():
        p.requires_grad_(True)
    student.eval()
    teacher.eval()
    opt = torch.optim.Adam(list(named.values()), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: step_size_factor(i, steps, schedule))
    gen = torch.Generator().manual_seed(seed)

    def batch_kl(rows: torch.Tensor, grad: bool) -> torch.Tensor:
        ids, m = input_ids[rows].to(device), mask[rows].to(device)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=m).logits
        with torch.set_grad_enabled(grad):
            s_logits = student(input_ids=ids, attention_mask=m).logits
            real = m.bool()
            return token_kl(t_logits[real].float().log_softmax(-1), s_logits[real].float().log_softmax(-1)).mean()

    def held_kl() -> float:
        total, count = 0.0, 0
        for s in range(0, held_rows.numel(), batch_rows):
            rows = held_rows[s:s + batch_rows]
            k = int(mask[rows].sum())
            total += float(batch_kl(rows, False)) * k
            count += k
        return total / max(count, 1)

    start = best = held_kl()
    best_step, best_state = 0, {name: p.detach().clone() for name, p in named.items()}
    for step in range(1, steps + 1):
        pick = torch.randint(0, train_rows.numel(), (min(batch_rows, train_rows.numel()),), generator=gen)
        loss = batch_kl(train_rows[pick], True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            value = held_kl()
            if math.isfinite(value) and value < best:
                best, best_step = value, step
                best_state = {name: p.detach().clone() for name, p in named.items()}
        if progress:
            progress("distill", step, steps)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(best_state[name])
            p.requires_grad_(False)
        for name, t in float_tensors(student).items():  # back to each tensor's own dtype (fp32 -> bf16 exact)
            t.data = t.data.to(dtypes[name])
    return {"steps": steps, "params": params, "trainable": int(sum(p.numel() for p in named.values())),
            "lr": lr, "schedule": schedule, "batch_rows": batch_rows, "train_rows": int(train_rows.numel()),
            "heldout_rows": int(n_hold),
            "heldout_kl": [round(start, 6), round(best, 6)], "kept_step": best_step,
            "seconds": round(time.perf_counter() - t0, 3)}
