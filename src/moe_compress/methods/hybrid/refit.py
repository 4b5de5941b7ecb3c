"""``refit``: prune, then re-fit what is kept so the smaller layer reproduces the ORIGINAL layer's output.

Pruning by selection alone (frequency, REAP, NAEE, ...) keeps the surviving experts unchanged and lets the model's
router, masked to them, route every token. The function of the removed experts is simply lost. ``refit`` keeps
the cheap exact structure of pruning (a subset of experts, a standard checkpoint) but afterwards fits the kept
experts' down projections and router rows, layer by layer, to the original MoE block's routed output on the
calibration tokens:

1. **Select** the kept set S (|S| = n): REAP by default (``select``; NAEE's reconstruction search, soft count,
   frequency or EAN instead), respecting DeepSeek groups and super experts.
2. **Down-projection least squares** (``refit_down``, on by default): with the pruned routing fixed, the routed
   output is LINEAR in the kept experts' down projections D_e [H, I]:
       y'_t = sum_e D_e z_{e,t},   z_{e,t} = w'_e(x_t) a_e(x_t) [I]   (a_e = act(gate_e x, up_e x); 0 if unrouted),
   so all kept down projections are fitted JOINTLY in closed form (ridge towards the original, fp64) to
   Y_t = sum_{e in top-k(x_t)} w_e(x_t) y_e(x_t), the ORIGINAL block's routed output (all E experts, the
   model's own routing):
       D* = argmin_D sum_t ||Y_t - D z_t||^2 + lambda ||D - D_0||^2,    D = [D_1 ... D_n] [H, n I],
       D*^T = (Z^T Z + lambda I)^-1 (Z^T Y + lambda D_0^T),   lambda = ridge x mean diag(Z^T Z).
   Since the objective at D* is at most its value at D_0, the calibration reconstruction error never increases
   (checked in the tests). Z^T Z [nI, nI] is built block by block from co-routed tokens only (cost
   T k^2 I^2, not T (nI)^2). This is where the removed experts' function is folded into the kept ones: every
   token that lost an expert now lands on kept experts whose down projections are trained to produce what
   the original block produced. ``ridge="auto"``: fit on the non-held-out tokens for every ridge of
   `RIDGE_GRID`, keep the one with the lowest held-out error, refit on all tokens.
3. Optional stages, off by default (measured no better on the testbeds, see docs/methods.md):
   - **router re-fit** (``router_steps`` > 0, before 2): the kept router rows R [n, H] are trained for a few
     full-batch Adam steps on L(R) = (1/T) sum_t || Y_t - sum_{e in top-k_R(x_t)} w^R_e(x_t) y_e(x_t) ||^2
     (gradients through the routing weights; the top-k choice moves with the logits); the best iterate (start
     included) is kept. DeepSeek-V3's correction bias is kept. ``rounds`` > 1 alternates router and down fits.
   - **fold** (``fold``): each removed expert is folded into the kept expert that receives most of its
     routing mass; the new expert keeps the I most important neurons of the union (`fold_experts`).
   - **tuning** (``tune_steps`` > 0): minibatch Adam on the kept experts' gate/up/down against Y with the
     routing fixed, the iterate chosen on the held-out tokens, then the final least squares of 2.

4. Optional **distillation** (``distill_steps`` > 0, off by default because it holds the original model in
   memory beside the compressed one): once every layer is compressed, `Refit.refine` trains the compressed
   model's MoE blocks end to end towards the original's next-token distributions on the calibration rows
   (`distill.distill`; the best iterate on held-out rows is kept). Measured best on both testbeds with
   ``select="naee"``, 16 rows per step and the cosine schedule (docs/RESULTS.md "Testbeds").

Shared experts (DeepSeek, Qwen2-MoE) are untouched and identical in both outputs: they are left out of Y. Gate
and up projections are unchanged unless tuned. Biases (GPT-OSS) are kept as they are; the down bias is not
re-fitted (its routed contribution is subtracted from the target).

Plan info per layer: ``kept``, ``scores`` (the selection's), ``super_experts``, ``select``, ``ridge`` (chosen),
``heldout_by_ridge``, ``fit_tokens``, ``heldout_tokens``, and the relative reconstruction error
||Y - Y'||^2 / ||Y||^2 on all fit tokens after each stage (``rel_error``: ``pruned``, ``router``, ``down``) and
on the held-out share ``holdout`` of them as fitted without them (``rel_error_heldout``), so over-fitting is
visible in compression.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from moe_compress.errors import UserError
from moe_compress.methods.base import LayerContext, LayerPlan, Method, Progress, get_method, register
from moe_compress.methods.hybrid.distill import distill
from moe_compress.methods.pruning.base import PruneParams, check_target, rounded, selection_method
from moe_compress.methods.reconstruction import original_output, relative_error
from moe_compress.models.layer import ExpertSet, ExpertWeights, MoELayer, expert_forward
from moe_compress.models.loading import CausalLM
from moe_compress.models.registry import Adapter
from moe_compress.models.routing import route
from moe_compress.models.surgery import keep_set

if TYPE_CHECKING:
    from moe_compress.calibration.data import CalibrationSet

RIDGE_GRID = (0.03, 0.1, 0.3, 1.0)
AUTO_RIDGE_FALLBACK = 0.1  # ridge="auto" with holdout=0
Selection = Literal["naee", "reap", "soft-count", "frequency", "ean"]


# ---------------------------------------------------------------------------------------------------------------
# the pieces (pure functions on tensors; fp32 compute, fp64 accumulation where it matters)
# ---------------------------------------------------------------------------------------------------------------

def routed(logits: torch.Tensor, layer: MoELayer, correction_bias: torch.Tensor | None):
    """The layer's routing rule on the kept experts' logits [T, n] -> (idx [T, k], weights [T, k])."""
    return route(logits, layer.rule, correction_bias)


@torch.no_grad()
def kept_outputs(w: ExpertWeights, x: torch.Tensor, act) -> torch.Tensor:
    """Every kept expert of w (fp32) on every token of x [T, H] -> [T, n, H] fp32."""
    return torch.stack([expert_forward(w, e, x, act) for e in range(w.n_experts)], dim=1)


def mixture(yk: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """yk [T, n, H] expert outputs, idx/wt [T, k] routing -> routed output [T, H]."""
    picked = yk.gather(1, idx.unsqueeze(-1).expand(-1, -1, yk.shape[-1]))  # [T, k, H]
    return (wt.unsqueeze(-1) * picked).sum(dim=1)


def refit_router(layer: MoELayer, x: torch.Tensor, target: torch.Tensor, yk: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, correction_bias: torch.Tensor | None, steps: int, lr: float,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
    """A few full-batch Adam steps on the kept router rows (and router bias, GPT-OSS) minimising the routed-output
    error. x [T, H], target [T, H], yk [T, n, H] kept experts' outputs, weight [n, H], bias [n] | None.

    Returns (best weight, best bias, [loss at start, best loss]); the best iterate never has a higher loss
    than the start. ``lr`` is relative to the RMS of the router rows.
    """
    w0 = weight.detach().float()
    scale = float(w0.pow(2).mean().sqrt().clamp(min=1e-8))
    params = [w0.clone().requires_grad_(True)]
    if bias is not None:
        params.append(bias.detach().float().clone().requires_grad_(True))
    opt = torch.optim.Adam(params, lr=lr * scale)
    norm = float(target.pow(2).sum(dim=1).mean().clamp(min=1e-30))

    def loss_of(ps) -> torch.Tensor:
        logits = x @ ps[0].T
        if len(ps) > 1:
            logits = logits + ps[1]
        idx, wt = routed(logits, layer, correction_bias)
        return (mixture(yk, idx, wt) - target).pow(2).sum(dim=1).mean() / norm

    with torch.no_grad():
        start = float(loss_of(params))
    best, best_params = start, [p.detach().clone() for p in params]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(params)
        val = float(loss.detach())
        if val < best:
            best, best_params = val, [p.detach().clone() for p in params]
        loss.backward()
        opt.step()
    with torch.no_grad():
        val = float(loss_of(params))
    if val < best:
        best, best_params = val, [p.detach().clone() for p in params]
    return best_params[0], (best_params[1] if bias is not None else None), [start, best]


@torch.no_grad()
def down_normal_equations(w: ExpertWeights, x: torch.Tensor, target: torch.Tensor, idx: torch.Tensor,
                          wt: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal equations of the joint down-projection least squares.

    w: the kept experts (fp32), x [T, H], target [T, H] (minus any down-bias contribution), idx/wt [T, k] the
    final routing over the n kept experts. Returns (G [nI, nI], B [nI, H]) fp64 with G = Z^T Z, B = Z^T Y,
    z_t = [w'_1 a_1(x_t); ...; w'_n a_n(x_t)] (zero blocks for unrouted experts). Built from co-routed tokens
    only.
    """
    n, i_dim, h = w.n_experts, w.down.shape[2], x.shape[1]
    t = x.shape[0]
    pos = torch.full((t, n), -1, dtype=torch.long, device=x.device)
    z: list[torch.Tensor] = []
    toks: list[torch.Tensor] = []
    for e in range(n):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        pos[tok, e] = torch.arange(tok.numel(), device=x.device)
        a = expert_forward(w, e, x[tok], act, intermediate=True) if tok.numel() else x.new_zeros(0, i_dim)
        z.append((wt[tok, slot, None] * a).double())
        toks.append(tok)
    g = torch.zeros(n * i_dim, n * i_dim, dtype=torch.float64, device=x.device)
    b = torch.zeros(n * i_dim, h, dtype=torch.float64, device=x.device)
    yd = target.double()
    for e in range(n):
        se = slice(e * i_dim, (e + 1) * i_dim)
        g[se, se] = z[e].T @ z[e]
        b[se] = z[e].T @ yd[toks[e]]
        for f in range(e + 1, n):
            both = (pos[:, e] >= 0) & (pos[:, f] >= 0)
            if bool(both.any()):
                blk = z[e][pos[both, e]].T @ z[f][pos[both, f]]
                sf = slice(f * i_dim, (f + 1) * i_dim)
                g[se, sf] = blk
                g[sf, se] = blk.T
    return g, b


def routed_forward(w: ExpertWeights, x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, act) -> torch.Tensor:
    """The routed output with fixed routing: x [T, H], idx/wt [T, k] over the experts of w -> [T, H]
    (differentiable in w's tensors; each expert runs on its routed tokens only)."""
    out = torch.zeros_like(x)
    for e in range(w.n_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel():
            out = out.index_add(0, tok, wt[tok, slot, None] * expert_forward(w, e, x[tok], act))
    return out


def tune_experts(w: ExpertWeights, act, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor,
                 xh: torch.Tensor, yh: torch.Tensor, idxh: torch.Tensor, wth: torch.Tensor, *, steps: int,
                 lr: float, batch: int, seed: int = 0, every: int = 10) -> tuple[ExpertWeights, list[float]]:
    """Layer-local distillation of the kept experts' gate, up and down projections (routing fixed).

    Minibatch Adam (``batch`` tokens, seeded) on ||Y - routed output||^2 over the fit tokens x [T, H] / y [T, H]
    with routing idx/wt [T, k]; the held-out tokens (xh, yh, idxh, wth) choose the iterate (evaluated every
    ``every`` steps, the start included), so the result is never worse than the start on them. ``lr`` is
    relative to each tensor's RMS. Returns (weights, [held-out relative error at start, at the chosen iterate]).
    Biases are not trained."""
    names = ("gate", "up", "down")
    params = {k: getattr(w, k).detach().float().clone().requires_grad_(True) for k in names}
    opt = torch.optim.Adam([{"params": [t], "lr": lr * float(t.detach().pow(2).mean().sqrt())}
                            for t in params.values()])
    gen = torch.Generator().manual_seed(seed)
    norm_h = float(yh.double().pow(2).sum().clamp(min=1e-30))

    def current() -> ExpertWeights:
        return ExpertWeights(params["gate"], params["up"], params["down"], w.gate_bias, w.up_bias, w.down_bias)

    def held_error() -> float:
        with torch.no_grad():
            return float((routed_forward(current(), xh, idxh, wth, act) - yh).double().pow(2).sum()) / norm_h

    start = best = held_error()
    best_w = {k: t.detach().clone() for k, t in params.items()}
    for step in range(1, steps + 1):
        rows = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen).to(x.device)
        yb = y[rows]
        loss = (routed_forward(current(), x[rows], idx[rows], wt[rows], act) - yb).pow(2).sum() / yb.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            err = held_error()
            if err < best:
                best, best_w = err, {k: t.detach().clone() for k, t in params.items()}
    out = ExpertWeights(best_w["gate"], best_w["up"], best_w["down"], w.gate_bias, w.up_bias, w.down_bias)
    return out, [start, best]


def flat_down(down: torch.Tensor) -> torch.Tensor:
    """[n, H, I] -> D^T [n I, H] fp64 (the unknowns of the least squares, expert blocks stacked)."""
    n, h, i_dim = down.shape
    return down.double().permute(0, 2, 1).reshape(n * i_dim, h)


@torch.no_grad()
def solve_down(g: torch.Tensor, b: torch.Tensor, down0: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares towards the start: D*^T = (G + lambda I)^-1 (B + lambda D_0^T).

    g [nI, nI], b [nI, H] fp64; down0 [n, H, I] -> new down [n, H, I] fp32. lambda = ridge x mean diag(G)
    (at least 1e-12 x that, so the system is always positive definite)."""
    n, h, i_dim = down0.shape
    d0t = flat_down(down0)  # [nI, H]
    lam = max(ridge, 1e-12) * float(g.diagonal().mean().clamp(min=1e-30))
    a = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    rhs = b + lam * d0t
    chol, info = torch.linalg.cholesky_ex(a)
    sol = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(a, rhs)
    return sol.reshape(n, i_dim, h).permute(0, 2, 1).float().contiguous()


@torch.no_grad()
def fold_assignment(layer: MoELayer, x: torch.Tensor, kept: list[int]) -> dict[int, list[int]]:
    """Which kept expert each removed expert is folded into: the one that receives most of its routing mass.

    For every removed expert r, affinity[r, c] = sum over the tokens whose ORIGINAL top-k holds r of the weight
    the PRUNED router (masked to the kept set) gives kept expert c: where r's tokens go once r is gone. With
    DeepSeek group routing c is restricted to r's routing group. Returns {kept expert: [removed experts]}.
    """
    n = layer.n_experts
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[kept] = True
    idx0, _ = layer.route(x)
    idx1, w1 = layer.route(x, mask)
    new_mass = torch.zeros(x.shape[0], n, dtype=torch.float64, device=x.device).scatter_add_(1, idx1, w1.double())
    hit = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device).scatter_(1, idx0, True)
    affinity = hit.double().T @ new_mass  # [E, E]: removed r (row) -> kept c (column)
    per = n // max(layer.rule.n_group, 1)
    out: dict[int, list[int]] = {c: [] for c in kept}
    for r in range(n):
        if r in out:
            continue
        cands = [c for c in kept if c // per == r // per] or list(kept)
        scores = affinity[r, cands]
        out[cands[int(torch.argmax(scores))]].append(r)
    return out


@torch.no_grad()
def neuron_importance(layer: MoELayer, x: torch.Tensor, e: int, w32: ExpertWeights) -> torch.Tensor:
    """[I] fp64: sum over the tokens routed to expert e (original routing) of (w_e(x) a_j(x))^2 ||down_e[:, j]||^2,
    the output energy each intermediate neuron j contributes on its own tokens."""
    idx, wt = layer.route(x)
    tok, slot = torch.nonzero(idx == e, as_tuple=True)
    i_dim = w32.down.shape[2]
    if tok.numel() == 0:
        return torch.zeros(i_dim, dtype=torch.float64, device=x.device)
    a = expert_forward(w32, e, x[tok], layer.activation, intermediate=True) * wt[tok, slot, None]
    return a.double().pow(2).sum(0) * w32.down[e].double().pow(2).sum(0)


@torch.no_grad()
def fold_experts(layer: MoELayer, x: torch.Tensor, groups: dict[int, list[int]]) -> ExpertSet:
    """One new expert per kept expert c: the I most important intermediate neurons (`neuron_importance`) among
    those of c and of the removed experts folded into it (gate/up rows, biases and down columns move together).
    Router rows and biases are c's. A group without removed members is c itself, exactly."""
    w = layer.experts
    w32 = w.to(dtype=torch.float32)
    i_dim = w.down.shape[2]
    kept = sorted(groups)
    gate, up, down, gb, ub, db, sources = [], [], [], [], [], [], []
    for c in kept:
        members = [c] + sorted(groups[c])
        if len(members) == 1:
            pick = [(c, torch.arange(i_dim, device=w.gate.device))]
        else:
            imp = torch.cat([neuron_importance(layer, x, m, w32) for m in members])
            top = torch.topk(imp, i_dim).indices.sort().values
            pick = [(m, top[(top >= k * i_dim) & (top < (k + 1) * i_dim)] - k * i_dim) for k, m in enumerate(members)]
            pick = [(m, j) for m, j in pick if j.numel()]
        gate.append(torch.cat([w.gate[m][j] for m, j in pick]))
        up.append(torch.cat([w.up[m][j] for m, j in pick]))
        down.append(torch.cat([w.down[m][:, j] for m, j in pick], dim=1))
        if w.gate_bias is not None and w.up_bias is not None:  # gpt_oss: gate and up biases
            gb.append(torch.cat([w.gate_bias[m][j] for m, j in pick]))
            ub.append(torch.cat([w.up_bias[m][j] for m, j in pick]))
        if w.down_bias is not None:
            db.append(w.down_bias[c])
        sources.append([(m, j.numel() / i_dim) for m, j in pick])
    base = keep_set(layer, kept)
    experts = ExpertWeights(torch.stack(gate), torch.stack(up), torch.stack(down),
                            torch.stack(gb) if gb else None, torch.stack(ub) if ub else None,
                            torch.stack(db) if db else None)
    return ExpertSet(experts, base.router_weight, base.router_bias, base.correction_bias, sources)


# ---------------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------------

@register
class Refit(Method):
    name = "refit"
    kind = "prune"
    summary = ("prune (REAP by default), then re-fit the kept experts' down projections so each layer "
               "reproduces the original layer output (least squares); optional end-to-end distillation")
    needs = frozenset({"max_activation", "frequency", "soft_count", "ean", "reap"})
    needs_inputs = True

    class Params(PruneParams):
        select: Selection = "reap"                   # how the kept set is chosen (measured best: reap)
        merge: Literal["msmoe", "hcsmoe", "submoe", "absorb"] | None = None  # merge instead of select: the re-fits
        #                                              start from that method's merged experts (its defaults)
        select_tokens: int = Field(4096, ge=1)       # naee: calibration tokens for the search
        select_balance: Literal["tokens", "domains"] = "tokens"  # naee: domains = per-domain regret (naee.py)
        fit_tokens: int = Field(16384, ge=16)        # tokens for the re-fits (evenly subsampled)
        holdout: float = Field(0.15, ge=0.0, lt=0.9)  # share of the fit tokens held out (ridge choice, diagnostics)
        router_steps: int = Field(0, ge=0)           # Adam steps of the router re-fit (0: off)
        router_lr: float = Field(0.01, gt=0.0)       # Adam step size, relative to the RMS of the router rows
        refit_down: bool = True                      # joint least-squares re-fit of the kept down projections
        ridge: float | Literal["auto"] = "auto"      # relative ridge towards the original down projections;
        #                                              auto: the best of RIDGE_GRID on the held-out tokens
        rounds: int = Field(1, ge=1)                 # alternations of router and down re-fits
        tune_steps: int = Field(0, ge=0)             # Adam steps of layer-local gate/up/down tuning (0: off)
        tune_lr: float = Field(0.003, gt=0.0)        # relative to each tensor's RMS
        tune_batch: int = Field(4096, ge=1)          # tokens per tuning step
        fold: bool = False                           # fold removed experts' best neurons into kept experts
        distill_steps: int = Field(0, ge=0)          # end-to-end distillation steps after all layers (0: off)
        distill_params: Literal["moe", "all"] = "moe"  # what distillation trains (see methods/hybrid/distill)
        distill_lr: float = Field(3e-4, gt=0.0)      # Adam step size
        distill_batch: int = Field(8, ge=1)          # calibration rows per step
        distill_every: int = Field(25, ge=1)         # held-out check interval (steps)
        distill_schedule: Literal["constant", "cosine"] = "constant"  # step size over the steps (distill.py)

    params: Params

    def __init__(self, **params):
        super().__init__(**params)
        if self.params.merge is not None:
            if self.params.fold:
                raise UserError("refit: merge and fold=true both say what the kept experts start from: "
                                "use one of them")
            self.merger = get_method(self.params.merge)
            self.needs = frozenset(self.needs | self.merger.needs)

    def observer_options(self) -> dict:
        return self.merger.observer_options() if self.params.merge is not None else {}

    @property
    def needs_teacher(self) -> bool:
        return self.params.distill_steps > 0

    def refine(self, student: CausalLM, teacher: CausalLM | None, adapter: Adapter, calib: CalibrationSet | None,
               *, device: str | torch.device, seed: int = 0, progress: Progress | None = None) -> dict | None:
        """Distillation of the compressed model against the original (``distill_steps`` > 0): `distill`."""
        p = self.params
        if not p.distill_steps:
            return None
        assert teacher is not None and calib is not None  # needs_teacher and needs_data: the pipeline gave both
        return distill(student, teacher, adapter, calib.input_ids, calib.attention_mask, params=p.distill_params,
                       steps=p.distill_steps, lr=p.distill_lr, batch_rows=p.distill_batch, every=p.distill_every,
                       schedule=p.distill_schedule, seed=seed, device=device, progress=progress)

    def _selector(self):
        p = self.params
        return selection_method(p.select, select_tokens=p.select_tokens, protect_super=p.protect_super,
                                super_threshold=p.super_threshold, balance=p.select_balance)

    def plan(self, ctx: LayerContext) -> LayerPlan:
        check_target(ctx)
        p, layer = self.params, ctx.layer
        if ctx.inputs is None or ctx.inputs.shape[0] == 0:
            raise UserError(f"method {self.name} needs the MoE inputs of calibration tokens: pass --calib SPEC")
        if p.merge is not None:  # the re-fits start from the merging method's experts and router rows
            merged = self.merger.plan(ctx)
            info: dict[str, Any] = {"merge": p.merge, **{k: merged.info[k] for k in ("groups", "merge_weights",
                                                                                     "router") if k in merged.info}}
            if p.router_steps == 0 and not p.refit_down:
                return LayerPlan(merged.expert_set, info)
            out_set, fit_info = self.refit(layer, merged.expert_set, ctx.inputs)
            info.update(fit_info)
            return LayerPlan(out_set, info)
        sel = self._selector().plan(ctx)
        kept = sel.info["kept"]
        base = keep_set(layer, kept)
        if p.fold:
            x = ctx.inputs.to(device=layer.router_weight.device, dtype=layer.router_weight.dtype)
            x = x.index_select(0, torch.linspace(0, x.shape[0] - 1, min(x.shape[0], p.fit_tokens),
                                                 device=x.device).round().long())
            folded = fold_assignment(layer, x, kept)
            base = fold_experts(layer, x, folded)
        info = {"kept": kept, "scores": sel.info.get("scores"), "super_experts": sel.info.get("super_experts", []),
                "select": p.select,
                **({"folded": {str(c): r for c, r in folded.items() if r}} if p.fold else {})}
        if p.router_steps == 0 and not p.refit_down:
            return LayerPlan(base, info)
        out_set, fit_info = self.refit(layer, base, ctx.inputs)
        info.update(fit_info)
        return LayerPlan(out_set, info)

    def refit(self, layer: MoELayer, base: ExpertSet, inputs: torch.Tensor) -> tuple[ExpertSet, dict]:
        """Re-fit the router rows / down projections of the pruned set ``base`` on the inputs [T, H]."""
        p = self.params
        device = layer.router_weight.device
        x_all = inputs.to(device=device, dtype=torch.float32)
        t_all = x_all.shape[0]
        if t_all > p.fit_tokens:
            x_all = x_all.index_select(0, torch.linspace(0, t_all - 1, p.fit_tokens, device=device).round().long())
        n_hold = int(x_all.shape[0] * p.holdout)
        hold = torch.zeros(x_all.shape[0], dtype=torch.bool, device=device)
        if n_hold:
            hold[torch.linspace(0, x_all.shape[0] - 1, n_hold, device=device).round().long()] = True
        x, xh = x_all[~hold], x_all[hold]
        y, yh = original_output(layer, x), original_output(layer, xh)
        w = base.experts.to(dtype=torch.float32)
        rw = base.router_weight.float()
        rb = None if base.router_bias is None else base.router_bias.float()
        cb = None if base.correction_bias is None else base.correction_bias.float()
        act = layer.activation

        def output(weights: ExpertWeights, r, b, xs):
            logits = xs @ r.T + (0 if b is None else b)
            idx, wt = routed(logits, layer, cb)
            return mixture(kept_outputs(weights, xs, act), idx, wt), idx, wt

        y_all = torch.empty_like(x_all)
        y_all[~hold], y_all[hold] = y, yh
        with torch.no_grad():
            errors = {"pruned": relative_error(output(w, rw, rb, x_all)[0], y_all)}
            held = {"pruned": relative_error(output(w, rw, rb, xh)[0], yh)} if n_hold else {}
        ridge_info, tuned = None, False
        for r in range(p.rounds):
            tag = "" if p.rounds == 1 else f"_{r + 1}"
            if p.router_steps:
                yk = kept_outputs(w, x, act)
                rw, rb, _ = refit_router(layer, x, y, yk, rw, rb, cb, p.router_steps, p.router_lr)
                with torch.no_grad():
                    errors["router" + tag] = relative_error(output(w, rw, rb, x_all)[0], y_all)
                    if n_hold:
                        held["router" + tag] = relative_error(output(w, rw, rb, xh)[0], yh)
            if p.refit_down:
                with torch.no_grad():
                    def normal(xs, ys):
                        idx, wt = routed(xs @ rw.T + (0 if rb is None else rb), layer, cb)
                        target = ys
                        if w.down_bias is not None:  # the (unchanged) down bias of the routed experts
                            target = ys - (wt.unsqueeze(-1) * w.down_bias[idx]).sum(dim=1)
                        g, b = down_normal_equations(w, xs, target, idx, wt, act)
                        return g, b, float(target.double().pow(2).sum())

                    g, b, _ = normal(x, y)
                    ridges = RIDGE_GRID if p.ridge == "auto" else (float(p.ridge),)
                    best = ridges[0] if len(ridges) == 1 else AUTO_RIDGE_FALLBACK
                    if n_hold:  # held-out error of the fit-part solution, per ridge; then refit on all tokens
                        gh, bh, tt = normal(xh, yh)
                        norm_h = float(yh.double().pow(2).sum().clamp(min=1e-30))
                        scores = {}
                        for rg in ridges:
                            dt = flat_down(solve_down(g, b, w.down, rg))
                            scores[rg] = (tt - 2 * float((dt * bh).sum()) + float((dt * (gh @ dt)).sum())) / norm_h
                        best = min(ridges, key=lambda rg: (scores[rg], rg))
                        held["down" + tag] = scores[best]
                        ridge_info = {str(rg): rounded([v])[0] for rg, v in scores.items()}
                        if p.tune_steps:  # gate/up/down tuning on the fit part, chosen on the held-out part
                            fit = ExpertWeights(w.gate, w.up, solve_down(g, b, w.down, best), w.gate_bias,
                                                w.up_bias, w.down_bias)
                            idx, wt = routed(x @ rw.T + (0 if rb is None else rb), layer, cb)
                            idxh, wth = routed(xh @ rw.T + (0 if rb is None else rb), layer, cb)
                            with torch.enable_grad():
                                w_t, (h0, h1) = tune_experts(fit, act, x, y, idx, wt, xh, yh, idxh, wth,
                                                             steps=p.tune_steps, lr=p.tune_lr, batch=p.tune_batch)
                            held["tune" + tag] = h1
                            if h1 < h0:  # accepted: the final least squares starts from the tuned experts
                                w, tuned = w_t, True
                                g, b, _ = normal(x, y)
                                gh, bh, _ = normal(xh, yh)
                        g, b = g + gh, b + bh
                    w = ExpertWeights(w.gate, w.up, solve_down(g, b, w.down, best), w.gate_bias, w.up_bias,
                                      w.down_bias)
                    errors["down" + tag] = relative_error(output(w, rw, rb, x_all)[0], y_all)
        dtype = base.experts.down.dtype
        if rb is not None:
            assert base.router_bias is not None  # rb is base.router_bias, refitted
            rb = rb.to(base.router_bias.dtype)
        new = ExpertSet(experts=ExpertWeights(w.gate.to(dtype) if tuned else base.experts.gate,
                                              w.up.to(dtype) if tuned else base.experts.up, w.down.to(dtype),
                                              base.experts.gate_bias, base.experts.up_bias, base.experts.down_bias),
                        router_weight=rw.to(base.router_weight.dtype),
                        router_bias=rb,
                        correction_bias=base.correction_bias, sources=base.sources)
        info = {"fit_tokens": int(x_all.shape[0]), "heldout_tokens": int(n_hold), "ridge": best if p.refit_down
                else None, "heldout_by_ridge": ridge_info,
                "rel_error": {k: rounded([v])[0] for k, v in errors.items()},
                "rel_error_heldout": {k: rounded([v])[0] for k, v in held.items()}}
        return new, info
