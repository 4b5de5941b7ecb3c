"""Foundation: routing functions, exact pruning surgery, export, for every supported architecture."""

from __future__ import annotations

import json
from functools import partial

import helpers
import pytest
import torch
from conftest import ARCHS
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from moe_compress.errors import UserError
from moe_compress.export.writer import save_model
from moe_compress.models.layer import ExpertSet
from moe_compress.models.registry import get_adapter, resolve_count_field
from moe_compress.models.routing import route
from moe_compress.models.surgery import check_expert_count, keep_experts, keep_sets, replace_experts
from moe_compress.models.tiny import tiny_config, tiny_model

ids = partial(helpers.ids, 3, 24)


def prune_keep(adapter, model, drop=(2, 5)):
    """Keep all experts but ``drop`` in every MoE layer (DeepSeek-V3: one per group)."""
    return {layer.index: [e for e in range(layer.n_experts) if e not in drop] for layer in adapter.layers(model)}


class masked_routing:
    """Context manager: the model's routers choose only among allowed experts (the pruning reference).

    Router outputs are replaced by `route(..., mask=allowed)`; everything else runs the model's own code.
    """

    def __init__(self, model, allowed: dict[int, list[int]]):
        self.adapter = get_adapter(model)
        self.model, self.allowed, self.hooks = model, allowed, []

    def __enter__(self):
        for layer in self.adapter.layers(self.model):
            mask = torch.zeros(layer.n_experts, dtype=torch.bool)
            mask[self.allowed[layer.index]] = True

            def hook(mod, args, out, layer=layer, mask=mask):
                h = args[0].reshape(-1, layer.router_weight.shape[1])
                idx, w = layer.route(h, mask=mask)
                return (out[0], w.to(out[1].dtype), idx)

            self.hooks.append(self.adapter.router(layer.block).register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_function_matches_model_router(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    h = torch.randn(64, model.config.hidden_size)
    for layer in adapter.layers(model):
        logits_ref, w_ref, idx_ref = adapter.router(layer.block)(h)
        idx, w = route(logits_ref, layer.rule, layer.correction_bias)
        torch.testing.assert_close(layer.router_logits(h), logits_ref.float(), rtol=0, atol=1e-6)
        # same chosen set and the same weight per chosen expert (order inside the top-k may differ)
        dense = lambda i, ww: torch.zeros(64, layer.n_experts).scatter(1, i, ww.float())  # noqa: E731
        torch.testing.assert_close(dense(idx, w), dense(idx_ref, w_ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_experts_used_in_tiny_models(arch):
    model = tiny_model(arch)
    h = torch.randn(512, model.config.hidden_size)
    for layer in get_adapter(model).layers(model):
        idx, _ = layer.route(h)
        assert torch.bincount(idx.flatten(), minlength=layer.n_experts).min() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_equals_router_masking_and_survives_save_load(arch, tmp_path):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    n = adapter.n_experts()
    keep = prune_keep(adapter, model, drop=(1, 6) if arch == "deepseek_v3" else (2, 5))
    x = ids()
    with torch.no_grad(), masked_routing(model, keep):
        reference = model(x).logits
    with torch.no_grad():
        unmasked = model(x).logits
    assert (reference - unmasked).abs().max() > 1e-3  # the dropped experts mattered
    keep_experts(adapter, model, keep)
    with torch.no_grad():
        pruned = model(x).logits
    assert (pruned - reference).abs().max().item() <= 1e-5
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg[adapter.count_field] == n - 2
    keys = []
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys += list(fh.keys())
    if arch == "gpt_oss":  # its hub format is the fused one
        assert any("experts.gate_up_proj" in k for k in keys)
    else:
        assert not any("gate_up_proj" in k for k in keys)
        assert any(".experts.0." in k for k in keys) and not any(f".experts.{n - 2}." in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert get_adapter(reloaded).n_experts() == n - 2
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, pruned)


@pytest.mark.parametrize("arch", ARCHS)
def test_replacing_every_expert_by_itself_is_bit_exact(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    sets = keep_sets(adapter, model, {l.index: list(range(l.n_experts)) for l in adapter.layers(model)})
    replace_experts(adapter, model, sets)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_refit_of_fused_format_checkpoint_saves_hub_names(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    keys = lambda d: [k for f in d.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]  # noqa: E731
    assert any("gate_up_proj" in k for k in keys(tmp_path / "fused"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    adapter = get_adapter(loaded)
    keep_experts(adapter, loaded, prune_keep(adapter, loaded))
    save_model(loaded, tmp_path / "out")
    assert not any("gate_up_proj" in k for k in keys(tmp_path / "out"))


def test_deepseek_v3_group_rules():
    model = tiny_model("deepseek_v3")  # 8 experts, n_group=2, topk_group=1, top-2
    adapter = get_adapter(model)
    with pytest.raises(UserError, match="n_group=2"):
        check_expert_count(adapter, 5)
    with pytest.raises(UserError, match="valid counts below 8: 4, 6"):
        check_expert_count(adapter, 3)
    with pytest.raises(UserError, match="same number of kept experts in each"):
        keep_experts(adapter, model, {l.index: [0, 1, 2, 3, 4, 5]
                                      for l in adapter.layers(model)})


def test_deepseek_v3_correction_bias_must_be_masked():
    """Masking the logits alone is not the pruning reference for sigmoid routing with a correction bias."""
    model = tiny_model("deepseek_v3")
    adapter = get_adapter(model)
    keep = prune_keep(adapter, model, drop=(1, 6))
    x = ids()
    with torch.no_grad(), masked_routing(model, keep):
        reference = model(x).logits
    keep_experts(adapter, model, keep)
    with torch.no_grad():
        assert (model(x).logits - reference).abs().max() <= 1e-5
    layer = adapter.layers(model)[0]
    assert layer.correction_bias.shape == (6,)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v2"])
def test_count_field_aliases_resolve(arch):
    cfg = tiny_config(arch)
    adapter = get_adapter(cfg)
    adapter.set_n_experts(5)
    assert getattr(cfg, resolve_count_field(cfg, adapter.count_field)) == 5
    assert cfg.to_dict()[adapter.count_field] == 5


def test_unsupported_and_dense_models_are_refused():
    dense = AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UserError, match="not a supported MoE architecture.*mixtral"):
        get_adapter(dense)
    qwen_dense = AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", mlp_only_layers=[0, 1, 2]))
    with pytest.raises(UserError, match="no MoE layers"):
        get_adapter(qwen_dense)


def test_every_layer_must_keep_the_same_count():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    sets = keep_sets(adapter, model, {l.index: list(range(6 if l.index else 5)) for l in adapter.layers(model)})
    with pytest.raises(UserError, match="same number of experts"):
        replace_experts(adapter, model, sets)


def test_gpt_oss_requires_router_bias_in_expert_set():
    model = tiny_model("gpt_oss")
    adapter = get_adapter(model)
    sets = keep_sets(adapter, model, prune_keep(adapter, model))
    sets = {i: ExpertSet(s.experts, s.router_weight, None, None, s.sources) for i, s in sets.items()}
    with pytest.raises(ValueError, match="router_bias"):
        replace_experts(adapter, model, sets)
