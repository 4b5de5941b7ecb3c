"""Testbed training (a few CPU steps on a tiny model) and the shipped mixtral-8e checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_compress.models.loading import resolve_model
from tools.testbed.arch import build_config
from tools.testbed.balance import RouterTap
from tools.testbed.evaluate import eval_windows, evaluate_domains
from tools.testbed.train import TrainSettings, lr_at, train

TINY = {
    "mixtral": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16),
    "deepseek_v3": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
}


def _tiny_run(tmp_path, arch: str, name: str) -> tuple[TrainSettings, dict]:
    """Train ``arch`` for 6 steps on a tiny config and corpus; the checkpoint goes to ``tmp_path / name``."""
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_corpus(corpus)
    settings = TrainSettings(
        arch=arch, out=tmp_path / name, data=corpus, eval_data=None, held_out_fraction=0.2, steps=6,
        warmup_steps=2, seq_len=32, batch_size=4, vocab_size=300, tokenizer_chars_per_domain=20_000,
        eval_batch_size=8, samples_per_domain=1, sample_tokens=8, config_overrides=TINY[arch], log_every=3,
    )
    return settings, train(settings)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, tuple[TrainSettings, dict]]:
    """One tiny run per architecture, shared by the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("testbed")
    return {arch: _tiny_run(tmp_path, arch, arch) for arch in TINY}


@pytest.mark.parametrize("arch", list(TINY))
def test_tiny_training_writes_loadable_checkpoint(tiny_runs, arch):
    settings, record = tiny_runs[arch]
    out = settings.out
    assert record["steps"] == 6 and record["tokens_seen"] == 6 * 4 * 32
    assert len(record["loss_curve"]["lm"]) == 6
    assert set(record["eval"]["perplexity"]) == {"code", "prose"}
    assert json.loads((out / "training.json").read_text())["steps"] == 6
    assert (out / "loss_curve.png").exists() and (out / "expert_usage.png").exists()

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id == model.config.eos_token_id == 0
    assert tokenizer.pad_token_id == model.config.pad_token_id == 1
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    if arch == "deepseek_v3":
        assert model.config.topk_method == "noaux_tc" and model.config.scoring_func == "sigmoid"
        bias = model.model.layers[1].mlp.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and bias.abs().sum() > 0  # the aux-loss-free update ran


def test_tiny_training_is_deterministic(tiny_runs):
    settings, first = tiny_runs["mixtral"]
    _, second = _tiny_run(settings.out.parent, "mixtral", "again")
    assert first["loss_curve"] == second["loss_curve"]
    assert first["routing"]["counts"] == second["routing"]["counts"]


@pytest.mark.parametrize("arch", list(TINY))
def test_held_out_perplexity_and_counts_are_those_of_the_seq_len_token_forward(arch):
    """`evaluate_domains` (the package's evaluate_lm on windows of S + 1 tokens) == a literal loop: each window's
    first S tokens run through the model (S = max_position_embeddings, as in training), cross-entropy against the
    next S tokens summed in fp64; the expert counts over the same S tokens per window."""
    seq_len, vocab = 16, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(arch, vocab, 0, 1, seq_len, TINY[arch])).eval()
    stream = np.random.default_rng(0).integers(0, vocab, 5 * seq_len + 3).astype(np.int32)
    tap = RouterTap(model)
    tap.start_counting(torch.device("cpu"))
    nll, n = 0.0, 0
    with torch.no_grad():
        for window in eval_windows(stream, seq_len):
            logits = model(input_ids=window[None, :-1], use_cache=False).logits[0]
            nll += float(F.cross_entropy(logits.double(), window[1:], reduction="sum"))
            n += seq_len
    counts = tap.stop_counting().tolist()
    got = evaluate_domains(model, tap, {"d": stream}, seq_len, batch_size=2)
    assert got["tokens"] == {"d": n} and n == 5 * seq_len
    assert got["perplexity"]["d"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["counts"]["d"] == counts
    assert sum(map(sum, counts)) == n * len(counts) * model.config.num_experts_per_tok


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, warmup=10, total=100, peak=1.0, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_shipped_mixtral_8e():
    path = Path(resolve_model("builtin:mixtral-8e"))
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert config.model_type == "mixtral"
    assert config.num_local_experts == 8 and config.num_experts_per_tok == 2
    assert 14e6 <= model.num_parameters() <= 16e6
    assert sum(f.stat().st_size for f in path.iterdir()) <= 32 * 2**20
    tokenizer = AutoTokenizer.from_pretrained(path)
    for text in ["The Supreme Court held that the statute applied.",
                 "def f(x):\n    return {'a': x ** 2}  # café ≥ 1\n\n\tend"]:
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    record = json.loads((path / "training.json").read_text())
    assert record["tokens_seen"] >= 100e6
    assert all(row["dead"] == 0 and row["max_over_min"] <= 5 for row in record["routing"]["balance"])
