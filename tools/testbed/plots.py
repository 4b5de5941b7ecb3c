"""Figures of a testbed run: the loss curve and the per-domain expert usage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_loss_curve(lm_loss: list[float], aux_loss: list[float], tokens_per_step: int, title: str,
                    path: Path) -> None:
    """LM loss (raw and EMA-smoothed) and auxiliary loss against tokens seen, saved as a PNG at ``path``."""
    tokens = (np.arange(1, len(lm_loss) + 1) * tokens_per_step) / 1e6
    smooth, ema = [], lm_loss[0]
    for value in lm_loss:
        ema = 0.98 * ema + 0.02 * value
        smooth.append(ema)
    fig, (ax_lm, ax_aux) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    ax_lm.plot(tokens, lm_loss, color="tab:blue", alpha=0.25, linewidth=0.6, label="per step")
    ax_lm.plot(tokens, smooth, color="tab:blue", linewidth=1.5, label="EMA (0.98)")
    ax_lm.set_ylabel("train LM loss (nats/token)")
    ax_lm.set_ylim(min(smooth) - 0.2, min(max(smooth[len(smooth) // 20:]) + 0.5, max(lm_loss)))
    ax_lm.legend()
    ax_lm.grid(alpha=0.3)
    ax_lm.set_title(title)
    ax_aux.plot(tokens, aux_loss, color="tab:orange", linewidth=0.8)
    ax_aux.set_ylabel("aux loss")
    ax_aux.set_xlabel("tokens seen (M)")
    ax_aux.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_usage(counts: dict[str, list[list[int]]], title: str, path: Path) -> None:
    """Heatmaps (one per MoE layer) of each domain's share of routed tokens per expert, relative to uniform.

    Args:
        counts: domain -> [L][E] expert counts on held-out text.
        title: figure title.
        path: PNG destination.
    """
    domains = list(counts)
    usage = np.array([counts[d] for d in domains], dtype=float)  # [D, L, E]
    n_layers, n_experts = usage.shape[1:]
    share = usage / usage.sum(-1, keepdims=True) * n_experts  # 1 = uniform
    cols = min(n_layers, 3 if n_experts <= 16 else 2)
    rows = (n_layers + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(0.3 * n_experts * cols + 2.5, 0.3 * len(domains) * rows + 1.2))
    vmax = max(2.0, float(np.quantile(share, 0.99)))
    image = None
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.axis("off")
            continue
        image = ax.imshow(share[:, layer], cmap="magma", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_yticks(range(len(domains)), domains if layer % cols == 0 else [], fontsize=8)
        ax.set_xticks(range(0, n_experts, max(1, n_experts // 8)))
        ax.tick_params(axis="x", labelsize=7)
        if layer + cols >= n_layers:
            ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="share x E (1 = uniform)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_upcycled_run(lm_loss: list[float], aux_loss: list[float], moe_from_step: int, tokens_per_step: int,
                      similarity: dict[str, dict], title: str, path: Path) -> None:
    """The one figure of an upcycled testbed run, saved as a PNG at ``path``: the LM loss of both phases (dense,
    then MoE from step ``moe_from_step``; raw and EMA-smoothed), the MoE phase's auxiliary loss, and the mean
    pairwise expert cosine (weights, outputs) per MoE layer at MoE step 0 and at the end.

    Args:
        lm_loss, aux_loss: per-step losses of the whole run (aux 0 in the dense phase).
        similarity: ``{"start": report, "end": report}`` from ``similarity.expert_similarity``.
    """
    tokens = (np.arange(1, len(lm_loss) + 1) * tokens_per_step) / 1e6
    smooth, ema = [], lm_loss[0]
    for value in lm_loss:  # one EMA across the upcycling: no artificial jump at the boundary
        ema = 0.98 * ema + 0.02 * value
        smooth.append(ema)
    fig = plt.figure(figsize=(11, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[2.2, 1], height_ratios=[3, 1])
    ax_lm = fig.add_subplot(grid[0, 0])
    ax_aux = fig.add_subplot(grid[1, 0], sharex=ax_lm)
    ax_sim = fig.add_subplot(grid[:, 1])
    cut = tokens[moe_from_step] if moe_from_step < len(tokens) else tokens[-1]
    for part, color, label in ((slice(0, moe_from_step), "tab:gray", "dense"),
                               (slice(moe_from_step, None), "tab:blue", "MoE")):
        ax_lm.plot(tokens[part], lm_loss[part], color=color, alpha=0.25, linewidth=0.6)
        ax_lm.plot(tokens[part], smooth[part], color=color, linewidth=1.5, label=f"{label} (EMA 0.98)")
    for ax in (ax_lm, ax_aux):
        ax.axvline(cut, color="black", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    ax_lm.set_ylim(min(smooth) - 0.2, min(max(smooth[len(smooth) // 20:]) + 0.5, max(lm_loss)))
    ax_lm.set_ylabel("train LM loss (nats/token)")
    ax_lm.legend()
    ax_lm.set_title(title)
    ax_aux.plot(tokens[moe_from_step:], aux_loss[moe_from_step:], color="tab:orange", linewidth=0.8)
    ax_aux.set_ylabel("aux loss")
    ax_aux.set_xlabel("tokens seen (M); dashed: upcycled")
    styles = {("start", "weight"): ("tab:gray", "o", "--"), ("end", "weight"): ("tab:blue", "o", "-"),
              ("start", "output"): ("tab:gray", "s", ":"), ("end", "output"): ("tab:red", "s", "-")}
    for (when, kind), (color, marker, line) in styles.items():
        layers = similarity[when]["layers"]
        ax_sim.plot([r["layer"] for r in layers], [r[kind]["mean"] for r in layers], color=color, marker=marker,
                    linestyle=line, label=f"{kind}, {'MoE step 0' if when == 'start' else 'end'}")
    ax_sim.set_ylim(-0.05, 1.05)
    ax_sim.set_xlabel("decoder layer")
    ax_sim.set_ylabel("mean pairwise expert cosine")
    ax_sim.set_title("expert similarity", fontsize=10)
    ax_sim.grid(alpha=0.3)
    ax_sim.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
