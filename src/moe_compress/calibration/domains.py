"""Expert statistics per calibration domain (observer plug-ins).

``frequency_by_domain`` [D, E] float64: number of top-k selections of expert e by real tokens of domain d, so
that its sum over d is ``frequency``. Each token's domain id comes from the runner (``token_domain``, from the
domain of its calibration row); without domains every token is domain 0. D is the option ``n_domains`` (the
rows grow if a larger id appears).

``tcess_logit_by_domain``, ``tcess_prob_by_domain`` [D, E] and ``tokens_by_domain`` [D] (PreMoe): per domain,
the sum over real tokens of the selection markers of `selection_markers` (the score of each of the token's k
highest router logits, 0 elsewhere) and the token count; see `TaskSelectionScore`.
"""

from __future__ import annotations

import torch

from moe_compress.calibration.observer_base import LayerObserver, register_observer
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


# -- PreMoe's task-conditioned expected selection score ----------------------------------------------------------

def selection_markers(logits: torch.Tensor, score: str, k: int, min_prob: float = 0.0,
                      sigmoid: bool = False) -> torch.Tensor:
    """PreMoe's per-token selection marker: router logits [T, E] -> m [T, E] float64.

    m[t, e] = s[t, e] if e is one of the k largest logits of token t and (min_prob > 0) its softmax over those k
    logits is at least min_prob, else 0; s = the raw logit (``score="logit"``) or the router's probability
    (``"prob"``: sigmoid(logit) when ``sigmoid``, else the softmax over all E logits). Ties in the top-k go to the
    lower expert index."""
    z = logits.double()
    t, e = z.shape
    k = min(k, e)
    top_val, top_idx = _stable_topk(z, k)
    keep = torch.ones_like(top_val, dtype=torch.bool)
    if min_prob > 0:
        keep = torch.softmax(top_val, dim=-1) >= min_prob
    if score == "logit":
        s = z
    elif score == "prob":
        s = torch.sigmoid(z) if sigmoid else torch.softmax(z, dim=-1)
    else:
        raise ValueError(f"score must be logit or prob here, not {score!r}")
    out = torch.zeros_like(z)
    out.scatter_(1, top_idx, torch.where(keep, s.gather(1, top_idx), 0.0))
    return out


def _stable_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row, ties to the lower index (torch.topk leaves ties unspecified)."""
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
    return z.gather(1, order), order


@register_observer
class TaskSelectionScore(LayerObserver):
    """PreMoe's TCESS per calibration domain (Pei et al., arXiv 2505.17639), from the router logits the layer
    computes on each token (bias included, DeepSeek-V3's choice-only correction bias not):

    - ``tcess_logit_by_domain`` and ``tcess_prob_by_domain`` [D, E] float64: sum over the real tokens of domain d
      of `selection_markers` with the raw logit / the router probability as the score (both from one pass, so
      that variants of either score share the statistics);
    - ``tokens_by_domain`` [D] float64: the number of those tokens,

    so TCESS_d = tcess_*_by_domain[d] / tokens_by_domain[d] and the all-domain TCESS pools every row. Options
    ``tcess_k`` (default 1) and ``tcess_min_prob`` (default 0: off). Rows grow as domain ids appear (every token
    is domain 0 without domains)."""

    provides = ("tcess_logit_by_domain", "tcess_prob_by_domain", "tokens_by_domain")

    def __init__(self, layer: MoELayer, tcess_k: int = 1, tcess_min_prob: float = 0.0, **options):
        super().__init__(layer, **options)
        self.k, self.min_prob = int(tcess_k), float(tcess_min_prob)
        dev = layer.router_weight.device
        self.sums = {s: torch.zeros(1, layer.n_experts, dtype=torch.float64, device=dev) for s in ("logit", "prob")}
        self.tokens = torch.zeros(1, dtype=torch.float64, device=dev)

    def update(self, hidden, idx, weights, mask):
        t = hidden.shape[0]
        dom = self.token_domain if self.token_domain is not None else torch.zeros(t, dtype=torch.long,
                                                                                 device=hidden.device)
        n_dom = int(dom.max()) + 1 if dom.numel() else 1
        if n_dom > self.tokens.shape[0]:
            for s, old in self.sums.items():
                self.sums[s] = torch.cat([old, old.new_zeros(n_dom - old.shape[0], old.shape[1])])
            self.tokens = torch.cat([self.tokens, self.tokens.new_zeros(n_dom - self.tokens.shape[0])])
        logits = self.layer.router_logits(hidden)
        real = mask.double()
        for s in ("logit", "prob"):
            marks = selection_markers(logits, s, self.k, self.min_prob, sigmoid=self.layer.rule.kind == "sigmoid_group")
            self.sums[s].index_add_(0, dom, marks * real[:, None])
        self.tokens.index_add_(0, dom, real)

    def result(self):
        return {"tcess_logit_by_domain": self.sums["logit"].clone(), "tcess_prob_by_domain": self.sums["prob"].clone(),
                "tokens_by_domain": self.tokens.clone()}
