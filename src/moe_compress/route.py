"""`moe-compress route`: pick, for a prompt, one of the companion checkpoints a method wrote beside its main one
(premoe: the domain checkpoint whose stored routing pattern is nearest to the prompt's).

Everything comes from the output folder: its compression.json names the method and the companions, the method's
index (``OUT/<method>.json``) and tensors describe how to compute a prompt's pattern, and the main checkpoint at
OUT computes it (for premoe only the decoder layers before the first MoE block run, and those are the
original's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moe_compress.errors import UserError


@dataclass
class Family:
    """A main checkpoint with companions: its folder, the method's index and the companions' chooser."""

    folder: Path
    method: str
    index: dict
    chooser: object  # a `moe_compress.methods.base.Companions` with `choose`

    def path(self, name: str) -> Path:
        return self.folder / self.index["checkpoints"][name]


def load_family(folder: str | Path) -> Family:
    """Read an output folder written by a method with companions; one-line `UserError`s for anything else."""
    from safetensors.torch import load_file

    from moe_compress.methods.base import method_class

    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder} does not exist: give the output folder of `moe-compress compress --method premoe`")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file: give the output folder of `moe-compress compress --method premoe`")
    manifest_path = folder / "compression.json"
    if not manifest_path.is_file():
        raise UserError(f"{folder} has no compression.json: it is not a moe-compress output (route needs the folder "
                        "`moe-compress compress --method premoe` writes)")
    try:
        manifest = json.loads(manifest_path.read_text())
        method = manifest["method"]["name"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{manifest_path} is not a readable moe-compress manifest") from None
    companions = manifest.get("companions")
    if not companions:
        raise UserError(f"{folder} holds a single {method} checkpoint, no domain checkpoints to choose from: route "
                        "works on the output of `moe-compress compress --method premoe`")
    index_path = folder / companions["index"]
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{index_path} is missing or damaged: re-run the compression") from None
    cls = method_class(method)
    tensors = {}
    if companions.get("tensors"):
        tensors_path = folder / companions["tensors"]
        if not tensors_path.is_file():
            raise UserError(f"{tensors_path} is missing: re-run the compression")
        tensors = load_file(str(tensors_path))
    for name, rel in index["checkpoints"].items():
        if not (folder / rel / "config.json").is_file():
            raise UserError(f"checkpoint {name!r} ({folder / rel}) is missing: re-run the compression")
    chooser = cls.load_companions(index, tensors)
    return Family(folder, method, index, chooser)


def route_prompt(folder: str | Path, prompt: str, device: str = "cpu") -> dict:
    """{"checkpoint", "domain", "distances" (nearest first), "tokens" (used: at most the model's
    ``max_position_embeddings``, the first ones), "prompt_tokens", "layer", "method"} for one prompt."""
    import torch

    from moe_compress.models.loading import load_model, load_tokenizer

    family = load_family(folder)
    if not prompt.strip():
        raise UserError("the prompt is empty: give some text with --prompt TEXT or --prompt-file FILE")
    tokenizer = load_tokenizer(str(family.folder))
    ids = tokenizer(prompt, return_tensors="pt", verbose=False)["input_ids"]
    if ids.shape[1] == 0:
        raise UserError("the prompt has no tokens: give some text")
    model = load_model(str(family.folder), dtype=torch.float32, device=device)
    limit = getattr(model.config, "max_position_embeddings", None) or ids.shape[1]
    n_tokens = int(ids.shape[1])
    name, distances = family.chooser.choose(model, ids[:, :limit])[0]
    order = dict(sorted(distances.items(), key=lambda kv: kv[1]))
    return {"checkpoint": str(family.path(name)), "domain": name, "distances": order,
            "tokens": min(n_tokens, limit), "prompt_tokens": n_tokens, "layer": family.index["query"]["layer"],
            "method": family.method}
