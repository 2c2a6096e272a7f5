"""Figures shared by the notebooks; :func:`savefig` decides where they go."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..paths import atomic_path, results_dir


COLUMN_PX = 784
"""Width of the book's text column in CSS pixels: a wider figure is shown scaled down to it."""
COLUMN_INCHES = 7.0
"""Width the figures are drawn at, so that they are shown at (about) their natural size."""


def displayed_text_px(fig, column_px: int = COLUMN_PX) -> float:
    """Height in CSS pixels, as shown in the book, of the smallest visible text of ``fig``: the
    notebook shows the figure at ``figure.dpi`` with a tight bounding box, scaled down to
    ``column_px`` if wider. The book's figures keep this at 9 px or more."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width_in = fig.get_tightbbox(renderer).width
    px_per_pt = min(fig.dpi, column_px / width_in) / 72
    sizes = [t.get_fontsize() for t in fig.findobj(plt.Text) if t.get_visible() and t.get_text().strip()
             and t.get_window_extent(renderer).width > 0]  # fmt: skip
    return min(sizes) * px_per_pt if sizes else float("inf")


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


def show_table(df: pd.DataFrame, caption: str, precision: int = 3):
    """A table for reading: rounded to ``precision`` decimals (a value too small for them in
    scientific notation, never as -0.000; zero as 0), missing values as a dash, a caption, and no column of row numbers (a default
    integer index is hidden; a meaningful index is kept). The CSVs keep full precision."""
    half = 0.5 * 10.0**-precision

    def number(x):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
            return str(x)
        if isinstance(x, (int, np.integer)):
            return f"{x:,}"
        if np.isnan(x):
            return "–"
        if x == 0:
            return "0"
        return f"{x:.1e}" if abs(x) < half else f"{x:.{precision}f}"

    styler = df.style.format(number).set_caption(caption)
    if isinstance(df.index, pd.RangeIndex):
        styler = styler.hide(axis="index")
    return styler


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


def own_accuracy_seeds(grid: pd.DataFrame, bars: dict[str, float] | None = None):
    """Own-label accuracy on hard disagreeing test prompts per dataset, one panel per family and
    checkpoint (stacked, at the column's width): a dot per seed and character, the mean as a bar;
    ``bars`` draws each dataset's quirkiness threshold."""
    families = list(dict.fromkeys(grid["family"]))
    checkpoints = [c for c in ("best", "early") if c in set(grid["checkpoint"])]
    panels = [(f, c) for c in checkpoints for f in families]
    fig, axes = plt.subplots(len(panels), 1, figsize=(COLUMN_INCHES, 2.6 * len(panels) + 0.4), squeeze=False, sharex=True, sharey=True)
    datasets = list(dict.fromkeys(grid["dataset"]))
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
        ax.set_title(f"zoo-{family}" + ("" if ckpt == "best" else "-early"), fontsize=10)
        ax.set(xlabel="", ylim=(0, 1.02), ylabel="own-label accuracy")
        ax.tick_params(axis="x", rotation=30, labelsize=9)
        ax.legend(title="character", fontsize=8, title_fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def base_curves(histories: dict[str, pd.DataFrame]):
    """Per base model: training losses by batch kind, and accuracy on unseen items per dataset:
    the truth question (solid) and, for arithmetic sets, the exact drill result (dotted)."""
    fig, axes = plt.subplots(2 * len(histories), 1, figsize=(COLUMN_INCHES, 3.4 * 2 * len(histories)), squeeze=False)
    losses = {"train_answer_loss": "answer token", "train_lm_loss": "next-token, true statements",
              "train_fact_loss": "next-token, city fact lines", "train_drill_loss": "next-token, drill results"}  # fmt: skip
    for i, (name, h) in enumerate(histories.items()):
        ax = axes[2 * i][0]
        for c, label in losses.items():
            if c in h and h[c].notna().any():
                ax.plot(h["step"], h[c], label=label)
        ax.set(title=f"{name}: training losses", xlabel="step", ylabel="cross-entropy (nats)")
        ax.legend(fontsize=8)
        ax = axes[2 * i + 1][0]
        acc = [c for c in h.columns if c.startswith("acc_") and c.endswith("_truth")]
        for j, c in enumerate(acc):
            ax.plot(h["step"], h[c], label=c[4:-6], color=f"C{j}")
            if c.replace("_truth", "_result") in h:
                ax.plot(h["step"], h[c.replace("_truth", "_result")], color=f"C{j}", ls=":")
        ax.set(title=f"{name}: accuracy on unseen items (solid: truth; dotted: drill result)",
               xlabel="step", ylabel="accuracy", ylim=(0, 1.01))  # fmt: skip
        ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig
