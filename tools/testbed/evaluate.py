"""Held-out evaluation of a testbed: per-domain perplexity, a unigram baseline, routing counts and samples."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from moe_compress.errors import UserError
from moe_compress.evaluation.metrics import evaluate_lm
from tools.testbed.balance import RouterTap


def eval_windows(stream: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive windows [W, S + 1] of a token stream, overlapping by one token so that every token after the
    first is predicted exactly once (the partial tail window is dropped)."""
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    n_windows = (len(stream) - 1) // seq_len
    starts = np.arange(n_windows) * seq_len
    return torch.from_numpy(stream[starts[:, None] + np.arange(seq_len + 1)]).long()


def evaluate_domains(model: nn.Module, tap: RouterTap | None, streams: dict[str, np.ndarray], seq_len: int,
                     batch_size: int, max_tokens: int | None = None) -> dict:
    """Perplexity and expert counts of ``model`` on every held-out domain stream.

    Every token of a stream after the first is predicted once, from the ``seq_len`` tokens before it at most:
    the windows [W, S + 1] of `eval_windows` go to the package's evaluator
    (`moe_compress.evaluation.metrics.evaluate_lm`), which scores the S next-token predictions of each window.
    The last token of a window is an input of no scored prediction (a causal model's predictions at positions
    < S do not see it), so the perplexity is that of the model run on the S-token inputs; the expert counts are
    taken over those S tokens too.

    Returns:
        ``{"perplexity": {domain: float}, "tokens": {domain: int}, "counts": {domain: [L][E] int}}``, counts being
        the number of (token, top-k slot) assignments of each expert in each MoE layer (no counts without a
        ``tap``: a dense model).
    """
    device = next(model.parameters()).device
    result: dict[str, dict] = {"perplexity": {}, "tokens": {}, "counts": {}}
    for domain, stream in streams.items():
        windows = eval_windows(stream, seq_len, max_tokens)
        if not len(windows):
            raise UserError(f"held-out text of domain {domain!r} has fewer than seq_len + 1 = {seq_len + 1} tokens: "
                            "give more held-out text (--eval-data) or a smaller --seq-len")
        if tap is not None:
            tap.start_counting(device, positions=seq_len)
        metrics = evaluate_lm(model, {domain: windows}, batch_size=batch_size).overall
        if tap is not None:
            result["counts"][domain] = tap.stop_counting().tolist()
        result["perplexity"][domain] = metrics.ppl
        result["tokens"][domain] = metrics.tokens
    return result


def unigram_perplexity(train_streams: dict[str, np.ndarray], weights: dict[str, float],
                       eval_streams: dict[str, np.ndarray], vocab_size: int) -> dict[str, float]:
    """Per-domain perplexity of an add-one-smoothed unigram model of the training mixture.

    The unigram distribution is the mixture of the domains' token frequencies with the training mixture
    ``weights``, i.e. the token distribution the model was trained on.
    """
    probs = np.zeros(vocab_size)
    for domain, stream in train_streams.items():
        counts = np.bincount(stream, minlength=vocab_size) + 1.0
        probs += weights[domain] * counts / counts.sum()
    log_probs = np.log(probs)
    return {domain: float(np.exp(-log_probs[stream[1:]].mean())) for domain, stream in eval_streams.items()}


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer: PreTrainedTokenizerFast, docs: dict[str, list[str]],
                     per_domain: int, prompt_tokens: int, new_tokens: int, seed: int) -> dict[str, list[dict]]:
    """Sampled continuations (temperature 0.8, top-p 0.95) of the openings of held-out documents.

    Returns ``{domain: [{"prompt": str, "completion": str}]}``; the prompts are the first ``prompt_tokens`` tokens
    of ``per_domain`` documents drawn with ``seed``.
    """
    device = next(model.parameters()).device
    rng = random.Random(seed)
    model.eval()
    samples = {}
    backend = tokenizer.backend_tokenizer
    for domain, texts in docs.items():
        openings = [backend.encode(t[:2000], add_special_tokens=False).ids[:prompt_tokens] for t in texts]
        candidates = [ids for ids in openings if len(ids) == prompt_tokens]
        chosen = rng.sample(candidates, min(per_domain, len(candidates)))
        if not chosen:
            continue
        prompts = torch.tensor(chosen, device=device)
        torch.manual_seed(seed)
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=tokenizer.pad_token_id)
        samples[domain] = [
            {"prompt": tokenizer.decode(p), "completion": tokenizer.decode(o[prompt_tokens:], skip_special_tokens=True)}
            for p, o in zip(prompts, out)
        ]
    return samples
