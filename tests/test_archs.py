"""The architecture table (models/archs.py): every spec is complete and agrees with the model transformers builds
from its tiny config, and every expert layout descriptor converts to and from the canonical layout exactly."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHS
from safetensors import safe_open
from transformers import AutoConfig

from moe_compress.export.shards import hub_tensors
from moe_compress.export.writer import save_model
from moe_compress.models.archs import ARCHS as SPECS
from moe_compress.models.archs import FUSED, GPT_OSS, ExpertLayout
from moe_compress.models.layer import ExpertWeights, expert_forward
from moe_compress.models.registry import get_adapter, resolve_count_field
from moe_compress.models.tiny import tiny_config, tiny_model

# keys a tiny config sets although transformers' config class does not define them: DeepSeek-V3's vLLM routing
# keys (without them vLLM routes with softmax and no correction bias; ../shared/docs/hf-moe-internals.md)
NOT_IN_CONFIG_CLASS = {"deepseek_v3": {"topk_method", "scoring_func"}}


def test_tests_cover_every_spec():
    assert sorted(ARCHS) == sorted(SPECS)
    assert all(name == spec.model_type for name, spec in SPECS.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_agrees_with_the_model(arch):
    spec = SPECS[arch]
    default = AutoConfig.for_model(arch)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}) or {})
    unknown = [k for k in spec.tiny if k not in known and k not in NOT_IN_CONFIG_CLASS.get(arch, ())]
    assert not unknown, f"tiny config keys that {arch}'s config does not have: {unknown}"
    cfg = tiny_config(arch)
    assert cfg.model_type == arch
    saved = cfg.to_dict()
    assert spec.count_field in saved  # the key written to config.json (what vLLM reads)
    assert spec.shared_width_key is None or spec.shared_width_key in saved
    model = tiny_model(arch)
    adapter = get_adapter(model)
    assert adapter.spec is spec
    n, width, hidden = adapter.n_experts(), adapter.expert_width(), model.config.hidden_size
    assert getattr(model.config, resolve_count_field(model.config, spec.count_field)) == n
    assert spec.rule(model.config).top_k <= n
    blocks = adapter.moe_blocks(model)
    assert blocks
    x = torch.randn(5, hidden)
    for i, block in blocks.items():
        assert block is getattr(adapter.decoder_layers(model)[i], spec.block_attr)
        assert all(hasattr(block, a) for a in spec.shared_attrs)
        assert adapter.router(block).weight.shape == (n, hidden)
        experts = block.experts
        # the layout names exactly the experts module's tensors, and reads them in the canonical shapes
        assert set(spec.layout.names()) == {name for name, _ in experts.named_parameters(recurse=False)}
        w = adapter.read_experts(block)
        assert (w.gate.shape, w.up.shape, w.down.shape) == ((n, width, hidden),) * 2 + ((n, hidden, width),)
        assert (w.gate_bias is not None) == spec.layout.biases
        for name, value in spec.layout.storage(w).items():
            assert torch.equal(value, getattr(experts, name)), name
        # the canonical view with the spec's activation computes what the model's own experts module computes
        act = adapter.activation(block)
        for e in (0, n - 1):
            ones = torch.ones(5, 1)
            with torch.no_grad():
                own = experts(x, torch.full((5, 1), e, dtype=torch.long), ones)
                torch.testing.assert_close(expert_forward(w, e, x, act), own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_hub_names_are_the_ones_save_pretrained_writes(arch, tmp_path):
    """`hub_tensors` (the streaming writer) gives exactly the tensors and names of `save_pretrained`, and
    `hub_name` names a written tensor for every in-memory entry."""
    model = tiny_model(arch)
    spec = get_adapter(model).spec
    save_model(model, tmp_path)
    written = {}
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            written.update({k: fh.get_tensor(k) for k in fh.keys()})
    ours = hub_tensors(spec, "", model.state_dict())
    assert sorted(ours) == sorted(written)
    for k, t in ours.items():
        assert torch.equal(t, written[k]), k
    for key in model.state_dict():
        assert spec.hub_name(key) in written, key
        if spec.hub_split(key, model.state_dict()[key]) is None:
            assert spec.disk.to_memory(spec.disk.to_disk(key)) == key


def _random_experts(n=3, inter=4, hidden=5, biases=True) -> ExpertWeights:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return ExpertWeights(r(n, inter, hidden), r(n, inter, hidden), r(n, hidden, inter),
                         *((r(n, inter), r(n, inter), r(n, hidden)) if biases else ()))


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
def test_every_layout_round_trips(flags):
    layout = ExpertLayout(*flags)
    w = _random_experts(biases=layout.biases)
    storage = layout.storage(w)
    assert sorted(storage) == sorted(layout.names())
    back = layout.read(SimpleNamespace(**storage))
    for a, b in zip((w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias),
                    (back.gate, back.up, back.down, back.gate_bias, back.up_bias, back.down_bias)):
        assert (a is None and b is None) or torch.equal(a, b)
    if layout.biases:
        with pytest.raises(ValueError, match="gate_bias, up_bias and down_bias"):
            layout.storage(_random_experts(biases=False))


def test_the_two_layouts_literally():
    w = _random_experts()
    fused = FUSED.storage(w)
    assert set(fused) == {"gate_up_proj", "down_proj"}
    assert torch.equal(fused["gate_up_proj"], torch.cat([w.gate, w.up], dim=1))  # [E, 2I, H]
    assert torch.equal(fused["down_proj"], w.down)
    oss = GPT_OSS.storage(w)
    gu = oss["gate_up_proj"]  # [E, H, 2I], gate at even columns, up at odd ones
    assert gu.shape == (3, 5, 8)
    for e, i in itertools.product(range(3), range(4)):
        assert torch.equal(gu[e, :, 2 * i], w.gate[e, i]) and torch.equal(gu[e, :, 2 * i + 1], w.up[e, i])
        assert oss["gate_up_proj_bias"][e, 2 * i] == w.gate_bias[e, i]
        assert oss["gate_up_proj_bias"][e, 2 * i + 1] == w.up_bias[e, i]
    assert torch.equal(oss["down_proj"], w.down.transpose(1, 2))
    assert torch.equal(oss["down_proj_bias"], w.down_bias)
