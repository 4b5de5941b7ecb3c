"""The statistic-observer plug-in interface and its registry (see `calibration.observers` for the runner side).

`LayerObserver` and `register_observer` live here, apart from the instrumented experts forward
(`calibration.observers`), so that the plug-in modules (`calibration.similarity`, `moments`, `domains`,
`routed`) import only this module while `calibration.observers` imports them to register them: no import
cycle.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moe_compress.models.layer import MoELayer


class LayerObserver:
    """A statistic observer for one MoE layer beyond the routed statistics (subclass and `register_observer`).

    ``provides``: the statistic names `result` returns. ``options``: free-form settings from the caller (for
    example a token budget).
    """

    provides: ClassVar[tuple[str, ...]] = ()
    token_domain: torch.Tensor | None = None  # [T] int64 domain id per token of the current batch, or None

    def __init__(self, layer: MoELayer, **options: Any):
        self.layer = layer
        self.options = options

    def update(self, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # Optional: define ``update_routed(hidden, tok, expert, y, weight, keep)`` to receive the routed outputs of
    # every batch: hidden [T, H] the MoE block's input, and per routed (token, slot) row r (all [R], rows grouped
    # by expert): tok[r] the token, expert[r] the expert, y [R, H] its output (before the routing weight),
    # weight[r] the routing weight as the model applies it, keep[r] True for real (non-padding) tokens.


EXTRA_OBSERVERS: dict[str, type[LayerObserver]] = {}


def register_observer(cls: type[LayerObserver]) -> type[LayerObserver]:
    for name in cls.provides:
        EXTRA_OBSERVERS[name] = cls
    return cls
