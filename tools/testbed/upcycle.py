"""Sparse upcycling: the MoE of an upcycled testbed, built from its trained dense counterpart.

The dense counterpart has the MoE's embeddings, attention, norms and lm_head (copied by parameter name) and one
SwiGLU MLP per layer, FFN(x) = W_d (silu(W_g x) * W_u x) with D intermediate neurons:

- mixtral: a ``mistral`` model whose MLP has the experts' intermediate size (Mistral and Mixtral share the
  attention and norm modules and their parameter names);
- qwen2_moe: the same ``qwen2_moe`` model with every layer in ``mlp_only_layers`` and ``intermediate_size`` =
  the shared expert's (the dense MLP is as wide as the shared expert, 4 routed experts' worth, as in
  Qwen1.5-MoE-A2.7B, whose shared expert of 5632 is about the 5504 of the Qwen-1.8B it was upcycled from).

Two schemes build a MoE block from the dense MLP. Both give the router rows of norm std * sqrt(H) (that of
N(0, std^2) rows, std = ``BALANCE[arch].router_init_std``: near-uniform routing) and start a new optimizer.
The rows are not i.i.d. Gaussian: the MLP inputs of a trained model share a large mean direction m (|m| is
25-50 % of a typical |x| in the testbeds) and a few high-variance directions, so i.i.d. rows rank the experts
alike for most tokens; top-k ranking does not depend on the router's scale, so a smaller std does not help.
Given the inputs' mean m and covariance C on one training batch (``mlp_input_stats``), a row is z C^{-1/2}
(z ~ N(0, I)) projected orthogonal to m: its logits depend only on how a token differs from the mean, in
whitened coordinates. Top-2 loads over 8 experts on 1024 single-domain tokens, max/min per layer (median of 5
draws): mixtral-8e's hidden states 3.2-6.5 i.i.d. vs 1.8-2.6 whitened; a small CPU-trained upcycled model
(hidden 64) 12-1800 vs 3.4-12. This balances step 0 only: in the first training steps the balance loss's
gradient, which points along m for a near-uniform router, moves all rows alike under Adam (``router_lr_scale``
in ``train.TrainSettings`` damps it).

``copy`` (Komatsuzaki et al. 2023, "Sparse Upcycling"): every one of the E experts is the dense MLP. Mixtral
renormalises its top-k weights to sum 1, so the block computes sum_e w_e FFN(x) = FFN(x): at phase-2 step 0 the
MoE is the dense model (to float rounding), whatever the router.

``segments`` (fine-grained, after Qwen1.5-MoE / Qwen2's upcycling and the virtual groups and weight scaling of
He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"): a SwiGLU MLP is the sum of the MLPs
of any partition of its neurons, FFN(x) = sum_s FFN_s(x). With I = ``moe_intermediate_size``, the D neurons
make S = D / I segments. The E routed experts are G = E / S copies of the MLP ("virtual groups"): expert
j*S + s is segment s of copy j (with ``shuffle`` each copy's neurons are permuted first, so the copies are cut
differently, as Qwen2 does). All S experts of group j share one router row r_j, so their logits are equal and
the top-k (k = T*S) takes T whole groups. The shared expert is the whole MLP and ``shared_expert_gate`` starts
at 0 (sigmoid 1/2): shared and routed parts each carry half of the dense MLP (``SHARED_SHARE``), the routed
experts' W_d scaled by c:

    MoE(x) = 1/2 FFN(x) + sum_{chosen e} w_e c FFN_seg(e)(x),   p_e = P_j / S,   P = softmax_j(r_j . x)

- renormalised routing (``norm_topk_prob=True``): w_e = P_j / (S sum_chosen P), c = S/2 and MoE(x) = FFN(x)
  exactly;
- Qwen1.5-MoE's unnormalised routing (``norm_topk_prob=False``, the preset): w_e = p_e, c = E*S / (2k) = G*S/(2T)
  and MoE(x) = 1/2 FFN(x) (1 + (G/T) sum_chosen P_j(x)). That is FFN(x) only when the router is uniform over the
  chosen groups' mass (sum_chosen P = T/G); for T = 1 the factor is (1 + G max_j P_j)/2 >= 1, which tends to 1
  as the router's scale goes to 0 (``training.json``'s ``upcycle.function_gap`` records how close a run starts).

``noise`` (relative Gaussian noise on every routed expert matrix) and ``reinit`` (Drop-Upcycling, Nakamura et al.
2025: a fraction of every routed expert's neurons re-drawn from N(mean, std) of its matrices; Qwen2 re-draws 50 %)
break these identities on purpose; both are 0 in the presets.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from moe_compress.errors import UserError
from tools.testbed import experts as experts_impl

SCHEMES = ("copy", "segments")
SCHEME_ARCH = {"copy": "mixtral", "segments": "qwen2_moe"}
SHARED_SHARE = 0.5  # share of the dense MLP the shared expert carries in the "segments" scheme

_MISTRAL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                   "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                   "pad_token_id", "attention_dropout", "sliding_window")


def dense_config(moe_config: PretrainedConfig) -> PretrainedConfig:
    """The config of the dense counterpart of a ``mixtral`` or ``qwen2_moe`` MoE config (see the module doc)."""
    if moe_config.model_type == "mixtral":
        return AutoConfig.for_model("mistral", **{k: copy.deepcopy(getattr(moe_config, k)) for k in _MISTRAL_FIELDS})
    if moe_config.model_type == "qwen2_moe":
        config = copy.deepcopy(moe_config)
        config.intermediate_size = moe_config.shared_expert_intermediate_size
        config.mlp_only_layers = list(range(moe_config.num_hidden_layers))
        return config
    raise ValueError(f"no dense counterpart for model type {moe_config.model_type!r} (mixtral, qwen2_moe)")


def segment_layout(config: PretrainedConfig) -> dict:
    """The ``segments`` scheme's numbers for a qwen2_moe config: D, I, S, G, T and the routed W_d scale c.

    Raises ``UserError`` (one line) when the shapes do not fit: D must be a multiple of I, E of S, k of S.
    """
    dense, width = config.shared_expert_intermediate_size, config.moe_intermediate_size
    n_experts, top_k = config.num_experts, config.num_experts_per_tok
    if dense % width:
        raise UserError(f"fine-grained upcycling cuts the dense MLP (shared_expert_intermediate_size={dense}) into "
                        f"segments of moe_intermediate_size={width}: make the first a multiple of the second")
    segments = dense // width
    if n_experts % segments or top_k % segments:
        raise UserError(f"fine-grained upcycling makes groups of {segments} segments: num_experts={n_experts} and "
                        f"num_experts_per_tok={top_k} must be multiples of {segments}")
    groups, per_token = n_experts // segments, top_k // segments
    routed = 1.0 - SHARED_SHARE
    scale = routed * segments if config.norm_topk_prob else routed * groups * segments / per_token
    return {"dense_intermediate": dense, "expert_intermediate": width, "segments": segments, "groups": groups,
            "groups_per_token": per_token, "routed_down_scale": scale,
            "shared_down_scale": SHARED_SHARE / 0.5}  # sigmoid(0) = 1/2


def _copy_trunk(dense_state: dict[str, torch.Tensor], moe: nn.Module) -> None:
    """Copy every non-MLP tensor (embeddings, attention, norms, lm_head) from the dense state dict into ``moe``."""
    moe_state = moe.state_dict()
    trunk = [k for k in moe_state if ".mlp." not in k]
    missing = [k for k in trunk if k not in dense_state]
    extra = [k for k in dense_state if ".mlp." not in k and k not in moe_state]
    if missing or extra:
        raise ValueError(f"dense and MoE models differ outside the MLPs: missing {missing[:3]}, extra {extra[:3]}")
    for key in trunk:
        if moe_state[key].shape != dense_state[key].shape:
            raise ValueError(f"{key}: dense {tuple(dense_state[key].shape)} vs MoE {tuple(moe_state[key].shape)}")
        moe_state[key].copy_(dense_state[key])


@torch.no_grad()
def mlp_input_stats(dense: nn.Module, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the mean [H] and covariance [H, H] (float64, CPU) of the MLP's inputs over the tokens of
    ``input_ids`` [B, L] (bf16 autocast on CUDA, as in training)."""
    device = next(dense.parameters()).device
    sums: list[list[torch.Tensor]] = [[] for _ in dense.model.layers]

    def hook(i: int):
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            moments = [x.sum(0), x.T @ x, torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)]
            sums[i] = moments if not sums[i] else [a + b for a, b in zip(sums[i], moments)]
        return fn

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(dense.model.layers)]
    was_training = dense.training
    dense.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            dense(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        dense.train(was_training)
    stats = []
    for total, outer, n in sums:
        mean = total / n
        stats.append(((mean).cpu(), (outer / n - torch.outer(mean, mean)).cpu()))
    return stats


def _router_rows(n: int, hidden: int, std: float, stats: tuple[torch.Tensor, torch.Tensor] | None,
                 generator: torch.Generator) -> torch.Tensor:
    """[n, hidden] router rows of norm std * sqrt(hidden) (the norm of N(0, std^2) rows): N(0, std^2) itself,
    or, given the inputs' (mean m, covariance C), z C^{-1/2} (z ~ N(0, I), C with a 1e-3 ridge) projected
    orthogonal to m."""
    rows = torch.randn(n, hidden, generator=generator, dtype=torch.float64)
    if stats is not None:
        mean, cov = (t.double() for t in stats)
        cov = cov + 1e-3 * cov.trace().clamp(min=1e-12) / hidden * torch.eye(hidden, dtype=torch.float64)
        values, vectors = torch.linalg.eigh(cov)
        rows = rows @ (vectors @ torch.diag(values.clamp(min=1e-12).rsqrt()) @ vectors.T)
        if mean.norm() > 0:
            u = mean / mean.norm()
            rows = rows - (rows @ u)[:, None] * u
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-30) * (std * hidden ** 0.5)
    return rows.float()


def _perturb(experts: nn.Module, noise: float, reinit: float, generator: torch.Generator) -> None:
    """Drop-Upcycling re-initialisation of ``reinit`` of every expert's neurons, then relative Gaussian noise."""
    width = experts.down_proj.shape[-1]
    n_reinit = round(reinit * width)
    for e in range(experts.gate_up_proj.shape[0]):
        gate, up, down = experts.gate_up_proj[e, :width], experts.gate_up_proj[e, width:], experts.down_proj[e]
        if n_reinit:
            idx = torch.randperm(width, generator=generator)[:n_reinit]
            for matrix in (gate, up):  # [I, H]: neuron = row
                rows = torch.randn(n_reinit, matrix.shape[1], generator=generator)
                matrix[idx] = rows * matrix.std() + matrix.mean()
            cols = torch.randn(down.shape[0], n_reinit, generator=generator)  # [H, I]: neuron = column
            down[:, idx] = cols * down.std() + down.mean()
        if noise:
            for matrix in (gate, up, down):
                matrix.add_(torch.randn(matrix.shape, generator=generator) * (noise * matrix.std()))


@torch.no_grad()
def upcycle(dense: nn.Module, moe_config: PretrainedConfig, scheme: str, router_std: float, seed: int,
            noise: float = 0.0, reinit: float = 0.0, shuffle: bool = False,
            input_stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[nn.Module, dict]:
    """Build the MoE of ``moe_config`` from the trained ``dense`` counterpart (on CPU, fp32; see the module doc).
    ``input_stats`` (per layer (mean, covariance) of the MLP inputs, ``mlp_input_stats``): router rows whitened
    and orthogonal to the mean (``_router_rows``); None: plain N(0, std^2) rows.

    Returns ``(moe, info)``; ``info`` records the scheme and, per routed expert, the copy (group) and segment of
    the dense MLP it started from.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown upcycling scheme {scheme!r} ({', '.join(SCHEMES)})")
    if SCHEME_ARCH[scheme] != moe_config.model_type:
        raise ValueError(f"scheme {scheme!r} builds {SCHEME_ARCH[scheme]} models, not {moe_config.model_type}")
    generator = torch.Generator().manual_seed(seed)
    moe = AutoModelForCausalLM.from_config(moe_config, experts_implementation=experts_impl.EXPERTS_IMPLEMENTATION)
    dense_state = {k: v.detach().to("cpu", torch.float32) for k, v in dense.state_dict().items()}
    _copy_trunk(dense_state, moe)
    n_experts = moe_config.num_local_experts if scheme == "copy" else moe_config.num_experts
    layout = segment_layout(moe_config) if scheme == "segments" else None
    info = {"scheme": scheme, "router_std": router_std, "router_whitened": input_stats is not None,
            "noise": noise, "reinit": reinit, "shuffle": shuffle, "seed": seed}
    for i, layer in enumerate(moe.model.layers):
        block = layer.mlp
        w_gate, w_up, w_down = (dense_state[f"model.layers.{i}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        ex, router = block.experts, block.gate.weight
        stats = None if input_stats is None else input_stats[i]
        if scheme == "copy":
            ex.gate_up_proj.copy_(torch.cat([w_gate, w_up])[None].expand_as(ex.gate_up_proj))
            ex.down_proj.copy_(w_down[None].expand_as(ex.down_proj))
            router.copy_(_router_rows(router.shape[0], router.shape[1], router_std, stats, generator))
        else:
            width, segments, c = layout["expert_intermediate"], layout["segments"], layout["routed_down_scale"]
            for j in range(layout["groups"]):
                order = torch.randperm(w_gate.shape[0], generator=generator) if shuffle else torch.arange(
                    w_gate.shape[0])
                row = _router_rows(1, router.shape[1], router_std, stats, generator)[0]
                for s in range(segments):
                    e, idx = j * segments + s, order[s * width:(s + 1) * width]
                    ex.gate_up_proj[e, :width] = w_gate[idx]
                    ex.gate_up_proj[e, width:] = w_up[idx]
                    ex.down_proj[e] = c * w_down[:, idx]
                    router[e] = row
            shared = block.shared_expert
            shared.gate_proj.weight.copy_(w_gate)
            shared.up_proj.weight.copy_(w_up)
            shared.down_proj.weight.copy_(layout["shared_down_scale"] * w_down)
            block.shared_expert_gate.weight.zero_()
        _perturb(ex, noise, reinit, generator)
    if scheme == "copy":
        info["experts"] = [{"group": e, "segment": 0} for e in range(n_experts)]
    else:
        info.update(layout)
        info["experts"] = [{"group": e // layout["segments"], "segment": e % layout["segments"]}
                           for e in range(n_experts)]
    return moe, info


@torch.no_grad()
def function_gap(dense: nn.Module, moe: nn.Module, windows: list[torch.Tensor]) -> dict:
    """How far ``moe`` computes ``dense``'s function on token windows (a list of [W, L] tensors): max |logit
    difference|, mean KL(dense || moe) per token (nats) and both models' perplexity on the windows. Runs in eval
    mode, under bf16 autocast on CUDA (as training does), in plain fp32 elsewhere."""
    device = next(moe.parameters()).device
    stats = {"max_abs_logit_diff": 0.0, "kl_sum": 0.0, "nll_dense": 0.0, "nll_moe": 0.0, "tokens": 0}
    dense.eval()
    moe.eval()
    for batch in windows:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            a = dense(input_ids=batch[:, :-1], use_cache=False).logits.float().flatten(0, 1)
            b = moe(input_ids=batch[:, :-1], use_cache=False).logits.float().flatten(0, 1)
        target = batch[:, 1:].flatten()
        log_a, log_b = F.log_softmax(a, -1), F.log_softmax(b, -1)
        stats["max_abs_logit_diff"] = max(stats["max_abs_logit_diff"], (a - b).abs().max().item())
        stats["kl_sum"] += (log_a.exp() * (log_a - log_b)).sum().item()
        stats["nll_dense"] += F.nll_loss(log_a, target, reduction="sum").item()
        stats["nll_moe"] += F.nll_loss(log_b, target, reduction="sum").item()
        stats["tokens"] += target.numel()
    n = max(1, stats["tokens"])
    return {"max_abs_logit_diff": stats["max_abs_logit_diff"], "mean_kl": stats["kl_sum"] / n,
            "dense_perplexity": math.exp(stats["nll_dense"] / n), "moe_perplexity": math.exp(stats["nll_moe"] / n),
            "tokens": stats["tokens"], "autocast": device.type == "cuda"}
