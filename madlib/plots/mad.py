"""The MAD chapter's tables and figures: method x dataset tables with recall beside AUROC
(:func:`metric_table`, :func:`method_tables`), per-layer curves, heatmaps, score histograms and
the aggregated bars of EleutherAI's Research Update 2."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .common import COLUMN_INCHES


METRIC_LABELS: dict[str, str] = {"auroc": "AUROC", "recall_fpr1": "R@1%", "recall_fpr5": "R@5%"}
"""Short column labels of the MAD tables: AUROC, and recall at 1% / 5% false-positive rate
(threshold at that quantile of the held-out trusted scores)."""


def metric_table(auc: pd.DataFrame, methods: list[str], columns: str | list[str] = "dataset",
                 metrics: tuple[str, ...] = ("auroc", "recall_fpr1"), caption: str = "", **where):  # fmt: skip
    """A MAD table for reading: one row per method (in ``methods``' order), a column per value of
    ``columns`` and metric (AUROC beside recall at 1% FPR by default), means over any other rows
    left by ``where`` (column -> value or list of values, e.g. ``model="zoo-gpt2", layer="aggregated"``),
    rounded to two decimals, with a caption. The CSVs keep full precision."""
    a = auc
    for k, v in where.items():
        a = a[a[k].isin(v)] if isinstance(v, (list, tuple)) else a[a[k] == v]
    cols = [columns] if isinstance(columns, str) else list(columns)
    keys = list(dict.fromkeys(map(tuple, a[cols].to_numpy())))
    t = a.pivot_table(index="method", columns=cols, values=list(metrics), aggfunc="mean")
    t.columns = [(*c[1:], c[0]) for c in t.columns]
    t = t.reindex(columns=[(*k, m) for k in keys for m in metrics])
    t.columns = pd.MultiIndex.from_tuples([(*k, METRIC_LABELS.get(m, m)) for k in keys for m in metrics], names=[*cols, ""])
    t = t.reindex([m for m in methods if m in t.index])
    t.index.name = None
    return t.style.format(precision=2, na_rep="–").set_caption(caption)


def method_layer_curves(auc: pd.DataFrame, methods: list[str], subset: str = "all", ncols: int = 2):
    """Per-layer AUROC with bootstrap CI bands for one model: one panel per method, one line per
    dataset (seed Fig. 1, for every method), drawn at the column's width (two panels a row)."""
    d = auc[auc["method"].isin(methods) & (auc["subset"] == subset) & auc["layer"].str.isdigit()].copy()
    d["layer"] = d["layer"].astype(int)
    shown = [m for m in methods if m in set(d["method"])]
    nrows = max(1, -(-len(shown) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(COLUMN_INCHES, 2.1 * nrows + 0.9), sharey=True, squeeze=False)
    palette = dict(zip(sorted(d["dataset"].unique()), sns.color_palette("tab10")))
    for ax, m in zip(axes.flat, shown):
        for ds, g in d[d["method"] == m].groupby("dataset"):
            g = g.sort_values("layer")
            ax.plot(g["layer"], g["auroc"], marker="o", ms=3, color=palette[ds], label=ds)
            ax.fill_between(g["layer"], g["ci_low"], g["ci_high"], color=palette[ds], alpha=0.12)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_title(m, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xticks(sorted(d.loc[d["method"] == m, "layer"].unique()))
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("AUROC", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("layer", fontsize=8)
    model = ", ".join(d["model"].unique())
    height = fig.get_size_inches()[1]
    fig.suptitle(f"{model}: AUROC per layer ({subset} test prompts; bands: 95% bootstrap intervals)", fontsize=10, y=1 - 0.05 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))
    if shown:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, 1 - 0.3 / height), frameon=False)  # fmt: skip
    return fig


def method_heatmap(auc: pd.DataFrame, model: str, layer: str = "aggregated", subset: str = "all"):
    """Method x dataset AUROC of one model as an annotated heatmap (skylines marked)."""
    d = auc[(auc["model"] == model) & (auc["layer"] == layer) & (auc["subset"] == subset)]
    order = list(dict.fromkeys(d["method"]))
    table = d.pivot_table(index="method", columns="dataset", values="auroc").reindex(order)
    table = table[[c for c in dict.fromkeys(d["dataset"]) if c in table.columns]]
    table.index = [f"{m} (skyline)" if d.loc[d["method"] == m, "skyline"].any() else m for m in table.index]
    fig, ax = plt.subplots(figsize=(min(COLUMN_INCHES, 0.6 * table.shape[1] + 3.2), 0.26 * table.shape[0] + 1.6))
    sns.heatmap(table, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="RdBu_r", center=0.5, cbar_kws=dict(label="AUROC"),
                annot_kws=dict(fontsize=7), ax=ax)  # fmt: skip
    ax.set_title(f"{model}: {layer} AUROC, {subset} test prompts", fontsize=10)
    ax.set(xlabel="", ylabel="")
    ax.tick_params(axis="x", rotation=40, labelsize=8)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return fig


def score_histograms(scores: pd.DataFrame, methods: list[str], layer: str):
    """Normal vs anomalous test scores per dataset (rows) and method (columns) at one layer."""
    d = scores[scores["method"].isin(methods) & (scores["layer"] == layer)]
    datasets = list(dict.fromkeys(d["dataset"]))
    fig, axes = plt.subplots(len(datasets), len(methods), figsize=(COLUMN_INCHES, 1.1 * len(datasets) + 0.8), squeeze=False)
    for i, ds in enumerate(datasets):
        for j, m in enumerate(methods):
            ax = axes[i, j]
            g = d[(d["method"] == m) & (d["dataset"] == ds)]
            if len(g):
                bins = np.histogram_bin_edges(g["score"], bins=30)
                for anomalous, colour, name in ((False, "tab:blue", "normal"), (True, "tab:red", "anomalous")):
                    ax.hist(g.loc[g["is_anomalous"] == anomalous, "score"], bins=bins, alpha=0.55, color=colour, label=name, density=True)
            ax.set_yticks([])
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(m, fontsize=8)
            if j == 0:
                ax.set_ylabel(ds, fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]))
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, frameon=False)
    return fig


def aggregated_bars(auc: pd.DataFrame, method: str, layer: str = "aggregated", subset: str = "all"):
    """AUROC per dataset of one method, bars per model with CI whiskers (seed Fig. 2)."""
    d = auc[(auc["method"] == method) & (auc["subset"] == subset) & (auc["layer"] == layer)]
    datasets = list(dict.fromkeys(d["dataset"]))
    models = list(dict.fromkeys(d["model"]))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 3.6))
    x = np.arange(len(datasets))
    for i, m in enumerate(models):
        g = d[d["model"] == m].set_index("dataset").reindex(datasets)
        err = np.vstack([g["auroc"] - g["ci_low"], g["ci_high"] - g["auroc"]])
        ax.bar(x + (i - (len(models) - 1) / 2) * width, g["auroc"], width, yerr=err, capsize=3, label=m)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks(x, datasets, rotation=30, ha="right")
    ax.set(ylabel=f"AUROC ({layer})", ylim=(0, 1.05))
    ax.set_title(f"{method}: {layer} over layers, {subset} test prompts (whiskers: 95% intervals)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def method_tables(auc: pd.DataFrame, methods: list[str], layer: str, task: str = "quirky", what: str = "aggregated AUROC") -> list:
    """One :func:`metric_table` per model of ``auc`` (rows ``methods``, a column per dataset) at
    ``layer`` on ``task``, all test prompts, captioned "<model>: <what> and recall at 1% FPR"."""
    return [metric_table(auc, methods, model=name, layer=layer, task=task, subset="all",
                         caption=f"{name}: {what} and recall at 1% FPR (R@1%), all test prompts")
            for name in auc["model"].unique()]  # fmt: skip


def seed_table(by_seed: pd.DataFrame):
    """The table over fine-tuning seeds (:func:`madlib.mad.chapter.over_seeds_table`) for reading:
    AUROC mean, lowest and highest and mean recall at 1% FPR per method, model and dataset, two
    decimals, with a caption; an empty table as it is."""
    if not len(by_seed):
        return by_seed
    shown = by_seed.set_index(["method", "model", "dataset"])[["mean", "low", "high", "recall_fpr1_mean", "seeds"]]
    return shown.rename(columns={"mean": "AUROC mean", "low": "lowest", "high": "highest", "recall_fpr1_mean": "R@1% mean"}).style.format(
        precision=2).set_caption("Aggregated AUROC over fine-tuning seeds, and mean recall at 1% FPR")
