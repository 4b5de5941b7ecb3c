"""The recipe: one validated description of a compression run (YAML file or CLI flags, same schema).

Unknown keys are errors. Every run writes its full equivalent recipe into compression.json, so any result can
be re-run with ``moe-compress compress --recipe``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moe_compress.errors import UserError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(_Strict):
    data: str | None = None             # a calibration SPEC (file, folder, hf:..., builtin:..., mixture)
    n_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = 0
    packing: bool = True
    chat_template: bool = False
    batch_size: int = Field(8, ge=1)


_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6,
          "mib": 2 ** 20, "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_size(text: str | int | float) -> int:
    """``"20GiB"``, ``"20GB"`` (10^9), ``"512MiB"``, ``"1.5G"`` (binary), ``1000`` (bytes) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read memory size {text!r}: use e.g. 20GiB, 20GB, 512MiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise UserError(f"memory size {text!r} must be positive")
    return value


class Execution(_Strict):
    """How the run executes (the results are the same; the streamed checkpoint has one shard per layer).

    mode: ``memory`` loads the whole model; ``stream`` reads one decoder layer at a time from a local
    checkpoint folder, writes each compressed layer as its own shard and resumes an interrupted run
    (`moe_compress.streaming`); ``auto`` streams when ``max_gpu_memory`` is set or the process was launched by
    torchrun, else runs in memory. max_gpu_memory: a device-memory cap for streaming (``"20GiB"``, bytes): the
    calibration batch size is chosen to fit it.
    """

    mode: Literal["auto", "memory", "stream"] = "auto"
    max_gpu_memory: str | int | None = None

    @model_validator(mode="after")
    def _cap(self) -> Execution:
        if self.max_gpu_memory is not None:
            try:
                parse_size(self.max_gpu_memory)
            except UserError as e:
                raise ValueError(str(e)) from None
            if self.mode == "memory":
                raise ValueError("max_gpu_memory streams layer by layer: use mode stream (or auto), or drop it")
        return self

    def resolved(self, world_size: int = 1) -> Execution:
        """``auto`` made concrete for a run in ``world_size`` processes: ``stream`` under torchrun or with a cap."""
        if self.mode != "auto":
            return self
        stream = self.max_gpu_memory is not None or world_size > 1
        return self.model_copy(update={"mode": "stream" if stream else "memory"})


class Recipe(_Strict):
    model: str
    method: str
    params: dict[str, Any] = {}
    experts: int | None = Field(None, ge=1)   # experts kept per MoE layer
    ratio: float | None = Field(None, gt=0, lt=1)  # fraction of routed experts removed
    calibration: Calibration = Calibration()
    output: str
    overwrite: bool = False
    mode: Literal["oneshot", "sequential"] = "oneshot"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"   # compute dtype while compressing
    save_dtype: Literal["source", "float32", "bfloat16", "float16"] = "source"  # dtype of the written tensors
    seed: int = 0
    trust_remote_code: bool = False
    execution: Execution = Execution()

    @model_validator(mode="before")
    @classmethod
    def _method_spec(cls, data: Any) -> Any:
        """``method: NAME[key=value,...]`` -> ``method: NAME`` + ``params`` (`normalize_method`)."""
        return normalize_method(dict(data)) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _one_budget(self) -> Recipe:
        if (self.experts is None) == (self.ratio is None):
            raise ValueError("give exactly one budget: experts (kept per layer) or ratio (fraction removed)")
        return self

    def target_experts(self, n_original: int) -> int:
        """Experts kept per layer for a model with ``n_original`` routed experts."""
        if self.experts is not None:
            return self.experts
        assert self.ratio is not None  # `_one_budget`: exactly one of experts and ratio is set
        return max(1, round(n_original * (1.0 - self.ratio)))


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        if cur.get(k) is None:
            cur[k] = {}
        cur = cur[k]
        if not isinstance(cur, dict):
            raise UserError(f"invalid recipe: {k} must be a mapping of keys to values (setting {dotted})")
    cur[keys[-1]] = value


def parse_overrides(items: list[str], flag: str = "--set") -> list[tuple[str, Any]]:
    """``key.sub=value`` strings -> (key, YAML-parsed value) pairs; errors name ``flag``."""
    out = []
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserError(f"{flag} expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError:
            raise UserError(f"{flag} {key}: cannot parse value {raw!r}") from None
    return out


def normalize_method(data: dict) -> dict:
    """A recipe dict with ``method: NAME[key=value,...]`` rewritten as ``method: NAME`` + ``params`` (the bracket
    parameters joined with ``params``; the same key in both only with the same value), so that both spellings
    give the same `Recipe` and compression.json records one form."""
    from moe_compress.methods.base import merge_method_params

    method, params = data.get("method"), data.get("params")
    if isinstance(method, str) and "[" in method:
        if params is not None and not isinstance(params, dict):
            return data  # the schema reports params' type
        data["method"], data["params"] = merge_method_params(method, params)
    return data


def build_recipe(data: dict, overrides: Sequence[tuple[str, Any]] = (), *, required: dict[str, str] | None = None,
                 check_method: bool = False) -> Recipe:
    """Validate a recipe dict (+ dotted overrides) into a Recipe; `UserError` with the first problem.

    Problems in what is given come before what is missing: a misspelt key is reported before a missing
    ``output``. ``required`` names the flag of a missing top-level key in the message (``{"output": "--out"}``);
    ``check_method`` also checks the method name and its parameters against the registry (before a missing key).
    """
    data = copy.deepcopy(data)
    for key, value in overrides:
        _set_path(data, key, value)
    normalize_method(data)
    missing: list[str] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        given = [x for x in errors if not (x["type"] == "missing" and len(x["loc"]) == 1)]
        if given:
            raise UserError(_message(given[0])) from None
        missing = [str(x["loc"][0]) for x in errors]
    if check_method and isinstance(data.get("method"), str) and isinstance(data.get("params", {}), dict):
        from moe_compress.methods.base import method_class

        method_class(data["method"])(**data.get("params", {}))
    if missing:
        labels = required or {}
        key = next((k for k in labels if k in missing), missing[0])
        if key in labels:
            raise UserError(f"missing {labels[key]} (give it on the command line or in --recipe)")
        raise UserError(f"invalid recipe: {key}: Field required")
    assert recipe is not None  # validated, or a UserError above
    return recipe


def _message(error: ErrorDetails) -> str:
    where = ".".join(str(x) for x in error["loc"]) or "recipe"
    msg = error["msg"].replace("Value error, ", "")
    if error["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling)"
    return f"invalid recipe: {where}: {msg}"


def load_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of keys to values")
    return data
