"""Tiny random-weight models of every supported architecture, built from configs (tests and benchmarks).

Routers get a larger init than the default so that routing is decisive and every expert is used; DeepSeek-V3
gets a random correction bias so that its choice-only bias matters in tests.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_compress.models.registry import get_adapter

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False,
                      shared_expert_intermediate_size=40),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5,
                        **_MLA),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=16, n_group=2, topk_group=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5, topk_method="noaux_tc", scoring_func="sigmoid", **_MLA),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention", "sliding_attention",
                                                                             "full_attention"], sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` (see TINY_CONFIGS), with ``overrides`` applied."""
    kw = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
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
        if adapter.spec.layout == "gpt_oss":
            for block in adapter.moe_blocks(model).values():
                for name in ("gate_up_proj_bias", "down_proj_bias"):
                    getattr(block.experts, name).normal_(0.0, 0.02)
    return model.eval()
