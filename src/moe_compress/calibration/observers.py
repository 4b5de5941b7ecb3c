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
mask [T]) through `update`, and returns {statistic: tensor} from `result`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from moe_compress.models.layer import MoELayer, expert_forward

ROUTED_STATS = ("frequency", "soft_count", "ean", "reap", "max_activation")


class LayerObserver:
    """A statistic observer for one MoE layer beyond the routed statistics (subclass and `register_observer`).

    ``provides``: the statistic names `result` returns. ``options``: free-form settings from the caller (for
    example a token budget).
    """

    provides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layer: MoELayer, **options):
        self.layer = layer
        self.options = options

    def update(self, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


EXTRA_OBSERVERS: dict[str, type[LayerObserver]] = {}


def register_observer(cls: type[LayerObserver]) -> type[LayerObserver]:
    for name in cls.provides:
        EXTRA_OBSERVERS[name] = cls
    return cls


class InputCapture(LayerObserver):
    """Keeps the MoE block's inputs of real tokens ([T, H] in total, from `inputs`) on ``offload_device``.
    Not a statistic: `result` is empty."""

    def __init__(self, layer: MoELayer, offload_device="cpu", **options):
        super().__init__(layer, **options)
        self.offload_device = offload_device
        self.chunks: list[torch.Tensor] = []

    def update(self, hidden, idx, weights, mask):
        self.chunks.append(hidden[mask].detach().to(self.offload_device))

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.empty(0, self.layer.router_weight.shape[1])

    def result(self):
        return {}


def make_observers(layer: MoELayer, names, **options) -> list[LayerObserver]:
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

    def __post_init__(self):
        z = lambda: torch.zeros(self.n_experts, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = {"frequency": z(), "soft_count": z(), "ean": z(), "reap_sum": z(),
                     "max_activation": z()}

    def update(self, expert_of_row: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
               renorm_weight: torch.Tensor) -> None:
        """expert_of_row [R], y [R, H] expert outputs, weight/renorm_weight [R] for R routed (token, slot)s."""
        e, n = expert_of_row, self.n_experts
        norms = torch.linalg.vector_norm(y.float(), dim=-1).double()
        s = self.sums
        s["frequency"] += torch.bincount(e, minlength=n).double()
        s["soft_count"].index_add_(0, e, weight.double())
        s["ean"].index_add_(0, e, norms)
        s["reap_sum"].index_add_(0, e, renorm_weight.double() * norms)
        peak = y.abs().amax(dim=-1).double() if y.numel() else norms
        s["max_activation"].scatter_reduce_(0, e, peak, reduce="amax")

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

    def __init__(self, layer: MoELayer, extra: list[LayerObserver] | None = None, device=None):
        self.layer = layer
        self.acc = RoutedAccumulator(layer.n_experts, device or layer.router_weight.device)
        self.token_mask: torch.Tensor | None = None  # [T] bool for the current batch, set by the runner
        self.extra: list[LayerObserver] = list(extra or [])
        self._experts = layer.block.experts

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
                *args, **kwargs) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> routed output [T, H]."""
        t, k = top_k_index.shape
        mask = self.token_mask if self.token_mask is not None else torch.ones(t, dtype=torch.bool,
                                                                               device=hidden.device)
        for obs in self.extra:
            obs.update(hidden, top_k_index, top_k_weights, mask)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        sorted_e = flat[order]
        tok = order // k
        counts = torch.bincount(sorted_e, minlength=self.layer.n_experts).tolist()
        y = hidden.new_empty((t * k, hidden.shape[-1]))
        start = 0
        for e, c in enumerate(counts):
            if c:
                y[start:start + c] = expert_forward(self.layer.experts, e, hidden[tok[start:start + c]],
                                                    self.layer.activation)
                start += c
        w = top_k_weights.reshape(-1)[order]
        renorm = (top_k_weights / top_k_weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)).reshape(-1)[order]
        keep = mask[tok]
        self.acc.update(sorted_e[keep], y[keep], w[keep].float(), renorm[keep].float())
        self.acc.tokens += int(mask.sum())
        out = torch.zeros_like(hidden)
        out.index_add_(0, tok, (y * w[:, None].to(y.dtype)).to(out.dtype))
        return out
