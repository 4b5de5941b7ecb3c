"""MoNE: routing score, output spread and novice means against a literal loop over routed tokens (each expert run
by the model's own experts module), the kept set, GPT-OSS's exact novice (zero weights, bias = mean), and the
compress command (novices dropped: reload == router-masked original)."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS
from helpers import ids
from methods_e2e import cli_prune_and_check, layer_stats
from test_pruning import capture_experts_calls, n_keep_for

from moe_compress.methods.base import LayerContext, get_method
from moe_compress.models.registry import get_adapter
from moe_compress.models.tiny import tiny_model

STATS = ("routed_output_sum", "routed_output_sq")


def brute_mone(model, x) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (routing score [E], output std [E], mean output [E, H])}: per expert, its outputs on its routed
    tokens collected one token at a time."""
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    out = {}
    for i, (h, idx, w) in capture_experts_calls(model, x).items():
        t, k, n = h.shape[0], idx.shape[1], adapter.n_experts()
        with torch.no_grad():
            y = [blocks[i].experts(h, torch.full((t, 1), e), torch.ones(t, 1, dtype=h.dtype)).double()
                 for e in range(n)]
        r, std, mean = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), []
        for e in range(n):
            rows = [(tok, slot) for tok in range(t) for slot in range(k) if int(idx[tok, slot]) == e]
            r[e] = sum(float(w[tok, slot]) for tok, slot in rows) / (t * k)
            outs = torch.stack([y[e][tok] for tok, _ in rows]) if rows else torch.zeros(1, h.shape[1])
            mean.append(outs.mean(0))
            std[e] = float(outs.var(0, unbiased=False).sum()) ** 0.5 if rows else 0.0
        out[i] = (r, std, torch.stack(mean))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_mone_scores_equal_the_formula(arch):
    model = tiny_model(arch)
    x = ids(2, 16)
    reference = brute_mone(model, x)
    stats = layer_stats(model, x, STATS)
    adapter = get_adapter(model)
    n_keep, n_group = n_keep_for(arch), adapter.rule().n_group
    for i, (r, std, mean) in reference.items():
        assert int((r > 0).sum()) > n_keep
        layer = adapter.layer(model, i)
        plan = get_method("mone").plan(LayerContext(layer, n_keep, stats[i]))
        info = plan.info
        torch.testing.assert_close(torch.tensor(info["routing_score"], dtype=torch.float64), r, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(torch.tensor(info["output_std"], dtype=torch.float64), std, rtol=1e-4, atol=1e-9)
        score = r * std
        torch.testing.assert_close(torch.tensor(info["scores"], dtype=torch.float64), score, rtol=1e-4, atol=1e-12)
        per = layer.n_experts // n_group
        expected = []
        for g in range(n_group):
            members = range(g * per, (g + 1) * per)
            expected += sorted(members, key=lambda e: (-float(score[e]), e))[:n_keep // n_group]
        assert info["kept"] == sorted(expected)
        assert info["novices"] == [e for e in range(layer.n_experts) if e not in info["kept"]]
        torch.testing.assert_close(torch.tensor(info["novice_norms"], dtype=torch.float64),
                                   mean[info["novices"]].norm(dim=1), rtol=1e-4, atol=1e-9)
        # the ranking is not frequency's: output spread matters
    assert any(sorted(range(8), key=lambda e: -float(reference[i][0][e])) !=
               sorted(range(8), key=lambda e: -float(reference[i][0][e] * reference[i][1][e])) for i in reference)


def test_gpt_oss_expert_with_zero_weights_outputs_its_bias():
    """What a GPT-OSS novice would be: zero gate/up/down weights and biases but down_proj_bias = mu."""
    model = tiny_model("gpt_oss")
    block = next(iter(get_adapter(model).moe_blocks(model).values()))
    mu = torch.randn(block.experts.down_proj_bias.shape[1])
    with torch.no_grad():
        for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj"):
            getattr(block.experts, name)[3].zero_()
        block.experts.down_proj_bias[3] = mu
        h = torch.randn(5, mu.shape[0])
        y = block.experts(h, torch.full((5, 1), 3), torch.ones(5, 1))
    torch.testing.assert_close(y, mu.expand(5, -1), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["deepseek_v2", "gpt_oss"] + [pytest.param(a, marks=pytest.mark.slow)
                                                               for a in ARCHS if a not in ("deepseek_v2", "gpt_oss")])
def test_compress_command_reloads_as_masked_original(monkeypatch, capsys, saved_models, text_file, tmp_path, arch):
    layers = cli_prune_and_check(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, "mone")
    assert all(info["novices_exported"].startswith("dropped") for info in layers.values())


@pytest.mark.parametrize("method,param,pattern", [("mone", "protect_super=maybe", "invalid parameter protect_super"),
                                                  ("mone", "novice=mean", "invalid parameter novice"),
                                                  ("easy-ep", "super_threshold=big",
                                                   "invalid parameter super_threshold")])
def test_bad_parameters_are_user_errors(monkeypatch, capsys, saved_models, tmp_path, method, param, pattern):
    from clitools import assert_user_error, run_cli

    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", method, "--experts",
                           4, "--calib", "builtin:demo", "--param", param, "--out", tmp_path / "out")
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "out").exists()
