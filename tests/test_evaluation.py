"""Evaluation: perplexity / KL / top-1 against brute force, windowing, aggregation, cost, and the lm-eval bridge."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from torch.nn import functional as F

from moe_compress.calibration.data import Document, evaluation_windows
from moe_compress.errors import UserError
from moe_compress.evaluation import metrics
from moe_compress.evaluation.lm_eval_bridge import (
    TASKS_DIR_ENV,
    default_tasks_dir,
    read_task_file,
    run_lm_eval,
    score_choices,
    score_task_file,
)
from moe_compress.evaluation.metrics import (
    check_same_tokenizer,
    compare_costs,
    evaluate_lm,
    generate_side_by_side,
    inference_cost,
)
from moe_compress.models.tiny import tiny_model

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    return tiny_model("mixtral", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def perturbed(model):
    """The same model with noisy experts: a stand-in for a compressed model."""
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn_like(p) * 0.2 * p.std())
    return other


@pytest.fixture(scope="module")
def windows() -> dict[str, torch.Tensor]:
    """Two domains with different window counts and lengths."""
    g = torch.Generator().manual_seed(0)
    return {"prose": torch.randint(0, VOCAB, (5, 16), generator=g),
            "code": torch.randint(0, VOCAB, (3, 12), generator=g)}


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """[n, L-1, V] fp64 log-probs of the predicted positions, from full logits."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)


def test_self_reference_is_exact(model, windows):
    for reference in (model, copy.deepcopy(model)):
        r = evaluate_lm(model, windows, reference=reference, batch_size=2)
        for m in [r.overall, *r.domains.values()]:
            assert m.kld == 0.0 and m.top1 == 1.0 and m.ppl_ratio == 1.0 and m.ppl == m.ppl_reference


@pytest.mark.parametrize("chunk_positions", [None, 4])
def test_kl_top1_and_ppl_match_brute_force(model, perturbed, windows, chunk_positions, monkeypatch):
    if chunk_positions:  # score 4 positions at a time, as a large vocabulary would
        monkeypatch.setattr(metrics, "_WORK_ELEMENTS", chunk_positions * VOCAB)
    r = evaluate_lm(perturbed, windows, reference=model, batch_size=2)  # 2 does not divide 5 or 3
    assert 0 < r.overall.kld and r.overall.top1 < 1
    for domain, ids in windows.items():
        lp, lq = _log_probs(perturbed, ids), _log_probs(model, ids)
        target = ids[:, 1:, None]
        kl = (lq.exp() * (lq - lp)).sum(-1).mean().item()
        top1 = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
        m = r.domains[domain]
        assert m.kld == pytest.approx(kl, abs=1e-6)
        assert m.top1 == pytest.approx(top1, abs=1e-12)
        assert m.ppl == pytest.approx(math.exp(-lp.gather(-1, target).mean().item()), rel=1e-6)
        assert m.ppl_reference == pytest.approx(math.exp(-lq.gather(-1, target).mean().item()), rel=1e-6)
        assert m.ppl_ratio == pytest.approx(m.ppl / m.ppl_reference, rel=1e-12)


def test_perplexity_equals_cross_entropy_loop(model, windows):
    r = evaluate_lm(model, windows, batch_size=4)
    nll, n = 0.0, 0
    for ids in windows.values():
        for row in ids:
            with torch.no_grad():
                logits = model(input_ids=row[None]).logits[0]
            nll += F.cross_entropy(logits[:-1].double(), row[1:], reduction="sum").item()
            n += row.numel() - 1
    assert r.overall.tokens == n == 5 * 15 + 3 * 11
    assert r.overall.ppl == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert set(r.to_dict()) == {"ppl", "tokens", "domains"}
    assert set(r.to_dict()["domains"]["code"]) == {"ppl", "tokens"}


def test_overall_is_token_weighted_combination_of_domains(model, perturbed, windows):
    d = evaluate_lm(perturbed, windows, reference=model, batch_size=3).to_dict()
    assert set(d) == {"ppl", "tokens", "ppl_reference", "ppl_ratio", "kld", "top1", "domains"}
    doms = d["domains"].values()
    total = sum(m["tokens"] for m in doms)
    assert d["tokens"] == total
    for key in ("kld", "top1"):
        assert d[key] == pytest.approx(sum(m[key] * m["tokens"] for m in doms) / total, rel=1e-12)
    for key in ("ppl", "ppl_reference"):
        log_mean = sum(math.log(m[key]) * m["tokens"] for m in doms) / total
        assert d[key] == pytest.approx(math.exp(log_mean), rel=1e-12)
    assert d["ppl_ratio"] == pytest.approx(d["ppl"] / d["ppl_reference"], rel=1e-12)
    json.dumps(d)


def _byte_tokenizer():
    """A byte-level tokenizer without merges: one token per byte, no special tokens added to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=258, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["abc"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def test_windowing_is_pinned():
    tok = _byte_tokenizer()
    ids = tok.convert_tokens_to_ids(list("abcdefghij"))
    out = evaluation_windows([Document(text="abcdefghij", domain="d")], tok, 4)
    assert list(out) == ["d"]
    assert out["d"].tolist() == [ids[0:4], ids[4:8]]  # 10 tokens, seq_len 4: two windows, the tail dropped
    joined = evaluation_windows([Document("abcde", "d"), Document("fghij", "d")], tok, 4)
    expect = tok("abcde\n\nfghij")["input_ids"]
    assert joined["d"].tolist() == [expect[0:4], expect[4:8], expect[8:12]]


def test_user_errors(model, windows):
    other_vocab = tiny_model("mixtral", vocab_size=VOCAB + 8)
    with pytest.raises(UserError, match="vocabulary"):
        evaluate_lm(model, windows, reference=other_vocab)
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        evaluate_lm(model, {"x": torch.full((1, 4), VOCAB)})
    with pytest.raises(UserError, match="no evaluation window"):
        evaluate_lm(model, {"x": torch.zeros(0, 4, dtype=torch.long)})


def test_check_same_tokenizer(tokenizer):
    check_same_tokenizer(tokenizer, copy.deepcopy(tokenizer))
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])
    with pytest.raises(UserError, match="tokenizer differs"):
        check_same_tokenizer(tokenizer, other)


def test_generations_are_deterministic(tokenizer):
    m = tiny_model("mixtral", vocab_size=len(tokenizer))
    prompts = ["The quick brown", "def add"]
    rows = generate_side_by_side(m, copy.deepcopy(m), tokenizer, prompts, max_new_tokens=6)
    assert [r["prompt"] for r in rows] == prompts
    assert all(r["model"] == r["reference"] for r in rows)
    assert generate_side_by_side(m, None, tokenizer, prompts, max_new_tokens=6) == \
        [{"prompt": r["prompt"], "model": r["model"]} for r in rows]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_inference_cost(arch):
    m = tiny_model(arch)
    c = inference_cost(m, seq_len=16, batch=2, runs=2)
    cfg = m.config
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert c.params == sum(p.numel() for p in m.parameters())
    assert c.params_experts == cfg.num_hidden_layers * n_experts * 3 * inter * cfg.hidden_size  # no shared expert
    assert c.weight_bytes == 4 * c.params and c.tokens_per_s > 0 and len(c.run_seconds) == 2
    cmp = compare_costs(c, c)
    assert cmp["params"]["ratio"] == 1.0 and cmp["tokens_per_s"]["ratio"] == 1.0


# ------------------------------------------------------------------------------------------------- tasks

_MC = [
    {"query": "Question: Which animal barks?\nAnswer:", "choices": ["a dog", "a cat", "the fish"], "gold": 0},
    {"query": "The man turned on the faucet, therefore", "choices": ["water flowed.", "the tap was dry"], "gold": 0},
    {"query": "Pick the café", "choices": ["café crème", "tea", "naïve résumé x"], "gold": 2},
    {"query": "Let $x$ be a point ", "choices": ["of the scheme.", "of the set", "in the rain"], "gold": 1},
]
_WINO = [
    {"context_options": ["Sarah helped Maria so Sarah", "Sarah helped Maria so Maria"],
     "continuation": "was thanked.", "gold": 1},
    {"context_options": ["The fox jumped over the dog because the fox", "The fox jumped over the dog because the dog"],
     "continuation": "was lazy.", "gold": 1},
]


@pytest.fixture
def task_dir(tmp_path):
    for name, items in (("tiny_mc", _MC), ("tiny_wino", _WINO)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return tmp_path


def test_direct_scorer_matches_hand_computation(tokenizer, task_dir):
    m = tiny_model("mixtral", vocab_size=len(tokenizer))
    s = score_task_file(m, tokenizer, task_dir / "tiny_mc.jsonl", batch_size=3)
    item = _MC[0]
    for j, choice in enumerate(item["choices"]):
        ctx = tokenizer.encode(item["query"])
        whole = tokenizer.encode(item["query"] + " " + choice)
        with torch.no_grad():
            lp = torch.log_softmax(m(input_ids=torch.tensor([whole])).logits[0].double(), -1)
        expected = sum(lp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
        assert s.loglikelihoods[0][j] == pytest.approx(expected, abs=1e-4)
    assert s.n == len(_MC)


def test_lm_eval_bridge_equals_direct_scorer(tokenizer, task_dir):
    pytest.importorskip("lm_eval", reason="lm-eval is optional (the eval extra; the dev extra installs it)")
    m = tiny_model("mixtral", vocab_size=len(tokenizer))
    res = run_lm_eval(m, ["tiny_mc", "tiny_wino"], tokenizer=tokenizer, tasks_dir=task_dir, batch_size=4,
                      bootstrap_iters=0, log_samples=True)
    assert res["sources"] == {t: str(task_dir / f"{t}.jsonl") for t in ("tiny_mc", "tiny_wino")}
    for name, items, keys in (("tiny_mc", _MC, ("acc", "acc_norm", "acc_bytes")), ("tiny_wino", _WINO, ("acc",))):
        direct = score_choices(m, tokenizer, items)
        got = res["tasks"][name]
        assert got["n"] == len(items)
        for key in keys:
            assert got[key] == direct.to_dict()[key], key
        for sample in res["samples"][name]:
            lls = [ll for ll, _ in sample["filtered_resps"]]
            assert lls == pytest.approx(direct.loglikelihoods[sample["doc_id"]], abs=1e-4)


def test_task_errors(tmp_path, monkeypatch, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match="expected one of"):
        read_task_file(bad)
    with pytest.raises(UserError, match="cannot read task file"):
        read_task_file(tmp_path / "missing.jsonl")
    monkeypatch.setenv(TASKS_DIR_ENV, str(tmp_path))
    assert default_tasks_dir() == tmp_path
    monkeypatch.setenv(TASKS_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(UserError, match=TASKS_DIR_ENV):
        default_tasks_dir()
    monkeypatch.delenv(TASKS_DIR_ENV)
    monkeypatch.chdir(tmp_path)
    assert default_tasks_dir() is None
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    with pytest.raises(UserError, match="moe-compress\\[eval\\]"):
        run_lm_eval(torch.nn.Linear(1, 1), ["tiny_mc"], tokenizer=tokenizer, tasks_dir=tmp_path)
