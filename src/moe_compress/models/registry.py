"""The adapter over the architecture table: `get_adapter` turns a model (or config) into an `Adapter` that yields
`MoELayer` views and knows the routing rule and the expert-count field, all read from the family's `ArchSpec`
(models/archs.py, re-exported here as `ARCHS` / `ArchSpec`).
"""

from __future__ import annotations

from typing import Any

import torch

from moe_compress.errors import UserError
from moe_compress.models.archs import ARCHS, ArchSpec
from moe_compress.models.layer import Activation, ExpertWeights, MoELayer
from moe_compress.models.loading import Config
from moe_compress.models.routing import RoutingRule

__all__ = ["ARCHS", "SUPPORTED", "Adapter", "ArchSpec", "get_adapter", "resolve_count_field"]

SUPPORTED = ", ".join(sorted(ARCHS))


def resolve_count_field(config: Config, name: str) -> str:
    """Follow ``config.attribute_map`` aliases to the attribute that really stores the value."""
    amap = getattr(config, "attribute_map", {}) or {}
    seen = set()
    while name in amap and name not in seen:
        seen.add(name)
        name = amap[name]
    return name


class Adapter:
    """Uniform access to the MoE blocks of one model family."""

    def __init__(self, spec: ArchSpec, config: Config):
        self.spec = spec
        self.config = config

    # -- config -------------------------------------------------------------------------------------------
    @property
    def count_field(self) -> str:
        return self.spec.count_field

    def n_experts(self) -> int:
        return int(getattr(self.config, resolve_count_field(self.config, self.spec.count_field)))

    def set_n_experts(self, n: int) -> None:
        setattr(self.config, resolve_count_field(self.config, self.spec.count_field), int(n))

    def expert_width(self) -> int:
        """The routed experts' intermediate size I (config field ``spec.width_field``)."""
        return int(getattr(self.config, resolve_count_field(self.config, self.spec.width_field)))

    def set_expert_width(self, width: int) -> None:
        """Record a new routed-expert intermediate size in the config. Only the routed experts' field changes:
        dense MLPs (DeepSeek's first layers, Qwen's ``mlp_only_layers``) and shared experts keep their own sizes
        (``intermediate_size``, ``shared_expert_intermediate_size``); Mixtral, OLMoE, PhiMoE and GPT-OSS have
        no dense MLP, so their ``intermediate_size`` is the experts' only."""
        setattr(self.config, resolve_count_field(self.config, self.spec.width_field), int(width))

    def width_problem(self) -> str | None:
        """Why the routed experts' width cannot change on its own here, or None. A family with ``shared_width_key``
        (DeepSeek-V2/V3: ``n_shared_experts``) sizes its shared experts as ``width_field x config[key]``: a new
        width would resize them on reload."""
        key = self.spec.shared_width_key
        if key is not None and int(getattr(self.config, key, 0) or 0) > 0:
            return (f"{self.spec.family}'s shared experts are sized {self.spec.width_field} x {key} in the config, "
                    "so a new routed-expert width would change them too")
        return None

    def rule(self) -> RoutingRule:
        return self.spec.rule(self.config)

    # -- modules ------------------------------------------------------------------------------------------
    @staticmethod
    def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
        base: Any = getattr(model, "model", model)
        return base.layers

    def moe_blocks(self, model: torch.nn.Module) -> dict[int, torch.nn.Module]:
        """{decoder layer index: MoE block} for the layers that hold routed experts."""
        out: dict[int, torch.nn.Module] = {}
        for i, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.spec.block_attr, None)
            if block is not None and hasattr(block, "experts") and hasattr(block.experts, "down_proj"):
                out[i] = block
        return out

    def router(self, block: torch.nn.Module) -> Any:
        """The block's router module (its ``weight`` and, by family, ``bias``/``e_score_correction_bias``)."""
        return getattr(block, self.spec.router_attr)

    def activation(self, block: torch.nn.Module) -> Activation:
        return self.spec.activation(block.experts)

    def read_experts(self, block: torch.nn.Module) -> ExpertWeights:
        """Views of the block's expert tensors in the canonical [E,I,H]/[E,H,I] layout (``spec.layout``)."""
        return self.spec.layout.read(block.experts)

    def layer(self, model: torch.nn.Module, index: int, block: torch.nn.Module | None = None) -> MoELayer:
        block = block if block is not None else self.moe_blocks(model)[index]
        router = self.router(block)
        return MoELayer(
            index=index,
            block=block,
            rule=self.rule(),
            router_weight=router.weight,
            router_bias=getattr(router, "bias", None),
            correction_bias=getattr(router, "e_score_correction_bias", None),
            experts=self.read_experts(block),
            activation=self.activation(block),
            router_fp32=self.spec.router_fp32,
        )

    def layers(self, model: torch.nn.Module) -> list[MoELayer]:
        return [self.layer(model, i, b) for i, b in self.moe_blocks(model).items()]


def get_adapter(model_or_config: torch.nn.Module | Config) -> Adapter:
    """The adapter for a model or config; a clear `UserError` for dense or unsupported models."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = ARCHS.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise UserError(f"model type {model_type!r} is not a supported MoE architecture "
                        f"(supported: {SUPPORTED})")
    adapter = Adapter(spec, config)
    if hasattr(model_or_config, "config") and not adapter.moe_blocks(model_or_config):
        raise UserError(f"this {model_type} model has no MoE layers with routed experts; nothing to compress")
    return adapter
