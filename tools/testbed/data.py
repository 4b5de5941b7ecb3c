"""Text corpora, the byte-level BPE tokenizer and packed token streams for testbed training.

A corpus is a file or folder of ``.txt``, ``.jsonl``, ``.jsonl.xz`` or ``.parquet`` files (any data SPEC of the
package, in fact), read by the package's own reader (`moe_compress.calibration.data.read_documents`). JSON lines
hold ``{"text", "domain"}`` (``domain`` defaults to the file's name); a ``.txt`` file is one document whose
domain is the file's name. Documents are packed into one token stream per domain, each document followed by the
end-of-text token.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moe_compress.calibration import data as package_data
from moe_compress.errors import UserError

# the project's corpus beside the checkout (REPO/tools/testbed/data.py -> REPO/../shared/data)
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DEFAULT_TRAIN_DATA = SHARED_DATA / "train"
DEFAULT_EVAL_DATA = SHARED_DATA / "eval"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def read_documents(spec: str | Path) -> dict[str, list[str]]:
    """The non-blank documents of a data SPEC grouped by domain, domains sorted by name, documents in file
    order (`moe_compress.calibration.data.read_documents`; a missing path or unreadable file is a `UserError`)."""
    docs = package_data.texts_by_domain(package_data.read_documents(str(spec)))
    return {domain: docs[domain] for domain in sorted(docs)}


def split_held_out(docs: dict[str, list[str]], fraction: float, seed: int
                   ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split every domain's documents into (train, held-out), holding out ``fraction`` of them (at least one)."""
    rng = random.Random(seed)
    train, held = {}, {}
    for domain, texts in docs.items():
        order = list(range(len(texts)))
        rng.shuffle(order)
        n_held = max(1, round(fraction * len(texts))) if len(texts) > 1 else 0
        held_idx = set(order[:n_held])
        train[domain] = [t for i, t in enumerate(texts) if i not in held_idx]
        held[domain] = [t for i, t in enumerate(texts) if i in held_idx]
    return train, {d: t for d, t in held.items() if t}


def train_tokenizer(docs: dict[str, list[str]], vocab_size: int, chars_per_domain: int, seed: int
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on up to ``chars_per_domain`` characters of every domain.

    Sampling the same amount of text from each domain keeps small domains (code, math) well tokenized. Token 0 is
    ``<|endoftext|>`` (eos and bos), token 1 is ``<|pad|>``.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    for texts in docs.values():
        order = list(range(len(texts)))
        rng.shuffle(order)
        budget = chars_per_domain
        for i in order:
            if budget <= 0:
                break
            sample.append(texts[i][:budget])
            budget -= len(sample[-1])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(sample, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN)


def encode_streams(tokenizer: PreTrainedTokenizerFast, docs: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """One packed token stream [N_d] (int32) per domain: every document's tokens followed by eos.

    Encoding runs in the tokenizers library's thread pool (``encode_batch``).
    """
    backend = tokenizer.backend_tokenizer
    streams = {}
    for domain, texts in docs.items():
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        parts = []
        for encoding in encodings:
            parts.append(np.asarray(encoding.ids, dtype=np.int32))
            parts.append(np.asarray([tokenizer.eos_token_id], dtype=np.int32))
        streams[domain] = np.concatenate(parts)
    return streams


def mixture_weights(sizes: dict[str, int], alpha: float) -> dict[str, float]:
    """Domain sampling probabilities proportional to size**alpha (alpha=1: natural mix, 0: uniform)."""
    raw = {d: float(n) ** alpha for d, n in sizes.items()}
    total = sum(raw.values())
    return {d: w / total for d, w in raw.items()}


class WindowSampler:
    """Draws random training windows from per-domain token streams, mixing domains by fixed probabilities.

    All streams live in one flat int32 tensor on ``device``; a batch is sampled there (no host round trip):
    each row picks a domain from ``weights`` and a uniformly random start inside that domain's stream.
    """

    def __init__(self, streams: dict[str, np.ndarray], weights: dict[str, float], batch_size: int, seq_len: int,
                 device: torch.device, seed: int):
        """
        Args:
            streams: domain -> packed tokens [N_d]; every N_d must be > seq_len.
            weights: domain -> sampling probability.
            batch_size: rows per batch (B).
            seq_len: tokens per row fed to the model (S); rows hold S + 1 tokens (inputs and shifted targets).
            device: where batches are built.
            seed: seed of the sampler's own generator.
        """
        short = [d for d, s in streams.items() if len(s) <= seq_len]
        if short:
            raise UserError(f"training domains {short} hold fewer than seq_len + 1 = {seq_len + 1} tokens: give "
                            "more text (--data) or a smaller --seq-len")
        self.domains = list(streams)
        lengths = torch.tensor([len(streams[d]) for d in self.domains], dtype=torch.long)
        self.flat = torch.from_numpy(np.concatenate([streams[d] for d in self.domains])).to(device)
        self.starts = (torch.cumsum(lengths, 0) - lengths).to(device)
        self.spans = (lengths - seq_len).to(device)  # number of valid window starts per domain
        self.weights = torch.tensor([weights[d] for d in self.domains], dtype=torch.float, device=device)
        self.offsets = torch.arange(seq_len + 1, device=device)
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample(self) -> torch.Tensor:
        """A batch of windows [B, S + 1] (int64)."""
        dom = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        u = torch.rand(self.batch_size, generator=self.generator, device=self.flat.device)
        start = self.starts[dom] + (u * self.spans[dom]).long()
        return self.flat[start[:, None] + self.offsets].long()
