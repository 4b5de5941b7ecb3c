"""NAEE pruning ("Not All Experts are Equal", Lu et al., ACL 2024, arXiv 2402.14800): keep the expert set that
best reconstructs the MoE block's output on calibration tokens.

err(S) = (1/T) sum_t || sum_{e in top-k_S(x_t)} w^S_e(x_t) f_e(x_t) - sum_{e in top-k(x_t)} w_e(x_t) f_e(x_t) ||^2,
minimised over kept sets S with |S| = n, where (top-k_S, w^S) is the model's own routing with the router masked
to S (`MoELayer.route(h, mask)`): exactly what the pruned model computes. Shared experts (and Qwen2-MoE's gated
shared expert) are not touched by pruning, appear identically in both outputs and cancel in the difference, so
they are left out.

Evaluation: with d_t = w^S(x_t) - w(x_t) (dense over E, at most 2k non-zeros) err(S) = (1/T) sum_t d_t^T G_t d_t,
G_t[e, f] = <f_e(x_t), f_f(x_t)>. Every expert runs once on every sampled token to build G [T, E, E] (fp64,
T x E^2 x 8 bytes); a candidate then costs one routing pass plus a [2k, 2k] quadratic form per token, and many
candidates are routed at once. d is formed from the matched weights (an expert chosen in both routings
contributes w^S_e - w_e), so unchanged tokens give exactly zero and nothing cancels catastrophically.

Search: every feasible kept set when there are at most ``max_candidates`` (exhaustive, exact optimum on the
sampled tokens); otherwise greedy backward elimination (repeatedly drop the expert whose removal raises err
least) or beam search over the same moves (``beam_width`` best partial sets kept per step). Feasible: super
experts kept (``protect_super``), and with DeepSeek group routing the same number of experts kept per group.

Domain balance (``balance="domains"``, calibration rows with two or more domains): the token mean lets the
domains whose tokens the remaining experts reconstruct poorly anyway dominate, and the kept set can drop the
experts a smaller or easier domain depends on (measured: NAEE's kept set costs code the most on deepseek-fine).
The balanced objective is the mean over domains of each domain's error relative to the best kept set for that
domain alone,

    err_bal(S) = (1/D) sum_d err_d(S) / err_d*,    err_d* = err_d(search on domain d's tokens only),

(err_d: the error on domain d's sampled tokens; err_d* found by the same search), so a kept set is judged by
how much worse than necessary it is for every domain, whatever the domains' scales (the "regret" of each
domain). One domain, or tokens without domains, give the plain objective.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Literal

import torch
from pydantic import Field

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, LayerPlan, register
from moe_compress.methods.pruning.base import PruneParams, ScorePruning, check_target, protected_experts, rounded
from moe_compress.models.layer import MoELayer, expert_forward
from moe_compress.models.routing import route
from moe_compress.models.surgery import keep_set


@torch.no_grad()
def expert_gram(layer: MoELayer, x: torch.Tensor, max_elements: int = 2**24) -> torch.Tensor:
    """Per-token Gram matrices of all expert outputs: x [T, H] -> G [T, E, E] fp64, G[t, e, f] = <f_e(x_t), f_f(x_t)>.

    Experts run in their own dtype (what the model computes) on token chunks of about ``max_elements`` / (E H)
    tokens, so at most one chunk of outputs [chunk, E, H] is held at a time.
    """
    t, h = x.shape
    e = layer.n_experts
    x = x.to(device=layer.experts.down.device, dtype=layer.experts.down.dtype)
    gram = torch.empty(t, e, e, dtype=torch.float64, device=x.device)
    chunk = max(1, max_elements // (e * h))
    for s in range(0, t, chunk):
        xc = x[s:s + chunk]
        y = torch.stack([expert_forward(layer.experts, j, xc, layer.activation) for j in range(e)], dim=1)
        y = y.double()  # [chunk, E, H]
        gram[s:s + chunk] = torch.bmm(y, y.transpose(1, 2))
    return gram


class ReconstructionObjective:
    """err(mask) of one MoE layer for many router masks at once, on calibration tokens x [T, H].

    ``errors(masks [C, E] bool) -> [C]`` fp64 mean squared error per token of the routed output with the router
    restricted to each mask, against the unmasked routed output. ``energy``: mean ||routed output||^2 per token.
    """

    @torch.no_grad()
    def __init__(self, layer: MoELayer, x: torch.Tensor, max_elements: int = 2**24):
        device = layer.router_weight.device
        x = x.to(device)
        self.layer, self.max_elements = layer, max_elements
        self.domains: torch.Tensor | None = None  # [T] domain ids, set by `balance`
        self.scale: torch.Tensor | None = None    # [D] per-domain divisors
        self.counts: torch.Tensor | None = None   # [D] tokens per domain
        self.n_tokens, self.n_experts = x.shape[0], layer.n_experts
        self.logits = layer.router_logits(x.to(layer.router_weight.dtype))  # [T, E] fp32
        self.idx0, w0 = route(self.logits, layer.rule, layer.correction_bias)  # [T, k]
        self.w0 = w0.double()
        self.k = self.idx0.shape[1]
        self.gram = expert_gram(layer, x, max_elements)
        tt = torch.arange(self.n_tokens, device=device).view(-1, 1, 1)
        self.g0 = self.gram[tt, self.idx0.unsqueeze(-1), self.idx0.unsqueeze(-2)]  # [T, k, k] original top-k
        self.energy = float(torch.einsum("tab,ta,tb->", self.g0, self.w0, self.w0)) / self.n_tokens

    @torch.no_grad()
    def errors(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [C, E] bool (True = kept) -> err [C] fp64 (err_bal after `balance`)."""
        if self.domains is None:
            out = [q.sum(1) / self.n_tokens for q in self._token_errors(masks)]
        else:
            scale = self._balancing()[1]
            out = [(self._per_domain(q) / scale).mean(1) for q in self._token_errors(masks)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    @torch.no_grad()
    def domain_errors(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [E] bool (after `balance`) -> [D] mean error per domain."""
        return self._per_domain(torch.cat(list(self._token_errors(mask.unsqueeze(0)))))[0]

    @torch.no_grad()
    def domain_regret(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [E] bool (after `balance`) -> [D] err_d / scale_d."""
        return self.domain_errors(mask) / self._balancing()[1]

    def _balancing(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(domains [T], scale [D], counts [D]) as set by `balance`."""
        if self.domains is None or self.scale is None or self.counts is None:
            raise RuntimeError("ReconstructionObjective: call balance() first")
        return self.domains, self.scale, self.counts

    def _token_errors(self, masks: torch.Tensor) -> Iterator[torch.Tensor]:
        """masks [C, E] -> per-token errors d_t^T G_t d_t, [c, T] per batch of candidates (``max_elements``)."""
        masks = masks.to(device=self.logits.device, dtype=torch.bool)
        t, e, k = self.n_tokens, self.n_experts, self.k
        per_candidate = t * (4 * e + 12 * k * k)
        step = max(1, self.max_elements // per_candidate)
        for s in range(0, masks.shape[0], step):
            m = masks[s:s + step]
            c = m.shape[0]
            logits = self.logits.unsqueeze(0).expand(c, t, e).reshape(c * t, e)
            allowed = m.unsqueeze(1).expand(c, t, e).reshape(c * t, e)
            idx, w = route(logits, self.layer.rule, self.layer.correction_bias, allowed)
            yield self._quadratic(idx.view(c, t, k), w.view(c, t, k).double())

    def _per_domain(self, q: torch.Tensor) -> torch.Tensor:
        """q [c, T] per-token errors -> [c, D] mean error per domain."""
        domains, scale, counts = self._balancing()
        sums = torch.zeros(q.shape[0], scale.shape[0], dtype=q.dtype, device=q.device)
        return sums.index_add_(1, domains, q) / counts

    def balance(self, domains: torch.Tensor, scale: torch.Tensor) -> None:
        """From now on ``errors`` is the mean over domains of err_d / scale_d: domains [T] int64 ids 0..D-1 of
        the tokens (every id present), scale [D] > 0."""
        self.domains = domains.to(self.logits.device)
        self.scale = scale.to(device=self.logits.device, dtype=torch.float64)
        self.counts = torch.bincount(self.domains, minlength=self.scale.shape[0]).double()

    def _quadratic(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """idx/w [c, T, k] masked routing -> d_t^T G_t d_t per candidate and token [c, T].

        d_t lives on the original top-k slots (d_o: w^S_e - w_e, chosen in both routings or dropped) and on
        the new slots (d_n: experts chosen only under the mask). The d_o part uses the precomputed G_t
        restricted to the original top-k; the cross and new-new parts are gathered only for the (candidate,
        token) pairs whose routing picked an expert outside its original top-k.
        """
        match = idx.unsqueeze(-1) == self.idx0.unsqueeze(-2)                  # [c, T, k_new, k_orig]
        d_o = (match * w.unsqueeze(-1)).sum(dim=-2) - self.w0                  # [c, T, k]
        err = torch.einsum("tab,cta,ctb->ct", self.g0, d_o, d_o)
        new = ~match.any(dim=-1)                                               # [c, T, k]
        ci, t = torch.nonzero(new.any(dim=-1), as_tuple=True)                  # rows with a new expert
        if ci.numel():
            d_n = w[ci, t].masked_fill(~new[ci, t], 0.0)                       # [R, k]
            i_n = idx[ci, t]                                                   # [R, k]
            tr = t.view(-1, 1, 1)
            cross = self.gram[tr, self.idx0[t].unsqueeze(-1), i_n.unsqueeze(-2)]  # [R, k_orig, k_new]
            g_nn = self.gram[tr, i_n.unsqueeze(-1), i_n.unsqueeze(-2)]         # [R, k_new, k_new]
            rows = (2 * torch.einsum("rab,ra,rb->r", cross, d_o[ci, t], d_n)
                    + torch.einsum("rab,ra,rb->r", g_nn, d_n, d_n))
            err.index_put_((ci, t), rows, accumulate=True)
        return err


def _groups(n: int, n_group: int) -> list[list[int]]:
    per = n // max(n_group, 1)
    return [list(range(g * per, (g + 1) * per)) for g in range(max(n_group, 1))]


def search_space_size(n: int, n_keep: int, n_group: int, protected: list[int]) -> int:
    """Number of feasible kept sets: per group, choose the non-protected members that fill the quota."""
    quota = n_keep // max(n_group, 1)
    size = 1
    for members in _groups(n, n_group):
        prot = sum(1 for e in members if e in protected)
        size *= math.comb(len(members) - prot, quota - prot)
    return size


def _masks(sets: list[tuple[int, ...]] | list[frozenset], n: int) -> torch.Tensor:
    m = torch.zeros(len(sets), n, dtype=torch.bool)
    for i, s in enumerate(sets):
        m[i, list(s)] = True
    return m


def exhaustive_search(obj: ReconstructionObjective, n_keep: int, n_group: int, protected: list[int],
                      chunk: int = 4096) -> tuple[list[int], float, int]:
    """The feasible kept set with the smallest error (ties: first in lexicographic order). Returns
    (kept, err, candidates evaluated)."""
    n, quota = obj.n_experts, n_keep // max(n_group, 1)
    per_group = []
    for members in _groups(n, n_group):
        prot = [e for e in members if e in protected]
        free = [e for e in members if e not in protected]
        per_group.append([tuple(prot) + c for c in itertools.combinations(free, quota - len(prot))])
    candidates = itertools.product(*per_group)
    best: list[int] | None = None
    best_err, count = math.inf, 0
    while True:
        batch = [tuple(sorted(itertools.chain(*parts))) for parts in itertools.islice(candidates, chunk)]
        if not batch:
            break
        errs = obj.errors(_masks(batch, n)).cpu()
        count += len(batch)
        i = int(torch.argmin(errs))
        i = int(torch.nonzero(errs == errs[i])[0])  # first of equal minima
        if float(errs[i]) < best_err:
            best, best_err = list(batch[i]), float(errs[i])
    if best is None:
        raise ValueError(f"naee: none of the {count} kept sets has a finite reconstruction error")
    return best, best_err, count


def beam_search(obj: ReconstructionObjective, n_keep: int, n_group: int, protected: list[int],
                width: int) -> tuple[list[int], float, int]:
    """Backward elimination: from all experts, remove one expert per step, keeping the ``width`` kept sets with
    the smallest error (width 1: greedy). Only experts that are not protected and whose group is still above
    its quota may be removed. Returns (kept, err, candidates evaluated)."""
    n, quota = obj.n_experts, n_keep // max(n_group, 1)
    group_of = {e: g for g, members in enumerate(_groups(n, n_group)) for e in members}
    beam: list[frozenset] = [frozenset(range(n))]
    errs_beam = [0.0]
    count = 0
    for _ in range(n - n_keep):
        children, seen = [], set()
        for state in beam:
            counts = [0] * max(n_group, 1)
            for e in state:
                counts[group_of[e]] += 1
            for e in sorted(state):
                if e in protected or counts[group_of[e]] <= quota:
                    continue
                child = state - {e}
                if child not in seen:
                    seen.add(child)
                    children.append(child)
        errs = obj.errors(_masks(children, n)).cpu().tolist()
        count += len(children)
        order = sorted(range(len(children)), key=lambda i: (errs[i], i))[:width]
        beam, errs_beam = [children[i] for i in order], [errs[i] for i in order]
    return sorted(beam[0]), errs_beam[0], count


@register
class NAEEPruning(ScorePruning):
    name = "naee"
    summary = ("keep the expert set that best reconstructs each MoE block's output on calibration tokens "
               "(exhaustive, greedy or beam search)")
    needs = frozenset({"max_activation"})
    needs_inputs = True

    class Params(PruneParams):
        max_tokens: int = Field(4096, ge=1)        # calibration tokens sampled per layer (seeded)
        search: Literal["auto", "exhaustive", "greedy", "beam"] = "auto"
        max_candidates: int = Field(5000, ge=0)    # auto: exhaustive iff the feasible sets are at most this many
        beam_width: int = Field(4, ge=1)           # for search=beam
        max_elements: int = Field(2**24, ge=1024)  # working-memory budget (tensor elements) per batch
        balance: Literal["tokens", "domains"] = "tokens"  # domains: mean over calibration domains of the regret

    params: Params

    def sample_tokens(self, ctx: LayerContext) -> torch.Tensor:
        """The layer's calibration inputs [T, H], subsampled to ``max_tokens`` rows with ``ctx.generator``."""
        return self.sample(ctx)[0]

    def sample(self, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(inputs [T, H], their domain ids [T] or None), subsampled to ``max_tokens`` rows with ``ctx.generator``."""
        x, dom = ctx.inputs, ctx.input_domains
        if x is None or x.shape[0] == 0:
            raise UserError(f"method {self.name} needs the MoE inputs of calibration tokens: pass --calib SPEC")
        if dom is not None and dom.shape[0] != x.shape[0]:
            dom = None
        if x.shape[0] > self.params.max_tokens:
            gen = ctx.generator if ctx.generator is not None else torch.Generator().manual_seed(0)
            rows = torch.randperm(x.shape[0], generator=gen)[:self.params.max_tokens].sort().values
            x = x[rows.to(x.device)]
            dom = None if dom is None else dom[rows.to(dom.device)]
        return x, dom

    def plan(self, ctx: LayerContext) -> LayerPlan:
        check_target(ctx)
        p, layer = self.params, ctx.layer
        n, n_keep, n_group = layer.n_experts, ctx.n_experts, max(layer.rule.n_group, 1)
        protected = protected_experts(ctx, p)
        x, dom = self.sample(ctx)
        space = search_space_size(n, n_keep, n_group, protected)
        search = p.search
        if search == "auto":
            search = "exhaustive" if space <= p.max_candidates else "greedy"
        if search == "exhaustive" and space > p.max_candidates:
            raise UserError(f"method naee: exhaustive search over {space} kept sets exceeds "
                            f"max_candidates={p.max_candidates}; raise it or use search=greedy|beam")

        def run(obj: ReconstructionObjective) -> tuple[list[int], float, int]:
            if search == "exhaustive":
                return exhaustive_search(obj, n_keep, n_group, protected)
            return beam_search(obj, n_keep, n_group, protected, 1 if search == "greedy" else p.beam_width)

        balanced = {}
        with torch.no_grad():
            obj = ReconstructionObjective(layer, x, p.max_elements)
            names: list = []
            ids: torch.Tensor | None = None
            if dom is not None and p.balance == "domains":
                unique, ids = torch.unique(dom, return_inverse=True)  # ids: 0..D-1
                names = unique.tolist()
            if ids is not None and len(names) > 1:  # the best kept set of each domain alone sets its scale
                optima = [run(ReconstructionObjective(layer, x[(ids == d).to(x.device)], p.max_elements))[1]
                          for d in range(len(names))]
                floor = 1e-9 * max(obj.energy, 1e-30)  # a domain its optimum reconstructs exactly
                obj.balance(ids, torch.tensor(optima, dtype=torch.float64).clamp(min=floor))
                balanced = {"domains": names, "domain_optima": rounded(optima)}
            single = obj.errors(~torch.eye(n, dtype=torch.bool)).cpu()  # objective when only e is dropped
            kept, err, evaluated = run(obj)
            if balanced:
                mask = torch.zeros(n, dtype=torch.bool)
                mask[kept] = True
                balanced["domain_regret"] = rounded(obj.domain_regret(mask).cpu())
        info = {
            "kept": kept,
            "scores": rounded(single),
            "super_experts": protected,
            "search": search,
            "search_space": space,
            "candidates_evaluated": evaluated,
            "reconstruction_error": rounded([err])[0],
            "relative_error": rounded([err / max(obj.energy, 1e-30)])[0] if not balanced else None,
            "tokens": int(x.shape[0]),
            **({"balance": "domains", **balanced} if balanced else {}),
        }
        return LayerPlan(keep_set(layer, kept), info)

    def score(self, ctx: LayerContext) -> torch.Tensor:  # not used by plan; the single-drop errors
        with torch.no_grad():
            obj = ReconstructionObjective(ctx.layer, self.sample_tokens(ctx), self.params.max_elements)
            return obj.errors(~torch.eye(ctx.layer.n_experts, dtype=torch.bool))
