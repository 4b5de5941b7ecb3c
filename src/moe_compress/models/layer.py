"""A uniform view of one MoE block, and the expert set a method returns for it.

Whatever the storage (v5 fused ``gate_up_proj [E, 2I, H]``, GPT-OSS interleaved and transposed with biases),
experts are seen as ``gate [E, I, H]``, ``up [E, I, H]``, ``down [E, H, I]`` (+ optional biases ``gate_bias
[E, I]``, ``up_bias [E, I]``, ``down_bias [E, H]``), and an expert computes

    y = down @ act(gate @ x + b_g, up @ x + b_u) + b_d,

with ``act`` the family's gated activation (SwiGLU, or GPT-OSS's clamped variant). Shared experts are outside
this view: methods never touch them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from moe_compress.models.routing import RoutingRule, route

Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise."""
    return F.silu(gate) * up


def clamped_swiglu(alpha: float, limit: float) -> Activation:
    """GPT-OSS's activation: (clamp(up) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)."""

    def act(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)

    return act


@dataclass
class ExpertWeights:
    """The routed experts of one block in the canonical layout (tensors, not modules).

    gate, up: [E, I, H]; down: [E, H, I]; gate_bias, up_bias: [E, I] or None; down_bias: [E, H] or None.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def n_experts(self) -> int:
        return self.gate.shape[0]

    def select(self, idx: torch.Tensor | list[int]) -> "ExpertWeights":
        """The experts at ``idx`` (in that order), as new tensors."""
        index = torch.as_tensor(idx, dtype=torch.long, device=self.gate.device)
        return self.map(lambda t: t.index_select(0, index).clone())

    def to(self, **kw: Any) -> "ExpertWeights":
        """Every tensor through ``Tensor.to(**kw)`` (dtype, device)."""
        return self.map(lambda t: t.to(**kw))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ExpertWeights":
        """A new `ExpertWeights` of ``fn`` applied to each tensor (the absent biases stay None)."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return ExpertWeights(fn(self.gate), fn(self.up), fn(self.down),
                             opt(self.gate_bias), opt(self.up_bias), opt(self.down_bias))


@dataclass
class ExpertSet:
    """What a method returns for one layer: the new experts and their router.

    experts: the E' new experts; router_weight [E', H]; router_bias [E'] or None (gpt_oss);
    correction_bias [E'] or None (deepseek_v3); sources[j] = [(original expert, weight), ...] that new expert
    j comes from (pruning: [(e, 1.0)]).
    """

    experts: ExpertWeights
    router_weight: torch.Tensor
    router_bias: torch.Tensor | None = None
    correction_bias: torch.Tensor | None = None
    sources: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts


@dataclass
class MoELayer:
    """A view on one decoder layer's MoE block. Tensors are the live parameters (not copies) unless noted.

    router_weight [E, H]; router_bias [E] | None; correction_bias [E] | None (choice-only, deepseek_v3).
    """

    index: int
    block: torch.nn.Module
    rule: RoutingRule
    router_weight: torch.Tensor
    router_bias: torch.Tensor | None
    correction_bias: torch.Tensor | None
    experts: ExpertWeights
    activation: Activation
    router_fp32: bool = False  # deepseek computes logits from fp32-cast weights and inputs

    @property
    def n_experts(self) -> int:
        return self.router_weight.shape[0]

    def router_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[T, H] hidden states -> [T, E] fp32 logits, as the model computes them (bias included)."""
        if self.router_fp32:
            logits = F.linear(h.float(), self.router_weight.float())
        else:
            logits = F.linear(h, self.router_weight)
        if self.router_bias is not None:
            logits = logits + self.router_bias
        return logits.float()

    def route(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H] -> (indices [T, k], weights [T, k] fp32)."""
        return route(self.router_logits(h), self.rule, self.correction_bias, mask)

    def expert_forward(self, e: int, x: torch.Tensor, intermediate: bool = False) -> torch.Tensor:
        """Expert ``e`` on tokens x [T, H] -> [T, H] (or its intermediate activation [T, I] if asked)."""
        return expert_forward(self.experts, e, x, self.activation, intermediate)


def expert_forward(w: ExpertWeights, e: int, x: torch.Tensor, act: Activation,
                   intermediate: bool = False) -> torch.Tensor:
    """Expert ``e`` of ``w`` on x [T, H] -> y [T, H], or the activation a [T, I] with y = a @ down[e].T."""
    g = F.linear(x, w.gate[e], None if w.gate_bias is None else w.gate_bias[e])
    u = F.linear(x, w.up[e], None if w.up_bias is None else w.up_bias[e])
    a = act(g, u)
    if intermediate:
        return a
    return F.linear(a, w.down[e], None if w.down_bias is None else w.down_bias[e])
