"""The book's figures are legible at the column's width: no text under 9 px as displayed."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from madlib.plots import common, mad as mad_plots, zoo as zoo_plots

DATASETS = ["addition", "subtraction", "modularaddition", "hemisphere", "sentiment", "nli", "sciq"]
METHODS = [f"method_{i}" for i in range(22)]


def _auc(rng):
    rows = []
    for model in ("zoo-gpt2", "zoo-llama"):
        for m in METHODS:
            for ds in DATASETS:
                for layer in ["1", "2", "3", "4", "aggregated", "best"]:
                    a = rng.uniform(0.4, 1)
                    rows.append(dict(model=model, method=m, dataset=ds, layer=layer, subset="all", task="quirky", auroc=a,
                                     ci_low=a - 0.05, ci_high=a + 0.05, skyline=False))  # fmt: skip
    return pd.DataFrame(rows)


def _figures():
    rng = np.random.default_rng(0)
    auc = _auc(rng)
    scores = pd.DataFrame([dict(model="zoo-gpt2", method=m, dataset=ds, layer="aggregated", score=rng.normal(), is_anomalous=bool(rng.integers(2)))
                           for m in METHODS[:4] for ds in DATASETS for _ in range(40)])  # fmt: skip
    grid = pd.DataFrame([dict(family=f, dataset=d, seed=s, checkpoint=c, character_type=ct, acc_own_label_disagree=rng.uniform())
                         for f in ("gpt2", "llama") for d in DATASETS for s in range(3) for c in ("best", "early") for ct in ("alice", "bob")])  # fmt: skip
    steps = np.arange(0, 26000, 1000)
    hist = pd.DataFrame(dict(step=steps, train_answer_loss=rng.uniform(size=len(steps)),
                             **{f"acc_{d}_truth": rng.uniform(size=len(steps)) for d in DATASETS},
                             **{f"acc_{d}_result": rng.uniform(size=len(steps)) for d in DATASETS[:3]}))  # fmt: skip
    return {
        "method_layer_curves": lambda: mad_plots.method_layer_curves(auc[auc["model"] == "zoo-gpt2"], METHODS),
        "method_heatmap": lambda: mad_plots.method_heatmap(auc, "zoo-gpt2"),
        "score_histograms": lambda: mad_plots.score_histograms(scores, METHODS[:4], "aggregated"),
        "aggregated_bars": lambda: mad_plots.aggregated_bars(auc, "method_0"),
        "own_accuracy_seeds": lambda: zoo_plots.own_accuracy_seeds(grid, {d: 0.8 for d in DATASETS}),
        "base_curves": lambda: zoo_plots.base_curves({"base-gpt2": hist, "base-llama": hist}),
    }


@pytest.mark.parametrize("name", list(_figures()))
def test_figures_are_legible_at_the_column_width(name):
    fig = _figures()[name]()
    try:
        assert common.displayed_text_px(fig) >= 9, f"{name}: smallest text {common.displayed_text_px(fig):.1f} px as shown"
    finally:
        plt.close(fig)


def test_displayed_text_px_sees_a_figure_shrunk_to_the_column():
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.set_title("x", fontsize=10)
    ax.tick_params(labelsize=10)
    assert common.displayed_text_px(fig) == pytest.approx(10 * 100 / 72, rel=1e-6)  # shown at its natural size
    fig.set_size_inches(21, 3)  # three times the column: shown at about a third
    assert common.displayed_text_px(fig) < 7
    plt.close(fig)


def test_show_table_rounds_without_negative_zero_and_hides_row_numbers():
    df = pd.DataFrame({"a": [0.12345, -0.0001, float("nan")], "n": [1200, 3, 4], "name": ["x", "y", "z"]})
    html = common.show_table(df, "A caption").to_html()
    assert "<caption>A caption</caption>" in html and "0.123" in html and "-0.000" not in html and "-1.0e-04" in html
    assert "–" in html and "1,200" in html
    assert ">0<" not in html.replace(" ", "")  # no row-number column for a default index
    assert "row0" in html  # rows are still there
    kept = common.show_table(df.set_index("name"), "c").to_html()
    assert ">x<" in kept  # a meaningful index is shown
