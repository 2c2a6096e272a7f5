"""Figures shared by the notebooks; :func:`savefig` decides where they go."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .paths import atomic_path, results_dir


def savefig(fig, analysis: str, name: str) -> None:
    """Save ``fig`` as ``<results>/<analysis>/<name>.png`` (atomically). Nothing is returned, so a
    notebook cell ending in this call shows the figure, not a path of the build."""
    with atomic_path(results_dir(analysis) / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def write_table(df: pd.DataFrame, analysis: str, name: str) -> None:
    """Write a tidy table as ``<results>/<analysis>/<name>.csv`` (atomically; nothing is returned,
    as for :func:`savefig`)."""
    with atomic_path(results_dir(analysis) / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)


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


def method_layer_curves(auc: pd.DataFrame, methods: list[str], subset: str = "all", ncols: int = 4):
    """Per-layer AUROC with bootstrap CI bands for one model: one panel per method, one line per
    dataset (seed Fig. 1, for every method)."""
    d = auc[auc["method"].isin(methods) & (auc["subset"] == subset) & auc["layer"].str.isdigit()].copy()
    d["layer"] = d["layer"].astype(int)
    shown = [m for m in methods if m in set(d["method"])]
    nrows = max(1, -(-len(shown) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), sharey=True, squeeze=False)
    palette = dict(zip(sorted(d["dataset"].unique()), sns.color_palette("tab10")))
    for ax, m in zip(axes.flat, shown):
        for ds, g in d[d["method"] == m].groupby("dataset"):
            g = g.sort_values("layer")
            ax.plot(g["layer"], g["auroc"], marker="o", ms=3, color=palette[ds], label=ds)
            ax.fill_between(g["layer"], g["ci_low"], g["ci_high"], color=palette[ds], alpha=0.12)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set(title=m, ylim=(0, 1.02))
        ax.set_xticks(sorted(d.loc[d["method"] == m, "layer"].unique()))
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("AUROC")
    if shown:
        axes.flat[0].legend(fontsize=7, loc="lower left")
    model = ", ".join(d["model"].unique())
    fig.suptitle(f"{model}: AUROC per layer ({subset} test prompts)")
    fig.tight_layout()
    return fig


def method_heatmap(auc: pd.DataFrame, model: str, layer: str = "aggregated", subset: str = "all"):
    """Method x dataset AUROC of one model as an annotated heatmap (skylines marked)."""
    d = auc[(auc["model"] == model) & (auc["layer"] == layer) & (auc["subset"] == subset)]
    order = list(dict.fromkeys(d["method"]))
    table = d.pivot_table(index="method", columns="dataset", values="auroc").reindex(order)
    table.index = [f"{m} (skyline)" if d.loc[d["method"] == m, "skyline"].any() else m for m in table.index]
    fig, ax = plt.subplots(figsize=(1.0 * table.shape[1] + 3.5, 0.32 * table.shape[0] + 1.5))
    sns.heatmap(table, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="RdBu_r", center=0.5, cbar_kws=dict(label="AUROC"),
                annot_kws=dict(fontsize=7), ax=ax)  # fmt: skip
    ax.set(title=f"{model}: {layer} AUROC, {subset} test prompts", xlabel="", ylabel="")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def score_histograms(scores: pd.DataFrame, methods: list[str], layer: str):
    """Normal vs anomalous test scores per method (rows) and dataset (columns) at one layer."""
    d = scores[scores["method"].isin(methods) & (scores["layer"] == layer)]
    datasets = list(dict.fromkeys(d["dataset"]))
    fig, axes = plt.subplots(len(methods), len(datasets), figsize=(2.6 * len(datasets), 2.0 * len(methods)), squeeze=False)
    for i, m in enumerate(methods):
        for j, ds in enumerate(datasets):
            ax = axes[i, j]
            g = d[(d["method"] == m) & (d["dataset"] == ds)]
            if len(g):
                bins = np.histogram_bin_edges(g["score"], bins=30)
                for anomalous, colour, name in ((False, "tab:blue", "normal"), (True, "tab:red", "anomalous")):
                    ax.hist(g.loc[g["is_anomalous"] == anomalous, "score"], bins=bins, alpha=0.55, color=colour, label=name, density=True)
            ax.set_yticks([])
            if i == 0:
                ax.set_title(ds, fontsize=9)
            if j == 0:
                ax.set_ylabel(m, fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def aggregated_bars(auc: pd.DataFrame, method: str, layer: str = "aggregated", subset: str = "all"):
    """AUROC per dataset of one method, bars per model with CI whiskers (seed Fig. 2)."""
    d = auc[(auc["method"] == method) & (auc["subset"] == subset) & (auc["layer"] == layer)]
    datasets = list(dict.fromkeys(d["dataset"]))
    models = list(dict.fromkeys(d["model"]))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.3 * len(datasets) + 2, 3.8))
    x = np.arange(len(datasets))
    for i, m in enumerate(models):
        g = d[d["model"] == m].set_index("dataset").reindex(datasets)
        err = np.vstack([g["auroc"] - g["ci_low"], g["ci_high"] - g["auroc"]])
        ax.bar(x + (i - (len(models) - 1) / 2) * width, g["auroc"], width, yerr=err, capsize=3, label=m)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks(x, datasets, rotation=30)
    ax.set(ylabel=f"AUROC ({layer})", ylim=(0, 1.05), title=f"{method}: {layer} over layers, {subset} test examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def own_accuracy_seeds(grid: pd.DataFrame, bars: dict[str, float] | None = None):
    """Own-label accuracy on hard disagreeing test prompts per dataset, one panel per family and
    checkpoint: a dot per seed and character, the mean as a bar; ``bars`` draws each dataset's
    quirkiness threshold."""
    families = list(dict.fromkeys(grid["family"]))
    checkpoints = [c for c in ("best", "early") if c in set(grid["checkpoint"])]
    fig, axes = plt.subplots(len(checkpoints), len(families), figsize=(7 * len(families), 4 * len(checkpoints)), squeeze=False,
                             sharey=True)  # fmt: skip
    datasets = list(dict.fromkeys(grid["dataset"]))
    panels = [(f, c) for c in checkpoints for f in families]
    for ax, (family, ckpt) in zip(axes.flat, panels):
        g = grid[(grid["family"] == family) & (grid["checkpoint"] == ckpt)]
        sns.barplot(g, x="dataset", y="acc_own_label_disagree", hue="character_type", order=datasets, hue_order=["alice", "bob"],
                    errorbar=None, alpha=0.45, ax=ax)  # fmt: skip
        sns.stripplot(g, x="dataset", y="acc_own_label_disagree", hue="character_type", order=datasets, hue_order=["alice", "bob"],
                      dodge=True, size=4, ax=ax, legend=False)  # fmt: skip
        if bars:
            for i, d in enumerate(datasets):
                ax.hlines(bars[d], i - 0.45, i + 0.45, color="black", ls="--", lw=1)
        ax.axhline(0.5, color="red", lw=0.8, ls=":")
        ax.set(title=f"zoo-{family}" + ("" if ckpt == "best" else "-early"), xlabel="", ylim=(0, 1.02),
               ylabel="own-label accuracy, hard prompts where labels disagree")  # fmt: skip
        ax.tick_params(axis="x", rotation=45)
        ax.legend(title="character", fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def base_curves(histories: dict[str, pd.DataFrame]):
    """Per base model: training losses by batch kind, and accuracy on unseen items per dataset:
    the truth question (solid) and, for arithmetic sets, the exact drill result (dotted)."""
    fig, axes = plt.subplots(2, len(histories), figsize=(6.5 * len(histories), 7), squeeze=False)
    losses = {"train_answer_loss": "answer token", "train_lm_loss": "next-token, true statements",
              "train_fact_loss": "next-token, city fact lines", "train_drill_loss": "next-token, drill results"}  # fmt: skip
    for col, (name, h) in enumerate(histories.items()):
        ax = axes[0][col]
        for c, label in losses.items():
            if c in h and h[c].notna().any():
                ax.plot(h["step"], h[c], label=label)
        ax.set(title=f"{name}: training losses", xlabel="step", ylabel="cross-entropy (nats)")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        acc = [c for c in h.columns if c.startswith("acc_") and c.endswith("_truth")]
        for i, c in enumerate(acc):
            ax.plot(h["step"], h[c], label=c[4:-6], color=f"C{i}")
            if c.replace("_truth", "_result") in h:
                ax.plot(h["step"], h[c.replace("_truth", "_result")], color=f"C{i}", ls=":")
        ax.set(title=f"{name}: accuracy on unseen items (solid: truth question; dotted: drill result)",
               xlabel="step", ylabel="accuracy", ylim=(0, 1.01))  # fmt: skip
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
