"""Helpers shared by several test modules (import them as ``from helpers import ...``; fixtures live in
conftest.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch

from moe_compress.models.registry import get_adapter

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Experts in a mixture of experts model are chosen by a router.",
    "def add(a, b):\n    return a + b\n",
    "Let $x \\in X$ be a point of the scheme.",
    "The patient was given a dose of aspirin for the pain.",
    "It was a dark and stormy night; the rain fell in torrents.",
]


def make_tokenizer(vocab_size: int = 96):
    """A byte-level BPE tokenizer trained on `SENTENCES` (no downloads), with eos/pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def write_calibration_file(path: Path) -> Path:
    """A small jsonl calibration file of 40 rows in two domains (``code``, ``prose``), from `SENTENCES`."""
    with open(path, "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": " ".join(SENTENCES[i % 6:] + SENTENCES[:i % 6]),
                                 "domain": "code" if i % 2 else "prose"}) + "\n")
    return Path(path)


def ids(n: int = 4, length: int = 32, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    """Random token ids [n, length] from a seeded generator."""
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def capture_block_inputs(model, x: torch.Tensor, module: Callable[[object, torch.nn.Module], torch.nn.Module]
                         ) -> dict[int, tuple[torch.Tensor, ...]]:
    """Run the whole model once on ``x`` (no grad); per MoE layer, the positional arguments (detached copies)
    that ``module(adapter, block)`` of its MoE block received, e.g. ``lambda a, b: b.experts``."""
    adapter = get_adapter(model)
    seen, hooks = {}, []
    for i, block in adapter.moe_blocks(model).items():
        def hook(mod, args, i=i):
            seen[i] = tuple(a.detach().clone() for a in args if isinstance(a, torch.Tensor))
        hooks.append(module(adapter, block).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def write_corpus(path: Path, seed: int = 0) -> None:
    """Two small domains (prose, Python) as JSON lines: the training corpus of the tiny testbed runs."""
    rng = random.Random(seed)
    words = "the cat sat on a mat while river water ran past old stone houses near green hills".split()
    lines = []
    for i in range(12):
        prose = " ".join(rng.choice(words) for _ in range(120)) + "."
        code = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12))
        lines += [json.dumps({"text": prose, "domain": "prose"}), json.dumps({"text": code, "domain": "code"})]
    Path(path).write_text("\n".join(lines) + "\n")


SRC = Path(__file__).resolve().parents[1] / "src"


def run_gloo_ranks(body: str, recipe: dict, world: int = 2) -> None:
    """Run ``body`` (Python source; ``recipe`` is bound to the recipe dict) in ``world`` CPU processes with
    torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT on a free local port); every process
    must exit 0 (its stderr is the assertion message)."""
    import os
    import socket
    import subprocess
    import sys

    script = f"import sys\nsys.path.insert(0, {str(SRC)!r})\nimport torch\ntorch.set_num_threads(1)\n" \
             f"recipe = {recipe!r}\n{body}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank),
                                              "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": str(port)})
             for rank in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
