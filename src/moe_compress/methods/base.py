"""The small interface every compression method implements, and the registry of methods.

A method sees one MoE layer at a time (`LayerContext`: the layer view, its calibration statistics, the
target expert count and, if it asks, the MoE block's calibration inputs) and returns a `LayerPlan`: the new
`ExpertSet` plus what compression.json should record. It never loads files, parses arguments or moves
tensors between devices; the pipeline does that.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from moe_compress.errors import UserError
from moe_compress.models.layer import ExpertSet, MoELayer
from moe_compress.models.loading import CausalLM

if TYPE_CHECKING:
    from moe_compress.calibration.data import CalibrationSet
    from moe_compress.models.registry import Adapter

Progress = Callable[[str, int, int], None]


class Params(BaseModel):
    """Base of every method's parameters: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


AnyParams = Params  # the base, for annotations inside `Method` (where ``Params`` is its nested class)


@dataclass
class LayerContext:
    """Everything a method may use for one layer.

    stats: {name: tensor} for this layer (e.g. frequency [E], output_similarity [E, E]);
    inputs: the MoE block's inputs on real calibration tokens [T, H], if the method set ``needs_inputs``;
    generator: seeded, for any randomness;
    input_domains: the calibration domain id of each of those tokens [T] int64, when the calibration rows had
    domains (else None);
    domain_names: the calibration domains' names in id order (the ids of ``input_domains`` and of per-domain
    statistics such as ``tokens_by_domain``), or None without domains.
    """

    layer: MoELayer
    n_experts: int
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: torch.Tensor | None = None
    generator: torch.Generator | None = None
    input_domains: torch.Tensor | None = None
    domain_names: list[str] | None = None


@dataclass
class LayerPlan:
    """A method's decision for one layer: the new experts and a JSON-able record of why."""

    expert_set: ExpertSet
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Companions:
    """Further checkpoints a method derives from the same original model beside its main one, and how to choose
    one for an input (premoe: one pruned checkpoint per calibration domain, chosen by the nearest stored
    routing pattern).

    folder: the sub-folder of the output that holds them (``OUT/<folder>/<name as a folder name>/``);
    kept: {name: {MoE layer: kept original experts}} (each companion is the original pruned to those);
    index: JSON-able description written as ``OUT/<method>.json`` (with a ``checkpoints`` entry added: name ->
    path relative to OUT); tensors: what `choose` needs beside the index (may be empty), written as
    ``OUT/<folder>/<tensors_file>`` (not beside the main weights, where a loader that reads every
    ``*.safetensors`` file of the folder would take it for part of the model)."""

    folder: str
    kept: dict[str, dict[int, list[int]]]
    index: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors_file: str = "query.safetensors"

    def choose(self, model: Any, input_ids: torch.Tensor) -> list[tuple[str, dict[str, float]]]:
        """For each row of ``input_ids`` [B, L] (run through ``model``, the main checkpoint): the chosen
        companion's name and the score of every companion (lower = closer)."""
        raise NotImplementedError


class Method:
    """Base class. Subclasses set the class attributes and implement `plan`."""

    name: ClassVar[str]
    kind: ClassVar[Literal["prune", "merge"]]
    summary: ClassVar[str]
    # `needs` and `needs_data` are class defaults that an instance may change from its parameters (stun with
    # unstructured_sparsity > 0 reads calibration data): ask the instance, not the class
    needs: frozenset[str] = frozenset()            # statistics the method reads
    needs_inputs: ClassVar[bool] = False           # wants the MoE inputs of calibration tokens
    needs_data: bool = True                        # False: runs without calibration data
    # True: every expert is kept and the budget (--experts N / --ratio R) is a share of the routed experts'
    # parameters (N / E of them); the method narrows the experts instead (``ctx.n_experts`` = N)
    keeps_experts: ClassVar[bool] = False
    # True: besides the main checkpoint the method derives further pruned checkpoints of the same original model
    # (`companions`; premoe: one per calibration domain). The pipeline then keeps the original in memory, writes
    # them under the output folder, and refuses --mode sequential and --stream.
    writes_companions: ClassVar[bool] = False
    min_domains: ClassVar[int] = 0                 # calibration domains the method needs (0: any data)

    class Params(Params):
        pass

    # each subclass narrows this to its own ``Params`` (``params: Params`` after the nested class; a base
    # class of other methods to the base of their parameters, e.g. ``params: PruneParams``)
    params: AnyParams

    def __init__(self, **params: Any):
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "parameters"
            valid = ", ".join(self.Params.model_fields) or "none"
            if first["type"] == "extra_forbidden":
                close = difflib.get_close_matches(where, self.Params.model_fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UserError(f"method {self.name}: invalid parameter {where}: unknown parameter{hint}; valid "
                                f"parameters: {valid}") from None
            raise UserError(f"method {self.name}: invalid parameter {where}: {first['msg']}") from None

    def plan(self, ctx: LayerContext) -> LayerPlan:
        raise NotImplementedError

    @property
    def needs_teacher(self) -> bool:
        """True when `refine` wants the original model next to the compressed one."""
        return False

    def refine(self, student: CausalLM, teacher: CausalLM | None, adapter: Adapter, calib: CalibrationSet | None,
               *, device: str | torch.device, seed: int = 0, progress: Progress | None = None) -> dict | None:
        """An optional stage after every MoE layer was compressed and written (``student``, in place), e.g.
        distillation against the original model ``teacher`` on the calibration set ``calib``. Returns a
        JSON-able record for compression.json, or None when the method has no such stage."""
        return None

    def in_memory_model(self, model: Any, adapter: Any, stats: dict[int, dict[str, torch.Tensor]],
                        infos: dict[int, dict]) -> tuple[Any, int] | None:
        """A method whose paper's model is not a standard checkpoint (MoNE's novices) can return it here for
        evaluation: ``model`` (a copy of the original, changed in place, e.g. by hooks) and its parameter count as
        the paper counts it; ``stats``/``infos`` are the statistics and plan records per layer. Default: None."""
        return None

    def check_model(self, adapter: Any) -> None:
        """A `UserError` if the parameters do not fit this model (run before any weights are loaded)."""

    def companions(self, infos: dict[int, dict], original: Any, adapter: Any) -> Companions | None:
        """For ``writes_companions`` methods: the further checkpoints, from the per-layer plan records ``infos``
        and the ORIGINAL model (``adapter`` its adapter). None otherwise."""
        return None

    @classmethod
    def load_companions(cls, index: dict, tensors: dict[str, torch.Tensor]) -> Companions:
        """The `Companions` written as ``index`` (``OUT/<method>.json``) and ``tensors``, to choose among them."""
        raise NotImplementedError(f"method {cls.name} writes no companions")

    def observer_options(self) -> dict[str, Any]:
        """Options for the statistic observers this method needs (e.g. a token budget)."""
        return {}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, kind, one-line summary and parameters with defaults (for `moe-compress methods`)."""
        return {"name": cls.name, "kind": cls.kind, "summary": cls.summary,
                "params": {k: f.default for k, f in cls.Params.model_fields.items()}}


METHODS: dict[str, type[Method]] = {}
"""name -> class, filled by `register` while `moe_compress.methods` (the package) imports every method module."""

# -- method specs: NAME or NAME[key=value,...], the one syntax of --method, recipes' ``method:``, bench --methods
# and the ``spec`` field of compression.json

_SPEC = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\[(.*)\])?\s*$", re.S)
SPEC_FORM = "NAME or NAME[key=value,...], e.g. refit[select=naee,distill_steps=400]"


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets/braces (``a,b[x=1,y=2]`` -> ``a``, ``b[x=1,y=2]``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def split_method_list(text: str) -> list[str]:
    """``"frequency,submoe[whiten=true,rank_ratio=0.5]"`` -> the method specs (commas inside [] stay)."""
    return [p.strip() for p in _split_top(text) if p.strip()]


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"refit[select=naee,distill_steps=400]"`` -> ``("refit", {"select": "naee", "distill_steps": 400})``.

    Values are YAML scalars (``true``, ``0.5``, ``naee``), as in ``--param``/``--set``. Only the syntax is checked
    here; the name and the parameters are checked by `method_class` and the method's `Params`.
    """
    import yaml

    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if not m:
        raise UserError(f"cannot parse method {spec!r}: write {SPEC_FORM}")
    name, body = m.group(1), m.group(2) or ""
    params: dict[str, Any] = {}
    for item in _split_top(body):
        if not item.strip():
            if body.strip():  # "refit[a=1,,b=2]"; "refit[]" is just refit
                raise UserError(f"method {spec!r}: empty parameter between commas; write {SPEC_FORM}")
            continue
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"method {spec!r}: parameter {item.strip()!r} is not key=value; write {SPEC_FORM}")
        if key in params:
            raise UserError(f"method {spec!r}: parameter {key} is given twice")
        try:
            params[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"method {spec!r}: cannot parse the value of {key}: {raw.strip()!r}") from None
    return name, params


def _format_value(value: Any) -> str:
    import yaml

    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def format_method_spec(name: str, params: dict[str, Any] | None = None) -> str:
    """The canonical spec: ``name`` or ``name[k=v,...]`` with the parameters in the given order."""
    if not params:
        return name
    return f"{name}[{','.join(f'{k}={_format_value(v)}' for k, v in params.items())}]"


def merge_method_params(spec: str, params: dict[str, Any] | None, where: str = "params") -> tuple[str, dict]:
    """A spec's bracket parameters joined with separately given ``params`` (a recipe's ``params:``, ``--param``):
    the name and one dict. The same key in both is accepted only with the same value."""
    name, inline = parse_method_spec(spec)
    merged = dict(inline)
    for key, value in (params or {}).items():
        if key in inline and inline[key] != value:
            raise UserError(f"method {spec!r} sets {key}={_format_value(inline[key])} but {where} has "
                            f"{key}={_format_value(value)}: give {key} once")
        merged[key] = value
    return name, merged


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name} registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; a `UserError` with a suggestion otherwise."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown method {name!r}{hint}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(name: str, **params: Any) -> Method:
    return method_class(name)(**params)


def all_methods() -> dict[str, type[Method]]:
    return dict(sorted(METHODS.items()))
