"""The output-similarity observer's computation and sampling (calibration/similarity.py): the per-token cosine
product equals the former normalised-Gram formula, the seeded subsample is deterministic, the reported
standard error matches the spread of the estimate over seeds, and the cost budget bounds the subsample."""

from __future__ import annotations

import pytest
import torch

from moe_compress.calibration.similarity import (
    ExpertOutputs,
    all_expert_outputs,
    gram_fp32,
    mean_stderr,
    token_cosines,
)
from moe_compress.models.registry import get_adapter
from moe_compress.models.tiny import tiny_model


def _layer(arch="mixtral"):
    model = tiny_model(arch)
    return get_adapter(model).layers(model)[0]


def _hidden(layer, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, layer.router_weight.shape[1], generator=g)


@torch.no_grad()
def _observe(layer, hidden, batch=50, **options):
    obs = ExpertOutputs(layer, total_tokens=hidden.shape[0], **options)
    idx, w = layer.route(hidden)
    for s in range(0, hidden.shape[0], batch):
        h = hidden[s:s + batch]
        obs.update(h, idx[s:s + batch], w[s:s + batch], torch.ones(h.shape[0], dtype=torch.bool))
    return obs.result()


def _old_cosine_sum(y_ehc: torch.Tensor) -> torch.Tensor:
    """The former accumulation: normalised outputs [E, H, c] in the model's dtype, one flat Gram."""
    norms = torch.linalg.vector_norm(y_ehc, dim=1, keepdim=True, dtype=torch.float32)
    yn = (y_ehc.float() / norms.clamp(min=1e-12)).to(y_ehc.dtype)
    return gram_fp32(yn.reshape(yn.shape[0], -1)).double()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
@torch.no_grad()
def test_token_cosines_equal_the_former_normalised_gram(arch):
    layer = _layer(arch)
    x = _hidden(layer, 70)
    y = all_expert_outputs(layer.experts, x, layer.activation)          # [E, c, H]
    y[1, 3] = 0  # an all-zero output: cosine 0 with everything, as before
    new = token_cosines(y).sum(0, dtype=torch.float64)
    old = _old_cosine_sum(y.permute(0, 2, 1))
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-5)
    yb = y.to(torch.bfloat16)  # half precision: same up to the (former) rounding of the normalised copy
    torch.testing.assert_close(token_cosines(yb).sum(0, dtype=torch.float64), _old_cosine_sum(yb.permute(0, 2, 1)),
                               rtol=2e-2, atol=2e-2 * 70 ** 0.5)
    ref = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(y[e], y[f], dim=-1, eps=1e-30)
                                    for f in range(y.shape[0])]) for e in range(y.shape[0])])  # [E, E, c]
    ref[1, :, 3] = ref[:, 1, 3] = 0
    torch.testing.assert_close(token_cosines(y).permute(1, 2, 0), ref, rtol=1e-5, atol=1e-6)


def test_all_tokens_have_zero_error_and_first_n_without_total():
    layer = _layer()
    h = _hidden(layer, 120)
    full = _observe(layer, h, similarity_tokens=10 ** 6)
    assert float(full["output_similarity_stderr"].abs().max()) == 0.0
    assert float(full["expert_output_mean_stderr"].abs().max()) == 0.0
    seeded = _observe(layer, h, similarity_tokens=10 ** 6, similarity_seed=5)  # n >= T: every token either way
    for k in full:
        torch.testing.assert_close(seeded[k], full[k], rtol=1e-12, atol=1e-12)


def test_seeded_subsample_is_deterministic_and_differs_between_seeds():
    layer = _layer()
    h = _hidden(layer, 300)
    a = _observe(layer, h, similarity_tokens=40, similarity_seed=1)
    again = _observe(layer, h, similarity_tokens=40, similarity_seed=1)
    b = _observe(layer, h, similarity_tokens=40, similarity_seed=1, batch=37)  # other batching, same tokens
    c = _observe(layer, h, similarity_tokens=40, similarity_seed=2)
    for k in a:
        assert torch.equal(a[k], again[k]), k
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["output_similarity"], c["output_similarity"])
    even = _observe(layer, h, similarity_tokens=40)  # default: evenly spaced, unchanged
    idx = torch.div(torch.arange(40) * 300, 40, rounding_mode="floor")
    ref = _observe(layer, h[idx], similarity_tokens=10 ** 6)
    torch.testing.assert_close(even["output_similarity"], ref["output_similarity"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(even["expert_output_mean"], ref["expert_output_mean"], rtol=1e-6, atol=1e-6)


def test_reported_standard_error_matches_the_spread_over_seeds():
    """Over many seeds, the estimate's squared deviation from the all-token mean averages to the reported
    squared standard error (simple random sampling without replacement, finite-population factor included)."""
    layer = _layer()
    h = _hidden(layer, 400, seed=1)
    exact = _observe(layer, h, similarity_tokens=10 ** 6, batch=400)
    dev_sim, se_sim, dev_mean, se_mean = [], [], [], []
    for seed in range(300):
        r = _observe(layer, h, similarity_tokens=40, similarity_seed=seed, batch=400)
        dev_sim.append((r["output_similarity"] - exact["output_similarity"]).square())
        se_sim.append(r["output_similarity_stderr"].square())
        dev_mean.append((r["expert_output_mean"] - exact["expert_output_mean"]).square())
        se_mean.append(r["expert_output_mean_stderr"].square())
    off = ~torch.eye(layer.n_experts, dtype=torch.bool)  # the diagonal is 1 with error 0
    ratio_sim = torch.stack(dev_sim).mean(0)[off].sum() / torch.stack(se_sim).mean(0)[off].sum()
    ratio_mean = torch.stack(dev_mean).mean(0).sum() / torch.stack(se_mean).mean(0).sum()
    assert 0.85 < float(ratio_sim) < 1.15 and 0.85 < float(ratio_mean) < 1.15, (ratio_sim, ratio_mean)


def test_budget_bounds_the_subsample():
    layer = _layer()  # tiny mixtral: E 8, top-2
    e, k = layer.n_experts, layer.rule.top_k
    h = _hidden(layer, 400)
    obs = ExpertOutputs(layer, similarity_tokens=1000, total_tokens=400, similarity_budget=0.5)
    assert obs.select.size == int(0.5 * 400 * k / e)
    capped = _observe(layer, h, similarity_tokens=1000, similarity_budget=0.5)
    plain = _observe(layer, h, similarity_tokens=int(0.5 * 400 * k / e))
    for name in capped:
        torch.testing.assert_close(capped[name], plain[name], rtol=0, atol=0)
    assert ExpertOutputs(layer, similarity_tokens=10, similarity_budget=0.01).select.size == 10  # no T: no cap
    with pytest.raises(ValueError):
        ExpertOutputs(layer, similarity_budget=0)


def test_mean_stderr_formula():
    vals = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    s, sq = vals.sum(), vals.square().sum()
    se = mean_stderr(s, sq, 4, 10)
    assert float(se) == pytest.approx((vals.var(unbiased=True) / 4 * (1 - 4 / 10)).sqrt().item())
    assert float(mean_stderr(s, sq, 4, None)) == pytest.approx((vals.var() / 4).sqrt().item())
    assert float(mean_stderr(s, sq, 4, 4)) == 0.0 and mean_stderr(s[None], sq[None], 1, 10).isinf().all()


def test_merge_methods_pass_the_budget_only_when_set():
    from moe_compress.methods.base import get_method

    assert get_method("submoe").observer_options() == {"similarity_tokens": 32768}
    assert get_method("hcsmoe", similarity_budget=0.25).observer_options() == {"similarity_tokens": 32768,
                                                                                "similarity_budget": 0.25}


@pytest.mark.parametrize("seed", [None, 0, 7])
@pytest.mark.parametrize("n,total", [(5, 40), (17, 40), (40, 40), (1, 9)])
def test_subsample_selector_is_the_literal_index_set(seed, n, total):
    """Over batches with padding, the selector marks exactly the real tokens whose global index is in the wanted
    set (floor(i T / n), or the seeded random n-subset), each once."""
    from moe_compress.calibration.similarity import SubsampleSelector

    sel = SubsampleSelector(n, total, seed)
    wanted = set(range(total)) if n >= total else set(sel._wanted.tolist())
    gen = torch.Generator().manual_seed(1)
    seen, picked = 0, []
    while seen < total:
        mask = torch.rand(8, generator=gen) < 0.7
        mask = mask & (torch.cumsum(mask.long(), 0) + seen <= total)
        got = sel(mask)
        idx = [seen + int(r) for r in (torch.cumsum(mask.long(), 0) - 1)[mask].tolist()]
        expected = torch.zeros(8, dtype=torch.bool)
        expected[mask.nonzero().flatten()] = torch.tensor([i in wanted for i in idx], dtype=torch.bool)
        assert torch.equal(got, expected)
        picked += [i for i in idx if i in wanted]
        seen += int(mask.sum())
    assert len(picked) == min(n, total) == sel.size
