"""PreMoe (Pei et al., "PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval", arXiv
2505.17639): one compact expert set per task, and at use time the stored task pattern nearest to the query picks
which one to load.

Probabilistic expert pruning (PEP) ranks experts by the task-conditioned expected selection score

    TCESS_d(e) = (1 / |T_d|) sum_{t in T_d} m_t(e),
    m_t(e) = s_t(e) if e is among the k largest router logits of token t (and, if min_prob > 0, its softmax over
             those k logits is >= min_prob), else 0,

over the calibration tokens T_d of domain d (statistics ``tcess_logit_by_domain`` or ``tcess_prob_by_domain``,
and ``tokens_by_domain``, per MoE layer); s is the raw router logit (``score=logit``, default: the authors'
code) or the router's probability (``prob``: softmax over all experts, sigmoid for DeepSeek-V3; a softmax
router's logits are defined only up to a per-token constant, and prob measured far better on both testbeds, see
docs/methods.md). Domain d keeps the top-N experts of TCESS_d in every layer (N = the budget, the same for every
domain); the all-domain set (TCESS over every calibration token) is the main checkpoint, the "one all-domain
checkpoint of the same size".

Task-adaptive expert retrieval (TAER), as the authors' code does it: a query's pattern is the mean marker over
its tokens at the FIRST MoE layer only, and the domain whose stored first-layer TCESS is nearest in L2 is chosen.
The first MoE layer's router input depends on no expert, so any pruned checkpoint computes it exactly; with the
first layer's full router rows stored beside the patterns (``domains/query.safetensors``) the query pattern is the
original model's, computed from the output folder alone. See docs/methods.md for what differs from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from moe_compress.calibration.domains import selection_markers
from moe_compress.errors import UserError
from moe_compress.methods.base import Companions, LayerContext, LayerPlan, Method, register
from moe_compress.methods.pruning.base import PruneParams, check_target, choose_kept, protected_experts, rounded
from moe_compress.models.surgery import keep_set

INDEX_FORMAT = "moe-compress premoe patterns 1"


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first MoE block's input is known."""


@dataclass
class TaskPatterns(Companions):
    """PreMoe's domain checkpoints and their retrieval: the stored first-layer TCESS of each domain and the full
    router of that layer (``tensors["router.weight"]`` [E, H], ``"router.bias"`` [E] where the router has one)."""

    layer: int = 0                      # the decoder layer of the first MoE block
    score: str = "prob"                 # logit | prob
    select_k: int = 1
    min_prob: float = 0.0
    sigmoid: bool = False               # prob = sigmoid(logit) (DeepSeek-V3) instead of a softmax
    patterns: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [E] float64

    def query_patterns(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """[B, L] token ids -> [B, E] float64: each row's mean selection marker at the first MoE layer, from
        that block's input in ``model`` (any checkpoint of this family: the input is the original's) and the
        stored full router. Only the decoder layers before that block run."""
        from moe_compress.models.registry import get_adapter

        block = get_adapter(model).moe_blocks(model).get(self.layer)
        if block is None:
            raise UserError(f"the model has no MoE block in decoder layer {self.layer}, where the stored patterns "
                            "were measured: route with the checkpoint these patterns were written with")
        seen = {}

        def capture(module, args, kwargs):
            seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Captured

        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        device = model.get_input_embeddings().weight.device
        try:
            with torch.inference_mode():
                model(input_ids=input_ids.to(device),
                      attention_mask=None if attention_mask is None else attention_mask.to(device), use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        h = seen["h"].float()
        b, length = input_ids.shape
        h = h.reshape(b * length, -1)
        w = self.tensors["router.weight"].to(device=h.device, dtype=torch.float32)
        logits = F.linear(h, w)
        if "router.bias" in self.tensors:
            logits = logits + self.tensors["router.bias"].to(device=h.device, dtype=torch.float32)
        marks = selection_markers(logits, self.score, self.select_k, self.min_prob, self.sigmoid).view(b, length, -1)
        real = torch.ones(b, length, dtype=torch.float64) if attention_mask is None else attention_mask.double()
        real = real.to(marks.device)
        return ((marks * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)).cpu()

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, E] query patterns -> [B, D] L2 distances to the stored patterns (in ``self.patterns`` order)."""
        stored = torch.stack([p.double() for p in self.patterns.values()])
        return torch.cdist(queries.double(), stored)

    def choose(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> list[tuple[str, dict[str, float]]]:
        names = list(self.patterns)
        dist = self.distances(self.query_patterns(model, input_ids, attention_mask))
        return [(names[int(torch.argmin(row))], {n: float(v) for n, v in zip(names, row)}) for row in dist]

    @classmethod
    def from_index(cls, index: dict, tensors: dict[str, torch.Tensor]) -> "TaskPatterns":
        """Rebuild from a ``premoe.json`` dict and the tensors of its ``query.router`` file."""
        q = index["query"]
        layer = int(q["layer"])
        patterns = {name: torch.tensor(d["layers"][str(layer)]["tcess"], dtype=torch.float64)
                    for name, d in index["domains"].items()}
        kept = {name: {int(i): v["kept"] for i, v in d["layers"].items()} for name, d in index["domains"].items()}
        return cls(folder=index.get("folder", "domains"), kept=kept, index=index, tensors=tensors, layer=layer,
                   score=index["score"], select_k=int(index["select_k"]), min_prob=float(index["min_prob"]),
                   sigmoid=bool(q["sigmoid"]), patterns=patterns)


@register
class PreMoe(Method):
    name = "premoe"
    kind = "prune"
    summary = ("one pruned checkpoint per calibration domain, keeping that domain's experts with the highest "
               "task-conditioned expected selection score from the router logits (PreMoe); OUT holds the "
               "all-domain one, `moe-compress route` picks a domain checkpoint for a prompt")
    needs = frozenset({"tcess_logit_by_domain", "tcess_prob_by_domain", "tokens_by_domain", "max_activation"})
    writes_companions = True
    min_domains = 2

    class Params(PruneParams):
        score: Literal["prob", "logit"] = "logit"  # s in the marker; logit = the authors' code, prob = ours
        select_k: int = Field(1, ge=1)        # the k largest router logits of a token count (authors' code: 1)
        min_prob: float = Field(0.0, ge=0.0, le=1.0)  # also require softmax over those k >= this (0: off)
        route_tokens: int = Field(32, ge=1)   # bench: the first tokens of each window from which it is routed

    params: Params

    def check_model(self, adapter) -> None:
        n = adapter.n_experts()
        if self.params.select_k > n:
            raise UserError(f"method premoe: select_k={self.params.select_k} is more than the model's {n} experts "
                            f"per layer; use 1 to {n}")

    def observer_options(self) -> dict:
        p = self.params
        return {"tcess_k": p.select_k, "tcess_min_prob": p.min_prob}

    def plan(self, ctx: LayerContext) -> LayerPlan:
        check_target(ctx)
        names = ctx.domain_names or []
        if len(names) < self.min_domains:
            raise UserError("method premoe writes one checkpoint per calibration domain and needs calibration "
                            f"data with at least {self.min_domains} domains (a jsonl 'domain' field, or a folder "
                            "with one file per domain, e.g. builtin:demo)")
        score = self.params.score
        sums = ctx.stats[f"tcess_{score}_by_domain"].double().cpu()
        tokens = ctx.stats["tokens_by_domain"].double().cpu()
        d = len(names)
        sums = torch.cat([sums, sums.new_zeros(max(0, d - sums.shape[0]), sums.shape[1])])[:d]
        tokens = torch.cat([tokens, tokens.new_zeros(max(0, d - tokens.shape[0]))])[:d]
        per_domain = sums / tokens.clamp(min=1)[:, None]
        overall = sums.sum(dim=0) / tokens.sum().clamp(min=1)
        supers = protected_experts(ctx, self.params)
        n_group = ctx.layer.rule.n_group
        kept = choose_kept(overall, ctx.n_experts, n_group, supers)
        domains = {name: {"tokens": int(tokens[i]), "kept": choose_kept(per_domain[i], ctx.n_experts, n_group, supers),
                          "tcess": rounded(per_domain[i])} for i, name in enumerate(names)}
        info = {"kept": kept, "scores": rounded(overall), "super_experts": supers, "tokens": int(tokens.sum()),
                "score": score, "domains": domains}
        return LayerPlan(keep_set(ctx.layer, kept), info)

    @classmethod
    def load_companions(cls, index: dict, tensors: dict[str, torch.Tensor]) -> TaskPatterns:
        return TaskPatterns.from_index(index, tensors)

    def companions(self, infos: dict[int, dict], original, adapter) -> TaskPatterns:
        first = min(infos)
        layer = adapter.layer(original, first)
        names = list(infos[first]["domains"])
        score = self.params.score
        sigmoid = layer.rule.kind == "sigmoid_group"
        p = self.params

        def layers(get) -> dict[str, dict]:
            return {str(i): get(info) for i, info in sorted(infos.items())}

        index = {
            "format": INDEX_FORMAT, "method": self.name, "folder": "domains", "score": score,
            "select_k": p.select_k, "min_prob": p.min_prob, "distance": "l2",
            "query": {"layer": first, "router": "domains/query.safetensors", "sigmoid": sigmoid,
                      "how": (f"mean over the prompt's tokens of the selection marker at the MoE block of decoder "
                              f"layer {first}: the {p.select_k} largest router logits (router = "
                              "domains/query.safetensors router.weight [+ router.bias] applied to that block's "
                              f"input, computed by the checkpoint in this folder) keep their {score}"
                              f"{' (sigmoid)' if sigmoid and score == 'prob' else ''}, every other expert 0"
                              f"{f', and only where their softmax over the k >= {p.min_prob}' if p.min_prob else ''}; "
                              f"the domain whose layers[{first}].tcess is nearest in L2 is chosen")},
            "all_domains": {"tokens": infos[first]["tokens"],
                            "layers": layers(lambda info: {"kept": info["kept"], "tcess": info["scores"]})},
            "domains": {name: {"tokens": infos[first]["domains"][name]["tokens"],
                               "layers": layers(lambda info, name=name: {
                                   "kept": info["domains"][name]["kept"], "tcess": info["domains"][name]["tcess"]})}
                        for name in names},
        }
        tensors = {"router.weight": layer.router_weight.detach().float().cpu().contiguous()}
        if layer.router_bias is not None:
            tensors["router.bias"] = layer.router_bias.detach().float().cpu().contiguous()
        return TaskPatterns.from_index(index, tensors)
