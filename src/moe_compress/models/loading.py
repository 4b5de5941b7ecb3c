"""Resolving a MODEL argument and loading it (safetensors only; remote code only when asked).

A MODEL is a local checkpoint folder, ``builtin:NAME`` (a testbed shipped in the package, or kept in a
checkout's ``testbeds/``), or a Hugging Face hub id (``org/name``) for users who are online.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from moe_compress.errors import UserError

# transformers objects at our type boundaries. A model's family-specific attributes (``model.model.layers``,
# ``get_input_embeddings().weight``, ``generate``) resolve at runtime through `torch.nn.Module.__getattr__`, a
# config's fields through `PretrainedConfig`'s attribute map: no static type describes them, so these are `Any`,
# named so that signatures still say what they expect.
CausalLM = Any   # a transformers causal LM (what `load_model` returns)
Config = Any     # a transformers `PretrainedConfig`
Tokenizer = Any  # a transformers tokenizer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REPO_TESTBEDS = Path(__file__).resolve().parents[3] / "testbeds"


def builtin_models() -> dict[str, Path]:
    """{name: folder} of the testbeds available here: package data first, then a checkout's testbeds/."""
    found: dict[str, Path] = {}
    pkg = Path(str(resources.files("moe_compress") / "data" / "testbeds"))
    for root in (pkg, REPO_TESTBEDS):
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if (d / "config.json").is_file():
                    found.setdefault(d.name, d)
    return found


def resolve_model(spec: str) -> str:
    """A local folder path (as str) for local/builtin specs, or the hub id unchanged."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        available = builtin_models()
        if name not in available:
            raise UserError(f"unknown builtin model {name!r} (available: {', '.join(available) or 'none'})")
        return str(available[name])
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {spec} is a file; give the checkpoint folder (with config.json)")
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {spec} has no config.json; is it a Hugging Face checkpoint?")
        return str(path)
    if not _HUB_ID.match(spec):
        raise UserError(f"model folder not found: {spec}")
    return spec  # a hub id such as mistralai/Mixtral-8x7B-v0.1


def load_config(spec: str, trust_remote_code: bool = False) -> Config:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(spec), trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of {spec}: {str(e).splitlines()[0]}") from e


def load_model(spec: str, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False) -> CausalLM:
    """Load a causal LM from safetensors weights in eval mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise UserError(f"no .safetensors weights in {spec} (only safetensors checkpoints are loaded)")
    from safetensors import SafetensorError

    try:
        model: CausalLM = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise UserError(f"cannot read the weights of {spec} ({str(e).splitlines()[0]}): a file is damaged or "
                        "incomplete; download the checkpoint again") from e
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {spec}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(spec), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {spec}: {str(e).splitlines()[0]}") from e
