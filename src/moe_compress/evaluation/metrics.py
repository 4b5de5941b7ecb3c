"""What compression cost: perplexity, KL(reference ‖ model) and top-1 agreement, greedy samples, inference cost.

Protocol (`evaluate_lm`): the text of each domain is tokenised once and cut into non-overlapping windows
``[n, L]`` (``calibration.data.evaluation_windows``); each window is one forward pass and is scored on its
``L - 1`` next-token predictions (position ``t`` predicts token ``t + 1``). Perplexity is
``exp(total NLL / total predicted tokens)`` over all windows of a domain; the ``"all"`` numbers pool every
predicted token of every domain, so they are the token-weighted combination of the domains.

With a reference model (normally the uncompressed original), both models run on the same batch in the same
pass and, on every predicted position, we add up

- ``KL(reference ‖ model) = Σ_v p_ref(v) (log p_ref(v) − log p_model(v))`` (nats per predicted token),
- top-1 agreement: ``argmax p_model == argmax p_ref``,
- the reference's own NLL (for ``ppl_reference`` and ``ppl_ratio = ppl / ppl_reference``).

Log-softmaxes are computed in fp32 (whatever the model dtype) a few positions at a time, so that a large
vocabulary never needs more than one batch of logits plus a bounded fp32 work area; sums are kept in fp64.
Nothing is written to disk. Models are used where they are (their devices and dtypes are not changed); input
ids are sent to the device of each model's input embeddings.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moe_compress.divergence import token_kl
from moe_compress.errors import UserError
from moe_compress.models.loading import CausalLM

ProgressFn = Callable[[str, int, int], None]
"""Progress callback ``progress(stage, done, total)``, as elsewhere in the package."""

_WORK_ELEMENTS = 1 << 24
"""Positions are scored in chunks of at most this many fp32 vocabulary entries (64 MiB per temporary)."""


@dataclass(frozen=True)
class LMMetrics:
    """Language-modelling numbers over a set of predicted tokens.

    ``ppl_reference``, ``ppl_ratio``, ``kld`` (mean KL(reference ‖ model) in nats per predicted token) and
    ``top1`` (fraction of predicted positions where both models' most likely next token agree) are None when no
    reference model was given.
    """

    ppl: float
    tokens: int
    ppl_reference: float | None = None
    ppl_ratio: float | None = None
    kld: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict[str, float | int]:
        """``{"ppl", "tokens"}`` plus ``{"ppl_reference", "ppl_ratio", "kld", "top1"}`` with a reference."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class EvalResult:
    """`evaluate_lm`'s result: ``overall`` pools all domains' tokens; ``domains`` has one entry per domain."""

    overall: LMMetrics
    domains: dict[str, LMMetrics]

    def to_dict(self) -> dict:
        """JSON-ready: the overall keys at top level and ``"domains": {name: {same keys}}``."""
        return {**self.overall.to_dict(), "domains": {d: m.to_dict() for d, m in self.domains.items()}}


@dataclass
class _Sums:
    """Running sums over predicted tokens (Python floats are fp64)."""

    tokens: int = 0
    nll: float = 0.0
    nll_reference: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, other: _Sums) -> None:
        self.tokens += other.tokens
        self.nll += other.nll
        self.nll_reference += other.nll_reference
        self.kl += other.kl
        self.agree += other.agree

    def metrics(self, with_reference: bool) -> LMMetrics:
        ppl = math.exp(self.nll / self.tokens)
        if not with_reference:
            return LMMetrics(ppl=ppl, tokens=self.tokens)
        ppl_ref = math.exp(self.nll_reference / self.tokens)
        return LMMetrics(ppl=ppl, tokens=self.tokens, ppl_reference=ppl_ref, ppl_ratio=ppl / ppl_ref,
                         kld=self.kl / self.tokens, top1=self.agree / self.tokens)


def _input_device(model: CausalLM) -> torch.device:
    return model.get_input_embeddings().weight.device


def _vocab_rows(model: CausalLM) -> int:
    return model.get_input_embeddings().num_embeddings


def _check_windows(windows: Mapping[str, torch.Tensor], vocab: int) -> None:
    if not windows:
        raise UserError("no evaluation windows: give at least one domain of text")
    for domain, w in windows.items():
        if w.dim() != 2 or w.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"windows[{domain!r}] must be an integer tensor [n, L], got {w.dtype} {tuple(w.shape)}")
        if w.shape[1] < 2:
            raise UserError(f"evaluation windows of {domain!r} have length {w.shape[1]}; seq_len must be >= 2")
        if w.shape[0] == 0:
            raise UserError(f"domain {domain!r} has no evaluation window: its text is shorter than one window; "
                            "lower the sequence length or give more text")
        if int(w.min()) < 0 or int(w.max()) >= vocab:
            raise UserError(f"windows of {domain!r} hold token ids outside the model's vocabulary of {vocab}: "
                            "were they tokenised with another tokenizer?")


def _score_batch(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None) -> _Sums:
    """Sums over the predicted positions of one batch.

    Args:
        logits: ``[B, L, V]`` the model's logits on the batch (any float dtype).
        targets: ``[B, L - 1]`` the next tokens (``input_ids[:, 1:]``), on ``logits.device``.
        ref_logits: ``[B, L, V]`` the reference's logits on the same batch (same device), or None.

    Position ``t`` of ``logits`` predicts ``targets[:, t]``; the last position has no target and is ignored.
    """
    n_pos, vocab = targets.shape[1], logits.shape[-1]
    chunk = max(1, _WORK_ELEMENTS // vocab)
    nll, nll_ref, kl, agree = [], [], [], []
    for b in range(logits.shape[0]):
        for s in range(0, n_pos, chunk):
            e = min(s + chunk, n_pos)
            t = targets[b, s:e, None]                                   # [c, 1]
            lp = torch.log_softmax(logits[b, s:e].float(), dim=-1)     # [c, V] fp32
            nll.append(-lp.gather(-1, t).squeeze(-1))
            if ref_logits is not None:
                lq = torch.log_softmax(ref_logits[b, s:e].float(), dim=-1)
                nll_ref.append(-lq.gather(-1, t).squeeze(-1))
                kl.append(token_kl(lq, lp))
                agree.append(lp.argmax(-1) == lq.argmax(-1))
            del lp
    sums = _Sums(tokens=targets.numel(), nll=_fp64_sum(nll))
    if ref_logits is not None:
        sums.nll_reference, sums.kl = _fp64_sum(nll_ref), _fp64_sum(kl)
        sums.agree = int(torch.cat(agree).sum())
    return sums


def _fp64_sum(parts: list[torch.Tensor]) -> float:
    """Sum of per-position fp32 values, accumulated in fp64 (on the CPU: fp64 is not on every device)."""
    return float(torch.cat(parts).cpu().double().sum())


def evaluate_lm(
    model: CausalLM,
    windows: Mapping[str, torch.Tensor],
    *,
    reference: CausalLM | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Perplexity of ``model`` (and KL, top-1 agreement, reference perplexity against ``reference``) per domain.

    Args:
        model: a causal LM (``model(input_ids).logits`` is ``[B, L, V]``), e.g. the compressed model.
        windows: ``{domain: LongTensor [n, L]}`` non-overlapping token windows (see the module docstring);
            domains may have different ``L``. A batch never mixes domains.
        reference: the model to compare with (normally the original), sharing ``model``'s tokenizer; it runs on
            the same batches in the same pass. None: perplexity only.
        batch_size: windows per forward pass. Peak memory is about one batch of logits per model
            (``batch_size · L · V`` in the model's dtype) plus a bounded fp32 work area.
        progress: called as ``progress(f"eval {domain}", windows_done, windows_total)``.

    Returns:
        An `EvalResult`; ``result.to_dict()`` is ``{"ppl", "tokens", ["ppl_reference", "ppl_ratio", "kld",
        "top1"], "domains": {domain: {same keys}}}`` where ``tokens`` counts predicted tokens (``n · (L − 1)``).

    Raises:
        UserError: a domain without windows, token ids outside the vocabulary, or a reference whose vocabulary
            differs from the model's.
    """
    vocab = _vocab_rows(model)
    if reference is not None and _vocab_rows(reference) != vocab:
        raise UserError(f"the reference model has a vocabulary of {_vocab_rows(reference)} tokens and the model "
                        f"{vocab}: KL and top-1 agreement need both models to share one tokenizer")
    _check_windows(windows, vocab)
    models = [m for m in (model, reference) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        per_domain = {d: _evaluate_domain(model, reference, w, d, batch_size, progress) for d, w in windows.items()}
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    total = _Sums()
    for sums in per_domain.values():
        total.add(sums)
    with_ref = reference is not None
    return EvalResult(overall=total.metrics(with_ref),
                      domains={d: s.metrics(with_ref) for d, s in per_domain.items()})


def evaluate_assigned(
    windows: Mapping[str, torch.Tensor],
    assignments: Mapping[str, Mapping[str, Sequence[str]]],
    load: Callable[[str], nn.Module],
    *,
    reference: nn.Module | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> dict[str, EvalResult]:
    """`evaluate_lm` where each window is scored by a model of its own: ``assignments[a][domain][j]`` names the
    model that scores window ``j`` of ``domain`` under assignment ``a`` (e.g. "routed", "oracle"); ``load(name)``
    builds that model. Models are built one at a time, in the order of first use, and dropped after their
    windows of every assignment are scored, so at most one of them is in memory beside ``reference``; a window
    that several assignments give the same model is scored once.

    Returns {assignment: EvalResult}; the sums are those of `evaluate_lm` (one window = the same numbers whichever
    batch it is in), so an assignment that names one model everywhere gives that model's `evaluate_lm` result.
    """
    for a, choice in assignments.items():
        for d, w in windows.items():
            if len(choice.get(d, ())) != w.shape[0]:
                raise ValueError(f"assignment {a!r} names {len(choice.get(d, ()))} models for the {w.shape[0]} "
                                 f"windows of {d!r}")
    names = list(dict.fromkeys(n for choice in assignments.values() for d in windows for n in choice[d]))
    sums = {a: {d: _Sums() for d in windows} for a in assignments}
    for name in names:
        model = load(name)
        model.eval()
        _check_windows(windows, _vocab_rows(model))
        if reference is not None:
            reference.eval()
            if _vocab_rows(reference) != _vocab_rows(model):
                raise UserError(f"the reference model has a vocabulary of {_vocab_rows(reference)} tokens and the "
                                f"model {_vocab_rows(model)}: KL and top-1 agreement need one tokenizer")
        for d, w in windows.items():
            rows = sorted({j for choice in assignments.values() for j, n in enumerate(choice[d]) if n == name})
            if not rows:
                continue
            per_window = dict(zip(rows, _window_sums(model, reference, w[rows], d, batch_size, progress)))
            for a, choice in assignments.items():
                for j, n in enumerate(choice[d]):
                    if n == name:
                        sums[a][d].add(per_window[j])
        del model
    with_ref = reference is not None
    out = {}
    for a, per_domain in sums.items():
        total = _Sums()
        for s in per_domain.values():
            total.add(s)
        out[a] = EvalResult(overall=total.metrics(with_ref), domains={d: s.metrics(with_ref)
                                                                      for d, s in per_domain.items()})
    return out


def _batch_logits(model: nn.Module, reference: nn.Module | None, windows: torch.Tensor, domain: str,
                  batch_size: int, progress: ProgressFn | None):
    """Per batch of ``windows``: (logits [B, L, V], targets [B, L-1], reference logits or None), on the model's
    device; the reference's logits must have the model's shape (one tokenizer and vocabulary)."""
    n = windows.shape[0]
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].long()
        logits = model(input_ids=batch.to(_input_device(model)), use_cache=False).logits
        ref_logits = None
        if reference is not None:
            ref_logits = reference(input_ids=batch.to(_input_device(reference)), use_cache=False).logits
            if ref_logits.shape != logits.shape:
                raise UserError(f"the reference's logits {tuple(ref_logits.shape)} differ in shape from the model's "
                                f"{tuple(logits.shape)}: both must share one tokenizer and vocabulary")
            ref_logits = ref_logits.to(logits.device)
        yield logits, batch[:, 1:].to(logits.device), ref_logits
        del logits, ref_logits
        if progress:
            progress(f"eval {domain}", min(start + batch_size, n), n)


@torch.inference_mode()
def _window_sums(model: nn.Module, reference: nn.Module | None, windows: torch.Tensor, domain: str,
                 batch_size: int, progress: ProgressFn | None) -> list[_Sums]:
    """`_evaluate_domain`'s sums, one per window (batched the same way)."""
    return [_score_batch(logits[b:b + 1], targets[b:b + 1], None if ref is None else ref[b:b + 1])
            for logits, targets, ref in _batch_logits(model, reference, windows, domain, batch_size, progress)
            for b in range(logits.shape[0])]


@torch.inference_mode()
def _evaluate_domain(model: CausalLM, reference: CausalLM | None, windows: torch.Tensor, domain: str,
                     batch_size: int, progress: ProgressFn | None) -> _Sums:
    sums = _Sums()
    for logits, targets, ref in _batch_logits(model, reference, windows, domain, batch_size, progress):
        sums.add(_score_batch(logits, targets, ref))
    return sums


def check_same_tokenizer(tokenizer, reference_tokenizer) -> None:
    """Raise `UserError` unless both tokenizers map the same strings to the same ids (needed for KL/top-1)."""
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise UserError("the reference model's tokenizer differs from the model's: KL and top-1 agreement compare "
                        "next-token distributions and need the same tokenizer (compare against the original model)")


@torch.inference_mode()
def generate_side_by_side(model: CausalLM, reference: CausalLM | None, tokenizer, prompts: Sequence[str],
                          max_new_tokens: int = 32) -> list[dict[str, str]]:
    """Greedy continuations of each prompt by ``model`` and ``reference`` (deterministic).

    Returns:
        One row per prompt: ``{"prompt", "model", "reference"}`` (``"reference"`` only when one is given); the
        continuations are the decoded new tokens only, special tokens removed.
    """
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    rows = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        if enc["input_ids"].shape[1] == 0:
            raise UserError("empty generation prompt: give each prompt some text")
        row = {"prompt": prompt}
        for key, m in (("model", model), ("reference", reference)):
            if m is None:
                continue
            dev = _input_device(m)
            out = m.generate(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                             generation_config=config)
            row[key] = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class InferenceCost:
    """Size and forward-pass speed of a model (see `inference_cost`)."""

    params: int                  # all parameters (tied weights counted once)
    params_experts: int          # parameters whose name contains ".experts." (routed experts)
    weight_bytes: int            # bytes of all parameters in their current dtypes
    tokens_per_s: float          # batch · seq_len / median forward time
    seconds_per_forward: float   # median over the timed runs
    seq_len: int
    batch: int
    device: str
    peak_memory_bytes: int | None = None  # CUDA only: peak allocated memory during the timed runs
    run_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"params", "params_experts", "weight_bytes"}``; routed experts are detected by name (``.experts.``)."""
    params = experts = nbytes = 0
    for name, p in model.named_parameters():
        params += p.numel()
        nbytes += p.numel() * p.element_size()
        if ".experts." in name:
            experts += p.numel()
    return {"params": params, "params_experts": experts, "weight_bytes": nbytes}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def inference_cost(model: CausalLM, vocab: int | Sized | None = None, *, seq_len: int = 512, batch: int = 1,
                   runs: int = 5, warmup: int = 1, seed: int = 0) -> InferenceCost:
    """Parameter counts, weight memory and forward-pass throughput of ``model`` where it is.

    Args:
        vocab: token ids are drawn uniformly from ``[0, vocab)``; an int, a tokenizer (``len(tokenizer)``) or
            None for the model's input-embedding rows.
        seq_len, batch: the shape ``[batch, seq_len]`` of the timed forward pass (no KV cache).
        runs, warmup: timed runs (the median is reported) after ``warmup`` untimed ones. On CUDA the device is
            synchronised around each run.
    """
    n_vocab = _vocab_rows(model) if vocab is None else vocab if isinstance(vocab, int) else len(vocab)
    device = _input_device(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_vocab, (batch, seq_len), generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(runs):
            _synchronize(device)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            _synchronize(device)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return InferenceCost(**parameter_counts(model), tokens_per_s=batch * seq_len / median,
                         seconds_per_forward=median, seq_len=seq_len, batch=batch, device=str(device),
                         peak_memory_bytes=peak, run_seconds=times)


def compare_costs(model: InferenceCost, reference: InferenceCost) -> dict[str, dict[str, float]]:
    """``{quantity: {"model", "reference", "ratio"}}`` with ``ratio = model / reference`` for the parameter counts,
    weight bytes, tokens/s (ratio > 1: faster) and peak memory (when both have it)."""
    keys = ["params", "params_experts", "weight_bytes", "tokens_per_s"]
    if model.peak_memory_bytes is not None and reference.peak_memory_bytes is not None:
        keys.append("peak_memory_bytes")
    out = {}
    for k in keys:
        a, b = getattr(model, k), getattr(reference, k)
        out[k] = {"model": a, "reference": b, "ratio": a / b if b else float("nan")}
    return out
