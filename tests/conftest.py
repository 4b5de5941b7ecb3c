"""Shared fixtures: tiny models of every architecture, a tiny tokenizer, and saved checkpoints of both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

from moe_compress.models.tiny import TINY_CONFIGS, tiny_model  # noqa: E402

ARCHS = list(TINY_CONFIGS)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Experts in a mixture of experts model are chosen by a router.",
    "def add(a, b):\n    return a + b\n",
    "Let $x \\in X$ be a point of the scheme.",
    "The patient was given a dose of aspirin for the pain.",
    "It was a dark and stormy night; the rain fell in torrents.",
]


def make_tokenizer(vocab_size: int = 96):
    """A byte-level BPE tokenizer trained on a few sentences (no downloads), with eos/pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor runs (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny tensors gain nothing from threads, and on a busy machine the threads' waiting costs 5-10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small jsonl calibration file with two domains."""
    import json

    p = tmp_path_factory.mktemp("data") / "calib.jsonl"
    with open(p, "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": " ".join(_SENTENCES[i % 6:] + _SENTENCES[:i % 6]),
                                 "domain": "code" if i % 2 else "prose"}) + "\n")
    return p


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """{arch: folder} of a saved tiny model + tokenizer for each architecture (built once per session)."""
    from moe_compress.export.writer import save_model

    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        d = root / arch
        model = tiny_model(arch, vocab_size=len(tokenizer))
        save_model(model, d)
        tokenizer.save_pretrained(d)
        out[arch] = d
    return out
