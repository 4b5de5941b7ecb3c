"""Pruning methods against brute-force references computed independently of the calibration runner.

- every routed score (frequency, soft count, EAN, REAP, max activation) from full-model hooks, each expert run
  by the model's own experts module on every token;
- NAEE's objective and exhaustive optimum against every subset physically pruned out of a copy of the block;
- greedy / beam search: valid sets, never better than exhaustive;
- super-expert protection on a planted outlier expert; DeepSeek-V3 group counts;
- sequential mode: layer i is scored on inputs produced by the already-pruned layers before it;
- the compress command for every pruning method on saved tiny models of every architecture.
"""

from __future__ import annotations

import copy
import itertools
import json
from types import SimpleNamespace

import pytest
import torch
from clitools import run_cli
from conftest import ARCHS
from helpers import capture_block_inputs, ids
from transformers import AutoModelForCausalLM

from moe_compress.calibration.runner import run_layers
from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, get_method
from moe_compress.methods.pruning.base import super_experts
from moe_compress.methods.pruning.naee import ReconstructionObjective, search_space_size
from moe_compress.models.registry import get_adapter
from moe_compress.models.surgery import keep_set, write_block
from moe_compress.models.tiny import tiny_model
from moe_compress.pipeline import plan_and_apply
from moe_compress.recipe import Recipe

SCORE_METHODS = {"frequency": "frequency", "soft-count": "soft_count", "ean": "ean", "reap": "reap"}
PRUNING_METHODS = ["frequency", "soft-count", "ean", "reap", "naee", "random"]


def n_keep_for(arch: str) -> int:
    return 4 if arch == "deepseek_v3" else 5  # DeepSeek-V3 tiny: 2 groups of 4 -> an even count


# ---------------------------------------------------------------------------------------------------------------
# brute-force references
# ---------------------------------------------------------------------------------------------------------------

def capture_experts_calls(model, x) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the whole model on x; per MoE layer, what its experts module received: (hidden [T,H], idx [T,k],
    weights [T,k]) as the model's own router computed them."""
    return {i: (h, idx, w.float()) for i, (h, idx, w) in capture_block_inputs(model, x, lambda a, b: b.experts).items()}


def brute_stats(model, x) -> dict[int, dict[str, torch.Tensor]]:
    """{MoE layer: {statistic: [E] float64}}: each expert e is run by the model's experts module on EVERY token
    (top_k_index = e, weight 1), then the routed (token, slot) pairs are read off."""
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    out = {}
    for i, (h, idx, w) in capture_experts_calls(model, x).items():
        t, n = h.shape[0], adapter.n_experts()
        stats = {k: torch.zeros(n, dtype=torch.float64) for k in
                 ("frequency", "soft_count", "ean", "reap", "max_activation")}
        renorm = w / w.sum(dim=-1, keepdim=True)
        for e in range(n):
            with torch.no_grad():
                y = blocks[i].experts(h, torch.full((t, 1), e), torch.ones(t, 1, dtype=h.dtype)).double()
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            norms = y[tok].norm(dim=-1)
            stats["frequency"][e] = len(tok)
            stats["soft_count"][e] = w[tok, slot].double().sum()
            stats["ean"][e] = norms.sum()
            stats["reap"][e] = (renorm[tok, slot].double() * norms).mean() if len(tok) else 0.0
            stats["max_activation"][e] = y[tok].abs().max() if len(tok) else 0.0
        out[i] = stats
    return out


def runner_stats(model, x, inputs: bool = False):
    """{layer: stats} (and {layer: MoE inputs}) from the calibration runner, model unchanged."""
    adapter = get_adapter(model)
    stats, moe_inputs = {}, {}

    def on_layer(run):
        if run.observer is not None:
            stats[run.index] = run.observer.results()
            moe_inputs[run.index] = run.moe_inputs

    run_layers(model, adapter, x, on_layer=on_layer, keep_moe_inputs=inputs)
    return (stats, moe_inputs) if inputs else stats


def block_output(block, h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = block(h.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).squeeze(0)


def brute_subset_errors(model, layer_index: int, h: torch.Tensor, subsets) -> torch.Tensor:
    """Mean over tokens of ||block_S(h) - block(h)||^2 for each kept set S, each computed by physically pruning
    a copy of the whole MoE block (shared experts included) and running the model's own block forward."""
    adapter = get_adapter(model)
    block = adapter.moe_blocks(model)[layer_index]
    layer = adapter.layer(model, layer_index, block)
    full = block_output(block, h).double()
    errs = []
    for s in subsets:
        pruned = copy.deepcopy(block)
        write_block(adapter, pruned, keep_set(layer, list(s)))
        errs.append(((block_output(pruned, h).double() - full) ** 2).sum(dim=-1).mean())
    return torch.stack(errs)


def feasible_subsets(n: int, n_keep: int, n_group: int):
    per = n // n_group
    return [s for s in itertools.combinations(range(n), n_keep)
            if len({sum(1 for e in s if e // per == g) for g in range(n_group)}) == 1]


def plan_pipeline(model, method: str, n_keep: int, x, mode="oneshot", **params):
    """plan_and_apply through the calibration runner (what `compress` runs after loading)."""
    recipe = Recipe(model="tiny", method=method, experts=n_keep, output="unused", mode=mode, params=params)
    adapter = get_adapter(model)
    return plan_and_apply(get_method(method, **params), adapter, model, n_keep,
                          calib=SimpleNamespace(input_ids=x, attention_mask=None), recipe=recipe, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_scores_equal_brute_force(arch):
    model = tiny_model(arch)
    x = ids()
    reference = brute_stats(model, x)
    stats = runner_stats(model, x)
    assert set(stats) == set(reference)
    adapter = get_adapter(model)
    n_keep, n_group = n_keep_for(arch), adapter.rule().n_group
    for i, ref in reference.items():
        assert ref["frequency"].min() > 0  # every expert routed: the scores are all informative
        for stat in ("frequency", "soft_count", "ean", "reap", "max_activation"):
            torch.testing.assert_close(stats[i][stat].double(), ref[stat], rtol=1e-5, atol=1e-6)
        layer = adapter.layer(model, i)
        for method, stat in SCORE_METHODS.items():
            plan = get_method(method).plan(LayerContext(layer, n_keep, {k: v.float() for k, v in stats[i].items()}))
            torch.testing.assert_close(torch.tensor(plan.info["scores"], dtype=torch.float64), ref[stat],
                                       rtol=1e-5, atol=1e-6)
            assert plan.info["super_experts"] == []  # random tiny models have no outlier expert
            # kept = the n_keep best by the reference score (ties: lower index), best per group for DeepSeek
            per = layer.n_experts // n_group
            expected = []
            for g in range(n_group):
                members = range(g * per, (g + 1) * per)
                expected += sorted(members, key=lambda e: (-float(ref[stat][e]), e))[:n_keep // n_group]
            assert plan.info["kept"] == sorted(expected), (method, i)


def test_super_expert_rule():
    peaks = torch.tensor([1.0, 1.3, 0.8, 1.1, 25.0, 0.9, 10.9, 1.2])  # median 1.15
    assert super_experts(peaks, 10.0) == [4]
    assert super_experts(peaks, 5.0) == [4, 6]
    assert super_experts(torch.tensor([1.0, 2.0, 9.0, 3.0]), 10.0) == []
    assert super_experts(None, 10.0) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_super_expert_is_detected_and_kept(arch):
    model = tiny_model(arch)
    x = ids()
    adapter = get_adapter(model)
    first = min(adapter.moe_blocks(model))
    freq = runner_stats(model, x)[first]["frequency"]
    planted = int(torch.argmin(freq))  # the least used expert of the first MoE layer
    assert freq[planted] > 0
    with torch.no_grad():  # huge down-projection outputs; routing in this layer is unchanged
        ex = adapter.moe_blocks(model)[first].experts
        ex.down_proj[planted] *= 1000.0
        if getattr(ex, "down_proj_bias", None) is not None:
            ex.down_proj_bias[planted] *= 1000.0
    n_keep = 4 if arch == "deepseek_v3" else 2  # DeepSeek-V3: groups of at least 2
    infos, _, _ = plan_pipeline(copy.deepcopy(model), "frequency", n_keep, x)
    assert infos[first]["super_experts"] == [planted]
    assert planted in infos[first]["kept"] and len(infos[first]["kept"]) == n_keep
    infos, _, _ = plan_pipeline(copy.deepcopy(model), "frequency", n_keep, x, protect_super=False)
    assert infos[first]["super_experts"] == [] and planted not in infos[first]["kept"]


# ---------------------------------------------------------------------------------------------------------------
# NAEE
# ---------------------------------------------------------------------------------------------------------------

def first_moe_inputs(model, x):
    adapter = get_adapter(model)
    first = min(adapter.moe_blocks(model))
    stats, inputs = runner_stats(model, x, inputs=True)
    return first, stats[first], inputs[first]


@pytest.mark.parametrize("arch", ARCHS)
def test_naee_exhaustive_finds_true_optimum(arch):
    model = tiny_model(arch)
    x = ids(3, 24)
    first, stats, h = first_moe_inputs(model, x)
    adapter = get_adapter(model)
    layer = adapter.layer(model, first)
    n, n_group = layer.n_experts, layer.rule.n_group
    n_keep = 6 if n_group == 1 else 4
    subsets = feasible_subsets(n, n_keep, n_group)
    brute = brute_subset_errors(model, first, h, subsets)
    # the batched objective equals the physically pruned block, for every subset (shared experts cancel)
    masks = torch.zeros(len(subsets), n, dtype=torch.bool)
    for j, s in enumerate(subsets):
        masks[j, list(s)] = True
    objective = ReconstructionObjective(layer, h).errors(masks)
    torch.testing.assert_close(objective, brute, rtol=1e-4, atol=1e-9)
    plan = get_method("naee").plan(LayerContext(layer, n_keep, stats, h, torch.Generator().manual_seed(0)))
    best = int(torch.argmin(brute))
    assert torch.sort(brute).values[1] > brute[best] * (1 + 1e-4)  # a unique optimum, so the set must match
    assert plan.info["kept"] == list(subsets[best])
    assert plan.info["search"] == "exhaustive"
    assert plan.info["search_space"] == plan.info["candidates_evaluated"] == len(subsets)
    assert plan.info["reconstruction_error"] == pytest.approx(float(brute[best]), rel=1e-4)
    if n_group > 1:  # dropping one expert alone is not a valid DeepSeek pruning: no physical reference
        return
    # scores: the error of dropping each expert alone
    singles = brute_subset_errors(model, first, h, [[f for f in range(n) if f != e] for e in range(n)])
    torch.testing.assert_close(torch.tensor(plan.info["scores"], dtype=torch.float64), singles, rtol=1e-4,
                               atol=1e-9)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_naee_greedy_and_beam_are_valid_and_not_better_than_exhaustive(arch):
    model = tiny_model(arch)
    x = ids(3, 24)
    first, stats, h = first_moe_inputs(model, x)
    layer = get_adapter(model).layer(model, first)
    n, n_group = layer.n_experts, layer.rule.n_group
    n_keep = 4
    subsets = feasible_subsets(n, n_keep, n_group)
    brute = brute_subset_errors(model, first, h, subsets)
    by_set = {s: float(e) for s, e in zip(subsets, brute)}
    for params, evaluated in (({"search": "greedy"}, None), ({"search": "beam", "beam_width": 3}, None),
                              ({"max_candidates": 10}, None)):  # auto falls back to greedy above the limit
        plan = get_method("naee", **params).plan(LayerContext(layer, n_keep, stats, h))
        kept = tuple(plan.info["kept"])
        assert len(kept) == n_keep and kept in by_set  # a feasible set (equal counts per DeepSeek group)
        assert by_set[kept] >= float(brute.min()) * (1 - 1e-6)
        assert plan.info["reconstruction_error"] == pytest.approx(by_set[kept], rel=1e-4)
        assert plan.info["search"] == params.get("search", "greedy")
        assert plan.info["search_space"] == len(subsets)
    greedy = get_method("naee", search="greedy").plan(LayerContext(layer, n_keep, stats, h))
    if n_group == 1:  # remove 4 of 8, one per step: 8 + 7 + 6 + 5 candidates
        assert greedy.info["candidates_evaluated"] == 26
    with pytest.raises(UserError, match="max_candidates"):
        get_method("naee", search="exhaustive", max_candidates=5).plan(LayerContext(layer, n_keep, stats, h))


def test_naee_respects_protected_and_groups_in_search_space():
    assert search_space_size(8, 6, 1, []) == 28
    assert search_space_size(8, 6, 1, [3]) == 21          # C(7, 5)
    assert search_space_size(8, 4, 2, []) == 36           # C(4, 2)^2
    assert search_space_size(8, 4, 2, [0, 1]) == 6        # group 0 full of protected experts: C(4, 2)
    model = tiny_model("mixtral")
    x = ids(3, 24)
    first, stats, h = first_moe_inputs(model, x)
    layer = get_adapter(model).layer(model, first)
    stats = dict(stats)
    # make expert with the largest single-drop error irrelevant: plant a peak on the least important one
    singles = ReconstructionObjective(layer, h).errors(~torch.eye(8, dtype=torch.bool))
    weakest = int(torch.argmin(singles))
    peaks = torch.ones(8)
    peaks[weakest] = 100.0
    stats["max_activation"] = peaks
    for search in ("exhaustive", "greedy", "beam"):
        plan = get_method("naee", search=search).plan(LayerContext(layer, 2, stats, h))
        assert weakest in plan.info["kept"] and plan.info["super_experts"] == [weakest]


def test_naee_token_budget_is_seeded():
    model = tiny_model("olmoe")
    x = ids(4, 32)
    first, stats, h = first_moe_inputs(model, x)
    layer = get_adapter(model).layer(model, first)
    method = get_method("naee", max_tokens=20)
    plans = [method.plan(LayerContext(layer, 4, stats, h, torch.Generator().manual_seed(s))).info for s in (1, 1, 2)]
    assert all(p["tokens"] == 20 for p in plans)
    assert plans[0] == plans[1] and plans[0]["scores"] != plans[2]["scores"]
    with pytest.raises(UserError, match="calibration"):
        method.plan(LayerContext(layer, 4, stats, None))


def test_runner_hands_each_token_its_domain():
    model = tiny_model("qwen3_moe")
    x = ids(4, 16)
    mask = torch.ones_like(x)
    mask[1, 10:] = 0  # padding is not a token
    domains = torch.tensor([2, 0, 1, 0])
    got = {}

    def on_layer(run):
        if run.observer is not None:
            got[run.index] = (run.moe_inputs, run.moe_domains)

    run_layers(model, get_adapter(model), x, mask, on_layer=on_layer, keep_moe_inputs=True, domains=domains)
    expected = domains.repeat_interleave(16)[mask.reshape(-1).bool()]
    for h, dom in got.values():
        assert h.shape[0] == dom.shape[0] == int(mask.sum())
        assert torch.equal(dom, expected)
    run_layers(model, get_adapter(model), x, mask, on_layer=on_layer, keep_moe_inputs=True)
    assert all(dom is None for _, dom in got.values())


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_naee_domain_balance_is_the_mean_regret(arch):
    """balance=domains: the kept set minimises mean_d err_d(S) / min_S' err_d(S'), every err_d from physically
    pruned blocks on domain d's tokens."""
    model = tiny_model(arch)
    first, stats, h = first_moe_inputs(model, ids(4, 24))
    layer = get_adapter(model).layer(model, first)
    n, n_group = layer.n_experts, layer.rule.n_group
    n_keep = 4
    dom = (torch.arange(h.shape[0]) >= h.shape[0] // 3).long() * 3  # two domains (ids 0 and 3), 1/3 and 2/3
    subsets = feasible_subsets(n, n_keep, n_group)
    per = torch.stack([brute_subset_errors(model, first, h[dom == d], subsets) for d in (0, 3)], 1)  # [S, 2]
    regret = per / per.min(0).values
    best = int(torch.argmin(regret.mean(1)))
    assert torch.sort(regret.mean(1)).values[1] > regret.mean(1)[best] * (1 + 1e-4)
    info = get_method("naee", balance="domains").plan(LayerContext(layer, n_keep, stats, h, None, dom)).info
    assert info["kept"] == list(subsets[best]) and info["balance"] == "domains" and info["domains"] == [0, 3]
    torch.testing.assert_close(torch.tensor(info["domain_optima"], dtype=torch.float64), per.min(0).values,
                               rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(torch.tensor(info["domain_regret"], dtype=torch.float64), regret[best], rtol=1e-4,
                               atol=1e-9)


def test_naee_domain_balance_with_one_domain_is_the_plain_objective():
    model = tiny_model("mixtral")
    first, stats, h = first_moe_inputs(model, ids(3, 24))
    layer = get_adapter(model).layer(model, first)
    plain = get_method("naee").plan(LayerContext(layer, 4, stats, h)).info
    one = get_method("naee", balance="domains").plan(
        LayerContext(layer, 4, stats, h, None, torch.full((h.shape[0],), 2))).info
    assert one == plain


def test_compress_hands_calibration_domains_to_the_method():
    model = tiny_model("deepseek_v3")
    x = ids(6, 24)
    recipe = Recipe(model="tiny", method="naee", experts=4, output="unused", params={"balance": "domains"})
    calib = SimpleNamespace(input_ids=x, attention_mask=None, domains=["code", "wiki", "code", "wiki", "law", "law"])
    infos, _, _ = plan_and_apply(get_method("naee", balance="domains"), get_adapter(model), model, 4, calib=calib,
                                 recipe=recipe, device="cpu")
    assert all(i["balance"] == "domains" and i["domains"] == [0, 1, 2] for i in infos.values())


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek groups, sequential mode, budgets
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", PRUNING_METHODS)
@pytest.mark.parametrize("n_keep", [4, 6])
def test_deepseek_v3_keeps_equal_counts_per_group(method, n_keep):
    model = tiny_model("deepseek_v3")  # 8 experts in 2 groups of 4
    infos, _, _ = plan_pipeline(model, method, n_keep, ids(2, 16))
    for info in infos.values():
        kept = info["kept"]
        assert len(kept) == n_keep
        assert sum(1 for e in kept if e < 4) == sum(1 for e in kept if e >= 4) == n_keep // 2
    assert get_adapter(model).n_experts() == n_keep


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_sequential_mode_scores_on_already_pruned_layers(arch):
    x = ids()
    n_keep = 4
    oneshot_model, seq_model = tiny_model(arch), tiny_model(arch)
    _, oneshot, _ = plan_pipeline(oneshot_model, "reap", n_keep, x, mode="oneshot")
    infos, sequential, _ = plan_pipeline(seq_model, "reap", n_keep, x, mode="sequential")
    layers = sorted(sequential.layers)
    assert len(layers) >= 2
    assert torch.equal(oneshot.layers[layers[0]]["reap"], sequential.layers[layers[0]]["reap"])
    for later in layers[1:]:
        assert not torch.allclose(oneshot.layers[later]["ean"], sequential.layers[later]["ean"])
        # brute force: the original model with every MoE layer before `later` pruned as planned
        reference = tiny_model(arch)
        adapter = get_adapter(reference)
        for i, block in adapter.moe_blocks(reference).items():
            if i < later:
                write_block(adapter, block, keep_set(adapter.layer(reference, i, block), infos[i]["kept"]))
        ref = brute_stats(reference, x)[later]
        for stat in ("frequency", "soft_count", "ean", "reap", "max_activation"):
            torch.testing.assert_close(sequential.layers[later][stat].double(), ref[stat], rtol=1e-5, atol=1e-5)
    # and oneshot layer statistics are those of the original model
    ref = brute_stats(tiny_model(arch), x)[layers[-1]]
    torch.testing.assert_close(oneshot.layers[layers[-1]]["ean"].double(), ref["ean"], rtol=1e-5, atol=1e-5)


def test_ratio_budget():
    recipe = lambda r: Recipe(model="m", method="reap", ratio=r, output="o")  # noqa: E731
    assert recipe(0.25).target_experts(8) == 6
    assert recipe(0.5).target_experts(8) == 4
    assert recipe(0.5).target_experts(64) == 32
    assert recipe(0.9).target_experts(8) == 1  # rounds; the pipeline then refuses counts below top-k


# ---------------------------------------------------------------------------------------------------------------
# end to end: reduced checkpoints that load and equal the router-masked original
# ---------------------------------------------------------------------------------------------------------------

def masked_logits(model, kept: dict[int, list[int]], x) -> torch.Tensor:
    """Logits of ``model`` with every router restricted to the kept experts (the pruning reference)."""
    adapter = get_adapter(model)
    hooks = []
    for layer in adapter.layers(model):
        mask = torch.zeros(layer.n_experts, dtype=torch.bool)
        mask[kept[layer.index]] = True

        def hook(mod, args, out, layer=layer, mask=mask):
            idx, w = layer.route(args[0].reshape(-1, layer.router_weight.shape[1]), mask=mask)
            return (out[0], w.to(out[1].dtype), idx)

        hooks.append(adapter.router(layer.block).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(x).logits
    finally:
        for h in hooks:
            h.remove()


def check_reduced_checkpoint(original_dir, out_dir, kept: dict[int, list[int]], n_keep: int, x) -> None:
    original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
    reduced = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert get_adapter(reduced).n_experts() == n_keep
    with torch.no_grad():
        got = reduced(x).logits
    reference = masked_logits(original, kept, x)
    assert (got - reference).abs().max().item() <= 2e-5
    with torch.no_grad():
        assert (original(x).logits - reference).abs().max() > 1e-4  # the pruning did change the model


E2E_FAST = [(a, "naee") for a in ARCHS] + [("qwen2_moe", m) for m in PRUNING_METHODS if m != "naee"]
E2E_SLOW = [(a, m) for a in ARCHS for m in PRUNING_METHODS if (a, m) not in E2E_FAST]


def _e2e_in_memory(saved_models, tmp_path, arch, method):
    from moe_compress.export.writer import save_model

    n_keep = n_keep_for(arch)
    model = AutoModelForCausalLM.from_pretrained(saved_models[arch], dtype=torch.float32).eval()
    infos, _, _ = plan_pipeline(model, method, n_keep, ids(3, 16, vocab=90))
    save_model(model, tmp_path / "out")
    kept = {i: info["kept"] for i, info in infos.items()}
    assert all(len(k) == n_keep for k in kept.values())
    check_reduced_checkpoint(saved_models[arch], tmp_path / "out", kept, n_keep, ids(2, 12, vocab=90, seed=7))


@pytest.mark.parametrize("arch,method", E2E_FAST)
def test_plan_apply_save_reload_equals_masked_reference(saved_models, tmp_path, arch, method):
    _e2e_in_memory(saved_models, tmp_path, arch, method)


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", E2E_SLOW)
def test_plan_apply_save_reload_every_method_and_arch(saved_models, tmp_path, arch, method):
    _e2e_in_memory(saved_models, tmp_path, arch, method)




CLI_FAST = [("mixtral", m) for m in PRUNING_METHODS] + [(a, "reap") for a in ARCHS if a != "mixtral"]
CLI_SLOW = [(a, m) for a in ARCHS for m in PRUNING_METHODS if (a, m) not in CLI_FAST]


def _cli_end_to_end(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, method):
    n_keep = n_keep_for(arch)
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models[arch], "--method", method, "--experts", n_keep,
                        "--calib", text_file, "--n-samples", 4, "--seq-len", 16, "--out", out, "-q")
    assert code == 0, err
    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["experts"] == {"original": 8, "kept": n_keep}
    layers = manifest["layers"]
    assert set(map(int, layers)) == set(get_adapter(tiny_model(arch)).moe_blocks(tiny_model(arch)))
    for info in layers.values():
        assert len(info["kept"]) == n_keep and len(info["scores"]) == 8 and "super_experts" in info
        assert [s[0][0] for s in info["sources"]] == info["kept"]
        if method == "naee":
            assert info["search"] == "exhaustive" and info["candidates_evaluated"] == info["search_space"] > 0
    kept = {int(i): info["kept"] for i, info in layers.items()}
    check_reduced_checkpoint(saved_models[arch], out, kept, n_keep, ids(2, 12, vocab=90, seed=7))


@pytest.mark.parametrize("arch,method", CLI_FAST)
def test_compress_command(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, method):
    _cli_end_to_end(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, method)


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", CLI_SLOW)
def test_compress_command_every_method_and_arch(monkeypatch, capsys, saved_models, text_file, tmp_path, arch,
                                                method):
    _cli_end_to_end(monkeypatch, capsys, saved_models, text_file, tmp_path, arch, method)


def test_compress_command_ratio_and_no_protect_super(monkeypatch, capsys, saved_models, text_file, tmp_path):
    common = ("--calib", text_file, "--n-samples", 4, "--seq-len", 16, "-q")
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["deepseek_v3"], "--method", "ean",
                        "--ratio", 0.5, "--out", tmp_path / "a", *common)
    assert code == 0, err
    manifest = json.loads((tmp_path / "a" / "compression.json").read_text())
    assert manifest["experts"] == {"original": 8, "kept": 4} and manifest["recipe"]["ratio"] == 0.5
    assert manifest["method"]["params"]["protect_super"] is True
    code, _, err = run_cli(monkeypatch, capsys, "compress", saved_models["olmoe"], "--method", "reap", "--ratio", 0.25,
                        "--no-protect-super", "--out", tmp_path / "b", *common)
    assert code == 0, err
    manifest = json.loads((tmp_path / "b" / "compression.json").read_text())
    assert manifest["experts"] == {"original": 8, "kept": 6}
    assert manifest["method"]["params"]["protect_super"] is False
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b").config.num_experts == 6
