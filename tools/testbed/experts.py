"""A grouped_mm experts implementation that follows autocast, registered in transformers' experts interface.

transformers' ``grouped_mm`` experts forward casts the tokens to the weights' dtype because grouped_mm is not
autocast-aware. Training keeps fp32 master weights under bf16 autocast, which would run the expert matmuls in
fp32. This implementation casts the fused expert weights (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])
to the autocast dtype first (differentiably, so fp32 master weights still get the gradients) and then runs the
stock grouped_mm forward. Without autocast it is the stock forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

EXPERTS_IMPLEMENTATION = "grouped_mm_autocast"


class _CastExperts:
    """Read-only view of an experts module whose fused weights are cast to ``dtype``."""

    def __init__(self, experts: nn.Module, dtype: torch.dtype):
        self._experts = experts
        self.gate_up_proj = experts.gate_up_proj.to(dtype)
        self.down_proj = experts.down_proj.to(dtype)

    def __getattr__(self, name: str):
        return getattr(self._experts, name)


def grouped_mm_autocast_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward: hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H] (hidden's dtype)."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        out = grouped_mm_experts_forward(_CastExperts(experts, dtype), hidden_states.to(dtype), top_k_index,
                                         top_k_weights.to(dtype))
        return out.to(hidden_states.dtype)
    return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, grouped_mm_autocast_experts_forward)
