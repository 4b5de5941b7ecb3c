"""``heapr-refit`` (methods/hybrid/heapr_refit.py): HEAPr's narrowing, then refit's down least squares.

- with the re-fits off it is HEAPr's plan tensor for tensor;
- the least squares never increases HEAPr's calibration reconstruction error, and lowers it on tiny models;
- for an expert routed alone and no ridge, the fitted kept down columns are the Neuron-Merging closed form
  D_K + D_R C_RK C_KK^-1 (checked on a top-1 layer);
- the compress command writes a narrowed checkpoint that reloads (every expert kept);
- choosing the kept experts (select, merge, fold) is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ids
from test_heapr import WIDTH_FIELDS
from transformers import AutoModelForCausalLM

from moe_compress.calibration.runner import run_layers
from moe_compress.methods.base import LayerContext, get_method
from moe_compress.methods.pruning.heapr import keep_width
from moe_compress.models.layer import expert_forward
from moe_compress.models.registry import get_adapter
from moe_compress.models.tiny import tiny_model


def first_layer(arch, rows=4, seq=32, **config):
    model = tiny_model(arch, **config)
    adapter = get_adapter(model)
    stats, inputs = {}, {}

    def on_layer(run):
        if run.observer is not None:
            stats[run.index] = {k: v.float() for k, v in run.observer.results().items()}
            inputs[run.index] = run.moe_inputs
        return False

    run_layers(model, adapter, ids(rows, seq), on_layer=on_layer, keep_moe_inputs=True, stats=("expert_act_wsq",))
    first = min(adapter.moe_blocks(model))
    return adapter.layer(model, first), stats[first], inputs[first]


def ctx(layer, stats, x, n=6):
    return LayerContext(layer, n, stats, x, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_no_refit_equals_heapr_and_the_fit_only_helps(arch):
    layer, stats, x = first_layer(arch)
    off = get_method("heapr-refit", refit_down=False).plan(ctx(layer, stats, x))
    heapr = get_method("heapr").plan(ctx(layer, stats, x))
    for name in ("gate", "up", "down"):
        assert torch.equal(getattr(off.expert_set.experts, name), getattr(heapr.expert_set.experts, name))
    assert off.info["intermediate_size"] == heapr.info["intermediate_size"]
    fit = get_method("heapr-refit", holdout=0.0, ridge=1e-2).plan(ctx(layer, stats, x))
    err = fit.info["rel_error"]
    assert err["down"] <= err["pruned"] * (1 + 1e-6) and err["down"] < err["pruned"]
    assert fit.expert_set.experts.down.shape == heapr.expert_set.experts.down.shape
    assert torch.equal(fit.expert_set.experts.gate, heapr.expert_set.experts.gate)


def test_single_routed_expert_is_neuron_merging():
    """Top-1 routing: no expert is co-routed, so without ridge each expert's fit is its own least squares, whose
    solution merges the removed neurons into the kept ones: D_K + D_R C_RK C_KK^-1, C the w^2-weighted second
    moments of that expert's activations on its routed tokens."""
    layer, stats, x = first_layer("mixtral", rows=32, seq=64, num_experts_per_tok=1)
    plan = get_method("heapr-refit", holdout=0.0, ridge=0.0, fit_tokens=100000).plan(ctx(layer, stats, x))
    heapr = get_method("heapr").plan(ctx(layer, stats, x))
    assert plan.info["intermediate_size"]["kept"] < layer.experts.gate.shape[1]
    idx, wt = layer.route(x.float())
    w = layer.experts.to(dtype=torch.float32)
    checked = 0
    for e in range(layer.n_experts):
        tok = torch.nonzero(idx[:, 0] == e).flatten()
        kept_rows = [int(torch.nonzero((w.gate[e] == g).all(dim=1))[0])
                     for g in heapr.expert_set.experts.gate[e].float()]
        if tok.numel() < 3 * len(kept_rows):  # too few tokens for a well-posed fit
            continue
        a = expert_forward(w, e, x[tok].float(), layer.activation, intermediate=True).double()
        a = a * wt[tok, 0, None].double()
        removed = [j for j in range(a.shape[1]) if j not in kept_rows]
        c_kk = a[:, kept_rows].T @ a[:, kept_rows]
        c_rk = a[:, removed].T @ a[:, kept_rows]
        d = w.down[e].double()
        expected = d[:, kept_rows] + d[:, removed] @ torch.linalg.solve(c_kk, c_rk.T).T
        torch.testing.assert_close(plan.expert_set.experts.down[e].double(), expected, rtol=1e-3, atol=1e-4)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("arch,n", [("mixtral", 6), ("qwen2_moe", 5)])
def test_compress_command_writes_a_narrowed_checkpoint(monkeypatch, capsys, saved_models, text_file, tmp_path,
                                                       arch, n):
    from clitools import run_cli

    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models[arch], "--method", "heapr-refit",
                           "--experts", n, "--calib", text_file, "--n-samples", 4, "--seq-len", 16, "--out", out, "-q")
    assert code == 0, err
    manifest = json.loads((out / "compression.json").read_text())
    width = tiny_model(arch).config.to_dict()[WIDTH_FIELDS[arch]]
    assert manifest["experts"] == {"original": 8, "kept": 8, "budget": n}
    assert manifest["intermediate_size"] == {"original": width, "kept": keep_width(n, 8, width)}
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert get_adapter(reloaded).expert_width() == keep_width(n, 8, width)
    with torch.no_grad():
        assert torch.isfinite(reloaded(ids(2, 12, vocab=90)).logits).all()


@pytest.mark.parametrize("param,pattern", [("select=naee", "select choose"), ("merge=msmoe", "merge choose"),
                                           ("fold=true", "fold choose"), ("width_multiple=0",
                                                                          "invalid parameter width_multiple")])
def test_choosing_experts_is_a_user_error(monkeypatch, capsys, saved_models, tmp_path, param, pattern):
    from clitools import assert_user_error, run_cli

    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["mixtral"], "--method", "heapr-refit",
                           "--experts", 6, "--param", param, "--calib", "builtin:demo", "--n-samples", 4,
                           "--seq-len", 16, "--out", tmp_path / "out", "-q")
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "out").exists()
