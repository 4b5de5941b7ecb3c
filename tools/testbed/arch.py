"""Model configurations of the testbed MoE models, and the balance recipe each architecture trains with.

Every preset is a small but complete instance of its Hugging Face architecture (``AutoConfig.for_model``), so
a trained testbed is a standard checkpoint that transformers (and vLLM) load like the real model:

- ``mixtral``: 8 experts, top-2, softmax router, untied embeddings (the ``mixtral-8e`` testbed, ~14.4M params).
- ``deepseek_v3``: 32 fine-grained routed experts, top-4 chosen within the 2 best of 4 groups, 1 shared expert,
  sigmoid scores with ``e_score_correction_bias`` (``topk_method="noaux_tc"``), first layer dense, MLA attention
  with ``kv_lora_rank`` 512 + ``qk_rope_head_dim`` 64 = 576, the one size vLLM's MLA kernels serve (as
  DeepSeek-V2/V3 themselves; bench/vllm_parity.py checks it). The shipped ``deepseek-fine`` testbed was trained
  before with ``--set kv_lora_rank=64 --set qk_rope_head_dim=16`` (80: transformers runs it, vLLM refuses it).
- ``qwen2_moe``: 16 experts, top-4, plus a gated shared expert.
- ``olmoe``: 16 experts, top-4, softmax without renormalisation.

Sparse-upcycled presets (``UPCYCLED``, trained by ``tools.testbed.upcycle`` in two phases: a dense model
first, then the MoE built from it):

- ``mixtral-upcycled``: the ``mixtral`` preset (the ``mixtral-8e`` shape), every expert a copy of the dense
  model's MLP (intermediate 384).
- ``qwen-fine-upcycled``: ``qwen2_moe`` with 16 experts of intermediate 128 (top-4) and one shared expert of
  intermediate 512, from a dense model with an MLP of intermediate 512: the shared expert is a copy of that MLP,
  and the routed experts are 4 copies of it, each cut into 4 segments of 128 neurons (see ``upcycle``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

ARCHS = ("mixtral", "deepseek_v3", "qwen2_moe", "olmoe")

_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# ``router_aux_loss_coef`` is only informative here (training computes its own loss, see BALANCE): it is the
# final balance coefficient in transformers' convention, whose loss equals top_k (not 1) when balanced.

PRESETS: dict[str, dict] = {
    "mixtral": dict(
        hidden_size=192, intermediate_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
        head_dim=32, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
    ),
    "deepseek_v3": dict(
        hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=32,
        qk_rope_head_dim=64, v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=0, tie_word_embeddings=False,
    ),
    "qwen2_moe": dict(
        hidden_size=192, moe_intermediate_size=192, shared_expert_intermediate_size=384, intermediate_size=768,
        num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=False, decoder_sparse_step=1, tie_word_embeddings=False, router_aux_loss_coef=0.005,
    ),
    "olmoe": dict(
        hidden_size=192, intermediate_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, tie_word_embeddings=False,
        router_aux_loss_coef=0.005,
    ),
}


@dataclass(frozen=True)
class BalanceSettings:
    """How routing is kept balanced during training (see ``tools.testbed.balance``).

    Attributes:
        lb_start: coefficient of the load-balancing loss at step 0 (normalised so a balanced layer scores 1).
        lb_end: coefficient after ``lb_decay_frac`` of the run (linear decay in between, constant after).
        lb_decay_frac: fraction of the steps over which the coefficient decays.
        per_sequence: compute the balance loss per sequence (DeepSeek-V3's sequence-wise loss) instead of
            over the whole batch (Switch Transformer).
        z_loss: coefficient of the router z-loss, mean(logsumexp(logits)^2) (softmax routers only).
        bias_update_rate: step u of the aux-loss-free update of ``e_score_correction_bias``,
            bias += u * sign(mean_load - load) after every optimizer step; 0 disables it.
        router_init_std: std of the normal init of router weights (small = near-uniform routing at the start).
    """

    lb_start: float
    lb_end: float
    lb_decay_frac: float = 0.5
    per_sequence: bool = False
    z_loss: float = 0.0
    bias_update_rate: float = 0.0
    router_init_std: float = 0.02


BALANCE: dict[str, BalanceSettings] = {
    "mixtral": BalanceSettings(lb_start=0.1, lb_end=0.02, z_loss=1e-3, router_init_std=1e-3),
    "deepseek_v3": BalanceSettings(lb_start=1e-3, lb_end=1e-3, per_sequence=True, bias_update_rate=1e-3,
                                   router_init_std=1e-3),
    "qwen2_moe": BalanceSettings(lb_start=0.1, lb_end=0.02, z_loss=1e-3, router_init_std=1e-3),
    "olmoe": BalanceSettings(lb_start=0.1, lb_end=0.02, z_loss=1e-3, router_init_std=1e-3),
}


@dataclass(frozen=True)
class UpcycleRecipe:
    """A sparse-upcycled testbed: which MoE is built from which dense model, and how (``testbed.upcycle``).

    Attributes:
        arch: model_type of the MoE (the dense counterpart follows from it, see ``upcycle.dense_config``).
        config: the MoE's preset config (replaces ``PRESETS[arch]``; ``--set`` overrides still apply on top).
        scheme: ``"copy"`` (every routed expert is the dense MLP; needs renormalised top-k routing: mixtral) or
            ``"segments"`` (fine-grained: shared expert = the dense MLP, routed experts = segments of copies of
            it, one virtual group of segments per copy; qwen2_moe).
        dense_share: share of the training budget (minutes, or steps) spent on the dense phase.
        noise: std of the Gaussian noise added to every routed expert matrix, relative to that matrix's std.
        reinit: fraction of every routed expert's intermediate neurons re-drawn from N(mean, std) of the matrix
            they sit in (Drop-Upcycling's partial re-initialisation).
        shuffle: ``"segments"`` only: permute the dense MLP's neurons independently for every copy before
            cutting it into segments (Qwen2's upcycling), instead of cutting every copy the same way.
    """

    arch: str
    config: dict
    scheme: str
    dense_share: float = 0.5
    noise: float = 0.0
    reinit: float = 0.0
    shuffle: bool = False


UPCYCLED: dict[str, UpcycleRecipe] = {
    "mixtral-upcycled": UpcycleRecipe(arch="mixtral", config=dict(PRESETS["mixtral"]), scheme="copy"),
    "qwen-fine-upcycled": UpcycleRecipe(
        arch="qwen2_moe", scheme="segments", shuffle=True,
        config=dict(
            hidden_size=192, moe_intermediate_size=128, shared_expert_intermediate_size=512, intermediate_size=512,
            num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, num_experts=16,
            num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, tie_word_embeddings=False,
            router_aux_loss_coef=0.005,
        ),
    ),
}


def build_config(
    arch: str,
    vocab_size: int,
    eos_token_id: int,
    pad_token_id: int,
    max_position_embeddings: int,
    overrides: dict | None = None,
    base: dict | None = None,
) -> PretrainedConfig:
    """The preset config of ``arch`` (or ``base`` instead of it) for a tokenizer of ``vocab_size`` tokens, with
    ``overrides`` applied last.

    The end-of-text token doubles as BOS (GPT-2 style); nothing is prepended automatically.
    """
    if arch not in PRESETS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    kwargs = dict(
        PRESETS[arch] if base is None else base, vocab_size=vocab_size, bos_token_id=eos_token_id,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(_ROPE), initializer_range=0.02,
    )
    kwargs.update(overrides or {})
    return AutoConfig.for_model(arch, **kwargs)


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks of ``model`` in layer order: every module holding a router ``gate`` and ``experts``."""
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)
            and isinstance(getattr(m, "gate", None), nn.Module)]


def init_routers(model: nn.Module, std: float, generator: torch.Generator) -> None:
    """Re-draw every router weight [E, H] from N(0, std^2) (near-uniform routing at the start when std is small)."""
    with torch.no_grad():
        for block in moe_blocks(model):
            weight = block.gate.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, embedding, lm_head, routed experts, and active per token.

    ``active`` counts every parameter except the routed experts, plus the fraction top_k / E of those.
    """
    config = model.config
    n_experts = config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts
    counts = {"total": 0, "embedding": 0, "lm_head": 0, "routed_experts": 0}
    for name, param in model.named_parameters():
        counts["total"] += param.numel()
        if name.endswith("embed_tokens.weight"):
            counts["embedding"] += param.numel()
        elif name.startswith("lm_head."):
            counts["lm_head"] += param.numel()
        elif ".experts." in name:
            counts["routed_experts"] += param.numel()
    counts["active"] = round(counts["total"] - counts["routed_experts"]
                             + counts["routed_experts"] * config.num_experts_per_tok / n_experts)
    return counts
