"""PNG plots of routing statistics, drawn with matplotlib's object API on the Agg canvas.

matplotlib is imported inside each function (the library never needs it), and no global state is
touched: figures are ``matplotlib.figure.Figure`` objects, not pyplot's, so plotting neither
switches the backend of a user's session nor leaks open figures.

Every function writes one PNG at ``path`` and returns ``path``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from moe_gen.durable import atomic_open

__all__ = [
    "plot_expert_heatmaps", "plot_entropy_by_layer", "plot_interference",
    "plot_dendrogram", "plot_heatmaps_side_by_side",
]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str) -> str:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def _vmax(*shares: np.ndarray) -> float:
    """Top of the colour scale: the largest share shown (with top-k routing a group's share of one
    expert is at most 1/k, so a fixed scale to 1 would waste half the colours)."""
    values = [float(np.max(s)) for s in shares if np.size(s)]
    return max(values + [1e-9])


def _heatmap(ax, share_EG: np.ndarray, groups: Sequence[str], title: str, *, vmax: float = 1.0,
             colorbar: bool = True):
    """One expert × group panel of shares in [0, vmax]."""
    image = ax.imshow(share_EG, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(share_EG.shape[0]))
    ax.set_ylabel("expert", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.05)
    return image


def plot_expert_heatmaps(share_LGE: np.ndarray, layer_names: Sequence[str], group_names: Sequence[str], path: str,
                         *, title: str = "share of each task's assignments per expert") -> str:
    """One expert × group heatmap per layer (a grid of panels): groups are tasks or modalities.
    Layer by layer, never summed over layers: expert ids of different layers are unrelated (a
    modality that every layer sends to one expert, a different one in each, pooled over layers
    looked spread over several).

    Args:
        share_LGE: ``[L, G, E]`` share of each group's assignments that each expert took.
        layer_names: ``[L]`` panel titles; group_names: ``[G]`` column labels.
    """
    share_LGE = np.asarray(share_LGE, dtype=float)
    L = max(share_LGE.shape[0], 1)
    cols = min(L, 4)
    rows = math.ceil(L / cols)
    fig = _figure(3.2 * cols + 0.5, 2.8 * rows + 0.6)
    fig.suptitle(title, fontsize=10)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for layer, ax in enumerate(axes):
        if layer >= share_LGE.shape[0]:
            ax.axis("off")
            continue
        _heatmap(ax, share_LGE[layer].T, group_names, layer_names[layer], vmax=_vmax(share_LGE),
                 colorbar=(layer % cols == cols - 1 or layer == share_LGE.shape[0] - 1))
    return _save(fig, path)


def plot_entropy_by_layer(series: dict[str, Sequence[float]], max_bits: Sequence[float], layer_names: Sequence[str],
                          path: str) -> str:
    """Mean routing entropy (bits) per layer, one line per model or group, with the uniform-router
    bound log2 E dashed."""
    fig = _figure(max(4.5, 0.7 * len(layer_names) + 2.5), 3.4)
    ax = fig.subplots()
    x = np.arange(len(layer_names))
    for label, values in series.items():
        ax.plot(x, list(values), marker="o", label=label)
    if len(max_bits):
        ax.plot(x, list(max_bits), linestyle="--", color="grey", label="log2 E (uniform)")
    ax.set_xticks(x)
    ax.set_xticklabels(layer_names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("entropy (bits)")
    ax.set_ylim(bottom=0)
    ax.set_title("router entropy by layer", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_interference(matrix_NN: np.ndarray, task_names: Sequence[str], path: str, *,
                      title: Optional[str] = None) -> str:
    """Heatmap of the interference matrix I[i, j] (row i: the task whose loss changes; column j:
    the task whose gradient step is taken), on a diverging scale from -1 (hurts) to 1 (helps);
    undefined cells (NaN: a task with a zero gradient) are grey and marked "–", not drawn as 0."""
    from matplotlib import colormaps

    matrix_NN = np.asarray(matrix_NN, dtype=float)
    N = len(task_names)
    fig = _figure(1.0 * N + 3.0, 0.8 * N + 2.4)
    ax = fig.subplots()
    cmap = colormaps["RdBu"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(matrix_NN), cmap=cmap, vmin=-1.0, vmax=1.0)
    for i in range(N):
        for j in range(N):
            value = matrix_NN[i, j]
            ax.text(j, i, "–" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(N))
    ax.set_xticklabels(task_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(N))
    ax.set_yticklabels(task_names, fontsize=7)
    ax.set_xlabel("step along task j's gradient")
    ax.set_ylabel("change of task i's loss")
    ax.set_title(title or "task interference (cosine of task gradients)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.05)
    return _save(fig, path)


def plot_dendrogram(linkage_Z: np.ndarray, task_names: Sequence[str], path: str) -> str:
    """Dendrogram of the task-affinity clustering (scipy ``linkage`` matrix ``[N-1, 4]``)."""
    from scipy.cluster.hierarchy import dendrogram

    fig = _figure(max(4.0, 0.8 * len(task_names) + 2.0), 3.4)
    ax = fig.subplots()
    dendrogram(np.asarray(linkage_Z, dtype=float), labels=list(task_names), ax=ax, leaf_rotation=30,
               leaf_font_size=8, color_threshold=0)
    ax.set_ylabel("Jensen-Shannon distance")
    ax.set_title("tasks clustered by expert usage", fontsize=10)
    return _save(fig, path)


def plot_heatmaps_side_by_side(share_a_LGE: np.ndarray, share_b_LGE: np.ndarray, layers_a: Sequence[str],
                               layers_b: Sequence[str], group_names: Sequence[str], labels: Sequence[str],
                               path: str) -> str:
    """Two models' expert × task heatmaps, one row per layer, model A left and model B right
    (a model with fewer MoE layers leaves its panels empty)."""
    share_a_LGE, share_b_LGE = np.asarray(share_a_LGE, dtype=float), np.asarray(share_b_LGE, dtype=float)
    rows = max(share_a_LGE.shape[0], share_b_LGE.shape[0], 1)
    fig = _figure(7.2, 2.6 * rows + 0.6)
    fig.suptitle("share of each task's assignments per expert", fontsize=10)
    axes = fig.subplots(rows, 2, squeeze=False)
    vmax = _vmax(share_a_LGE, share_b_LGE)
    image = None
    for column, (share, layers, label) in enumerate(((share_a_LGE, layers_a, labels[0]),
                                                     (share_b_LGE, layers_b, labels[1]))):
        for layer in range(rows):
            ax = axes[layer, column]
            if layer >= share.shape[0]:
                ax.axis("off")
                if layer == 0:
                    ax.set_title(f"{label}: no MoE layer", fontsize=9)
                continue
            image = _heatmap(ax, share[layer].T, group_names, f"{label}: {layers[layer]}", vmax=vmax, colorbar=False)
    if image is not None:  # one scale for both models
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.04)
    return _save(fig, path)
