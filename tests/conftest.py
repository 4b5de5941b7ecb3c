"""Shared fixtures: tiny models of every architecture, a tiny tokenizer, and saved checkpoints of both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

from helpers import make_tokenizer, write_calibration_file  # noqa: E402

from moe_compress.models.tiny import TINY_CONFIGS, tiny_model  # noqa: E402

ARCHS = list(TINY_CONFIGS)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
    return write_calibration_file(tmp_path_factory.mktemp("data") / "calib.jsonl")


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
