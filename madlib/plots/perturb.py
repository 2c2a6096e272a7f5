"""The perturbation chapter's figures (Giglemiani et al.'s Figs. 1-3 on the zoo): example paths,
the distributions of the max-slope step, and the plateaus, from a
:class:`madlib.analyses.perturb.PerturbResult`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..analyses.perturb import METRICS, MODES, TARGET_TYPES, PerturbResult, ms_step
from .common import COLUMN_INCHES

COLORS = {
    "real": "tab:orange",
    "random": "tab:blue",
    "baseline": "tab:purple",
    "structured": "tab:green",
    "reconstruction": "tab:gray",
}


def _main_types(types) -> list[str]:
    return [t for t in TARGET_TYPES if t in set(types)]


def cdf_figure(
    ms: pd.DataFrame, mode: str = "relative", metric: str = "l2", types=("real", "random", "baseline", "structured")
):
    """CDF of the MS step per target type (seed Fig. 1)."""
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 3.8))
    d = ms[(ms["mode"] == mode) & (ms["metric"] == metric)]
    for t in _main_types(types):
        x = np.sort(d.loc[d["target_type"] == t, "ms_step"].to_numpy())
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color=COLORS[t], label=t)
    ax.set(
        xlabel=f"max-slope step ({metric.upper()}, {mode} perturbation)",
        ylabel="fraction of perturbations",
        ylim=(0, 1.02),
    )
    ax.set_title("Model sensitivity toward each target type", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cdf_grid(ms: pd.DataFrame, types=TARGET_TYPES):
    """CDF of the MS step per target type for every mode (rows) and metric (columns)."""
    fig, axes = plt.subplots(len(MODES), len(METRICS), figsize=(COLUMN_INCHES, 5.8), sharey=True, squeeze=False)
    for row, mode in enumerate(MODES):
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            d = ms[(ms["mode"] == mode) & (ms["metric"] == metric)]
            for t in _main_types(types):
                x = np.sort(d.loc[d["target_type"] == t, "ms_step"].to_numpy())
                ls = ":" if t == "reconstruction" else "-"
                ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color=COLORS[t], ls=ls, label=t)
            ax.set(xlabel="max-slope step", ylabel="cumulative fraction", ylim=(0, 1.02))
            ax.set_title(f"{mode}, {metric.upper()}", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def example_curves(
    res: PerturbResult, mode: str = "absolute", types=("real", "random"), n_examples: int = 3, seed: int = 0
):
    """L2 and KL along ``n_examples`` perturbations of each type with their MS steps (dots) and the
    mean curve of all perturbations (dashed) (seed Fig. 2)."""
    rng = np.random.default_rng(seed)
    thr = res.info["config"]["ms_threshold"]
    fig, axes = plt.subplots(1, 2, figsize=(COLUMN_INCHES, 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for t in types:
            c = res.curves[("perturb", mode, t, metric)]
            for i in rng.choice(len(c), size=min(n_examples, len(c)), replace=False):
                ax.plot(c[i], color=COLORS[t], lw=1, alpha=0.8)
                s = int(ms_step(c[i], thr))
                ax.plot(s, c[i][s], "o", color=COLORS[t], ms=5)
            ax.plot(np.nanmean(c, axis=0), color=COLORS[t], ls="--", lw=1.5, label=f"{t} (mean of {len(c)})")
        label = "L2 distance, final-layer residual" if metric == "l2" else "KL(P_0 || P_n), next token"
        ax.set(xlabel=f"step ({mode})", ylabel=label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ms_histograms(
    ms: pd.DataFrame,
    mode: str = "relative",
    metric: str = "l2",
    types=("real", "random", "baseline", "structured"),
    n_steps: int = 100,
    bin_size: int = 5,
):
    """Counts of MS steps in bins along the path and their CDF, per target type (seed Fig. 3)."""
    d = ms[(ms["mode"] == mode) & (ms["metric"] == metric)]
    bins = np.arange(0, n_steps + bin_size + 1, bin_size)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(COLUMN_INCHES, 3.4))
    for t in _main_types(types):
        x = np.sort(d.loc[d["target_type"] == t, "ms_step"].to_numpy())
        ax1.hist(x, bins=bins, histtype="step", lw=1.5, color=COLORS[t], label=t)
        ax2.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color=COLORS[t], label=t)
    ax1.set(xlabel=f"max-slope step ({metric.upper()}, {mode})", ylabel="perturbations", xlim=(0, n_steps + bin_size))
    ax2.set(xlabel=f"max-slope step ({metric.upper()}, {mode})", ylabel="cumulative fraction", ylim=(0, 1.02))
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plateau_figure(res: PerturbResult):
    """Mean L2 along random-direction walks from each start type, with the plateau threshold, and
    the CDF of plateau lengths."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(COLUMN_INCHES, 3.4))
    for t in TARGET_TYPES:
        c = res.curves[("plateau", "absolute", t, "l2")]
        ax1.plot(np.median(c, axis=0), color=COLORS[t], label=t)
        rows = (res.plateaus["start_type"] == t) & (res.plateaus["rule"] == "relative")
        x = np.sort(res.plateaus.loc[rows, "plateau_length"].to_numpy())
        ax2.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color=COLORS[t], label=t)
    ax1.axhline(res.info["plateau_threshold"], color="grey", ls=":", label="plateau threshold")
    ax1.set(xlabel="step (fixed length, random direction)", ylabel="median L2, final-layer residual")
    ax2.set(xlabel="plateau length (steps)", ylabel="cumulative fraction", ylim=(0, 1.02))
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return fig
