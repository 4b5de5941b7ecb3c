"""The ``refit`` method (methods/hybrid/refit.py): identities that must hold exactly, monotonicity of the re-fits,
determinism, and the pruned checkpoint computing what the plan measured.

- the reference output Y equals what the model's own experts module computes;
- keeping every expert: the down-projection least squares returns the original weights (the fit is exact
  already), and the joint normal equations equal the dense Z^T Z / Z^T Y;
- with both re-fits off, refit's plan is NAEE's plan tensor for tensor;
- each re-fit never increases the calibration reconstruction error of its starting point;
- the same seed gives the same tensors; every architecture runs through the pipeline.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS
from helpers import ids

from moe_compress.calibration.runner import run_layers
from moe_compress.methods.base import LayerContext, get_method
from moe_compress.methods.hybrid.refit import (
    down_normal_equations,
    fold_assignment,
    kept_outputs,
    mixture,
    original_output,
    refit_router,
    relative_error,
    solve_down,
)
from moe_compress.models.layer import expert_forward
from moe_compress.models.registry import get_adapter
from moe_compress.models.routing import route
from moe_compress.models.tiny import tiny_model


def first_layer(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    stats, inputs = {}, {}

    def on_layer(run):
        if run.observer is not None:
            stats[run.index] = {k: v.float() for k, v in run.observer.results().items()}
            inputs[run.index] = run.moe_inputs
        return False

    run_layers(model, adapter, ids(), on_layer=on_layer, keep_moe_inputs=True)
    first = min(adapter.moe_blocks(model))
    return model, adapter.layer(model, first), stats[first], inputs[first]


def n_keep_for(layer) -> int:
    return 4 if layer.rule.n_group > 1 else 6


def ctx(layer, stats, x, n_keep):
    return LayerContext(layer, n_keep, stats, x, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_reference_output_is_the_experts_module_output(arch):
    _, layer, _, x = first_layer(arch)
    idx, w = layer.route(x)
    with torch.no_grad():
        out = layer.block.experts(x, idx, w.to(x.dtype))
    torch.testing.assert_close(original_output(layer, x), out.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_keeping_everything_is_a_fixed_point(arch):
    _, layer, _, x = first_layer(arch)
    w = layer.experts.to(dtype=torch.float32)
    idx, wt = layer.route(x)
    y = original_output(layer, x)
    target = y if w.down_bias is None else y - (wt.unsqueeze(-1) * w.down_bias[idx]).sum(dim=1)
    g, b = down_normal_equations(w, x, target, idx, wt, layer.activation)
    # the block-built normal equations equal the dense ones
    n, i_dim = w.n_experts, w.down.shape[2]
    z = torch.zeros(x.shape[0], n * i_dim, dtype=torch.float64)
    for e in range(n):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        z[tok, e * i_dim:(e + 1) * i_dim] = (wt[tok, slot, None] * expert_forward(w, e, x[tok], layer.activation,
                                                                                  intermediate=True)).double()
    torch.testing.assert_close(g, z.T @ z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, z.T @ target.double(), rtol=1e-9, atol=1e-9)
    # the original down projections already reproduce Y: ridge least squares towards them returns them, and
    # without ridge (G may be singular on few tokens) the fitted OUTPUTS are the original ones
    for ridge in (1e-3, 1.0):
        torch.testing.assert_close(solve_down(g, b, w.down, ridge), w.down, rtol=1e-3, atol=1e-4)
    d = solve_down(g, b, w.down, 0.0).double().permute(0, 2, 1).reshape(n * i_dim, -1)
    torch.testing.assert_close(z @ d, target.double(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_no_refit_equals_naee(arch):
    _, layer, stats, x = first_layer(arch)
    n_keep = n_keep_for(layer)
    a = get_method("refit", select="naee", router_steps=0, refit_down=False).plan(ctx(layer, stats, x, n_keep))
    b = get_method("naee").plan(ctx(layer, stats, x, n_keep))
    assert a.info["kept"] == b.info["kept"]
    for name in ("gate", "up", "down"):
        assert torch.equal(getattr(a.expert_set.experts, name), getattr(b.expert_set.experts, name))
    assert torch.equal(a.expert_set.router_weight, b.expert_set.router_weight)


def test_select_balance_is_naee_balance():
    _, layer, stats, x = first_layer("deepseek_v3")
    dom = torch.arange(x.shape[0]) % 2
    c = LayerContext(layer, 4, stats, x, torch.Generator().manual_seed(0), dom)
    a = get_method("refit", select="naee", select_balance="domains", refit_down=False).plan(c)
    b = get_method("naee", balance="domains").plan(LayerContext(layer, 4, stats, x, torch.Generator().manual_seed(0),
                                                                dom))
    assert b.info["balance"] == "domains" and a.info["kept"] == b.info["kept"]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_refits_never_increase_the_calibration_error(arch):
    _, layer, stats, x = first_layer(arch)
    n_keep = n_keep_for(layer)
    plan = get_method("refit", router_steps=10, holdout=0.0, ridge=1e-2).plan(ctx(layer, stats, x, n_keep))
    err = plan.info["rel_error"]
    assert err["router"] <= err["pruned"] * (1 + 1e-6)
    assert err["down"] <= err["router"] * (1 + 1e-5)
    assert err["down"] < err["pruned"]  # the least squares has room to improve on tiny random models


def test_router_refit_returns_its_best_iterate():
    _, layer, _, x = first_layer("mixtral")
    kept = [0, 1, 2, 3, 4, 5]
    w = layer.experts.select(kept).to(dtype=torch.float32)
    y = original_output(layer, x)
    yk = kept_outputs(w, x, layer.activation)
    rw = layer.router_weight[kept].detach().float()
    new, _, (start, best) = refit_router(layer, x, y, yk, rw, None, None, steps=20, lr=0.05)
    assert best <= start
    idx, wt = route(x @ new.T, layer.rule)
    norm = float(y.pow(2).sum(dim=1).mean())
    assert float((mixture(yk, idx, wt) - y).pow(2).sum(dim=1).mean()) / norm == pytest.approx(best, rel=1e-5)
    assert relative_error(y, y) == 0.0


def test_deterministic():
    _, layer, stats, x = first_layer("mixtral")
    plans = [get_method("refit", router_steps=5).plan(ctx(layer, stats, x, 6)) for _ in range(2)]
    for name in ("gate", "up", "down"):
        assert torch.equal(getattr(plans[0].expert_set.experts, name), getattr(plans[1].expert_set.experts, name))
    assert torch.equal(plans[0].expert_set.router_weight, plans[1].expert_set.router_weight)
    assert plans[0].info == plans[1].info


def test_fold_assignment_stays_in_deepseek_groups():
    _, layer, _, x = first_layer("deepseek_v3")
    per = layer.n_experts // layer.rule.n_group
    kept = [0, 1, per, per + 1]
    folded = fold_assignment(layer, x, kept)
    assert sorted(folded) == kept
    assert sorted(r for rs in folded.values() for r in rs) == [e for e in range(layer.n_experts) if e not in kept]
    assert all(r // per == c // per for c, rs in folded.items() for r in rs)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_computes_what_the_plan_measured(arch):
    """Written into the model, the re-fitted layer's routed output on the fit tokens has the recorded error."""
    from moe_compress.models.surgery import write_block

    model, layer, stats, x = first_layer(arch)
    n_keep = n_keep_for(layer) if arch != "phimoe" else 6
    plan = get_method("refit", holdout=0.0, fit_tokens=10**6).plan(ctx(layer, stats, x, n_keep))
    y = original_output(layer, x)
    adapter = get_adapter(model)
    block = adapter.moe_blocks(model)[layer.index]
    write_block(adapter, block, plan.expert_set)
    new = adapter.layer(model, layer.index, block)
    idx, wt = new.route(x)
    with torch.no_grad():
        out = block.experts(x, idx, wt.to(x.dtype)).float()
    assert relative_error(out, y) == pytest.approx(plan.info["rel_error"]["down"], rel=1e-3, abs=1e-6)


def test_tuning_is_chosen_on_heldout_tokens_and_never_worse_there():
    _, layer, stats, x = first_layer("mixtral")
    plan = get_method("refit", tune_steps=20, tune_batch=64, holdout=0.25).plan(ctx(layer, stats, x, 6))
    held = plan.info["rel_error_heldout"]
    assert held["tune"] <= held["down"] * (1 + 1e-9)
    assert plan.info["rel_error"]["down"] <= plan.info["rel_error"]["pruned"]
