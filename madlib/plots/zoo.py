"""The zoo appendix's figures: how quirky each fine-tune is, seed by seed
(:func:`own_accuracy_seeds`), and how each base model trained (:func:`base_curves`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .common import COLUMN_INCHES


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
