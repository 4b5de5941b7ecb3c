"""``moe-compress testbed``: train the project's testbed MoE models.

Run as ``moe-compress testbed train ...`` (the main CLI mounts ``app``) or ``python -m moe_compress.testbed.cli``.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from moe_compress.testbed.data import DEFAULT_EVAL_DATA, DEFAULT_TRAIN_DATA

app = typer.Typer(help="Train the small MoE testbed models.", no_args_is_help=True)


class Arch(str, Enum):
    mixtral = "mixtral"
    deepseek_v3 = "deepseek_v3"
    qwen2_moe = "qwen2_moe"
    olmoe = "olmoe"


def _parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs; VALUE is parsed as JSON when it can be (numbers, booleans, null), else kept as text."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


@app.command()
def train(
    arch: Arch = typer.Option(..., help="Model architecture (transformers model_type)."),
    out: Path = typer.Option(..., help="Output folder for the checkpoint, tokenizer and training.json."),
    data: Path = typer.Option(DEFAULT_TRAIN_DATA, help="Training corpus: a file or folder of .txt/.jsonl/.jsonl.xz."),
    eval_data: Optional[Path] = typer.Option(
        DEFAULT_EVAL_DATA, help="Held-out corpus (domain = file name); 'none' holds out 2% of --data instead."),
    minutes: float = typer.Option(6.0, help="Training time budget (the step count is fixed after warm-up)."),
    steps: Optional[int] = typer.Option(None, help="Train exactly this many steps (overrides --minutes)."),
    seed: int = typer.Option(0, help="Seed of tokenizer sampling, init, data order and samples."),
    batch_size: int = typer.Option(128, help="Sequences per step."),
    seq_len: int = typer.Option(512, help="Tokens per sequence."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    warmup_steps: int = typer.Option(200, help="Linear warm-up steps."),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size (2 special tokens included)."),
    set_: list[str] = typer.Option([], "--set", help="Model config override KEY=VALUE (repeatable)."),
) -> None:
    """Train a testbed MoE from scratch and save a standard HF checkpoint + tokenizer + training.json."""
    from moe_compress.testbed.train import TrainSettings
    from moe_compress.testbed.train import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = TrainSettings(
        arch=arch.value, out=out, data=data, eval_data=None if str(eval_data).lower() == "none" else eval_data,
        minutes=minutes, steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len, lr=lr,
        warmup_steps=warmup_steps, vocab_size=vocab_size, config_overrides=_parse_overrides(set_),
    )
    options = sys.argv[sys.argv.index("train") + 1:] if "train" in sys.argv else []
    record = run_training(settings, command=shlex.join(["moe-compress", "testbed", "train", *options]))
    typer.echo(json.dumps({"out": str(out), "steps": record["steps"], "tokens_seen": record["tokens_seen"],
                           "perplexity": record["eval"]["perplexity"]}, indent=1))


@app.command()
def sample(
    out: Path = typer.Option(..., help="Output .jsonl file ({text, domain} records)."),
    model: str = typer.Option("builtin:mixtral-8e", help="Model that writes the text (folder or builtin:NAME)."),
    docs_per_prompt: int = typer.Option(2, min=1, help="Sampled documents per domain prompt."),
    max_new_tokens: int = typer.Option(400, min=1, help="Tokens sampled per document."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Sample domain-tagged text from a testbed (how builtin:demo and builtin:demo-eval were made)."""
    from transformers import AutoTokenizer

    from moe_compress.models.loading import load_model, resolve_model
    from moe_compress.testbed.sample import sample_documents, write_jsonl

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    records = sample_documents(load_model(model), tokenizer, docs_per_prompt, max_new_tokens, seed)
    write_jsonl(records, out)
    typer.echo(f"wrote {len(records)} documents to {out}")


@app.callback()
def _main() -> None:
    """Testbed commands."""


if __name__ == "__main__":
    app()
