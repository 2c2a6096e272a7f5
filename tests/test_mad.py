import numpy as np
import pandas as pd
import pytest
import torch

from madlib.data import datasets as q
from madlib.features.activations import Extraction
from madlib.mad.task import MadFeatures, mad_task, score_detectors


@pytest.fixture(scope="module")
def records():
    return q.quirky_dataset("addition", n=2000, seed=0, max_digits=2)


def test_task_roles(records):
    task = mad_task(records, max_test=200, seed=0)
    t = task.trusted
    assert (t["split"] == "train").all() and t["easy"].all() and set(t["character"]) <= set(q.ALICE_NAMES[:4])
    u = task.untrusted
    assert u["easy"].all() and set(u["character"]) <= set(q.ALICE_NAMES[:4]) | set(q.BOB_NAMES[:4])
    test = task.test
    assert (test["split"] == "validation").all() and test["hard"].all()
    assert len(test) == 200 and test["is_anomalous"].sum() == 100
    assert (test["is_anomalous"] == (test["character_type"] == "bob")).all()
    assert not set(test["character"]) & (set(q.ALICE_NAMES[:4]) | set(q.BOB_NAMES[:4]))
    assert (test["agreement"] == (test["alice_label"] == test["bob_label"])).all()


def test_task_errors(records):
    with pytest.raises(ValueError, match="exactly one"):
        mad_task(q.quirky_dataset("subtraction", n=40, seed=0).pipe(lambda d: d.assign(dataset=["a", "b"] * 40)))
    with pytest.raises(ValueError, match="max_test=1"):
        mad_task(records, max_test=1)


def test_scores_table_on_known_anomalies(records):
    task = mad_task(records, max_test=200, seed=1)
    rng = np.random.default_rng(0)
    d = 6
    shift = np.where(task.test["is_anomalous"].to_numpy()[:, None], 6.0, 0.0) * np.eye(d)[0]
    feats = MadFeatures(
        Extraction({1: torch.tensor(rng.normal(size=(len(task.trusted), d))), 2: torch.tensor(rng.normal(size=(len(task.trusted), d)))},
                   torch.zeros(len(task.trusted))),
        Extraction({}, torch.zeros(0)),
        Extraction({1: torch.tensor(rng.normal(size=(200, d)) + shift), 2: torch.tensor(rng.normal(size=(200, d)))}, torch.zeros(200)),
    )
    auc, scores = score_detectors(task, feats, ["mahalanobis"], n_boot=100, seed=0)
    assert len(auc) == 3 * 4  # subsets x (2 layers + aggregated + mean)
    all_ = auc[auc["subset"] == "all"].set_index("layer")["auroc"]
    assert all_["1"] > 0.9 and abs(all_["2"] - 0.5) < 0.1
    assert all_["aggregated"] > 0.8
    assert set(scores["layer"]) == {"1", "2", "aggregated"} and len(scores) == 3 * 200


def _auc_rows(values):
    rows = []
    for (model, dataset, seed), auroc in values.items():
        rows.append(dict(model=model, dataset=dataset, finetune_seed=seed, auroc=auroc, method="mahalanobis",
                         layer="aggregated", subset="all", task="quirky"))  # fmt: skip
    return pd.DataFrame(rows)


def test_seed_claims_judge_each_seed():
    from madlib.mad import task as mad

    good = {("m", "addition", s): 0.99 for s in (0, 1, 2)} | {("m", "sentiment", s): 0.6 for s in (0, 1, 2)}
    claims = mad.seed_claims(_auc_rows(good))
    assert "holds in every seed (3)" in claims["arith_detected"]
    assert "non-arithmetic below arithmetic holds in every seed" in claims["kinds"]
    bad = dict(good) | {("m", "addition", 1): 0.7}
    claims = mad.seed_claims(_auc_rows(bad))
    assert "holds in seeds 0, 2 only (of 3)" in claims["arith_detected"] and "0.700 (seed 1)" in claims["arith_detected"]
    none = {k: (0.5 if k[1] == "addition" else 0.9) for k in good}
    claims = mad.seed_claims(_auc_rows(none))
    assert "holds in no seed" in claims["arith_detected"] and "below arithmetic holds in no seed" in claims["kinds"]
    table = mad.over_seeds(_auc_rows(bad))
    row = table[(table["dataset"] == "addition")].iloc[0]
    assert row["low"] == 0.7 and row["high"] == 0.99 and row["seeds"] == 3


def test_chapter_claims_tell_what_holds_and_what_does_not():
    from madlib.mad import task as mad

    def table(arith, other, methods=("mahalanobis", "dense_ae", "sae_diag_mahalanobis", "flow_mahalanobis")):
        rng = np.random.default_rng(0)
        rows = []
        for ds in ("addition", "subtraction", "sentiment", "nli"):
            for seed in (0, 1):
                base = arith if ds in ("addition", "subtraction") else other
                for i, m in enumerate(methods):
                    rows.append(dict(model="zoo-m", dataset=ds, finetune_seed=seed, method=m, layer="aggregated", subset="all",
                                     task="quirky", skyline=False, auroc=min(1.0, base + 0.01 * i + rng.normal(0, 0.002))))  # fmt: skip
        return pd.DataFrame(rows)

    holds = table(0.97, 0.6)
    c = mad.chapter_claims(holds[holds["finetune_seed"] == 0], holds, "mahalanobis", seed_method="mahalanobis")
    assert c["arith_verdict"].startswith("The zoo agrees") and "worse on the non-arithmetic" in c["pattern"]
    assert "holds in every seed (2)" in c["seed_arith"] and c["bd_mean"] == "not run" and c["main_method"] == "mahalanobis"
    assert c["best_methods"].startswith("flow_mahalanobis") and c["sparse_verdict"].startswith("sae_diag_mahalanobis minus dense_ae: +0.01") and "scores higher" in c["sparse_verdict"]
    fails = table(0.6, 0.9)
    c = mad.chapter_claims(fails[fails["finetune_seed"] == 0], fails, "mahalanobis")
    assert c["arith_verdict"].startswith("The zoo does not reproduce") and "(zoo-m, " in c["arith_verdict"]
    assert "better on the non-arithmetic" in c["pattern"] and c["seed_arith"] == "Not judged over seeds in this run."
    assert "sae_seed2_diag_mahalanobis not run" in c["sae_control_verdict"]


def test_compare_methods_says_no_difference_when_the_interval_covers_zero():
    from madlib.mad import task as mad

    rng = np.random.default_rng(0)
    rows = []
    for ds in range(12):
        base = rng.uniform(0.6, 0.9)
        for method, shift in (("a", 0.05), ("b", 0.0), ("c", rng.normal(0, 0.02))):
            rows.append(dict(model="m", dataset=f"d{ds}", finetune_seed=0, method=method, layer="aggregated", subset="all",
                             task="quirky", auroc=base + shift))  # fmt: skip
    auc = pd.DataFrame(rows)
    ab = mad.compare_methods(auc, "a", "b")
    assert ab["diff"] == pytest.approx(0.05) and ab["low"] == pytest.approx(0.05) and ab["verdict"] == "a above b"
    assert mad.compare_methods(auc, "b", "a")["verdict"] == "b below a"
    cb = mad.compare_methods(auc, "c", "b")
    assert cb["low"] < 0 < cb["high"] and cb["verdict"] == "no difference" and "covers zero" in cb["text"]
    assert mad.compare_methods(auc, "a", "missing") is None


def test_metric_table_puts_recall_beside_auroc_per_dataset():
    from madlib.plots import mad as mad_plots

    rows = []
    for model in ("m1", "m2"):
        for ds in ("addition", "nli"):
            for method in ("mahalanobis", "lof"):
                for subset in ("all", "agree"):
                    rows.append(dict(model=model, dataset=ds, method=method, layer="aggregated", task="quirky", subset=subset,
                                     auroc=0.5 + 0.1 * (ds == "nli") + 0.01 * (method == "lof") + 0.2 * (model == "m2"),
                                     recall_fpr1=0.05 if subset == "all" else 0.9))  # fmt: skip
    auc = pd.DataFrame(rows)
    styler = mad_plots.metric_table(auc, ["lof", "mahalanobis", "absent"], model="m1", layer="aggregated", subset="all", caption="c")
    t = styler.data
    assert list(t.index) == ["lof", "mahalanobis"]
    assert list(t.columns) == [("addition", "AUROC"), ("addition", "R@1%"), ("nli", "AUROC"), ("nli", "R@1%")]
    assert t.loc["lof", ("nli", "AUROC")] == pytest.approx(0.61) and t.loc["mahalanobis", ("addition", "R@1%")] == 0.05
    assert "<caption>c</caption>" in styler.to_html()
    # columns of several keys, other rows averaged (here over the two datasets)
    t2 = mad_plots.metric_table(auc, ["mahalanobis"], columns=["model", "subset"], layer="aggregated").data
    assert t2.loc["mahalanobis", ("m2", "all", "AUROC")] == pytest.approx(0.75)
    assert t2.loc["mahalanobis", ("m1", "agree", "R@1%")] == pytest.approx(0.9)
