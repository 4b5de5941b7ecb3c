"""Expert statistics collected while a layer runs, at close to the cost of its normal forward pass.

During calibration the experts module of each MoE block is given an instrumented forward
(`ObservedExperts`): it receives the routing the model itself computed (indices [T, k], weights [T, k]),
runs each expert once on the tokens routed to it, returns exactly the model's output, and feeds every
per-(token, slot) expert output y [T*k, H] to the statistics. Routed-only statistics per expert e:

- ``frequency``       number of top-k selections of e (sums to tokens x k);
- ``soft_count``      sum of the routing weights of e as the model applies them;
- ``ean``             sum over routed tokens of ||y_e(x)||_2 (Expert Activation Norm);
- ``reap``            mean over routed tokens of g_e(x) ||y_e(x)||_2, g renormalised over the token's top-k;
- ``max_activation``  max over routed tokens of max_j |y_e(x)_j| (down-projection output outliers: super
  experts).

Tokens whose attention-mask entry is 0 (padding) are run (the model runs them) but not counted.

Statistics that need more than the routed outputs (similarities, input second moments) are `LayerObserver`
plug-ins registered in `EXTRA_OBSERVERS` under each statistic name they provide; the runner installs the ones
a method asks for. Each sees every batch as (hidden [T, H], top-k indices [T, k], weights [T, k], real-token
mask [T]) through `update`, and returns {statistic: tensor} from `result`. Before each `update` the observer's
``token_domain`` attribute is set to the batch's per-token domain ids [T] (int64), or None when the
calibration data has no domains. A plug-in that also defines ``update_routed`` receives, after the experts ran,
the routed outputs the model itself computed (see `LayerObserver.update_routed`), so statistics of the routed
outputs cost no second expert pass. The built-in plug-ins (`calibration.similarity`, `calibration.moments`,
`calibration.domains`, `calibration.routed`) import the base class and registry from
`calibration.observer_base` and are imported (registered) by this module.

On accelerators the routed experts run as one grouped matrix product per projection
(``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``, like transformers' ``grouped_mm`` backend) where
the installed torch supports it for these tensors; on CPU (where torch 2.13's grouped_mm kernel is several
times slower than one product per expert, see bench/observer_overhead.py) and as a fallback, as one product
per expert on its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

# the built-in plug-ins register themselves on import (each imports only `observer_base`: no cycle)
import moe_compress.calibration.domains  # noqa: F401
import moe_compress.calibration.moments  # noqa: F401
import moe_compress.calibration.routed  # noqa: F401
import moe_compress.calibration.similarity  # noqa: F401
from moe_compress.calibration.observer_base import EXTRA_OBSERVERS, LayerObserver
from moe_compress.models.layer import Activation, ExpertWeights, MoELayer, expert_forward

ROUTED_STATS = ("frequency", "soft_count", "ean", "reap", "max_activation")


class InputCapture(LayerObserver):
    """Keeps the MoE block's inputs of real tokens ([T, H] in total, from `inputs`) on ``offload_device``, and
    their domain ids ([T] int64, from `domains`; None when the runner had no domains). Not a statistic:
    `result` is empty."""

    def __init__(self, layer: MoELayer, offload_device: str | torch.device = "cpu", **options: Any):
        super().__init__(layer, **options)
        self.offload_device = offload_device
        self.chunks: list[torch.Tensor] = []
        self.domain_chunks: list[torch.Tensor] | None = []

    def update(self, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> None:
        self.chunks.append(hidden[mask].detach().to(self.offload_device))
        if self.token_domain is None:
            self.domain_chunks = None
        elif self.domain_chunks is not None:
            self.domain_chunks.append(self.token_domain[mask].to(self.offload_device))

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.empty(0, self.layer.router_weight.shape[1])

    def domains(self) -> torch.Tensor | None:
        if not self.chunks or self.domain_chunks is None:
            return None
        return torch.cat(self.domain_chunks)

    def result(self) -> dict[str, torch.Tensor]:
        return {}


def make_observers(layer: MoELayer, names: Iterable[str], **options: Any) -> list[LayerObserver]:
    """One instance of each extra observer class needed for the statistic ``names`` (routed ones skipped)."""
    classes: list[type[LayerObserver]] = []
    for name in names:
        if name in ROUTED_STATS:
            continue
        if name not in EXTRA_OBSERVERS:
            raise ValueError(f"no observer provides statistic {name!r}")
        if EXTRA_OBSERVERS[name] not in classes:
            classes.append(EXTRA_OBSERVERS[name])
    return [cls(layer, **options) for cls in classes]


@dataclass
class RoutedAccumulator:
    """Running sums for the routed-only statistics of one layer (fp64 accumulation)."""

    n_experts: int
    device: torch.device | str = "cpu"
    tokens: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        z = lambda: torch.zeros(self.n_experts, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = {"frequency": z(), "soft_count": z(), "ean": z(), "reap_sum": z(),
                     "max_activation": z()}

    def update(self, expert_of_row: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
               renorm_weight: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """expert_of_row [R], y [R, H] expert outputs, weight/renorm_weight [R] for R routed (token, slot)s;
        keep [R] bool (None = all): rows that count (real tokens)."""
        norms = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)
        peak = y.abs().amax(dim=-1).float() if y.numel() else norms
        self.update_rows(expert_of_row, norms, peak, weight, renorm_weight, keep)

    def update_rows(self, expert_of_row: torch.Tensor, norms: torch.Tensor, peaks: torch.Tensor,
                    weight: torch.Tensor, renorm_weight: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Per routed row r (all [R]): expert, ||y_r||_2, max_j |y_rj|, routing weight, renormalised weight,
        and keep (bool, None = all). Rows with keep False contribute nothing (no compaction, no sync)."""
        e, n = expert_of_row, self.n_experts
        k = torch.ones_like(norms, dtype=torch.float64) if keep is None else keep.double()
        norms = norms.double() * k
        s = self.sums
        s["frequency"] += torch.bincount(e, weights=k, minlength=n)
        s["soft_count"].index_add_(0, e, weight.double() * k)
        s["ean"].index_add_(0, e, norms)
        s["reap_sum"].index_add_(0, e, renorm_weight.double() * norms)
        s["max_activation"].scatter_reduce_(0, e, peaks.double() * k, reduce="amax")

    def result(self) -> dict[str, torch.Tensor]:
        """{name: [E] float64}; ``reap`` is the mean over routed tokens (0 for an expert never routed)."""
        s = self.sums
        reap = torch.where(s["frequency"] > 0, s["reap_sum"] / s["frequency"].clamp(min=1), 0.0)
        return {"frequency": s["frequency"].clone(), "soft_count": s["soft_count"].clone(),
                "ean": s["ean"].clone(), "reap": reap, "max_activation": s["max_activation"].clone()}


class ObservedExperts:
    """An instrumented replacement for ``block.experts.forward`` (install with `install`, undo with `remove`).

    Computes the model's routed-expert output (same math as transformers' eager path) while feeding the
    routed statistics, and the `LayerObserver` plug-ins in ``extra``.
    """

    def __init__(self, layer: MoELayer, extra: list[LayerObserver] | None = None,
                 device: str | torch.device | None = None):
        self.layer = layer
        self.acc = RoutedAccumulator(layer.n_experts, device or layer.router_weight.device)
        self.token_mask: torch.Tensor | None = None  # [T] bool for the current batch, set by the runner
        self.token_domain: torch.Tensor | None = None  # [T] int64 domain ids of the current batch, or None
        self._grouped: bool | None = None  # grouped_mm usable here (None: not tried yet)
        self.extra: list[LayerObserver] = list(extra or [])
        self._experts: Any = layer.block.experts  # the experts module whose forward `install` shadows

    def results(self) -> dict[str, torch.Tensor]:
        """Routed statistics and every plug-in's statistics of this layer."""
        out = dict(self.acc.result())
        for obs in self.extra:
            out.update(obs.result())
        return out

    def install(self) -> "ObservedExperts":
        self._experts.forward = self.forward  # instance attribute shadows the class method
        return self

    def remove(self) -> None:
        if "forward" in vars(self._experts):
            del self._experts.forward

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> routed output [T, H]."""
        t, k = top_k_index.shape
        mask = self.token_mask if self.token_mask is not None else torch.ones(t, dtype=torch.bool,
                                                                               device=hidden.device)
        for obs in self.extra:
            obs.token_domain = self.token_domain
            obs.update(hidden, top_k_index, top_k_weights, mask)
        flat = top_k_index.reshape(-1)
        sorted_e, order = torch.sort(flat, stable=True)
        tok = order // k
        y = self._routed_outputs(hidden[tok], sorted_e)  # [T*k, H], rows grouped by expert
        w = top_k_weights.reshape(-1)[order]
        renorm = (top_k_weights / top_k_weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)).reshape(-1)[order]
        norms = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)
        peaks = y.abs().amax(dim=-1).float() if y.numel() else norms
        self.acc.update_rows(sorted_e, norms, peaks, w.float(), renorm.float(),
                             None if self.token_mask is None else mask[tok])
        self.acc.tokens += int(mask.sum())
        for obs in self.extra:
            routed = getattr(obs, "update_routed", None)
            if routed is not None:
                routed(hidden, tok, sorted_e, y, w, mask[tok])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        weighted = (y * w[:, None].to(y.dtype))[inverse]
        return weighted.view(t, k, -1).sum(dim=1).to(hidden.dtype)

    def _routed_outputs(self, x: torch.Tensor, sorted_e: torch.Tensor) -> torch.Tensor:
        """x [R, H] token rows sorted by expert (sorted_e [R]) -> each row's expert output [R, H]."""
        w, n = self.layer.experts, self.layer.n_experts
        counts = torch.bincount(sorted_e, minlength=n)
        if self._grouped is not False and x.shape[0] > 0 and x.device.type != "cpu":
            try:
                y = grouped_expert_forward(w, x, sorted_e, torch.cumsum(counts, 0, dtype=torch.int32),
                                           self.layer.activation)
                self._grouped = True
                return y
            except (RuntimeError, NotImplementedError):
                if self._grouped:  # worked before on this layer: a real error
                    raise
                self._grouped = False
        y = x.new_empty(x.shape)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                y[start:start + c] = expert_forward(w, e, x[start:start + c], self.layer.activation)
                start += c
        return y


def _grouped_mm_fn() -> Callable[..., torch.Tensor] | None:
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_expert_forward(w: ExpertWeights, x: torch.Tensor, sorted_e: torch.Tensor, offsets: torch.Tensor,
                           act: Activation) -> torch.Tensor:
    """Every row of x [R, H] through its expert, rows grouped by expert (sorted_e [R]; offsets [E] int32 =
    cumulative row counts) -> [R, H], as one grouped matrix product per projection.

    Raises RuntimeError/NotImplementedError where this torch has no grouped_mm for these tensors (the caller
    falls back to one product per expert)."""
    mm = _grouped_mm_fn()
    if mm is None:
        raise NotImplementedError("this torch has no grouped_mm")
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        raise NotImplementedError("grouped_mm needs compute capability 8.0")

    def linear(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [E, out, in]
        out = mm(inp, weight.transpose(1, 2), offs=offsets)
        return out if bias is None else out + bias[sorted_e]

    g = linear(x, w.gate, w.gate_bias)
    u = linear(x, w.up, w.up_bias)
    return linear(act(g, u), w.down, w.down_bias)
