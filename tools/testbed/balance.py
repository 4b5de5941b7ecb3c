"""Router observation and the load-balancing objectives used to train the testbeds.

Notation: T tokens in a forward pass (B sequences of S tokens), E routed experts, k experts per token, L MoE layers.

The loss is computed here from the routers' own outputs (a forward hook on each MoE block's ``gate``), the same
way for every architecture; the models' built-in aux losses (Mixtral's ``output_router_logits``) are not used,
and deepseek_v3 has none in transformers.

- Balance loss (Switch Transformer; DeepSeek-V3's sequence-wise form when computed per sequence):
  ``sum_e f_e * P_e`` with ``f_e = E * count_e / (T * k)`` and ``P_e`` the mean normalised router score of expert e
  (softmax probabilities, or sigmoid scores divided by their sum). A perfectly balanced layer scores 1.
- Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``, keeps softmax router logits small.
- Aux-loss-free balancing (DeepSeek-V3): after every optimizer step,
  ``e_score_correction_bias += u * sign(mean_e(load) - load)``, which only changes the choice of experts.
"""

from __future__ import annotations

import torch
from torch import nn

from tools.testbed.arch import BalanceSettings, moe_blocks


class RouterTap:
    """Keeps the latest router output of every MoE block, and optionally accumulates expert counts.

    After a forward pass ``logits[l]`` is [T, E] (raw router logits) and ``indices[l]`` is [T, k] (chosen experts,
    after any correction bias) for MoE layer l.
    """

    def __init__(self, model: nn.Module):
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no MoE block (a module with `gate` and `experts`)")
        first = self.blocks[0].gate
        self.num_experts = first.num_experts
        self.top_k = first.top_k
        self.sigmoid = hasattr(first, "e_score_correction_bias")
        self.logits: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.indices: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.counts: torch.Tensor | None = None  # [L, E] int64 while counting
        self.count_positions: int | None = None
        self._handles = [block.gate.register_forward_hook(self._hook(i)) for i, block in enumerate(self.blocks)]

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            logits, _, indices = output
            self.logits[layer] = logits
            self.indices[layer] = indices
            if self.counts is not None:
                if self.count_positions is not None:  # rows of count_positions + 1 tokens: count the first ones
                    indices = indices.reshape(-1, self.count_positions + 1, indices.shape[-1])[:, :self.count_positions]
                self.counts[layer] += torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        return hook

    def start_counting(self, device: torch.device, positions: int | None = None) -> None:
        """Reset and start accumulating per-layer expert counts over the following forward passes.

        ``positions``: the passes run rows of ``positions + 1`` tokens and only the first ``positions`` tokens of
        each row are counted (the held-out evaluation feeds windows [W, S + 1] and predicts from the first S).
        """
        self.counts = torch.zeros(len(self.blocks), self.num_experts, dtype=torch.long, device=device)
        self.count_positions = positions

    def stop_counting(self) -> torch.Tensor:
        """Stop counting; return the counts [L, E] (tokens routed to each expert, summed over top-k slots)."""
        counts, self.counts, self.count_positions = self.counts, None, None
        return counts.cpu()

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()

    def step_loads(self) -> torch.Tensor:
        """Expert loads [L, E] (float) of the latest forward pass, without a host sync."""
        loads = torch.zeros(len(self.blocks), self.num_experts, device=self.indices[0].device)
        for layer, indices in enumerate(self.indices):
            flat = indices.reshape(-1)
            loads[layer].scatter_add_(0, flat, torch.ones_like(flat, dtype=loads.dtype))
        return loads

    def balance_loss(self, batch_size: int, per_sequence: bool) -> torch.Tensor:
        """Mean over layers of ``sum_e f_e P_e`` (1 when balanced), per sequence or over the whole batch."""
        groups = batch_size if per_sequence else 1
        total = 0.0
        for logits, indices in zip(self.logits, self.indices):
            logits = logits.float().view(groups, -1, self.num_experts)  # [G, T/G, E]
            if self.sigmoid:
                scores = torch.sigmoid(logits)
                scores = scores / scores.sum(-1, keepdim=True)
            else:
                scores = torch.softmax(logits, dim=-1)
            chosen = indices.reshape(groups, -1)  # [G, T/G * k]
            counts = torch.zeros(groups, self.num_experts, device=logits.device)
            counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=counts.dtype))
            f = counts * self.num_experts / chosen.shape[1]
            total = total + (f * scores.mean(1)).sum(-1).mean()
        return total / len(self.logits)

    def z_loss(self) -> torch.Tensor:
        """Mean over layers and tokens of logsumexp(logits)^2."""
        return sum(torch.logsumexp(l.float(), dim=-1).square().mean() for l in self.logits) / len(self.logits)

    @torch.no_grad()
    def update_correction_bias(self, rate: float) -> None:
        """DeepSeek-V3 aux-loss-free step on every block's ``e_score_correction_bias`` [E] from the latest loads."""
        loads = self.step_loads()
        for block, load in zip(self.blocks, loads):
            block.gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))


class Balancer:
    """Applies one architecture's :class:`BalanceSettings` at every training step."""

    def __init__(self, tap: RouterTap, settings: BalanceSettings):
        if settings.bias_update_rate and not tap.sigmoid:
            raise ValueError("bias_update_rate needs a router with e_score_correction_bias (deepseek_v3)")
        self.tap = tap
        self.settings = settings

    def coefficient(self, progress: float) -> float:
        """Balance-loss coefficient at ``progress`` in [0, 1] of the run."""
        s = self.settings
        frac = min(1.0, progress / s.lb_decay_frac) if s.lb_decay_frac > 0 else 1.0
        return s.lb_start + (s.lb_end - s.lb_start) * frac

    def loss(self, batch_size: int, progress: float) -> torch.Tensor:
        """Auxiliary loss of the latest forward pass (balance loss + router z-loss), weighted."""
        s = self.settings
        loss = self.coefficient(progress) * self.tap.balance_loss(batch_size, s.per_sequence)
        if s.z_loss and not self.tap.sigmoid:
            loss = loss + s.z_loss * self.tap.z_loss()
        return loss

    def after_step(self) -> None:
        """Post-optimizer-step update (the correction-bias step, if enabled)."""
        if self.settings.bias_update_rate:
            self.tap.update_correction_bias(self.settings.bias_update_rate)


def balance_table(counts: torch.Tensor) -> list[dict]:
    """Per-layer balance of expert counts [L, E]: min, max, max/min ratio (inf if an expert is dead), CV."""
    rows = []
    for layer, c in enumerate(counts.double()):
        lo, hi = c.min().item(), c.max().item()
        rows.append({"layer": layer, "min": int(lo), "max": int(hi),
                     "max_over_min": hi / lo if lo > 0 else float("inf"),
                     "cv": (c.std() / c.mean()).item(), "dead": int((c == 0).sum())})
    return rows
