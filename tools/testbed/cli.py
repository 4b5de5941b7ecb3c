"""``python -m tools.testbed``: train the project's testbed MoE models and measure their experts.

Run from the repository root as ``python -m tools.testbed train|similarity|sample ...`` (`main`: user mistakes
print one line and exit 2, as in ``moe-compress``).
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

from moe_compress.errors import UserError
from moe_compress.recipe import parse_overrides
from tools.testbed.arch import UPCYCLED
from tools.testbed.data import DEFAULT_EVAL_DATA, DEFAULT_TRAIN_DATA
from tools.testbed.similarity import DEFAULT_TOKENS

app = typer.Typer(help="Train the small MoE testbed models.", no_args_is_help=True)


class Arch(str, Enum):
    mixtral = "mixtral"
    deepseek_v3 = "deepseek_v3"
    qwen2_moe = "qwen2_moe"
    olmoe = "olmoe"


Preset = Enum("Preset", {name.replace("-", "_"): name for name in UPCYCLED}, type=str)
Preset.__doc__ = "Upcycled testbed presets (arch.UPCYCLED)."


@app.command()
def train(
    arch: Optional[Arch] = typer.Option(None, help="Model architecture (transformers model_type), trained from "
                                        "scratch. Give --arch or --preset."),
    preset: Optional[Preset] = typer.Option(None, help="Sparse-upcycled testbed: a dense model trained first, "
                                            "then the MoE built from it (docs/TESTBEDS.md)."),
    out: Path = typer.Option(..., help="Output folder for the checkpoint, tokenizer and training.json."),
    data: Path = typer.Option(DEFAULT_TRAIN_DATA, help="Training corpus: a file or folder of "
                              ".txt/.jsonl/.jsonl.xz/.parquet."),
    eval_data: Optional[Path] = typer.Option(
        DEFAULT_EVAL_DATA, help="Held-out corpus (domain = file name); 'none' holds out 2% of --data instead."),
    minutes: float = typer.Option(6.0, help="Training time budget (the step count is fixed after warm-up); an "
                                  "upcycled preset splits it between its phases by --dense-share."),
    steps: Optional[int] = typer.Option(None, help="Train exactly this many steps (overrides --minutes); with "
                                        "--preset, the MoE phase's steps."),
    seed: int = typer.Option(0, help="Seed of tokenizer sampling, init, data order and samples."),
    batch_size: int = typer.Option(128, help="Sequences per step."),
    seq_len: int = typer.Option(512, help="Tokens per sequence."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    warmup_steps: int = typer.Option(200, help="Linear warm-up steps."),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size (2 special tokens included)."),
    set_: list[str] = typer.Option([], "--set", help="Model config override KEY=VALUE (repeatable; VALUE is YAML, "
                                   "as in moe-compress compress --set)."),
    dense_share: Optional[float] = typer.Option(None, help="Upcycled presets: share of the budget (--minutes, or "
                                                "steps) for the dense phase, 0 < x < 1 (preset: 0.5)."),
    dense_steps: Optional[int] = typer.Option(None, help="Upcycled presets with --steps: the dense phase's steps "
                                              "(default: --steps x share / (1 - share))."),
    upcycle_noise: Optional[float] = typer.Option(None, help="Upcycled presets: Gaussian noise on every expert "
                                                  "matrix, relative to its std (preset: 0)."),
    upcycle_reinit: Optional[float] = typer.Option(None, help="Upcycled presets: fraction of every expert's "
                                                   "neurons re-initialised, Drop-Upcycling (preset: 0)."),
    upcycle_shuffle: Optional[bool] = typer.Option(None, "--upcycle-shuffle/--no-upcycle-shuffle",
                                                   help="Fine-grained presets: permute each MLP copy's neurons "
                                                   "before cutting it into experts (preset: on)."),
    similarity_tokens: int = typer.Option(DEFAULT_TOKENS, help="Held-out tokens of the expert-similarity report."),
    router_lr_scale: float = typer.Option(1.0, help="Learning rate of the router weights, x the schedule's (an "
                                          "upcycled preset: its MoE phase)."),
    eval_max_tokens: Optional[int] = typer.Option(None, min=1, help="Evaluate on at most this many held-out tokens "
                                                  "per domain (default: all; a quick CPU check)."),
) -> None:
    """Train a testbed MoE (from scratch, or sparse-upcycled from a dense model) and save a standard HF
    checkpoint + tokenizer + training.json."""
    from tools.testbed.train import TrainSettings, resolve_recipe
    from tools.testbed.train import train as run_training

    if (arch is None) == (preset is None):
        raise UserError("give exactly one of --arch (a model trained from scratch) and --preset (an upcycled "
                        f"testbed: {', '.join(UPCYCLED)})")
    settings = TrainSettings(
        arch=arch.value if arch is not None else UPCYCLED[preset.value].arch,
        preset=None if preset is None else preset.value, out=out, data=data,
        eval_data=None if str(eval_data).lower() == "none" else eval_data,
        minutes=minutes, steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len, lr=lr,
        warmup_steps=warmup_steps, vocab_size=vocab_size, config_overrides=dict(parse_overrides(set_)),
        dense_share=dense_share, dense_steps=dense_steps, upcycle_noise=upcycle_noise,
        upcycle_reinit=upcycle_reinit, upcycle_shuffle=upcycle_shuffle, similarity_tokens=similarity_tokens,
        eval_max_tokens=eval_max_tokens, router_lr_scale=router_lr_scale,
    )
    resolve_recipe(settings)  # option mistakes: one line, before the logging and the data
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = sys.argv[sys.argv.index("train") + 1:] if "train" in sys.argv else []
    record = run_training(settings, command=shlex.join(["python", "-m", "tools.testbed", "train", *options]))
    typer.echo(json.dumps({"out": str(out), "steps": record["steps"], "tokens_seen": record["tokens_seen"],
                           "perplexity": record["eval"]["perplexity"]}, indent=1))


@app.command()
def similarity(
    model: str = typer.Argument(..., help="Checkpoint folder (or builtin:NAME) of an MoE model."),
    data: Path = typer.Option(DEFAULT_EVAL_DATA, help="Held-out text: a file or folder of "
                              ".txt/.jsonl/.jsonl.xz/.parquet."),
    tokens: int = typer.Option(DEFAULT_TOKENS, min=1, help="Held-out tokens, split evenly over the domains."),
    seq_len: int = typer.Option(512, min=1, help="Tokens per window."),
    device: str = typer.Option("cpu", help="Device to run on (cpu, cuda, ...)."),
    out: Optional[Path] = typer.Option(None, help="Also write the full report (with the [E][E] matrices) as JSON."),
) -> None:
    """Pairwise cosine of the routed experts' weights and outputs, per MoE layer (as training.json records)."""
    import torch

    from moe_compress.models.loading import load_model, load_tokenizer, resolve_model
    from moe_compress.models.registry import get_adapter
    from tools.testbed.data import encode_streams, read_documents
    from tools.testbed.similarity import expert_similarity, similarity_windows, summary_lines

    resolve_model(model)  # the model argument first: a missing folder is named before the data is looked at
    if not data.exists():
        raise UserError(f"held-out data not found: {data}")
    try:
        device_ = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown --device {device!r}: {str(e).splitlines()[0]}") from e
    tokenizer = load_tokenizer(model)
    net = load_model(model, dtype=torch.float32, device=str(device_))
    get_adapter(net)  # a dense or unsupported model: one line
    docs = read_documents(data)
    windows = similarity_windows(encode_streams(tokenizer, docs), tokens, seq_len)
    if not windows:
        raise UserError(f"no held-out tokens in {data}")
    report = expert_similarity(net, windows, matrices=out is not None)
    for line in summary_lines(report):
        typer.echo(line)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": model, "data": str(data), **report}, indent=1))
        typer.echo(f"wrote {out}")


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
    from tools.testbed.sample import sample_documents, write_jsonl

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    records = sample_documents(load_model(model), tokenizer, docs_per_prompt, max_new_tokens, seed)
    write_jsonl(records, out)
    typer.echo(f"wrote {len(records)} documents to {out}")


@app.callback()
def _main() -> None:
    """Testbed commands."""


def main() -> None:
    """Entry point of ``python -m tools.testbed``: the commands above, errors mapped as by ``moe-compress``."""
    from moe_compress.cli import run_app

    run_app(app)


if __name__ == "__main__":
    main()
