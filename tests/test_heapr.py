"""HEAPr: atomic-expert scores against a literal loop (each neuron's down column zeroed in the model's own experts
module, the change of its output on the model's own routing measured), neurons with a zero down column pruned
first at no cost, save + reload == the in-memory narrowed model with only the routed experts' width field
changed, and the CLI budget (--experts N = N experts' parameters, every expert kept)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS
from helpers import ids
from methods_e2e import layer_stats
from test_pruning import capture_experts_calls, plan_pipeline
from transformers import AutoModelForCausalLM

from moe_compress.methods.base import LayerContext, get_method
from moe_compress.methods.pruning.heapr import keep_width
from moe_compress.models.registry import get_adapter
from moe_compress.models.tiny import tiny_model

FAST = ("qwen2_moe", "deepseek_v3", "gpt_oss")
SHARED_TIED = ("deepseek_v2", "deepseek_v3")  # shared experts sized moe_intermediate_size x n_shared_experts
SOME_SLOW = [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]


def brute_scores(model, x) -> dict[int, torch.Tensor]:
    """{layer: S [E, I]}: S[e, j] = sum_t ||Y(x_t) - Y_{-(e,j)}(x_t)||^2, Y the experts module's output on the
    model's own routing and Y_{-(e,j)} the same with down_e[:, j] set to zero."""
    adapter = get_adapter(model)
    out = {}
    for i, (h, idx, w) in capture_experts_calls(model, x).items():
        layer = adapter.layer(model, i)
        experts = layer.block.experts
        n, width = layer.n_experts, layer.experts.gate.shape[1]
        s = torch.zeros(n, width, dtype=torch.float64)
        with torch.no_grad():
            full = experts(h, idx, w).double()
            for e in range(n):
                for j in range(width):
                    col = layer.experts.down[e, :, j].clone()
                    layer.experts.down[e, :, j] = 0
                    s[e, j] = (full - experts(h, idx, w).double()).square().sum()
                    layer.experts.down[e, :, j] = col
        out[i] = s
    return out


@pytest.mark.parametrize("arch", SOME_SLOW)
def test_scores_equal_literal_neuron_loop(arch):
    model = tiny_model(arch)
    x = ids(2, 16)
    reference = brute_scores(model, x)
    stats = layer_stats(model, x, ("expert_act_wsq",))
    adapter = get_adapter(model)
    for i, ref in reference.items():
        layer = adapter.layer(model, i)
        plan = get_method("heapr").plan(LayerContext(layer, 6, stats[i]))
        from moe_compress.methods.pruning.heapr import atomic_scores
        got = atomic_scores(layer, stats[i]["expert_act_wsq"])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(torch.tensor(plan.info["scores_per_expert"], dtype=torch.float64), ref.sum(1),
                                   rtol=1e-5, atol=1e-10)
        width = layer.experts.gate.shape[1]
        i_new = keep_width(6, layer.n_experts, width)
        assert plan.expert_set.n_experts == layer.n_experts
        assert plan.expert_set.experts.gate.shape[1] == i_new == plan.expert_set.experts.down.shape[2]
        for e in range(layer.n_experts):  # kept neurons = the i_new highest literal scores (ties: lower index)
            expect = sorted(sorted(range(width), key=lambda j: (-float(ref[e, j]), j))[:i_new])
            rows = plan.expert_set.experts.gate[e]
            torch.testing.assert_close(rows, layer.experts.gate[e, expect].detach(), rtol=0, atol=0)
            torch.testing.assert_close(plan.expert_set.experts.down[e], layer.experts.down[e][:, expect].detach(),
                                       rtol=0, atol=0)


@pytest.mark.parametrize("arch", SOME_SLOW)
def test_zero_down_columns_are_pruned_at_no_cost(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    width = adapter.layers(model)[0].experts.gate.shape[1]
    n_zero = width - keep_width(6, 8, width)
    assert n_zero > 0
    with torch.no_grad():
        for layer in adapter.layers(model):
            for e in range(layer.n_experts):
                cols = torch.randperm(width, generator=torch.Generator().manual_seed(e + 10 * layer.index))[:n_zero]
                layer.experts.down[e][:, cols] = 0
    x = ids(2, 12, vocab=90, seed=7)
    with torch.no_grad():
        before = model(x).logits
    infos, _, _ = plan_pipeline(model, "heapr", 6, ids(3, 16))
    assert get_adapter(model).expert_width() == width - n_zero
    assert all(info["intermediate_size"] == {"original": width, "kept": width - n_zero} for info in infos.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-5)
    # and the budget bites: one more neuron per expert is a real change
    model2 = tiny_model(arch)
    with torch.no_grad():
        ref2 = model2(x).logits
    plan_pipeline(model2, "heapr", 6, ids(3, 16))
    with torch.no_grad():
        assert (model2(x).logits - ref2).abs().max() > 1e-4


WIDTH_FIELDS = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
                "qwen3_moe": "moe_intermediate_size", "olmoe": "intermediate_size",
                "deepseek_v2": "moe_intermediate_size", "deepseek_v3": "moe_intermediate_size",
                "phimoe": "intermediate_size", "gpt_oss": "intermediate_size"}


@pytest.mark.parametrize("arch", [a if a in ("qwen2_moe", "gpt_oss") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ARCHS if a not in SHARED_TIED])
def test_save_reload_equals_in_memory(saved_models, tmp_path, arch):
    from moe_compress.export.writer import save_model

    model = AutoModelForCausalLM.from_pretrained(saved_models[arch], dtype=torch.float32).eval()
    cfg0 = model.config.to_dict()
    width = get_adapter(model).expert_width()
    plan_pipeline(model, "heapr", 5, ids(3, 16, vocab=90))
    save_model(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    field = WIDTH_FIELDS[arch]
    assert cfg[field] == keep_width(5, 8, width) < width
    changed = {k for k, v in cfg0.items() if k in cfg and cfg[k] != v and not k.startswith("_")}
    assert changed <= {field, "transformers_version", "dtype", "torch_dtype"}, changed  # dense/shared sizes intact
    adapter = get_adapter(reloaded)
    assert adapter.n_experts() == 8
    x = ids(2, 12, vocab=90, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,n", [("olmoe", 5), ("mixtral", 6)])
def test_compress_command(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, n):
    """--experts N is a parameter budget (every expert kept, each narrowed)."""
    from clitools import run_cli

    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models[arch], "--method", "heapr", "--experts", n,
                           "--calib", text_file, "--n-samples", 4, "--seq-len", 16, "--out", out, "-q")
    assert code == 0, err
    manifest = json.loads((out / "compression.json").read_text())
    width = tiny_model(arch).config.to_dict()[WIDTH_FIELDS[arch]]
    assert manifest["experts"] == {"original": 8, "kept": 8, "budget": n}
    assert manifest["intermediate_size"] == {"original": width, "kept": keep_width(n, 8, width)}
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert get_adapter(reloaded).expert_width() == keep_width(n, 8, width)


@pytest.mark.parametrize("args,pattern", [(("--experts", 8), "must be smaller"),
                                          (("--experts", 4, "--param", "ratio=0.5"), "invalid parameter ratio"),
                                          (("--experts", 4, "--param", "width_multiple=0"),
                                           "invalid parameter width_multiple"),
                                          (("--experts", 7, "--param", "width_multiple=16"), "keeps all 48 neurons"),
                                          (("--experts", 4, "--stream"), "streaming writer does not support")])
def test_bad_budgets_are_user_errors(monkeypatch, capsys, saved_models, tmp_path, args, pattern):
    from clitools import assert_user_error, run_cli

    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "heapr", *args,
                           "--calib", "builtin:demo", "--n-samples", 4, "--seq-len", 16, "--out", tmp_path / "out",
                           "-q")
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", SHARED_TIED)
def test_deepseek_with_shared_experts_is_refused(monkeypatch, capsys, saved_models, tmp_path, arch):
    """Its shared experts' size is moe_intermediate_size x n_shared_experts: reloading a narrowed checkpoint fails
    (checked: transformers raises on the mismatched shared-expert shapes), so heapr refuses before any work."""
    from clitools import assert_user_error, run_cli

    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models[arch], "--method", "heapr", "--experts", 4,
                           "--calib", "builtin:demo", "--out", tmp_path / "out")
    assert_user_error(code, err, "shared experts are sized")
