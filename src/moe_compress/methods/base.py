"""The small interface every compression method implements, and the registry of methods.

A method sees one MoE layer at a time (`LayerContext`: the layer view, its calibration statistics, the
target expert count and, if it asks, the MoE block's calibration inputs) and returns a `LayerPlan`: the new
`ExpertSet` plus what compression.json should record. It never loads files, parses arguments or moves
tensors between devices; the pipeline does that.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from moe_compress.errors import UserError
from moe_compress.models.layer import ExpertSet, MoELayer


class Params(BaseModel):
    """Base of every method's parameters: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class LayerContext:
    """Everything a method may use for one layer.

    stats: {name: tensor} for this layer (e.g. frequency [E], output_similarity [E, E]);
    inputs: the MoE block's inputs on real calibration tokens [T, H], if the method set ``needs_inputs``;
    generator: seeded, for any randomness;
    input_domains: the calibration domain id of each of those tokens [T] int64, when the calibration rows had
    domains (else None).
    """

    layer: MoELayer
    n_experts: int
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: torch.Tensor | None = None
    generator: torch.Generator | None = None
    input_domains: torch.Tensor | None = None


@dataclass
class LayerPlan:
    """A method's decision for one layer: the new experts and a JSON-able record of why."""

    expert_set: ExpertSet
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set the class attributes and implement `plan`."""

    name: ClassVar[str]
    kind: ClassVar[Literal["prune", "merge"]]
    summary: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()  # statistics the method reads
    needs_inputs: ClassVar[bool] = False           # wants the MoE inputs of calibration tokens
    needs_data: ClassVar[bool] = True              # False: runs without calibration data
    # True: every expert is kept and the budget (--experts N / --ratio R) is a share of the routed experts'
    # parameters (N / E of them); the method narrows the experts instead (``ctx.n_experts`` = N)
    keeps_experts: ClassVar[bool] = False

    class Params(Params):
        pass

    def __init__(self, **params: Any):
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "parameters"
            raise UserError(f"method {self.name}: invalid parameter {where}: {first['msg']} "
                            f"(valid parameters: {', '.join(self.Params.model_fields) or 'none'})") from None

    def plan(self, ctx: LayerContext) -> LayerPlan:
        raise NotImplementedError

    @property
    def needs_teacher(self) -> bool:
        """True when `refine` wants the original model next to the compressed one."""
        return False

    def refine(self, student, teacher, adapter, calib, *, device, seed: int = 0, progress=None) -> dict | None:
        """An optional stage after every MoE layer was compressed and written (``student``, in place), e.g.
        distillation against the original model ``teacher`` on the calibration set ``calib``. Returns a
        JSON-able record for compression.json, or None when the method has no such stage."""
        return None

    def observer_options(self) -> dict[str, Any]:
        """Options for the statistic observers this method needs (e.g. a token budget)."""
        return {}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, kind, one-line summary and parameters with defaults (for `moe-compress methods`)."""
        return {"name": cls.name, "kind": cls.kind, "summary": cls.summary,
                "params": {k: f.default for k, f in cls.Params.model_fields.items()}}


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name} registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; a `UserError` with a suggestion otherwise."""
    _load_builtin_methods()
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown method {name!r}{hint}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(name: str, **params: Any) -> Method:
    return method_class(name)(**params)


def all_methods() -> dict[str, type[Method]]:
    _load_builtin_methods()
    return dict(sorted(METHODS.items()))


def _load_builtin_methods() -> None:
    import moe_compress.methods.hybrid  # noqa: F401  (registration side effects)
    import moe_compress.methods.merging  # noqa: F401
    import moe_compress.methods.pruning  # noqa: F401
