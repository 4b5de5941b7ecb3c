"""Pretrain a small testbed MoE language model from scratch and save it as a standard HF checkpoint.

One run: read the corpus, train a byte-level BPE tokenizer, pack every domain into a token stream, build the
model from its transformers config, pretrain it on one device (bf16 autocast on CUDA, AdamW, linear warm-up then
cosine decay, load balancing as in :mod:`moe_compress.testbed.balance`), cast it to bf16, evaluate held-out
per-domain perplexity, a unigram baseline and per-domain expert usage, and write

    OUT/config.json, generation_config.json, model*.safetensors   (save_pretrained, hub-style expert names)
    OUT/tokenizer.json, tokenizer_config.json                     (AutoTokenizer loads them)
    OUT/training.json                                             (everything measured, see ``train``)
    OUT/loss_curve.png, expert_usage.png

Time budget: with ``minutes`` set, the first ``warmup_steps`` steps run at the warm-up learning rate while the
second half of them is timed; the number of steps that fits the remaining budget is fixed then, so the cosine
horizon is exactly the number of steps run. With ``steps`` set, the run is step-exact and time plays no role.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from moe_compress.testbed import experts
from moe_compress.testbed.arch import BALANCE, BalanceSettings, build_config, count_parameters, init_routers
from moe_compress.testbed.balance import Balancer, RouterTap, balance_table
from moe_compress.testbed.data import (
    DEFAULT_EVAL_DATA,
    DEFAULT_TRAIN_DATA,
    WindowSampler,
    encode_streams,
    mixture_weights,
    read_documents,
    split_held_out,
    train_tokenizer,
)
from moe_compress.testbed.evaluate import evaluate_domains, generate_samples, unigram_perplexity
from moe_compress.testbed.plots import plot_expert_usage, plot_loss_curve

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Everything that defines a testbed run (recorded in ``training.json``).

    ``eval_data=None`` holds out ``held_out_fraction`` of the training documents of every domain instead of
    reading a separate evaluation corpus. ``balance=None`` uses the architecture's recipe from ``arch.BALANCE``.
    """

    arch: str
    out: Path
    data: Path = DEFAULT_TRAIN_DATA
    eval_data: Path | None = DEFAULT_EVAL_DATA
    minutes: float = 6.0
    steps: int | None = None
    seed: int = 0
    seq_len: int = 512
    batch_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    vocab_size: int = 8192
    tokenizer_chars_per_domain: int = 4_000_000
    domain_alpha: float = 0.5
    held_out_fraction: float = 0.02
    eval_batch_size: int = 64
    eval_max_tokens: int | None = None
    samples_per_domain: int = 3
    sample_tokens: int = 64
    max_shard_size: str = "15MB"
    log_every: int = 100
    config_overrides: dict = field(default_factory=dict)
    balance: BalanceSettings | None = None


def lr_at(step: int, warmup: int, total: int, peak: float, min_ratio: float) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine from ``peak`` down to
    ``min_ratio * peak`` at the last of ``total`` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (timing); no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model: nn.Module, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95); weight decay on matrices and embeddings only (ndim >= 2)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def _to_bf16(model: nn.Module) -> None:
    """Cast the model to bf16 in place, keeping every ``e_score_correction_bias`` buffer [E] in fp32 (as
    DeepSeek-V3 checkpoints do: routing compares score + bias, and bf16 would round the bias away)."""
    biases = {name: buf.detach().clone() for name, buf in model.named_buffers()
              if name.endswith("e_score_correction_bias")}
    model.to(torch.bfloat16)
    for name, value in biases.items():
        module_name, buffer_name = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), buffer_name, value)


def _load_corpora(settings: TrainSettings) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train documents, held-out documents), each grouped by domain."""
    docs = read_documents(settings.data)
    if settings.eval_data is None:
        return split_held_out(docs, settings.held_out_fraction, settings.seed)
    return docs, read_documents(settings.eval_data)


@dataclass
class _LoopResult:
    """What the training loop measured: step counts, wall time of the steps, per-step losses."""

    steps: int
    warmup: int
    seconds: float
    lm_curve: list[float]
    aux_curve: list[float]


def _train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, sampler: WindowSampler, balancer: Balancer,
                tap: RouterTap, settings: TrainSettings, device: torch.device) -> _LoopResult:
    """Run the optimisation steps: ``settings.steps`` of them, or as many as fit ``settings.minutes`` (fixed
    after the warm-up from the timed second half of it, so that the cosine horizon is the real step count)."""
    use_amp = device.type == "cuda"
    tokens_per_step = settings.batch_size * settings.seq_len
    warmup = settings.warmup_steps if settings.steps is None else min(settings.warmup_steps,
                                                                      max(1, settings.steps // 10))
    total = settings.steps  # None until measured in a time-budgeted run
    lm_losses, aux_losses = [], []
    model.train()
    t_start = t_mid = time.perf_counter()
    step = 0
    while total is None or step < total:
        if total is None and step == warmup // 2:
            _synchronize(device)
            t_mid = time.perf_counter()
        if total is None and step == warmup:
            _synchronize(device)
            now = time.perf_counter()
            step_s = (now - t_mid) / (warmup - warmup // 2)
            total = warmup + max(1, int((settings.minutes * 60 - (now - t_start)) / step_s))
            log.info("measured %.1f ms/step -> %d steps in total (%.1fM tokens)", step_s * 1e3, total,
                     total * tokens_per_step / 1e6)
        progress = 0.0 if step < warmup else (step - warmup) / max(1, total - warmup)
        lr = lr_at(step, warmup, total or warmup, settings.lr, settings.min_lr_ratio)  # warm-up ignores total
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sampler.sample()  # [B, S + 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [B, S, V]
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        aux_loss = balancer.loss(settings.batch_size, progress)
        (lm_loss + aux_loss).backward()
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        balancer.after_step()
        lm_losses.append(lm_loss.detach())
        aux_losses.append(aux_loss.detach())
        step += 1
        if step % settings.log_every == 0 or step == total:
            ratios = balance_table(tap.step_loads().cpu())
            elapsed = time.perf_counter() - t_start
            log.info("step %d/%s  loss %.4f  aux %.4f  lr %.2e  %.0f tok/s  max/min per layer %s", step,
                     total or "?", lm_loss.item(), aux_loss.item(), lr, step * tokens_per_step / elapsed,
                     [round(r["max_over_min"], 1) for r in ratios])
    _synchronize(device)
    return _LoopResult(steps=step, warmup=warmup, seconds=time.perf_counter() - t_start,
                       lm_curve=[round(v, 4) for v in torch.stack(lm_losses).tolist()],
                       aux_curve=[round(v, 5) for v in torch.stack(aux_losses).tolist()])


def train(settings: TrainSettings, command: str | None = None) -> dict:
    """Run one testbed training (see the module docstring) and return the record written to ``training.json``.

    The record holds: ``arch``, ``command``, ``seed``, ``settings``, ``balance`` (the recipe used), ``config``,
    ``parameters`` (see ``arch.count_parameters``), ``versions``, ``device``, ``data`` (train tokens and mixture
    weight per domain, held-out tokens), ``steps``, ``warmup_steps``, ``tokens_per_step``, ``tokens_seen``,
    ``train_seconds``, ``tokens_per_second``, ``timings`` (data preparation and evaluation), ``loss_curve``
    (per-step ``lm`` and ``aux`` losses), ``eval`` (held-out, unigram and train-text perplexity per domain),
    ``routing`` (held-out ``counts`` {domain: [L][E]} and the per-layer ``balance`` table over all domains) and
    ``samples`` ({domain: [{prompt, completion}]}).
    """
    if settings.steps is None and settings.warmup_steps < 2:
        raise ValueError("a time-budgeted run needs warmup_steps >= 2 (its second half is timed)")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    balance_settings = settings.balance or BALANCE[settings.arch]
    _seed_everything(settings.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    timings = {}

    # Data and tokenizer.
    t0 = time.perf_counter()
    train_docs, eval_docs = _load_corpora(settings)
    timings["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, settings.vocab_size, settings.tokenizer_chars_per_domain, settings.seed)
    tokenizer.model_max_length = settings.seq_len
    timings["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_streams = encode_streams(tokenizer, train_docs)
    eval_streams = encode_streams(tokenizer, eval_docs)
    timings["encode_s"] = time.perf_counter() - t0
    sizes = {d: len(s) for d, s in train_streams.items()}
    weights = mixture_weights(sizes, settings.domain_alpha)
    log.info("train tokens per domain %s; mixture %s; %s", sizes, {d: round(w, 3) for d, w in weights.items()},
             {k: round(v, 1) for k, v in timings.items()})

    # Model.
    config = build_config(settings.arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                          settings.seq_len, settings.config_overrides)
    model = AutoModelForCausalLM.from_config(config, experts_implementation=experts.EXPERTS_IMPLEMENTATION)
    init_routers(model, balance_settings.router_init_std, torch.Generator().manual_seed(settings.seed + 1))
    model.to(device)
    params = count_parameters(model)
    log.info("%s: %s", settings.arch, params)
    tap = RouterTap(model)
    balancer = Balancer(tap, balance_settings)
    optimizer = _optimizer(model, settings, device)
    sampler = WindowSampler(train_streams, weights, settings.batch_size, settings.seq_len, device, settings.seed)
    tokens_per_step = settings.batch_size * settings.seq_len

    # Training.
    loop = _train_loop(model, optimizer, sampler, balancer, tap, settings, device)
    if device.type == "cuda":
        log.info("peak GPU memory %.1f GiB", torch.cuda.max_memory_allocated(device) / 2**30)

    # Evaluation of the bf16 model, exactly as it is saved.
    t0 = time.perf_counter()
    _to_bf16(model)
    evaluation = evaluate_domains(model, tap, eval_streams, settings.seq_len, settings.eval_batch_size,
                                  settings.eval_max_tokens)
    eval_tokens = max(evaluation["tokens"].values())
    train_text = evaluate_domains(model, tap, train_streams, settings.seq_len, settings.eval_batch_size, eval_tokens)
    unigram = unigram_perplexity(train_streams, weights, eval_streams, len(tokenizer))
    all_counts = torch.tensor(list(evaluation["counts"].values())).sum(0)  # [L, E]
    table = balance_table(all_counts)
    samples = generate_samples(model, tokenizer, eval_docs, settings.samples_per_domain, prompt_tokens=24,
                               new_tokens=settings.sample_tokens, seed=settings.seed)
    timings["eval_s"] = time.perf_counter() - t0
    tap.remove()
    for domain, ppl in evaluation["perplexity"].items():
        log.info("held-out %-10s ppl %8.2f   unigram %8.2f   (train text %8.2f)", domain, ppl, unigram[domain],
                 train_text["perplexity"][domain])
    log.info("held-out balance (max/min per MoE layer): %s", [round(r["max_over_min"], 2) for r in table])

    # Checkpoint and record.
    model.config.use_cache = True
    model.save_pretrained(out, max_shard_size=settings.max_shard_size)
    tokenizer.save_pretrained(out)
    record = {
        "arch": settings.arch,
        "command": command,
        "seed": settings.seed,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
        "balance": dataclasses.asdict(balance_settings),
        "config": model.config.to_dict(),
        "parameters": params,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "data": {"train_tokens": sizes, "mixture": weights, "eval_tokens": evaluation["tokens"]},
        "steps": loop.steps,
        "warmup_steps": loop.warmup,
        "tokens_per_step": tokens_per_step,
        "tokens_seen": loop.steps * tokens_per_step,
        "train_seconds": loop.seconds,
        "tokens_per_second": loop.steps * tokens_per_step / loop.seconds,
        "timings": timings,
        "loss_curve": {"lm": loop.lm_curve, "aux": loop.aux_curve},
        "eval": {"perplexity": evaluation["perplexity"], "unigram_perplexity": unigram,
                 "train_text_perplexity": train_text["perplexity"]},
        "routing": {"counts": evaluation["counts"], "balance": table},
        "samples": samples,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    title = f"{settings.arch}: {params['total'] / 1e6:.1f}M params, {loop.steps * tokens_per_step / 1e6:.0f}M tokens"
    plot_loss_curve(loop.lm_curve, loop.aux_curve, tokens_per_step, title, out / "loss_curve.png")
    plot_expert_usage(evaluation["counts"], f"{settings.arch}: held-out expert usage by domain",
                      out / "expert_usage.png")
    return record
