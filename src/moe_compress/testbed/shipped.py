"""The testbed checkpoints shipped inside the package (``moe_compress/data/testbeds``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED_TESTBEDS = ("mixtral-8e",)


def shipped_testbed(name: str = "mixtral-8e") -> Path:
    """Folder of a shipped testbed checkpoint, loadable with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``."""
    if name not in SHIPPED_TESTBEDS:
        raise ValueError(f"no shipped testbed {name!r}; shipped: {', '.join(SHIPPED_TESTBEDS)}")
    return Path(str(resources.files("moe_compress") / "data" / "testbeds" / name))
