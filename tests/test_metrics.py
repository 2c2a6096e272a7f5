import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from madlib.mad.metrics import aggregate_layers, auroc, auroc_table, bootstrap_counts, standardise, weighted_auroc


def test_auroc_gaussian_shift_matches_analytic():
    rng = np.random.default_rng(0)
    n, mu = 20_000, 1.0
    s = np.r_[rng.normal(size=n), rng.normal(mu, 1, size=n)]
    y = np.r_[np.zeros(n), np.ones(n)]
    assert auroc(y, s) == pytest.approx(stats.norm.cdf(mu / np.sqrt(2)), abs=0.01)


def test_weighted_auroc_with_unit_counts_is_sklearn_even_with_ties():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, size=300).astype(float)  # many ties
    y = rng.random(300) < 0.4
    assert weighted_auroc(y, s, np.ones((1, 300), dtype=int))[0] == pytest.approx(roc_auc_score(y, s))


def test_weighted_auroc_equals_auroc_of_expanded_resample():
    rng = np.random.default_rng(2)
    s = rng.normal(size=80)
    y = rng.random(80) < 0.5
    counts = bootstrap_counts(y, 5, seed=3)
    for c in counts:
        idx = np.repeat(np.arange(80), c)
        assert weighted_auroc(y, s, c[None])[0] == pytest.approx(roc_auc_score(y[idx], s[idx]))
    # stratified: class sizes are preserved
    assert (counts[:, y].sum(1) == y.sum()).all() and (counts[:, ~y].sum(1) == (~y).sum()).all()


def test_auroc_table_rows_and_intervals():
    rng = np.random.default_rng(4)
    y = np.r_[np.zeros(200), np.ones(200)].astype(bool)
    layers = {1: rng.normal(size=400) + y * 0.2, 2: rng.normal(size=400) * 10 + y * 20}
    agg = aggregate_layers(layers, {1: rng.normal(size=100), 2: rng.normal(size=100) * 10})
    rows = {r["layer"]: r for r in auroc_table(y, layers, agg, n_boot=300, seed=0)}
    assert set(rows) == {"1", "2", "aggregated", "mean"}
    for r in rows.values():
        assert r["ci_low"] <= r["auroc"] <= r["ci_high"] and r["n"] == 400
    assert rows["mean"]["auroc"] == pytest.approx((rows["1"]["auroc"] + rows["2"]["auroc"]) / 2)
    assert rows["aggregated"]["auroc"] == pytest.approx(auroc(y, agg))


def test_standardised_aggregation_is_scale_free():
    rng = np.random.default_rng(5)
    t1, t2 = rng.normal(size=50), rng.normal(size=50)
    s1, s2 = rng.normal(size=30), rng.normal(size=30)
    a = aggregate_layers({1: s1, 2: s2}, {1: t1, 2: t2})
    b = aggregate_layers({1: s1 * 1000 + 3, 2: s2}, {1: t1 * 1000 + 3, 2: t2})
    assert np.allclose(a, b)
    assert np.allclose(standardise(t1, t1).mean(), 0) and np.isclose(standardise(t1, t1).std(), 1)
    assert np.allclose(aggregate_layers({1: s1, 2: s2}), (s1 + s2) / 2)


def test_single_class_gives_nan():
    assert np.isnan(auroc(np.ones(5), np.arange(5)))


def test_auroc_table_without_layers_has_only_the_aggregated_row():
    y = np.repeat([False, True], 50)
    score = y + np.random.default_rng(0).normal(0, 1, 100)
    rows = auroc_table(y, {}, score, n_boot=50)
    assert [r["layer"] for r in rows] == ["aggregated"] and rows[0]["auroc"] == auroc(y, score)


def test_holdout_split_and_out_of_sample_standardisation():
    from madlib.detectors import make_detector
    from madlib.mad.metrics import holdout_split

    fit, ref = holdout_split(100, 0.2, seed=3)
    assert len(ref) == 20 and len(fit) == 80 and not set(fit) & set(ref) and set(fit) | set(ref) == set(range(100))
    assert (holdout_split(100, 0.2, seed=3)[1] == ref).all()
    same = holdout_split(10, 0.0)
    assert (same[0] == np.arange(10)).all() and (same[1] == np.arange(10)).all()
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=f"standardise_holdout={bad!r} is not accepted"):
            holdout_split(100, bad)
    # in-sample Mahalanobis scores understate the spread on new points; held-out ones do not
    import torch

    rng = np.random.default_rng(0)
    d, n = 40, 200
    x = torch.tensor(rng.normal(size=(n, d)))
    new = torch.tensor(rng.normal(size=(2000, d)))
    fit, ref = holdout_split(n, 0.2, seed=0)
    det_all = make_detector("mahalanobis").fit({1: x})
    det_fit = make_detector("mahalanobis").fit({1: x[torch.as_tensor(fit)]})
    in_sample = det_all.score({1: x})[1].mean()
    held_out = det_fit.score({1: x[torch.as_tensor(ref)]})[1].mean()
    fresh = det_fit.score({1: new})[1].mean()
    assert in_sample < 0.85 * det_all.score({1: new})[1].mean()
    assert abs(held_out - fresh) / fresh < 0.15


def test_recall_at_fpr_against_a_direct_count():
    from madlib.mad.metrics import recall_at_fpr, recall_columns

    rng = np.random.default_rng(1)
    ref = rng.normal(size=1000)
    anomalous = rng.normal(loc=2.0, size=500)
    shifted = rng.normal(loc=0.5, size=800)  # test normals unlike the trusted reference
    r, lo, hi, test_fpr = recall_at_fpr(anomalous, ref, 0.05, n_boot=500, seed=0, normal=shifted)
    assert test_fpr == pytest.approx((shifted > np.quantile(ref, 0.95)).mean()) and 0.1 < test_fpr < 0.2  # 1 - Phi(1.145) = 0.126
    thr = np.sort(ref)[int(np.ceil(0.95 * 1000)) - 1]  # about 5% of the reference lies above it
    assert abs((ref > np.quantile(ref, 0.95)).mean() - 0.05) < 0.002
    assert r == pytest.approx((anomalous > np.quantile(ref, 0.95)).mean()) and abs(r - (anomalous > thr).mean()) < 0.01
    assert lo <= r <= hi and 0.05 < hi - lo < 0.2
    # N(2, 1) above the 95% quantile of N(0, 1): 1 - Phi(1.645 - 2) = 0.64
    assert abs(r - 0.64) < 0.06
    assert np.isnan(recall_at_fpr(np.zeros(0), ref, 0.01)[0]) and np.isnan(recall_at_fpr(anomalous, np.zeros(0), 0.01)[0])
    assert recall_columns(0.01) == ("recall_fpr1", "recall_fpr1_low", "recall_fpr1_high", "test_fpr1")
    assert np.isnan(recall_at_fpr(anomalous, ref, 0.05, n_boot=10)[3])  # no test normals given
