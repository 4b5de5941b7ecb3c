"""Sparse-upcycled testbeds: what the upcycled MoE computes at its step 0, the expert-similarity report, the new
CLI options' one-line errors, and a tiny two-phase run of each preset (CPU, a few steps)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from clitools import assert_user_error, run_testbed_cli
from helpers import write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_compress.models.tiny import tiny_model
from tools.testbed.arch import UPCYCLED, build_config
from tools.testbed.similarity import expert_similarity
from tools.testbed.train import MAX_OUTPUT_FILES, TrainSettings, train
from tools.testbed.upcycle import dense_config, segment_layout, upcycle

TRUNK = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
TINY = {
    "mixtral-upcycled": dict(TRUNK, intermediate_size=48),
    # dense MLP 64 = 4 segments of 16; 8 experts = 2 copies (groups); top-4 = one whole group per token
    "qwen-fine-upcycled": dict(TRUNK, moe_intermediate_size=16, shared_expert_intermediate_size=64, num_experts=8,
                               num_experts_per_tok=4),
}
VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(preset: str, router_std: float, seed: int = 0, **kw):
    """(dense, moe, info) of a tiny preset: a random dense counterpart and the MoE upcycled from it."""
    recipe = UPCYCLED[preset]
    overrides = {**TINY[preset], **kw.pop("overrides", {})}
    config = build_config(recipe.arch, VOCAB, 0, 1, 64, overrides, base=recipe.config)
    torch.manual_seed(seed)
    dense = AutoModelForCausalLM.from_config(dense_config(config)).eval()
    moe, info = upcycle(dense, config, recipe.scheme, router_std, seed + 1, **kw)
    return dense, moe.eval(), info


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def test_mixtral_upcycled_is_the_dense_model():
    """Top-2 weights renormalised to 1 over identical experts: the MoE is the dense model, whatever the router."""
    dense, moe, info = _pair("mixtral-upcycled", router_std=0.5)
    assert dense.config.model_type == "mistral" and dense.config.intermediate_size == 48
    torch.testing.assert_close(_logits(moe, IDS), _logits(dense, IDS), atol=1e-5, rtol=1e-5)
    ex = moe.model.layers[1].mlp.experts
    assert torch.equal(ex.gate_up_proj[3, :48], dense.model.layers[1].mlp.gate_proj.weight)
    assert torch.equal(ex.gate_up_proj[3, 48:], dense.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(ex.down_proj[5], dense.model.layers[1].mlp.down_proj.weight)
    assert [e["group"] for e in info["experts"]] == list(range(8))
    _, noisy, _ = _pair("mixtral-upcycled", router_std=0.5, noise=0.05)
    assert (_logits(noisy, IDS) - _logits(dense, IDS)).abs().max() > 1e-3


@pytest.mark.parametrize("shuffle", [False, True])
def test_qwen_fine_renormalised_is_exact(shuffle):
    """With norm_topk_prob=True each token's top-4 is one whole virtual group: shared half + routed half = FFN."""
    dense, moe, _ = _pair("qwen-fine-upcycled", router_std=0.5, shuffle=shuffle, overrides={"norm_topk_prob": True})
    torch.testing.assert_close(_logits(moe, IDS), _logits(dense, IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shuffle", [False, True])
def test_qwen_fine_unnormalised_block_formula(shuffle):
    """Qwen1.5-MoE routing (softmax, top-k, no renormalisation): block(x) = FFN(x) (1 + G max_j P_j(x)) / 2 with P
    the softmax over the G groups' router rows, i.e. the dense MLP exactly only for a uniform router."""
    dense, moe, info = _pair("qwen-fine-upcycled", router_std=0.5, shuffle=shuffle)
    assert info["segments"] == 4 and info["groups"] == 2 and info["groups_per_token"] == 1
    assert info["routed_down_scale"] == 4.0  # E / 2
    x = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(1))
    block, mlp = moe.model.layers[0].mlp, dense.model.layers[0].mlp
    rows = block.gate.weight[::info["segments"]]  # one row per group
    assert torch.equal(block.gate.weight[1], rows[0]) and torch.equal(block.gate.weight[4], rows[1])
    groups = torch.softmax(x[0] @ rows.T, dim=-1)  # [T, G]
    factor = 0.5 * (1 + info["groups"] * groups.max(-1).values)
    with torch.no_grad():
        torch.testing.assert_close(block(x)[0], mlp(x)[0] * factor[:, None], atol=1e-5, rtol=1e-5)
    assert factor.max() > 1.05  # the test means something: a decisive router is far from the dense MLP
    _, small, _ = _pair("qwen-fine-upcycled", router_std=1e-7, shuffle=shuffle)  # -> dense as the router -> 0
    torch.testing.assert_close(_logits(small, IDS), _logits(dense, IDS), atol=1e-5, rtol=1e-5)


def test_qwen_fine_segments_and_shared_expert():
    """Without shuffling, expert j*S + s is segment s of the dense MLP (W_d scaled), the shared expert is the MLP."""
    dense, moe, info = _pair("qwen-fine-upcycled", router_std=1e-3)
    block, mlp = moe.model.layers[1].mlp, dense.model.layers[1].mlp
    c = info["routed_down_scale"]
    for e, source in enumerate(info["experts"]):
        assert source == {"group": e // 4, "segment": e % 4}
        rows = slice(16 * source["segment"], 16 * (source["segment"] + 1))
        assert torch.equal(block.experts.gate_up_proj[e, :16], mlp.gate_proj.weight[rows])
        assert torch.equal(block.experts.gate_up_proj[e, 16:], mlp.up_proj.weight[rows])
        assert torch.equal(block.experts.down_proj[e], c * mlp.down_proj.weight[:, rows])
    assert torch.equal(block.shared_expert.down_proj.weight, mlp.down_proj.weight)
    assert block.shared_expert_gate.weight.abs().sum() == 0


def test_drop_upcycling_reinit_redraws_a_fraction_of_neurons():
    dense, moe, _ = _pair("mixtral-upcycled", router_std=1e-3, reinit=0.25)
    gate = dense.model.layers[0].mlp.gate_proj.weight
    for e in range(8):
        changed = (moe.model.layers[0].mlp.experts.gate_up_proj[e, :48] != gate).any(-1)
        assert changed.sum() == 12  # round(0.25 * 48) neurons per expert


def test_router_rows_whitened_and_orthogonal_to_the_mean():
    from tools.testbed.upcycle import _router_rows, mlp_input_stats

    dense, _, _ = _pair("mixtral-upcycled", router_std=1e-3)
    stats = mlp_input_stats(dense, IDS)
    captured = []
    hook = dense.model.layers[1].post_attention_layernorm.register_forward_hook(
        lambda m, a, out: captured.append(out.reshape(-1, 32).double()))
    _logits(dense, IDS)
    hook.remove()
    x = captured[0]
    torch.testing.assert_close(stats[1][0], x.mean(0))
    torch.testing.assert_close(stats[1][1], torch.cov(x.T, correction=0))
    rows = _router_rows(8, 32, 1e-3, stats[1], torch.Generator().manual_seed(0)).double()
    assert (rows @ stats[1][0]).abs().max() < 1e-9 * stats[1][0].norm()
    torch.testing.assert_close(rows.norm(dim=1), torch.full((8,), 1e-3 * 32 ** 0.5, dtype=torch.float64))
    _, moe, info = _pair("mixtral-upcycled", router_std=1e-3)
    assert info["router_whitened"] is False  # without stats: plain N(0, std^2) rows


def test_segment_layout_rejects_uneven_shapes():
    from moe_compress.errors import UserError

    recipe = UPCYCLED["qwen-fine-upcycled"]
    config = build_config(recipe.arch, VOCAB, 0, 1, 64, {**TINY["qwen-fine-upcycled"], "num_experts": 6},
                          base=recipe.config)
    with pytest.raises(UserError, match="multiples of 4"):
        segment_layout(config)


def _brute_force(model, windows) -> list[dict]:
    """Per MoE layer, the pairwise cosines by explicit loops over pairs and tokens (MoE inputs taken from the
    post-attention norm, the MoE block's input in these architectures)."""
    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    inputs = {i: [] for i in layers}
    hooks = [model.model.layers[i].post_attention_layernorm.register_forward_hook(
        lambda m, a, out, i=i: inputs[i].append(out.reshape(-1, out.shape[-1]))) for i in layers]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[:, :-1])
    for h in hooks:
        h.remove()
    rows = []
    for i in layers:
        ex = model.model.layers[i].mlp.experts
        x = torch.cat(inputs[i]).double()
        n, width = ex.gate_up_proj.shape[0], ex.down_proj.shape[-1]
        flat = [torch.cat([ex.gate_up_proj[e].flatten(), ex.down_proj[e].flatten()]).double() for e in range(n)]
        outs = [(F.silu(x @ ex.gate_up_proj[e, :width].double().T) * (x @ ex.gate_up_proj[e, width:].double().T))
                @ ex.down_proj[e].double().T for e in range(n)]
        weight, output = torch.eye(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
        for a in range(n):
            for b in range(a + 1, n):
                weight[a, b] = weight[b, a] = F.cosine_similarity(flat[a], flat[b], dim=0)
                per_token = [F.cosine_similarity(outs[a][t], outs[b][t], dim=0) for t in range(x.shape[0])]
                output[a, b] = output[b, a] = torch.stack(per_token).mean()
        rows.append({"layer": i, "weight": weight, "output": output, "tokens": x.shape[0]})
    return rows


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_similarity_matches_brute_force(arch):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(2)
    windows = [torch.randint(0, 96, (2, 9), generator=gen), torch.randint(0, 96, (1, 6), generator=gen)]
    report = expert_similarity(model, windows)
    expected = _brute_force(model, windows)
    assert [r["layer"] for r in report["layers"]] == [r["layer"] for r in expected]
    assert report["tokens"] == expected[0]["tokens"] == 2 * 8 + 5
    for got, want in zip(report["layers"], expected):
        for kind in ("weight", "output"):
            pairs = want[kind][torch.triu_indices(*want[kind].shape, offset=1).unbind()]
            assert got[kind]["mean"] == pytest.approx(pairs.mean().item(), abs=1e-5)
            assert got[kind]["min"] == pytest.approx(pairs.min().item(), abs=1e-5)
            assert got[kind]["max"] == pytest.approx(pairs.max().item(), abs=1e-5)
            torch.testing.assert_close(torch.tensor(got[f"{kind}_matrix"], dtype=torch.float64), want[kind],
                                       atol=1e-4, rtol=0)


def test_similarity_uses_the_merging_methods_definitions():
    """The testbed report measures what the merging methods group on (methods.merging.signals)."""
    from moe_compress.methods.merging.signals import expert_output_signals, weight_similarity
    from moe_compress.models.registry import get_adapter
    from tools.testbed.similarity import moe_inputs, output_cosine, weight_cosine

    model = tiny_model("qwen2_moe")
    windows = [torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))]
    inputs = moe_inputs(model, windows)
    for layer in get_adapter(model).layers(model):
        torch.testing.assert_close(weight_cosine(layer.experts), weight_similarity(layer.experts))
        torch.testing.assert_close(output_cosine(layer, inputs[layer.index]),
                                   expert_output_signals(layer, inputs[layer.index])[0])


def test_similarity_of_fresh_copies_is_one():
    _, moe, _ = _pair("mixtral-upcycled", router_std=1e-3)
    report = expert_similarity(moe, [IDS])
    for row in report["layers"]:
        assert row["weight"]["min"] == pytest.approx(1.0, abs=1e-5)
        assert row["output"]["min"] == pytest.approx(1.0, abs=1e-5)


# -- the CLI's new options: one line, exit code 2, before any data is read --------------------------------------

@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --arch"),
    (["--arch", "mixtral", "--preset", "mixtral-upcycled"], "give exactly one of --arch"),
    (["--preset", "dbrx-upcycled"], "--preset"),
    (["--preset", "mixtral-upcycled", "--dense-share", "1"], "--dense-share"),
    (["--preset", "mixtral-upcycled", "--dense-share", "0"], "--dense-share"),
    (["--preset", "mixtral-upcycled", "--upcycle-noise", "-0.1"], "--upcycle-noise must be >= 0"),
    (["--preset", "qwen-fine-upcycled", "--upcycle-reinit", "1"], "--upcycle-reinit"),
    (["--preset", "mixtral-upcycled", "--dense-steps", "10"], "--dense-steps needs --steps"),
    (["--preset", "mixtral-upcycled", "--steps", "5", "--dense-steps", "0"], "--dense-steps must be >= 1"),
    (["--arch", "mixtral", "--dense-share", "0.5"], "only apply to an upcycled --preset"),
    (["--arch", "mixtral", "--upcycle-noise", "0.1"], "only apply to an upcycled --preset"),
    (["--preset", "qwen-fine-upcycled", "--set", "moe_intermediate_size=100"], "segments of moe_intermediate_size"),
    (["--preset", "mixtral-upcycled", "--similarity-tokens", "0"], "--similarity-tokens must be >= 1"),
    (["--preset", "mixtral-upcycled", "--upcycle-shuffle"], "--upcycle-shuffle only applies"),
    (["--arch", "qwen2_moe", "--no-upcycle-shuffle"], "only apply to an upcycled --preset"),
    (["--arch", "mixtral", "--router-lr-scale", "0"], "--router-lr-scale must be > 0"),
])
def test_train_option_errors(monkeypatch, capsys, tmp_path, args, message):
    code, _, err = run_testbed_cli(monkeypatch, capsys, "train", "--out", tmp_path / "out",
                           "--data", tmp_path / "missing", *args)
    assert_user_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_similarity_errors(monkeypatch, capsys, tmp_path):
    code, _, err = run_testbed_cli(monkeypatch, capsys, "similarity", tmp_path / "nowhere")
    assert_user_error(code, err, "model folder not found")
    dense = AutoModelForCausalLM.from_config(dense_config(build_config(
        "mixtral", VOCAB, 0, 1, 64, TINY["mixtral-upcycled"])))
    dense.save_pretrained(tmp_path / "dense")
    code, _, err = run_testbed_cli(monkeypatch, capsys, "similarity", tmp_path / "dense", "--data",
                           tmp_path / "nodata")
    assert_user_error(code, err, "held-out data not found")
    (tmp_path / "text.txt").write_text("a b c")
    code, _, err = run_testbed_cli(monkeypatch, capsys, "similarity", tmp_path / "dense", "--data",
                           tmp_path / "text.txt")
    assert_user_error(code, err, "cannot load the tokenizer")  # a checkpoint without one


# -- tiny two-phase runs ---------------------------------------------------------------------------------------

_TINY_RUN = ["--steps", "4", "--dense-steps", "3", "--warmup-steps", "2", "--seq-len", "32", "--batch-size", "4",
             "--vocab-size", "300", "--similarity-tokens", "96", "--eval-data", "none"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("upcycle") / "corpus.jsonl"
    write_corpus(path)
    return path


def test_tiny_qwen_fine_run(corpus, tmp_path):
    settings = TrainSettings(
        arch="qwen2_moe", preset="qwen-fine-upcycled", out=tmp_path / "q", data=corpus, eval_data=None,
        held_out_fraction=0.2, steps=4, dense_steps=3, warmup_steps=2, seq_len=32, batch_size=4, vocab_size=300,
        tokenizer_chars_per_domain=20_000, eval_batch_size=8, samples_per_domain=1, sample_tokens=8,
        config_overrides=TINY["qwen-fine-upcycled"], similarity_tokens=96, log_every=2,
    )
    record = train(settings)
    assert record["preset"] == "qwen-fine-upcycled" and record["arch"] == "qwen2_moe"
    assert record["phases"]["dense"]["steps"] == 3 and record["phases"]["moe"]["steps"] == 4
    assert record["steps"] == 7 and len(record["loss_curve"]["lm"]) == 7 and record["loss_curve"]["moe_from_step"] == 3
    assert record["loss_curve"]["aux"][:3] == [0.0] * 3
    up = record["upcycle"]
    assert up["dense_config"]["mlp_only_layers"] == [0, 1] and up["dense_config"]["intermediate_size"] == 64
    assert up["recipe"]["scheme"] == "segments" and up["recipe"]["shuffle"] is True
    assert up["layout"]["router_whitened"] is True
    assert set(up["dense_perplexity"]) == {"code", "prose"}
    assert up["function_gap"]["mean_kl"] < 1e-3  # router std 1e-3: nearly the dense model
    assert [len(r["weight_matrix"]) for r in record["similarity"]["start"]["layers"]] == [8, 8]
    files = sorted(p.name for p in settings.out.iterdir())
    assert len(files) <= MAX_OUTPUT_FILES and "generation_config.json" not in files
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "training.json", "loss_curve.png"} <= set(files)
    model = AutoModelForCausalLM.from_pretrained(settings.out)
    assert model.config.model_type == "qwen2_moe" and model.config.num_experts == 8
    assert AutoTokenizer.from_pretrained(settings.out).eos_token_id == model.config.eos_token_id == 0


def test_tiny_mixtral_run_through_the_cli(monkeypatch, capsys, corpus, tmp_path):
    """The command as the GPU runs it (tiny), then `testbed similarity` on its checkpoint."""
    sets = [a for k, v in TINY["mixtral-upcycled"].items() for a in ("--set", f"{k}={v}")]
    code, out, err = run_testbed_cli(monkeypatch, capsys, "train", "--preset", "mixtral-upcycled",
                             "--out", tmp_path / "m", "--data", corpus, *_TINY_RUN, *sets)
    assert code == 0, err
    assert json.loads(out)["steps"] == 7
    record = json.loads((tmp_path / "m" / "training.json").read_text())
    assert record["command"].startswith("python -m tools.testbed train --preset mixtral-upcycled")
    assert record["upcycle"]["function_gap"]["max_abs_logit_diff"] < 1e-4  # the dense model exactly
    start = record["similarity"]["start"]
    assert start["mean"]["weight"] == pytest.approx(1.0, abs=1e-5) and start["mean"]["output"] == pytest.approx(
        1.0, abs=1e-5)
    assert len(list((tmp_path / "m").iterdir())) <= MAX_OUTPUT_FILES

    code, out, err = run_testbed_cli(monkeypatch, capsys, "similarity", tmp_path / "m", "--data", corpus,
                             "--tokens", "64", "--seq-len", "16", "--out", tmp_path / "sim.json")
    assert code == 0, err
    assert "weight cosine" in out and "mean" in out.splitlines()[-2]
    report = json.loads((tmp_path / "sim.json").read_text())
    for mine, recorded in zip(report["layers"], record["similarity"]["end"]["layers"]):
        assert mine["weight"] == pytest.approx(recorded["weight"], abs=1e-4)  # same weights, any tokens
