"""The drift chapter's figures: the overlap on the task set against the general set
(:func:`plot_task_vs_general`), the candidate rates against k (:func:`plot_k_ablation`) and the
audit matrix (:func:`plot_drift_matrix`), from the table of :func:`madlib.analyses.drift.drift_table`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..analyses.drift import GENERAL, RATES, SIGNALS
from .common import COLUMN_INCHES


def plot_task_vs_general(table: pd.DataFrame, k: int):
    """Intersection mean of each fine-tune on its task set and on the general set, at ``k``."""
    import matplotlib.pyplot as plt

    t = table[table["k"] == k]
    own = t[t["is_task"]].set_index("task")["intersection_mean"]
    gen = t[t["eval_set"] == GENERAL].set_index("task")["intersection_mean"]
    tasks = list(own.index)
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 3.6))
    ax.bar(x - 0.2, own[tasks], 0.4, label="task set S")
    ax.bar(x + 0.2, gen[tasks], 0.4, label="general set G")
    ax.axhline(k, color="grey", ls=":", lw=1, label=f"k = {k} (no drift)")
    ax.set_xticks(x, tasks, rotation=20)
    ax.set(ylabel=f"intersection mean (top-{k} latents)", ylim=(0, k * 1.3))
    ax.set_title("Overlap of top-k SAE latents, base vs fine-tuned", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    return fig


def plot_k_ablation(table: pd.DataFrame):
    """The three candidate rates (task set against general set) as functions of k, one line per fine-tune."""
    import matplotlib.pyplot as plt

    t = table[table["is_task"]].sort_values("k")
    fig, axes = plt.subplots(len(RATES), 1, figsize=(COLUMN_INCHES, 2.5 * len(RATES) + 0.4), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, rate in zip(axes, RATES):
        for task, g in t.groupby("task", sort=False):
            ax.plot(g["k"], g[rate], marker="o", ms=3, label=task)
        ax.axhline(0, color="grey", lw=1, ls=":")
        ax.set_title(rate, fontsize=10)
        ax.set(ylabel="rate (S vs G)")
    axes[-1].set_xlabel("k (top-k latents per token)")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_drift_matrix(table: pd.DataFrame, k: int):
    """Fine-tunes (rows) × candidate sets (columns) under each audit signal, the true task framed."""
    import matplotlib.pyplot as plt

    t = table[(table["k"] == k) & (table["eval_set"] != GENERAL)]
    rows = list(dict.fromkeys(t["task"]))
    cols = list(dict.fromkeys(t["eval_set"]))
    fig, axes = plt.subplots(len(SIGNALS), 1, figsize=(COLUMN_INCHES, (0.42 * len(rows) + 1.9) * len(SIGNALS)), squeeze=False)
    axes = axes[:, 0]
    for ax, (signal, (col, lower)) in zip(axes, SIGNALS.items()):
        m = t.pivot(index="task", columns="eval_set", values=col).loc[rows, cols].to_numpy()
        ax.imshow(m, cmap="viridis_r" if lower else "viridis", aspect="auto")
        bright = (m - m.min()) / (np.ptp(m) or 1.0)
        bright = 1 - bright if lower else bright  # viridis is bright at its top
        for i in range(len(rows)):
            for j in range(len(cols)):
                colour = "k" if bright[i, j] > 0.6 else "w"
                ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=8, color=colour)
            if rows[i] in cols:
                j = cols.index(rows[i])
                ax.add_patch(plt.Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, ec="red", lw=2))
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(f"{signal} ({'lower' if lower else 'higher'} = more drift)", fontsize=10)
        ax.set(xlabel="candidate set", ylabel="fine-tuned on")
    fig.tight_layout()
    return fig
