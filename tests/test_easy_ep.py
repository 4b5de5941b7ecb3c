"""EASY-EP: the ``easy_ep`` statistic against a literal loop over tokens and slots (every expert run by the model's
own experts module on every token; the routed output taken from the experts module itself), the kept set, and
the compress command on every architecture (reload == router-masked original)."""

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

FAST_CLI = ["qwen2_moe", "gpt_oss"]


def brute_easy_ep(model, x, with_unweighted=False):
    """{layer: [E] float64} by the formula, one (token, slot) at a time (and the same sum without the token
    weights s_t, if asked)."""
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    out, plain = {}, {}
    for i, (h, idx, w) in capture_experts_calls(model, x).items():
        t, n = h.shape[0], adapter.n_experts()
        with torch.no_grad():
            routed = blocks[i].experts(h, idx, w.to(h.dtype)).double()  # the model's routed output [T, H]
            y = [blocks[i].experts(h, torch.full((t, 1), e), torch.ones(t, 1, dtype=h.dtype)).double()
                 for e in range(n)]
        hd = h.double()
        score = torch.zeros(n, dtype=torch.float64)
        plain[i] = torch.zeros(n, dtype=torch.float64)
        for tok in range(t):
            after = hd[tok] + routed[tok]
            cos = float(hd[tok] @ after) / (float(hd[tok].norm()) * float(after.norm()))
            s = max(0.0, 1.0 - cos)
            for slot in range(idx.shape[1]):
                e = int(idx[tok, slot])
                score[e] += s * float(w[tok, slot]) * float(y[e][tok].norm())
                plain[i][e] += float(w[tok, slot]) * float(y[e][tok].norm())
        out[i] = score
    return (out, plain) if with_unweighted else out


@pytest.mark.parametrize("arch", ARCHS)
def test_easy_ep_score_equals_the_formula(arch):
    model = tiny_model(arch)
    x = ids(2, 16)
    reference, unweighted = brute_easy_ep(model, x, with_unweighted=True)
    stats = layer_stats(model, x, ("easy_ep",))
    adapter = get_adapter(model)
    n_keep, n_group = n_keep_for(arch), adapter.rule().n_group
    for i, ref in reference.items():
        assert int((ref > 0).sum()) > n_keep  # enough experts used for the kept set to be decided by the scores
        torch.testing.assert_close(stats[i]["easy_ep"], ref, rtol=1e-4, atol=1e-9 * float(ref.max()))
        # the token weights matter: the score is not a multiple of the unweighted sum of w ||f||
        used = ref > 0
        ratio = ref[used] / unweighted[i][used]  # per-expert mean token weight: not a constant
        assert float(ratio.max() - ratio.min()) > 1e-3 * float(ratio.mean())
        layer = adapter.layer(model, i)
        plan = get_method("easy-ep").plan(LayerContext(layer, n_keep, stats[i]))
        torch.testing.assert_close(torch.tensor(plan.info["scores"], dtype=torch.float64), ref, rtol=1e-4,
                                   atol=1e-9 * float(ref.max()))
        per = layer.n_experts // n_group
        expected = []
        for g in range(n_group):
            members = range(g * per, (g + 1) * per)
            expected += sorted(members, key=lambda e: (-float(ref[e]), e))[:n_keep // n_group]
        assert plan.info["kept"] == sorted(expected)


def test_padding_tokens_do_not_count():
    model = tiny_model("olmoe")
    x = ids(2, 16)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    padded = layer_stats(model, x, ("easy_ep",), attention_mask=mask)
    first_row = layer_stats(model, x[:1], ("easy_ep",))
    first = min(padded)
    # row 1's 8 real tokens count, and only they (first MoE layer: causal attention, unaffected by padding)
    extra = brute_easy_ep(model, x[1:, :8])[first]
    assert float(extra.sum()) > 0
    torch.testing.assert_close(padded[first]["easy_ep"] - first_row[first]["easy_ep"], extra, rtol=1e-4,
                               atol=1e-6 * float(extra.max()))


@pytest.mark.parametrize("arch", FAST_CLI + [pytest.param(a, marks=pytest.mark.slow) for a in ARCHS
                                             if a not in FAST_CLI])
def test_compress_command_reloads_as_masked_original(monkeypatch, capsys, saved_models, text_file, tmp_path, arch):
    layers = cli_prune_and_check(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, "easy-ep")
    assert all(len(info["scores"]) == 8 for info in layers.values())
