"""PNG figures of expert statistics (matplotlib, Agg canvas; no pyplot state is touched).

Every function takes plain arrays, writes one PNG and returns its path:

- `usage_heatmap`: share of tokens that select each expert, layers x experts;
- `similarity_grid`: one [E, E] similarity matrix per layer (at most ``max_panels`` layers, evenly spaced);
- `domain_usage`: the usage heatmap of each calibration domain, on one colour scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure(width: float, height: float) -> Figure:
    """A matplotlib figure of ``width`` x ``height`` inches with its own Agg canvas (no pyplot state), as every
    plot of the package draws them."""
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _ticks(ax, n: int, labels: Sequence, axis: str, max_labels: int = 32) -> None:
    step = max(1, math.ceil(n / max_labels))
    pos = list(range(0, n, step))
    getattr(ax, f"set_{axis}ticks")(pos)
    getattr(ax, f"set_{axis}ticklabels")([str(labels[p]) for p in pos], fontsize=7)


def usage_heatmap(share: np.ndarray, layer_ids: Sequence[int], path: str | Path, top_k: int | None = None,
                  title: str = "Expert usage: share of tokens selecting each expert") -> Path:
    """share [L, E]: fraction of tokens whose top-k contains the expert (each row sums to top_k)."""
    n_layers, n_exp = share.shape
    fig = figure(min(18, 3 + 0.28 * n_exp), min(14, 1.8 + 0.32 * n_layers))
    ax = fig.add_subplot()
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    _ticks(ax, n_exp, list(range(n_exp)), "x")
    _ticks(ax, n_layers, list(layer_ids), "y")
    if top_k:
        title += f" (uniform = {top_k / n_exp:.3f})"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of tokens")
    fig.savefig(path)
    return Path(path)


def _panel_layout(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def similarity_grid(matrices: dict[int, np.ndarray], path: str | Path, title: str, max_panels: int = 16,
                    vmin: float | None = -1.0, vmax: float | None = 1.0) -> Path:
    """One heatmap per layer of an [E, E] matrix ({layer: matrix}); layers evenly subsampled to max_panels."""
    layers = sorted(matrices)
    if len(layers) > max_panels:
        pick = np.linspace(0, len(layers) - 1, max_panels).round().astype(int)
        layers = [layers[i] for i in sorted(set(pick.tolist()))]
        title += f" ({len(layers)} of {len(matrices)} layers)"
    rows, cols = _panel_layout(len(layers))
    fig = figure(2.6 * cols + 1, 2.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax, layer in zip(axes.flat, layers):
        im = ax.imshow(matrices[layer], cmap="RdBu_r", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path)
    return Path(path)


def domain_usage(shares: np.ndarray, domains: Sequence[str], layer_ids: Sequence[int], path: str | Path) -> Path:
    """shares [D, L, E]: per domain, the share of that domain's tokens selecting each expert."""
    n_dom, n_layers, n_exp = shares.shape
    rows, cols = _panel_layout(n_dom)
    fig = figure(min(24, cols * min(9, 2 + 0.22 * n_exp) + 1), rows * min(8, 1.5 + 0.3 * n_layers) + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = float(shares.max()) if shares.size else 1.0
    im = None
    for d, ax in enumerate(axes.flat):
        if d >= n_dom:
            ax.axis("off")
            continue
        im = ax.imshow(shares[d], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(str(domains[d]), fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        _ticks(ax, n_exp, list(range(n_exp)), "x", 16)
        _ticks(ax, n_layers, list(layer_ids), "y", 16)
    fig.suptitle("Expert usage per calibration domain (share of the domain's tokens)", fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of tokens")
    fig.savefig(path)
    return Path(path)
