"""Pretrain a small testbed MoE language model and save it as a standard HF checkpoint.

One run: read the corpus, train a byte-level BPE tokenizer, pack every domain into a token stream, build the
model from its transformers config, pretrain it on one device (bf16 autocast on CUDA, AdamW, linear warm-up then
cosine decay, load balancing as in :mod:`tools.testbed.balance`), cast it to bf16, evaluate held-out
per-domain perplexity, a unigram baseline and per-domain expert usage, and write

    OUT/config.json, generation_config.json, model*.safetensors   (save_pretrained, hub-style expert names)
    OUT/tokenizer.json, tokenizer_config.json                     (AutoTokenizer loads them)
    OUT/training.json                                             (everything measured, see ``train``)
    OUT/loss_curve.png, expert_usage.png

An upcycled preset (``arch.UPCYCLED``, ``settings.preset``) trains in two phases in the same run: first the dense
counterpart for ``dense_share`` of the budget, then the MoE built from it (``tools.testbed.upcycle``: the
dense MLP copied into the experts, a small router, a new optimizer) for the rest, with the architecture's balance
recipe. Its folder holds at most 8 files: the weight shards (+ index), config.json, the two tokenizer files,
training.json and one figure, loss_curve.png (both phases' losses and the expert similarity; no
generation_config.json, whose tokens config.json repeats, and no expert_usage.png, whose counts are in
training.json: ``plots.plot_expert_usage`` draws them).

Every run records the pairwise expert similarity (``tools.testbed.similarity``) on held-out tokens at MoE
step 0 (random init, or right after upcycling) and at the end (the saved bf16 model).

Time budget: with ``minutes`` set, the first ``warmup_steps`` steps run at the warm-up learning rate while the
second half of them is timed; the number of steps that fits the remaining budget is fixed then, so the cosine
horizon is exactly the number of steps run. With ``steps`` set, the run is step-exact and time plays no role.
An upcycled run applies this to each phase: the dense phase gets ``dense_share`` of ``minutes`` (or
``dense_steps`` steps, by default ``steps * dense_share / (1 - dense_share)``), the MoE phase the rest (or
``steps``); each phase has its own warm-up and cosine schedule with the same peak learning rate.
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

from moe_compress.errors import UserError
from tools.testbed import experts
from tools.testbed.arch import (
    BALANCE,
    UPCYCLED,
    BalanceSettings,
    UpcycleRecipe,
    build_config,
    count_parameters,
    init_routers,
    moe_blocks,
)
from tools.testbed.balance import Balancer, RouterTap, balance_table
from tools.testbed.data import (
    DEFAULT_EVAL_DATA,
    DEFAULT_TRAIN_DATA,
    WindowSampler,
    encode_streams,
    mixture_weights,
    read_documents,
    split_held_out,
    train_tokenizer,
)
from tools.testbed.evaluate import evaluate_domains, generate_samples, unigram_perplexity
from tools.testbed.plots import plot_expert_usage, plot_loss_curve, plot_upcycled_run
from tools.testbed.similarity import DEFAULT_TOKENS, expert_similarity, similarity_windows
from tools.testbed.upcycle import dense_config, function_gap, mlp_input_stats, segment_layout, upcycle

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Everything that defines a testbed run (recorded in ``training.json``).

    ``eval_data=None`` holds out ``held_out_fraction`` of the training documents of every domain instead of
    reading a separate evaluation corpus. ``balance=None`` uses the architecture's recipe from ``arch.BALANCE``.

    ``preset`` names an upcycled testbed (``arch.UPCYCLED``; ``arch`` must be its architecture); ``dense_share``,
    ``dense_steps``, ``upcycle_noise``, ``upcycle_reinit`` and ``upcycle_shuffle`` override its recipe (None: the
    preset's value).
    ``similarity_tokens`` held-out tokens measure the expert similarity. ``router_lr_scale`` multiplies the
    learning rate of the router weights (the MoE phase of an upcycled run, or the whole run from scratch).
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
    preset: str | None = None
    dense_share: float | None = None
    dense_steps: int | None = None
    upcycle_noise: float | None = None
    upcycle_reinit: float | None = None
    upcycle_shuffle: bool | None = None
    similarity_tokens: int = DEFAULT_TOKENS
    router_lr_scale: float = 1.0


MAX_OUTPUT_FILES = 8  # an upcycled testbed's folder: shards + index + config + 2 tokenizer files + record + figure


def resolve_recipe(settings: TrainSettings) -> UpcycleRecipe | None:
    """The upcycling recipe of ``settings`` (the preset's, with the settings' overrides), or None for a run from
    scratch. Raises ``UserError`` (one line) for inconsistent settings, before anything is read or trained."""
    overrides = {"dense_share": settings.dense_share, "noise": settings.upcycle_noise,
                 "reinit": settings.upcycle_reinit, "shuffle": settings.upcycle_shuffle}
    options = {"dense_share": "--dense-share", "noise": "--upcycle-noise", "reinit": "--upcycle-reinit",
               "shuffle": "--upcycle-shuffle"}
    if settings.router_lr_scale <= 0:
        raise UserError(f"--router-lr-scale must be > 0, got {settings.router_lr_scale}")
    if settings.similarity_tokens < 1:
        raise UserError(f"--similarity-tokens must be >= 1, got {settings.similarity_tokens}")
    if settings.preset is None:
        given = [options[k] for k, v in overrides.items() if v is not None]
        if settings.dense_steps is not None:
            given.append("--dense-steps")
        if given:
            raise UserError(f"{', '.join(given)} only apply to an upcycled --preset ({', '.join(UPCYCLED)})")
        return None
    if settings.preset not in UPCYCLED:
        raise UserError(f"unknown preset {settings.preset!r}; choose one of {', '.join(UPCYCLED)}")
    recipe = UPCYCLED[settings.preset]
    if settings.arch != recipe.arch:
        raise UserError(f"preset {settings.preset} is a {recipe.arch} model, not {settings.arch}")
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if not 0.0 < recipe.dense_share < 1.0:
        raise UserError("--dense-share is the dense phase's share of the budget: give a number strictly between 0 "
                        f"and 1, not {recipe.dense_share}")
    if recipe.noise < 0:
        raise UserError(f"--upcycle-noise must be >= 0, got {recipe.noise}")
    if not 0.0 <= recipe.reinit < 1.0:
        raise UserError(f"--upcycle-reinit is a fraction of each expert's neurons: give 0 <= r < 1, not "
                        f"{recipe.reinit}")
    if settings.dense_steps is not None:
        if settings.steps is None:
            raise UserError("--dense-steps needs --steps (a step-exact run); a timed run splits --minutes by "
                            "--dense-share")
        if settings.dense_steps < 1:
            raise UserError(f"--dense-steps must be >= 1, got {settings.dense_steps}")
    if recipe.shuffle and recipe.scheme != "segments":
        raise UserError(f"--upcycle-shuffle only applies to fine-grained presets (preset {settings.preset} copies "
                        "the whole MLP into every expert)")
    if recipe.scheme == "segments":  # the shapes (with --set applied) must cut into whole segments and groups
        segment_layout(build_config(settings.arch, 256, 0, 1, settings.seq_len, settings.config_overrides,
                                    base=recipe.config))
    return recipe


def _dense_steps(settings: TrainSettings, share: float) -> int | None:
    """The dense phase's step count of a step-exact upcycled run (None for a timed run)."""
    if settings.steps is None:
        return None
    if settings.dense_steps is not None:
        return settings.dense_steps
    return max(1, round(settings.steps * share / (1.0 - share)))


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


def _optimizer(model: nn.Module, settings: TrainSettings, device: torch.device,
               router_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95); weight decay on matrices and embeddings only (ndim >= 2); the router weights in a
    group of their own whose learning rate is ``router_lr_scale`` x the schedule's (``lr_scale``)."""
    routers = {id(block.gate.weight) for block in moe_blocks(model)} if router_lr_scale != 1.0 else set()
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in routers]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if routers:
        groups.append({"params": [p for p in model.parameters() if id(p) in routers],
                       "weight_decay": settings.weight_decay, "lr_scale": router_lr_scale})
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


def _train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, sampler: WindowSampler,
                balancer: Balancer | None, tap: RouterTap | None, settings: TrainSettings, device: torch.device,
                label: str = "") -> _LoopResult:
    """Run the optimisation steps: ``settings.steps`` of them, or as many as fit ``settings.minutes`` (fixed
    after the warm-up from the timed second half of it, so that the cosine horizon is the real step count).
    A dense model trains without ``balancer`` and ``tap`` (no auxiliary loss)."""
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
            log.info("%smeasured %.1f ms/step -> %d steps in total (%.1fM tokens)", label, step_s * 1e3,
                     total, total * tokens_per_step / 1e6)
        progress = 0.0 if step < warmup else (step - warmup) / max(1, total - warmup)
        lr = lr_at(step, warmup, total or warmup, settings.lr, settings.min_lr_ratio)  # warm-up ignores total
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = sampler.sample()  # [B, S + 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [B, S, V]
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        aux_loss = balancer.loss(settings.batch_size, progress) if balancer is not None else lm_loss.new_zeros(())
        (lm_loss + aux_loss).backward()
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if balancer is not None:
            balancer.after_step()
        lm_losses.append(lm_loss.detach())
        aux_losses.append(aux_loss.detach())
        step += 1
        if step % settings.log_every == 0 or step == total:
            ratios = [] if tap is None else balance_table(tap.step_loads().cpu())
            elapsed = time.perf_counter() - t_start
            log.info("%sstep %d/%s  loss %.4f  aux %.4f  lr %.2e  %.0f tok/s  max/min per layer %s", label, step,
                     total or "?", lm_loss.item(), aux_loss.item(), lr, step * tokens_per_step / elapsed,
                     [round(r["max_over_min"], 1) for r in ratios])
    _synchronize(device)
    return _LoopResult(steps=step, warmup=warmup, seconds=time.perf_counter() - t_start,
                       lm_curve=[round(v, 4) for v in torch.stack(lm_losses).tolist()],
                       aux_curve=[round(v, 5) for v in torch.stack(aux_losses).tolist()])


@dataclass
class _Upcycling:
    """What the dense phase and the upcycling produced: the MoE, the dense loop, and their record."""

    model: nn.Module
    loop: _LoopResult
    record: dict


def _dense_phase_and_upcycle(recipe: UpcycleRecipe, config, settings: TrainSettings, sampler: WindowSampler,
                             balance_settings: BalanceSettings, eval_streams: dict[str, np.ndarray],
                             sim_windows: list[torch.Tensor], device: torch.device) -> _Upcycling:
    """Phase 1 of an upcycled run: train the dense counterpart of ``config``, build the MoE from it, measure how
    close the MoE's function is (``upcycle.function_gap``), evaluate the dense model in bf16 and free it."""
    dense_cfg = dense_config(config)
    dense = AutoModelForCausalLM.from_config(dense_cfg)
    dense.to(device)
    dense_params = sum(p.numel() for p in dense.parameters())
    log.info("dense counterpart (%s, MLP intermediate %d): %d parameters", dense_cfg.model_type,
             dense_cfg.intermediate_size, dense_params)
    optimizer = _optimizer(dense, settings, device)
    phase = dataclasses.replace(settings, minutes=settings.minutes * recipe.dense_share,
                                steps=_dense_steps(settings, recipe.dense_share))
    loop = _train_loop(dense, optimizer, sampler, None, None, phase, device, label="dense ")
    del optimizer
    if device.type == "cuda":
        log.info("dense phase: peak GPU memory %.1f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
    t0 = time.perf_counter()
    stats = mlp_input_stats(dense, sampler.sample()[:, :-1])  # one training batch
    model, info = upcycle(dense, config, recipe.scheme, balance_settings.router_init_std, settings.seed + 1,
                          noise=recipe.noise, reinit=recipe.reinit, shuffle=recipe.shuffle, input_stats=stats)
    model.to(device)
    gap = function_gap(dense, model, sim_windows)
    upcycle_s = time.perf_counter() - t0
    log.info("upcycled (%s): MoE vs dense at MoE step 0: max |logit diff| %.3g, mean KL %.3g, perplexity %.3f vs "
             "%.3f", recipe.scheme, gap["max_abs_logit_diff"], gap["mean_kl"], gap["moe_perplexity"],
             gap["dense_perplexity"])
    t0 = time.perf_counter()
    _to_bf16(dense)
    dense_eval = evaluate_domains(dense, None, eval_streams, settings.seq_len, settings.eval_batch_size,
                                  settings.eval_max_tokens)
    del dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    recipe_record = dataclasses.asdict(recipe)
    recipe_record.pop("config")  # the MoE's config is the record's "config"
    record = {
        "preset": settings.preset,
        "recipe": recipe_record,
        "dense_config": dense_cfg.to_dict(),
        "dense_parameters": dense_params,
        "dense_perplexity": dense_eval["perplexity"],  # held-out, bf16, at the end of the dense phase
        "function_gap": gap,
        "experts": info.pop("experts"),
        "layout": info,
        "upcycle_seconds": upcycle_s,
        "dense_eval_seconds": time.perf_counter() - t0,
    }
    return _Upcycling(model=model, loop=loop, record=record)


def _phase_record(loop: _LoopResult, tokens_per_step: int) -> dict:
    return {"steps": loop.steps, "warmup_steps": loop.warmup, "tokens_seen": loop.steps * tokens_per_step,
            "train_seconds": loop.seconds, "tokens_per_second": loop.steps * tokens_per_step / loop.seconds}


def _check_output(out: Path, max_shard_size: str) -> None:
    """Log an upcycled testbed's files; warn when it breaks its limits (at most 8 files, shards within
    ``max_shard_size``, read as transformers does: "15MB" = 15e6 bytes)."""
    files = sorted(p for p in out.iterdir() if p.is_file())
    log.info("wrote %d files: %s", len(files), ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in files))
    if len(files) > MAX_OUTPUT_FILES:
        log.warning("the output folder holds %d files (> %d)", len(files), MAX_OUTPUT_FILES)
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    unit = max_shard_size.upper()[-2:]
    if unit in units:
        limit = float(max_shard_size[:-2]) * units[unit]
        big = [p.name for p in files if p.suffix == ".safetensors" and p.stat().st_size > limit]
        if big:
            log.warning("weight files over %s: %s", max_shard_size, big)


def train(settings: TrainSettings, command: str | None = None) -> dict:
    """Run one testbed training (see the module docstring) and return the record written to ``training.json``.

    The record holds: ``arch``, ``preset``, ``command``, ``seed``, ``settings``, ``balance`` (the recipe used),
    ``config``, ``parameters`` (see ``arch.count_parameters``), ``versions``, ``device``, ``data`` (train tokens
    and mixture weight per domain, held-out tokens), ``steps``, ``warmup_steps``, ``tokens_per_step``,
    ``tokens_seen``, ``train_seconds``, ``tokens_per_second`` (all phases together), ``timings`` (data
    preparation, evaluation, similarity), ``loss_curve`` (per-step ``lm`` and ``aux`` losses, and
    ``moe_from_step``: the first MoE step, 0 unless upcycled), ``eval`` (held-out, unigram and train-text
    perplexity per domain), ``routing`` (held-out ``counts`` {domain: [L][E]} and the per-layer ``balance`` table
    over all domains), ``similarity`` (``start``: MoE step 0, ``end``: the saved model; see
    ``similarity.expert_similarity``) and ``samples`` ({domain: [{prompt, completion}]}). An upcycled run adds
    ``phases`` ({"dense", "moe"}: steps, warm-up, tokens, seconds) and ``upcycle`` (the recipe, the dense config,
    parameter count and held-out perplexity, ``function_gap`` at MoE step 0, each expert's source ``experts``
    [{group, segment}] and the ``layout``).
    """
    if settings.steps is None and settings.warmup_steps < 2:
        raise ValueError("a time-budgeted run needs warmup_steps >= 2 (its second half is timed)")
    recipe = resolve_recipe(settings)
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
    sim_windows = similarity_windows(eval_streams, settings.similarity_tokens, settings.seq_len)

    # Model: from scratch, or upcycled from a dense model trained first (phase 1).
    config = build_config(settings.arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                          settings.seq_len, settings.config_overrides, base=recipe.config if recipe else None)
    upcycling = None
    if recipe is None:
        model = AutoModelForCausalLM.from_config(config, experts_implementation=experts.EXPERTS_IMPLEMENTATION)
        init_routers(model, balance_settings.router_init_std, torch.Generator().manual_seed(settings.seed + 1))
        model.to(device)
    sampler = WindowSampler(train_streams, weights, settings.batch_size, settings.seq_len, device, settings.seed)
    if recipe is not None:
        upcycling = _dense_phase_and_upcycle(recipe, config, settings, sampler, balance_settings, eval_streams,
                                             sim_windows, device)
        model = upcycling.model
    params = count_parameters(model)
    log.info("%s: %s", settings.preset or settings.arch, params)
    t0 = time.perf_counter()
    similarity = {"start": expert_similarity(model, sim_windows)}
    timings["similarity_s"] = time.perf_counter() - t0
    log.info("expert similarity at MoE step 0: mean weight cosine %.4f, mean output cosine %.4f",
             similarity["start"]["mean"]["weight"], similarity["start"]["mean"]["output"])
    tap = RouterTap(model)
    balancer = Balancer(tap, balance_settings)
    optimizer = _optimizer(model, settings, device, settings.router_lr_scale)
    tokens_per_step = settings.batch_size * settings.seq_len

    # Training (the MoE phase of an upcycled run).
    phase = settings if recipe is None else dataclasses.replace(settings,
                                                                minutes=settings.minutes * (1 - recipe.dense_share))
    loop = _train_loop(model, optimizer, sampler, balancer, tap, phase, device, label="" if recipe is None else "MoE ")
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
    t0 = time.perf_counter()
    similarity["end"] = expert_similarity(model, sim_windows)
    timings["similarity_s"] += time.perf_counter() - t0
    for domain, ppl in evaluation["perplexity"].items():
        dense_ppl = f"   dense {upcycling.record['dense_perplexity'][domain]:8.2f}" if upcycling else ""
        log.info("held-out %-10s ppl %8.2f   unigram %8.2f   (train text %8.2f)%s", domain, ppl, unigram[domain],
                 train_text["perplexity"][domain], dense_ppl)
    log.info("held-out balance (max/min per MoE layer): %s", [round(r["max_over_min"], 2) for r in table])
    log.info("expert similarity at the end: mean weight cosine %.4f, mean output cosine %.4f (step 0: %.4f, %.4f)",
             similarity["end"]["mean"]["weight"], similarity["end"]["mean"]["output"],
             similarity["start"]["mean"]["weight"], similarity["start"]["mean"]["output"])

    # Checkpoint and record.
    model.config.use_cache = True
    model.save_pretrained(out, max_shard_size=settings.max_shard_size)
    tokenizer.save_pretrained(out)
    loops = [upcycling.loop, loop] if upcycling else [loop]
    steps = sum(lp.steps for lp in loops)
    seconds = sum(lp.seconds for lp in loops)
    lm_curve = [v for lp in loops for v in lp.lm_curve]
    aux_curve = ([0.0] * upcycling.loop.steps if upcycling else []) + loop.aux_curve
    moe_from_step = upcycling.loop.steps if upcycling else 0
    record = {
        "arch": settings.arch,
        "preset": settings.preset,
        "command": command,
        "seed": settings.seed,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
        "balance": dataclasses.asdict(balance_settings),
        "config": model.config.to_dict(),
        "parameters": params,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "data": {"train_tokens": sizes, "mixture": weights, "eval_tokens": evaluation["tokens"]},
        "steps": steps,
        "warmup_steps": loop.warmup,
        "tokens_per_step": tokens_per_step,
        "tokens_seen": steps * tokens_per_step,
        "train_seconds": seconds,
        "tokens_per_second": steps * tokens_per_step / seconds,
        "timings": timings,
        "loss_curve": {"lm": lm_curve, "aux": aux_curve, "moe_from_step": moe_from_step},
        "eval": {"perplexity": evaluation["perplexity"], "unigram_perplexity": unigram,
                 "train_text_perplexity": train_text["perplexity"]},
        "routing": {"counts": evaluation["counts"], "balance": table},
        "similarity": similarity,
        "samples": samples,
    }
    if upcycling:
        timings["upcycle_s"] = upcycling.record.pop("upcycle_seconds")
        timings["dense_eval_s"] = upcycling.record.pop("dense_eval_seconds")
        record["phases"] = {"dense": _phase_record(upcycling.loop, tokens_per_step),
                            "moe": _phase_record(loop, tokens_per_step)}
        record["upcycle"] = upcycling.record
    (out / "training.json").write_text(json.dumps(record, indent=1))
    name = settings.preset or settings.arch
    title = f"{name}: {params['total'] / 1e6:.1f}M params, {steps * tokens_per_step / 1e6:.0f}M tokens"
    if upcycling:
        (out / "generation_config.json").unlink(missing_ok=True)  # bos/eos/pad only, as in config.json
        plot_upcycled_run(lm_curve, aux_curve, moe_from_step, tokens_per_step, similarity, title,
                          out / "loss_curve.png")
        _check_output(out, settings.max_shard_size)
    else:
        plot_loss_curve(lm_curve, aux_curve, tokens_per_step, title, out / "loss_curve.png")
        plot_expert_usage(evaluation["counts"], f"{settings.arch}: held-out expert usage by domain",
                          out / "expert_usage.png")
    return record
