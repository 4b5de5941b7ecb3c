"""Second moments of the MoE block's inputs (observer plug-in), for whitened SVD and least-squares merging.

- ``input_moment`` [E, H, H]: sum over the real tokens routed to expert e (e in the token's top-k) of x x^T;
- ``input_moment_all`` [H, H]: sum over all real tokens of x x^T.

Divide by ``frequency`` (resp. the token count) for the mean. Memory: E x H x H x 4 bytes per layer in fp32
(option ``moment_dtype="float64"`` doubles it): Mixtral-8x7B (E 8, H 4096) 0.5 GiB per layer, Qwen1.5-MoE
(E 60, H 2048) 0.9 GiB, DeepSeek-V3 (E 256, H 7168) 49 GiB, which is refused. The accumulator lives on the
layer's device; a layer whose moments would exceed ``moment_max_gb`` (default 8) raises a `UserError` before
any work. Installed only when a method (or the user) asks for these statistics.
"""

from __future__ import annotations

import torch

from moe_compress.calibration.observer_base import LayerObserver, register_observer
from moe_compress.errors import UserError
from moe_compress.models.layer import MoELayer


def moment_bytes(n_experts: int, hidden: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the ``input_moment`` [E, H, H] + ``input_moment_all`` [H, H] accumulators of one layer."""
    return (n_experts + 1) * hidden * hidden * torch.empty(0, dtype=dtype).element_size()


@register_observer
class InputMoments(LayerObserver):
    """Accumulates x x^T per expert (routed real tokens) and over all real tokens, in ``moment_dtype``."""

    provides = ("input_moment", "input_moment_all")

    def __init__(self, layer: MoELayer, moment_dtype: str = "float32", moment_max_gb: float = 8.0, **options):
        super().__init__(layer, **options)
        if moment_dtype not in ("float32", "float64"):
            raise UserError(f"moment_dtype must be float32 or float64, not {moment_dtype!r}")
        self.dtype = getattr(torch, moment_dtype)
        e, h = layer.router_weight.shape
        need = moment_bytes(e, h, self.dtype)
        if need > moment_max_gb * 2 ** 30:
            raise UserError(f"input_moment needs {need / 2 ** 30:.1f} GiB per layer ({e} experts x {h}^2 x "
                            f"{self.dtype.itemsize} bytes), above moment_max_gb={moment_max_gb}; raise it or "
                            "use a method that does not need input moments")
        dev = layer.router_weight.device
        self.per_expert = torch.zeros(e, h, h, dtype=self.dtype, device=dev)
        self.all = torch.zeros(h, h, dtype=self.dtype, device=dev)

    def update(self, hidden, idx, weights, mask):
        x = (hidden.to(self.dtype) * mask[:, None]).contiguous()  # padding rows become 0: they add nothing
        self.all += x.T @ x
        k = idx.shape[1]
        sorted_e, order = torch.sort(idx.reshape(-1), stable=True)
        xs = x[order // k]
        start = 0
        for e, c in enumerate(torch.bincount(sorted_e, minlength=self.per_expert.shape[0]).tolist()):
            if c:
                xe = xs[start:start + c]
                self.per_expert[e] += xe.T @ xe
                start += c

    def result(self):
        return {"input_moment": self.per_expert, "input_moment_all": self.all}
