"""Every supported MoE family, as data: one `ArchSpec` per ``config.model_type`` in the table `ARCHS`.

A spec says everything the rest of the code needs to know about a family, so that adding one is adding a row:

- where things live: the MoE block (``layer.<block_attr>``; its routed experts are always ``block.experts``, the
  transformers 5 experts module), the router (``block.<router_attr>``), the shared experts (``shared_attrs``);
- the config keys: the expert count (``count_field``, as saved in config.json) and the routed experts' width
  (``width_field``); ``shared_width_key`` when the shared experts are sized ``width_field x config[key]``;
- the routing rule (``rule(config) -> RoutingRule``) and whether the router runs in fp32;
- how the experts module stores the canonical ``gate [E,I,H]``, ``up [E,I,H]``, ``down [E,H,I]`` (+ biases):
  an `ExpertLayout` (fused gate_up: concatenated or interleaved, which half first, transposed, biases), and the
  expert activation;
- the hub (on-disk) tensor names: `DiskNames` (renames between disk and memory, per-expert leaf names, or the
  fused tensors as is);
- a tiny config for tests and benchmarks (``tiny``, on top of `moe_compress.models.tiny`'s common dimensions).

`Adapter` (models/registry.py) turns a spec and a config into `MoELayer` views; surgery, lazy loading and the
shard writer read and write expert tensors only through ``spec.layout`` and name them only through
``spec.disk`` / `ArchSpec.hub_split`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from moe_compress.models.layer import Activation, ExpertWeights, clamped_swiglu, swiglu
from moe_compress.models.loading import Config
from moe_compress.models.routing import RoutingRule

GATE, UP, DOWN = 0, 1, 2  # the projections, as indices into `DiskNames.expert_leaves`
WEIGHT_NAMES = ("gate_up_proj", "down_proj")  # the experts module's storage tensors (transformers 5 names)
BIAS_NAMES = ("gate_up_proj_bias", "down_proj_bias")  # ... and its biases, for a layout with ``biases``
# what each storage tensor holds: (projection, "weight" | "bias"), in order
PARTS: dict[str, tuple[tuple[int, str], ...]] = {
    "gate_up_proj": ((GATE, "weight"), (UP, "weight")), "down_proj": ((DOWN, "weight"),),
    "gate_up_proj_bias": ((GATE, "bias"), (UP, "bias")), "down_proj_bias": ((DOWN, "bias"),)}


@dataclass(frozen=True)
class ExpertLayout:
    """How an experts module stores its E experts, as data; `read` / `storage` convert to and from the canonical
    ``gate [E,I,H]``, ``up [E,I,H]``, ``down [E,H,I]`` (+ ``gate_bias``/``up_bias [E,I]``, ``down_bias [E,H]``).

    ``gate_up_proj`` holds gate and up on one 2I axis: ``[E, 2I, H]`` (``transposed=False``: weights act as
    ``W @ x``, like nn.Linear) or ``[E, H, 2I]`` (``transposed=True``: ``x @ W``), with ``down_proj`` ``[E, H, I]``
    or ``[E, I, H]`` likewise. On the 2I axis the two halves are concatenated (``interleaved=False``: rows
    ``0:I`` and ``I:2I``) or alternate (``interleaved=True``: ``0::2`` and ``1::2``); ``gate_first`` says which
    half is the gate. ``biases``: ``gate_up_proj_bias [E, 2I]`` (the weight's 2I order) and ``down_proj_bias
    [E, H]`` exist.
    """

    transposed: bool = False
    interleaved: bool = False
    gate_first: bool = True
    biases: bool = False

    def names(self) -> tuple[str, ...]:
        """The experts module's storage tensors under this layout."""
        return WEIGHT_NAMES + (BIAS_NAMES if self.biases else ())

    def _axis(self, leaf: str, ndim: int) -> int:
        """The 2I axis of storage tensor ``leaf``."""
        return ndim - 1 if self.transposed or leaf == "gate_up_proj_bias" else 1

    def _halves(self, t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = t.shape[axis] // 2
        if self.interleaved:
            index: list[Any] = [slice(None)] * t.dim()
            first, second = (t[tuple(index[:axis] + [slice(k, None, 2)])] for k in (0, 1))
        else:
            first, second = t.narrow(axis, 0, n), t.narrow(axis, n, n)
        return (first, second) if self.gate_first else (second, first)

    def _join(self, gate: torch.Tensor, up: torch.Tensor, axis: int) -> torch.Tensor:
        first, second = (gate, up) if self.gate_first else (up, gate)
        if self.interleaved:
            return torch.stack([first, second], dim=axis + 1).flatten(axis, axis + 1)
        return torch.cat([first, second], dim=axis)

    def _canonical(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(1, 2) if self.transposed else w

    def parts(self, leaf: str, t: torch.Tensor) -> list[tuple[int, str, torch.Tensor]] | None:
        """The canonical tensors that storage tensor ``leaf`` (``t``) holds, as views of ``t``: a list of
        (projection GATE/UP/DOWN, ``"weight"`` or ``"bias"``, [E, ...] view) in `PARTS` order; None if ``leaf``
        is not one of this layout's storage tensors."""
        if leaf not in self.names():
            return None
        kind = PARTS[leaf][0][1]
        if leaf.startswith("down_proj"):
            views = [t if kind == "bias" else self._canonical(t)]
        else:
            views = list(self._halves(t, self._axis(leaf, t.dim())))
            if kind == "weight":
                views = [self._canonical(v) for v in views]
        return [(proj, kind, v) for (proj, kind), v in zip(PARTS[leaf], views)]

    def read(self, experts: Any) -> ExpertWeights:
        """Views of ``experts``' (the experts module's) tensors in the canonical layout."""
        got: dict[tuple[int, str], torch.Tensor] = {}
        for leaf in self.names():
            for proj, kind, view in self.parts(leaf, getattr(experts, leaf)) or []:
                got[proj, kind] = view
        return ExpertWeights(got[GATE, "weight"], got[UP, "weight"], got[DOWN, "weight"],
                             got.get((GATE, "bias")), got.get((UP, "bias")), got.get((DOWN, "bias")))

    def storage(self, w: ExpertWeights) -> dict[str, torch.Tensor]:
        """{storage tensor name: value} holding the canonical experts ``w`` (the inverse of `read`). A layout with
        biases needs all three of ``w``'s biases (ValueError otherwise); one without ignores them."""
        store = lambda t: t.transpose(1, 2) if self.transposed else t  # noqa: E731
        out = {"gate_up_proj": self._join(store(w.gate), store(w.up), self._axis("gate_up_proj", w.gate.dim())),
               "down_proj": store(w.down)}
        if self.biases:
            if w.gate_bias is None or w.up_bias is None or w.down_bias is None:
                raise ValueError("the expert set must give gate_bias, up_bias and down_bias")
            out["gate_up_proj_bias"] = self._join(w.gate_bias, w.up_bias, self._axis("gate_up_proj_bias", 2))
            out["down_proj_bias"] = w.down_bias
        return out


FUSED = ExpertLayout()  # transformers 5's default: gate_up_proj [E, 2I, H] = [gate; up], down_proj [E, H, I]
GPT_OSS = ExpertLayout(transposed=True, interleaved=True, biases=True)  # [E, H, 2I] gate 0::2 / up 1::2, [E, I, H]


@dataclass(frozen=True)
class DiskNames:
    """How a family's hub (on-disk) tensor names differ from the in-memory (transformers 5) ones.

    renames: (disk substring, memory substring) pairs, applied in order from disk to memory (in reverse the other
    way). per_expert: the hub checkpoint holds one tensor per expert and projection,
    ``...experts.{e}.{leaf}.weight`` (``.bias``) with ``leaf`` from expert_leaves (gate, up, down), each the
    canonical [I, H] / [H, I] slice of expert e; False: the experts module's storage tensors under their
    in-memory names.
    """

    renames: tuple[tuple[str, str], ...] = ()
    expert_leaves: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    per_expert: bool = True

    def to_memory(self, name: str) -> str:
        for old, new in self.renames:
            name = name.replace(old, new)
        return name

    def to_disk(self, name: str) -> str:
        for old, new in reversed(self.renames):
            name = name.replace(new, old)
        return name


def _swiglu(experts: Any) -> Activation:
    return swiglu


def _clamped_swiglu(experts: Any) -> Activation:
    return clamped_swiglu(float(experts.alpha), float(experts.limit))


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
    """One family (see the module docstring). ``family``: its name in messages; ``tiny``: config keys of its tiny
    test model, on top of `moe_compress.models.tiny`'s common dimensions; ``activation(experts module)``: the
    experts' gated activation."""

    model_type: str
    family: str
    count_field: str
    rule: Callable[[Config], RoutingRule]
    tiny: dict[str, Any]
    block_attr: str = "mlp"
    router_attr: str = "gate"
    layout: ExpertLayout = FUSED
    activation: Callable[[Any], Activation] = _swiglu
    disk: DiskNames = field(default_factory=DiskNames)
    shared_attrs: tuple[str, ...] = ()
    shared_width_key: str | None = None
    router_fp32: bool = False
    width_field: str = "intermediate_size"  # config key of the routed experts' intermediate size (not dense MLPs')

    def _per_expert(self, mem_key: str) -> tuple[str, str] | None:
        """(``...experts`` prefix, storage leaf) if ``mem_key`` is written as one hub tensor per expert."""
        base, _, leaf = mem_key.rpartition(".")
        if self.disk.per_expert and base.endswith(".experts") and leaf in self.layout.names():
            return base, leaf
        return None

    def _expert_hub_key(self, base: str, e: int, proj: int, kind: str) -> str:
        return self.disk.to_disk(f"{base}.{e}.{self.disk.expert_leaves[proj]}.{kind}")

    def hub_split(self, mem_key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """For an experts storage tensor ``mem_key`` (``...experts.gate_up_proj`` etc.) of a family whose hub
        checkpoints hold one tensor per expert: [(hub key, view of ``t``)], expert by expert (gate then up for
        ``gate_up_proj``). None for every other entry (stored whole, under ``disk.to_disk(mem_key)``)."""
        where = self._per_expert(mem_key)
        if where is None:
            return None
        base, leaf = where
        parts = self.layout.parts(leaf, t) or []
        return [(self._expert_hub_key(base, e, proj, kind), view[e])
                for e in range(t.shape[0]) for proj, kind, view in parts]

    def hub_name(self, mem_key: str) -> str:
        """The hub name of in-memory state-dict entry ``mem_key``; for one written per expert, the name of
        expert 0's first slice of it."""
        where = self._per_expert(mem_key)
        if where is None:
            return self.disk.to_disk(mem_key)
        base, leaf = where
        proj, kind = PARTS[leaf][0]
        return self._expert_hub_key(base, 0, proj, kind)


_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
_MIXTRAL_DISK = DiskNames(((".block_sparse_moe.", ".mlp."),), ("w1", "w3", "w2"))

ARCHS: dict[str, ArchSpec] = {s.model_type: s for s in [
    ArchSpec("mixtral", "Mixtral", "num_local_experts", lambda c: _softmax_topk(c, renorm=True),
             tiny=dict(num_local_experts=8, num_experts_per_tok=2), disk=_MIXTRAL_DISK),
    ArchSpec("qwen2_moe", "Qwen2-MoE", "num_experts", _softmax_topk,
             tiny=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False,
                       shared_expert_intermediate_size=40),
             shared_attrs=("shared_expert", "shared_expert_gate"), width_field="moe_intermediate_size"),
    ArchSpec("qwen3_moe", "Qwen3-MoE", "num_local_experts", _softmax_topk,
             tiny=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
             width_field="moe_intermediate_size"),
    ArchSpec("olmoe", "OLMoE", "num_experts", _softmax_topk,
             tiny=dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1)),
    ArchSpec("deepseek_v2", "DeepSeek", "n_routed_experts", _deepseek_v2,
             tiny=dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                       first_k_dense_replace=1, q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5,
                       **_MLA),
             shared_attrs=("shared_experts",), shared_width_key="n_shared_experts", router_fp32=True,
             width_field="moe_intermediate_size"),
    ArchSpec("deepseek_v3", "DeepSeek", "n_routed_experts", _deepseek_v3,
             tiny=dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                       first_k_dense_replace=1, q_lora_rank=16, n_group=2, topk_group=1, norm_topk_prob=True,
                       routed_scaling_factor=2.5, topk_method="noaux_tc", scoring_func="sigmoid", **_MLA),
             shared_attrs=("shared_experts",), shared_width_key="n_shared_experts", router_fp32=True,
             width_field="moe_intermediate_size"),
    ArchSpec("phimoe", "PhiMoE", "num_local_experts",
             lambda c: RoutingRule("sparsemixer", 2, jitter_eps=float(c.router_jitter_noise)),
             tiny=dict(num_local_experts=8, num_experts_per_tok=2), router_attr="router",
             disk=DiskNames(_MIXTRAL_DISK.renames + ((".mlp.gate.weight", ".mlp.router.weight"),),
                            _MIXTRAL_DISK.expert_leaves)),
    ArchSpec("gpt_oss", "GPT-OSS", "num_local_experts", lambda c: RoutingRule("topk_softmax", c.num_experts_per_tok),
             tiny=dict(num_local_experts=8, num_experts_per_tok=2,
                       layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=16,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
             router_attr="router", layout=GPT_OSS, activation=_clamped_swiglu,
             disk=DiskNames(per_expert=False)),  # its hub format is the fused one
]}
