"""Expert usage per calibration domain (observer plug-in).

``frequency_by_domain`` [D, E] float64: number of top-k selections of expert e by real tokens of domain d, so
that its sum over d is ``frequency``. Each token's domain id comes from the runner (``token_domain``, from the
domain of its calibration row); without domains every token is domain 0. D is the option ``n_domains`` (the
rows grow if a larger id appears).
"""

from __future__ import annotations

import torch

from moe_compress.calibration.observers import LayerObserver, register_observer
from moe_compress.models.layer import MoELayer


@register_observer
class DomainFrequency(LayerObserver):
    provides = ("frequency_by_domain",)

    def __init__(self, layer: MoELayer, n_domains: int = 1, **options):
        super().__init__(layer, **options)
        self.counts = torch.zeros(max(1, int(n_domains)), layer.n_experts, dtype=torch.float64,
                                  device=layer.router_weight.device)

    def update(self, hidden, idx, weights, mask):
        t, k = idx.shape
        dom = self.token_domain if self.token_domain is not None else torch.zeros(t, dtype=torch.long,
                                                                                 device=idx.device)
        n_dom = int(dom.max()) + 1 if dom.numel() else 1
        if n_dom > self.counts.shape[0]:
            grown = self.counts.new_zeros(n_dom, self.counts.shape[1])
            grown[:self.counts.shape[0]] = self.counts
            self.counts = grown
        e = self.counts.shape[1]
        cell = (dom[:, None] * e + idx).reshape(-1)
        w = mask[:, None].expand(t, k).reshape(-1).double()
        self.counts.view(-1).index_add_(0, cell, w)

    def result(self):
        return {"frequency_by_domain": self.counts.clone()}
