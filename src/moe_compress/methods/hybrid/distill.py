"""End-to-end distillation of a compressed model against its original (an optional stage after surgery).

Layer-local fits (``refit``) make each MoE block reproduce the original block on the original block's inputs;
errors still add up through the layers, and the per-layer objective (squared error of the block output) is not
what the user measures (the next-token distribution). This stage trains the compressed model (the student) to
reproduce the original model's (the teacher's) next-token distributions on the calibration rows:

    L(theta) = (1 / #real tokens) sum_{rows, real positions} KL( p_teacher(. | prefix) || p_student(. | prefix) )

by minibatch Adam over ``params``: ``"moe"`` (default) the parameters of the compressed MoE blocks (routers,
routed and shared experts), ``"all"`` every parameter but the embeddings and the output head. The student runs
in fp32 in eval mode (no dropout, no router jitter); the teacher runs in its own dtype without gradients.

Over-fitting the calibration rows is the risk (a few hundred rows are a few hundred thousand tokens): every
``every`` steps the KL on ``holdout`` of the rows (every k-th row, never trained on) is measured and the
trainable tensors of the best iterate (the start included) are kept, so the held-out objective never increases.

Domain balance (``domains`` given, with at least two domains): the plain token mean lets the domains with the
largest KL dominate the gradient, and a domain the compressed model already handles fairly well (low KL, e.g.
code) gains little. With per-row domain labels the stage instead minimises the GEOMETRIC mean over the
calibration domains of their mean KL,

    L_bal(theta) = (1/D) sum_d log KL_d(theta),   grad = (1/D) sum_d grad KL_d / KL_d,

so every domain's relative reduction counts the same, whatever its scale. Minibatch gradients use
sum_t w_{d(t)} KL_t / #tokens with w_d = 1 / KL_d, KL_d measured on the held-out rows of domain d at the last
check (refreshed every ``every`` steps), and the kept iterate is the one with the smallest held-out L_bal.
One domain (or none) gives exactly the plain objective.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Literal

import torch

from moe_compress.evaluation.metrics import token_kl

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


def float_tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name (what ``model.to(dtype)`` converts, and more)."""
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def domain_objective(total: torch.Tensor, count: torch.Tensor, balanced: bool) -> tuple[float, torch.Tensor]:
    """The held-out objective and the per-domain gradient weights from per-domain KL sums and token counts.

    total, count: [D] fp64 (KL summed over the held-out tokens of each domain, their number). Returns
    (objective, w [D] fp32): balanced: (mean over the domains with tokens of log KL_d, w_d = 1 / KL_d; 1 for a
    domain without held-out tokens); else (token mean KL, all ones).
    """
    w = torch.ones(total.shape[0])
    if not balanced:
        return float(total.sum() / count.sum().clamp(min=1)), w
    seen = count > 0
    per = (total[seen] / count[seen]).clamp(min=1e-12)
    w[seen] = (1.0 / per).float()
    return float(per.log().mean()), w


def distill(student, teacher, adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
            params: Literal["moe", "all"] = "moe", steps: int = 200, lr: float = 3e-4, batch_rows: int = 8,
            holdout: float = 0.1, every: int = 25, seed: int = 0, device: str | torch.device = "cpu",
            domains: torch.Tensor | None = None, progress: Progress | None = None) -> dict:
    """Train ``student`` in place towards ``teacher`` on calibration rows input_ids [N, L] (mask [N, L]).

    ``domains``: [N] int64 domain id of each row, or None; with two or more domains among the held-out rows the
    objective is the domain-balanced one of the module docstring. Both models are moved to ``device``; the
    student is trained in fp32 and every tensor is returned in its own dtype (exact for the tensors that were not
    trained). Returns a JSON-able record: steps, trainable parameters, held-out KL (token mean) at the start and
    at the kept iterate (``heldout_kl``), per domain too when balanced (``heldout_kl_by_domain``), the step kept,
    rows used for training / held out, seconds.
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
    gen = torch.Generator().manual_seed(seed)

    dom = torch.zeros(n, dtype=torch.long) if domains is None else domains.to(torch.long).cpu()
    n_dom = int(dom.max()) + 1 if n else 1
    balanced = int(torch.unique(dom[held_rows]).numel()) > 1

    def batch_kl(rows: torch.Tensor, grad: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Token KL of the rows [B] -> [B] sums over real tokens (weighted per row by ``weight`` [B])."""
        ids, m = input_ids[rows].to(device), mask[rows].to(device)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=m).logits
        with torch.set_grad_enabled(grad):
            s_logits = student(input_ids=ids, attention_mask=m).logits
            kl = token_kl(t_logits.float().log_softmax(-1), s_logits.float().log_softmax(-1)) * m  # [B, L]
            return kl.sum(1) if weight is None else kl.sum(1) * weight.to(device)

    def held_kl() -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out (KL sum, real tokens) per domain, both [n_dom] fp64."""
        total, count = torch.zeros(n_dom, dtype=torch.float64), torch.zeros(n_dom, dtype=torch.float64)
        for s in range(0, held_rows.numel(), batch_rows):
            rows = held_rows[s:s + batch_rows]
            total.index_add_(0, dom[rows], batch_kl(rows, False).double().cpu())
            count.index_add_(0, dom[rows], mask[rows].sum(1).double())
        return total, count

    total, count = held_kl()
    start_kl = float(total.sum() / count.sum().clamp(min=1))
    start_dom = total / count.clamp(min=1)
    best, weight = domain_objective(total, count, balanced)
    best_kl, best_dom, best_step = start_kl, start_dom, 0
    best_state = {name: p.detach().clone() for name, p in named.items()}
    for step in range(1, steps + 1):
        pick = train_rows[torch.randint(0, train_rows.numel(), (min(batch_rows, train_rows.numel()),),
                                        generator=gen)]
        loss = batch_kl(pick, True, weight[dom[pick]]).sum() / mask[pick].sum().clamp(min=1).to(device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            total, count = held_kl()
            value, weight = domain_objective(total, count, balanced)
            if math.isfinite(value) and value < best:
                best, best_step = value, step
                best_kl, best_dom = float(total.sum() / count.sum().clamp(min=1)), total / count.clamp(min=1)
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
            "lr": lr, "batch_rows": batch_rows, "train_rows": int(train_rows.numel()), "heldout_rows": int(n_hold),
            "heldout_kl": [round(start_kl, 6), round(best_kl, 6)], "kept_step": best_step,
            **({"balance": "domains", "heldout_kl_by_domain": [[round(float(a), 6), round(float(b), 6)]
                                                              for a, b in zip(start_dom, best_dom)]}
               if balanced else {}),
            "seconds": round(time.perf_counter() - t0, 3)}
