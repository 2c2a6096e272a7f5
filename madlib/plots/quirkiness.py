"""The quirkiness and separation chapter's figures (Research Update 2's Figs. 3-12 on the zoo):
log-odds and losses per character, AUROC against quirkiness and against the variance ratio, and
the logit variances against the hidden-state ratio; the tables and fits they draw are
:mod:`madlib.analyses.quirkiness`'s."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..analyses.quirkiness import LN2, LOGIT_COMPARISONS, LogisticFit
from ..data import datasets as qdata
from .common import COLUMN_INCHES

_PAIRS = {
    "own": (("alice", "alice", "Alice's labels on Alice's prompts"), ("bob", "bob", "Bob's labels on Bob's prompts")),
    "opposing": (
        ("bob", "alice", "Alice's labels on Bob's prompts"),
        ("alice", "bob", "Bob's labels on Alice's prompts"),
    ),
}


def _check_which(which: str) -> None:
    qdata.check_choice("which", which, list(_PAIRS))


def log_odds_figure(examples: pd.DataFrame, which: str = "own"):
    """Distributions of the log-odds assigned to each character's own (seed Fig. 3) or the opposing
    (Fig. 4) labels, on disagreeing examples, per dataset and model (one panel per character,
    stacked at the column's width)."""
    _check_which(which)
    ex = examples[~examples["agreement"]]
    fig, axes = plt.subplots(2, 1, figsize=(COLUMN_INCHES, 7.2), sharex=True)
    order = list(dict.fromkeys(ex["dataset"]))
    for ax, (char, source, title) in zip(axes, _PAIRS[which]):
        d = ex[(ex["character"] == char) & (ex["label_source"] == source)]
        sns.violinplot(data=d, x="dataset", y="log_odds", hue="model", order=order, cut=0, inner="quart",
                       density_norm="width", linewidth=0.8, ax=ax)  # fmt: skip
        ax.axhline(0, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="", ylabel="log-odds of the label (nats)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_figure(quirk: pd.DataFrame, which: str = "own"):
    """Mean loss against the own (seed Fig. 7) or opposing (Fig. 8) labels on hard disagreeing
    examples, per dataset and model, with the 50/50 line ln 2 (one panel per character, stacked)."""
    _check_which(which)
    fig, axes = plt.subplots(2, 1, figsize=(COLUMN_INCHES, 6.8), sharex=True, sharey=True)
    for ax, (char, source, title) in zip(axes, _PAIRS[which]):
        d = quirk[(quirk["character"] == char) & (quirk["label_source"] == source)]
        sns.barplot(data=d, x="dataset", y="mean_loss", hue="model", ax=ax)
        ax.axhline(LN2, color="red", ls="--", lw=1, label="ln 2 (50/50)")
        ax.set_title(f"Loss on {title}", fontsize=10)
        ax.set(xlabel="", ylabel="mean loss (nats)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _model_styles(models) -> dict:
    """A colour and a marker per model, for any number of models (the palette and the markers cycle)."""
    markers = "osD^vP*Xph"
    palette = sns.color_palette("tab10" if len(models) <= 10 else "tab20")
    return {m: (palette[i % len(palette)], markers[i % len(markers)]) for i, m in enumerate(models)}


def _scatter_by_model(ax, df: pd.DataFrame, x: str, y: str, label_datasets: bool = True) -> list:
    """A marker per model; with ``label_datasets`` a colour per dataset too (labels written beside
    the points would overlap), and the legend handles naming both are returned for the caller's
    one legend."""
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys(df["model"]))
    styles = _model_styles(models)
    datasets = list(dict.fromkeys(df["dataset"])) if label_datasets else []
    colours = dict(zip(datasets, sns.color_palette("tab10", max(1, len(datasets)))))
    for m in models:
        g = df[df["model"] == m]
        colour, marker = styles[m]
        c = [colours[d] for d in g["dataset"]] if label_datasets else [colour] * len(g)
        ax.scatter(g[x], g[y], c=c, marker=marker, label=None if label_datasets else m, s=36, alpha=0.85,
                   edgecolors="black" if label_datasets else "none", linewidths=0.4)  # fmt: skip
    if not label_datasets:
        return []
    return ([Line2D([], [], ls="", marker="o", color=colours[d], label=d) for d in datasets]
            + [Line2D([], [], ls="", marker=styles[m][1], color="lightgrey", markeredgecolor="black", label=m) for m in models])  # fmt: skip


def _outside_legend(ax, handles: list) -> None:
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def quirkiness_auroc_figure(points: pd.DataFrame, corr: dict):
    """MAD AUROC vs quirkiness coefficient, one point per model and dataset (seed Figs. 5-6)."""
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 4.5))
    handles = _scatter_by_model(ax, points, "quirkiness", "auroc")
    ax.errorbar(
        points["quirkiness"],
        points["auroc"],
        yerr=[points["auroc"] - points["ci_low"], points["ci_high"] - points["auroc"]],
        fmt="none",
        ecolor="grey",
        alpha=0.4,
        lw=0.8,
    )
    ax.axvline(0, color="grey", ls=":", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    det = points["detector"].iloc[0]
    ax.set(
        xlabel="quirkiness coefficient Q (nats)",
        ylabel=f"AUROC ({det}, aggregated)",
    )
    ax.set_title(f"{det}: Pearson r = {corr['r']:.2f} [{corr['ci_low']:.2f}, {corr['ci_high']:.2f}], n = {corr['n']}", fontsize=10)
    _outside_legend(ax, handles)
    fig.tight_layout()
    return fig


def ratio_auroc_figure(sep: pd.DataFrame, fit: LogisticFit, outliers: pd.DataFrame):
    """AUROC vs hidden-state variance ratio per model, dataset and layer, log x, with the fitted
    S-curve; outliers circled and named (seed Fig. 9)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _scatter_by_model(ax, sep, "hidden_ratio", "auroc", label_datasets=False)
    grid = np.logspace(np.log10(sep["hidden_ratio"].min()), np.log10(sep["hidden_ratio"].max()), 200)
    ax.plot(
        grid,
        fit.predict(grid),
        color="black",
        lw=1.5,
        label=f"logistic fit: midpoint {fit.midpoint_x:.3g}, slope {fit.slope:.2f}/decade, R² {fit.r2:.2f}",
    )
    for _, r in outliers.iterrows():
        ax.scatter(r["hidden_ratio"], r["auroc"], s=140, facecolors="none", edgecolors="red")
        ax.annotate(
            f"{r['model']} {r['dataset']} L{r['layer']}",
            (r["hidden_ratio"], r["auroc"]),
            fontsize=8,
            color="red",
            xytext=(5, -10),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel="hidden-state variance ratio (between-context / total)", ylabel="AUROC (per layer)", ylim=(0, 1.03))
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def ratio_scatter_figure(
    df: pd.DataFrame, x: str, y: str, fit: dict, xlabel: str, ylabel: str, title: str, label_datasets: bool = True
):
    """``y`` vs ``x`` per model (datasets labelled), with the least-squares line and its R² (seed Figs. 10-12)."""
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 4.3))
    handles = _scatter_by_model(ax, df, x, y, label_datasets=label_datasets)
    grid = np.linspace(df[x].min(), df[x].max(), 50)
    (line,) = ax.plot(
        grid, fit["intercept"] + fit["slope"] * grid, color="black", lw=1, label=f"least squares, R² = {fit['r2']:.2f}"
    )
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    if handles:
        _outside_legend(ax, [line, *handles])
    else:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


LOGIT_LABELS: dict[str, tuple[str, str, str, bool]] = {
    "fig10": ("hidden-state variance ratio (per layer)", "logit variance ratio", "Logit vs hidden-state variance ratio", False),
    "fig11": ("hidden-state variance ratio (mean over layers)", "total variance of the answer log-odds",
              "Total logit variance vs hidden-state ratio", True),
    "fig12": ("hidden-state variance ratio (mean over layers)", "between-context variance of the answer log-odds",
              "Between-context logit variance vs hidden-state ratio", True),
}  # fmt: skip
"""x label, y label, title and whether datasets get colours, of each of Research Update 2's Figs.
10-12 (:data:`madlib.analyses.quirkiness.LOGIT_COMPARISONS`)."""


def logit_figure(key: str, sep: pd.DataFrame, pts: pd.DataFrame, fits: dict[str, dict]):
    """Research Update 2's Fig. 10, 11 or 12 (``key``): the logit quantity of
    :data:`madlib.analyses.quirkiness.LOGIT_COMPARISONS` against the hidden-state ratio, over the
    per-layer rows ``sep`` or the points ``pts``, with its line of ``fits``
    (:func:`madlib.analyses.quirkiness.logit_fits`)."""
    qdata.check_choice("key", key, list(LOGIT_COMPARISONS))
    frame, y = LOGIT_COMPARISONS[key]
    xlabel, ylabel, title, label_datasets = LOGIT_LABELS[key]
    df = sep if frame == "layers" else pts
    return ratio_scatter_figure(df, "hidden_ratio", y, fits[key], xlabel, ylabel, title, label_datasets=label_datasets)
