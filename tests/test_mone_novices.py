"""MoNE's in-memory model (methods/pruning/mone.py `attach_novices`): the original model whose novice slots output
the routing weight times the expert's mean output, checked against a literal per-token computation, and its row
in `bench`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS
from test_refit import first_layer

from moe_compress.methods.pruning.mone import attach_novices
from moe_compress.models.registry import get_adapter


@pytest.mark.parametrize("arch", ARCHS)
def test_novice_slots_output_the_mean(arch):
    model, layer, _, x = first_layer(arch)
    twin = copy.deepcopy(model)
    adapter = get_adapter(twin)
    mu = torch.randn(layer.n_experts, x.shape[1], generator=torch.Generator().manual_seed(0))  # any constants
    novices = [1, 3]
    attach_novices(twin, adapter, {layer.index: (novices, mu[novices])})
    block = adapter.moe_blocks(twin)[layer.index]
    idx, wt = layer.route(x)
    with torch.no_grad():
        got = block.experts(x, idx, wt.to(x.dtype)).float()
    expected = torch.zeros_like(got)
    for t in range(x.shape[0]):  # literal: each slot adds w * f_e(x_t), or w * mu_e for a novice
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            out = mu[e].float() if e in novices else layer.expert_forward(e, x[t:t + 1].float())[0].float()
            expected[t] += wt[t, s].float() * out
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert any(int((idx == p).sum()) for p in novices)  # the test exercised a novice slot


def test_bench_reports_mone_in_memory_row(tmp_path, saved_models):
    from moe_compress.benchmark import BenchSpec, parse_variants, run_bench
    from moe_compress.recipe import Calibration

    spec = BenchSpec(model=str(saved_models["mixtral"]), variants=parse_variants("mone,frequency"), budgets=[6],
                     calibration=Calibration(data="builtin:demo", n_samples=8, seq_len=32),
                     eval_data="builtin:demo-eval", eval_seq_len=32, max_windows=2, device="cpu")
    rows = run_bench(spec, tmp_path / "b")
    labels = [r["method"] for r in rows]
    assert labels == ["mone", "mone (in memory)", "frequency"]
    mem = rows[1]
    assert mem["params_M"] > rows[0]["params_M"]  # + one H-vector per novice
    assert mem["params_M"] - rows[0]["params_M"] < 0.01
    assert mem["kld"] != rows[0]["kld"]
