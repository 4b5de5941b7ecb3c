"""Architectures as data: where each family keeps its MoE blocks, routers, experts and expert count.

One `ArchSpec` row per supported ``config.model_type``; `get_adapter` turns a model (or config) into an
`Adapter` that yields `MoELayer` views and knows the routing rule and the expert-count field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from moe_compress.errors import UserError
from moe_compress.models.layer import Activation, ExpertWeights, MoELayer, clamped_swiglu, swiglu
from moe_compress.models.loading import Config
from moe_compress.models.routing import RoutingRule

Layout = Literal["fused", "gpt_oss"]


def _softmax_topk(cfg: Config, renorm: bool | None = None) -> RoutingRule:
    return RoutingRule("softmax_topk", cfg.num_experts_per_tok,
                       renormalize=bool(cfg.norm_topk_prob) if renorm is None else renorm)


def _deepseek_v2(cfg: Config) -> RoutingRule:
    grouped = getattr(cfg, "topk_method", "greedy") == "group_limited_greedy"
    return RoutingRule("softmax_group", cfg.num_experts_per_tok, scaling=float(cfg.routed_scaling_factor),
                       n_group=int(cfg.n_group) if grouped else 1,
                       topk_group=int(cfg.topk_group) if grouped else 1)


def _deepseek_v3(cfg: Config) -> RoutingRule:
    return RoutingRule("sigmoid_group", cfg.num_experts_per_tok, renormalize=bool(cfg.norm_topk_prob),
                       scaling=float(cfg.routed_scaling_factor), n_group=int(cfg.n_group or 1),
                       topk_group=int(cfg.topk_group or 1))


@dataclass(frozen=True)
class ArchSpec:
    """Where one family keeps things. ``count_field`` is the config key saved in config.json."""

    model_type: str
    count_field: str
    rule: Callable[[Config], RoutingRule]
    router_attr: str = "gate"
    layout: Layout = "fused"
    shared_attrs: tuple[str, ...] = ()
    router_fp32: bool = False
    width_field: str = "intermediate_size"  # config key of the routed experts' intermediate size (not dense MLPs')


ARCHS: dict[str, ArchSpec] = {s.model_type: s for s in [
    ArchSpec("mixtral", "num_local_experts", lambda c: _softmax_topk(c, renorm=True)),
    ArchSpec("qwen2_moe", "num_experts", _softmax_topk, shared_attrs=("shared_expert", "shared_expert_gate"),
             width_field="moe_intermediate_size"),
    ArchSpec("qwen3_moe", "num_local_experts", _softmax_topk, width_field="moe_intermediate_size"),
    ArchSpec("olmoe", "num_experts", _softmax_topk),
    ArchSpec("deepseek_v2", "n_routed_experts", _deepseek_v2, shared_attrs=("shared_experts",), router_fp32=True,
             width_field="moe_intermediate_size"),
    ArchSpec("deepseek_v3", "n_routed_experts", _deepseek_v3, shared_attrs=("shared_experts",), router_fp32=True,
             width_field="moe_intermediate_size"),
    ArchSpec("phimoe", "num_local_experts",
             lambda c: RoutingRule("sparsemixer", 2, jitter_eps=float(c.router_jitter_noise)), router_attr="router"),
    ArchSpec("gpt_oss", "num_local_experts", lambda c: RoutingRule("topk_softmax", c.num_experts_per_tok),
             router_attr="router", layout="gpt_oss"),
]}

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
        """Why the routed experts' width cannot change on its own here, or None. DeepSeek-V2/V3 size their shared
        experts as ``moe_intermediate_size x n_shared_experts``: a new width would resize them on reload."""
        if self.spec.width_field == "moe_intermediate_size" and self.spec.model_type.startswith("deepseek") \
                and int(getattr(self.config, "n_shared_experts", 0) or 0) > 0:
            return ("DeepSeek's shared experts are sized moe_intermediate_size x n_shared_experts in the config, so "
                    "a new routed-expert width would change them too")
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
            block = getattr(layer, "mlp", None)
            if block is not None and hasattr(block, "experts") and hasattr(block.experts, "down_proj"):
                out[i] = block
        return out

    def router(self, block: torch.nn.Module) -> Any:
        """The block's router module (its ``weight`` and, by family, ``bias``/``e_score_correction_bias``)."""
        return getattr(block, self.spec.router_attr)

    def activation(self, block: torch.nn.Module) -> Activation:
        if self.spec.layout == "gpt_oss":
            ex: Any = block.experts
            return clamped_swiglu(float(ex.alpha), float(ex.limit))
        return swiglu

    def read_experts(self, block: torch.nn.Module) -> ExpertWeights:
        """Views of the block's expert tensors in the canonical [E,I,H]/[E,H,I] layout."""
        ex: Any = block.experts
        if self.spec.layout == "fused":
            inter = ex.down_proj.shape[-1]
            return ExpertWeights(ex.gate_up_proj[:, :inter], ex.gate_up_proj[:, inter:], ex.down_proj)
        gu, gub = ex.gate_up_proj, ex.gate_up_proj_bias  # [E, H, 2I] interleaved, [E, 2I]
        return ExpertWeights(gu[..., 0::2].transpose(1, 2), gu[..., 1::2].transpose(1, 2),
                             ex.down_proj.transpose(1, 2), gub[:, 0::2], gub[:, 1::2], ex.down_proj_bias)

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
