"""Tiny random-weight models of every supported architecture, built from configs (tests and benchmarks).

Routers get a larger init than the default so that routing is decisive and every expert is used; DeepSeek-V3
gets a random correction bias so that its choice-only bias matters in tests.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_compress.models.archs import ARCHS, BIAS_NAMES
from moe_compress.models.registry import get_adapter

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False)

# each family's own tiny-config keys live in its spec (`ArchSpec.tiny`); this view keeps the old name
TINY_CONFIGS: dict[str, dict] = {name: spec.tiny for name, spec in ARCHS.items()}


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` (common dimensions + ``ARCHS[model_type].tiny``), with ``overrides`` applied."""
    kw = {**_COMMON, **ARCHS[model_type].tiny, **overrides}
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, seed: int = 0, router_std: float = 0.5, **overrides):
    """A tiny fp32 model in eval mode with decisive routers (std ``router_std``) and random biases."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer in adapter.layers(model):
            layer.router_weight.normal_(0.0, router_std)
            if layer.router_bias is not None:
                layer.router_bias.normal_(0.0, 0.1)
            if layer.correction_bias is not None:
                layer.correction_bias.copy_(torch.randn(layer.n_experts) * 0.05)
        if adapter.spec.layout.biases:
            for block in adapter.moe_blocks(model).values():
                for name in BIAS_NAMES:
                    getattr(block.experts, name).normal_(0.0, 0.02)
    return model.eval()
