import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from madlib.analyses import quirkiness as qk
from madlib.plots import quirkiness as qk_plots

matplotlib.use("Agg")


def _test_records(n_per_char: int, agree_share: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Test records: ``n_per_char`` Alice and Bob prompts; Bob's label is the opposite of Alice's
    except on an ``agree_share`` of rows."""
    rng = np.random.default_rng(seed)
    alice = rng.integers(0, 2, size=2 * n_per_char)
    agree = rng.random(2 * n_per_char) < agree_share
    bob = np.where(agree, alice, 1 - alice)
    return pd.DataFrame(
        dict(
            dataset="addition",
            character_type=["alice"] * n_per_char + ["bob"] * n_per_char,
            alice_label=alice,
            bob_label=bob,
            agreement=alice == bob,
        )
    )


def _direct_loss(s: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax over the two answer logits (" No" = 0, " Yes" = s)."""
    logits = torch.tensor(np.c_[np.zeros_like(s), s])
    return -torch.log_softmax(logits, dim=1)[torch.arange(len(s)), torch.tensor(labels)].numpy()


def test_label_log_odds_and_loss_match_two_way_softmax():
    s = np.array([-3.0, -0.5, 0.0, 2.0, 40.0])
    y = np.array([1, 0, 1, 1, 0])
    lo = qk.label_log_odds(s, y)
    np.testing.assert_allclose(lo, [-3.0, 0.5, 0.0, 2.0, -40.0])
    np.testing.assert_allclose(qk.two_way_loss(lo), _direct_loss(s, y), rtol=1e-12)
    assert qk.two_way_loss(np.array([0.0]))[0] == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="labels"):
        qk.label_log_odds(s, np.array([0, 1, 2, 1, 0]))
    with pytest.raises(ValueError, match="shape"):
        qk.label_log_odds(s, y[:3])


def test_quirkiness_coefficient_known_answer():
    # Alice gains 2 nats from her own labels, Bob loses 1: Bob is not quirky, Q = -1
    assert qk.quirkiness_coefficient(alice_own=0.2, alice_opposing=2.2, bob_own=1.0, bob_opposing=0.0) == pytest.approx(
        -1.0
    )
    assert qk.quirkiness_coefficient(0.1, 3.1, 0.5, 1.0) == pytest.approx(0.5)


def test_quirkiness_table_on_constructed_log_odds():
    n = 300
    rec = _test_records(n, agree_share=0.3, seed=1)
    rng = np.random.default_rng(2)
    # log-odds of the own label: Alice about +3, Bob about +1 (so Q is about 1); agreeing rows get junk
    own = np.r_[rng.normal(3.0, 1.0, n), rng.normal(1.0, 1.0, n)]
    own_label = np.where(rec["character_type"] == "alice", rec["alice_label"], rec["bob_label"])
    s = np.where(own_label == 1, own, -own)
    s[rec["agreement"].to_numpy()] = rng.normal(0, 50, rec["agreement"].sum())
    ex = qk.log_odds_table(rec, s).assign(model="m")
    assert len(ex) == 2 * len(rec) and set(ex["label_source"]) == {"alice", "bob"}
    table = qk.quirkiness_table(ex)
    assert list(table.columns) == qk.QUIRK_COLUMNS and len(table) == 4
    # direct: mean -log softmax losses on disagreeing rows
    dis = ~rec["agreement"].to_numpy()
    loss = {}
    for char in ("alice", "bob"):
        m = dis & (rec["character_type"] == char).to_numpy()
        for src in ("alice", "bob"):
            loss[char, src] = _direct_loss(s[m], rec[f"{src}_label"].to_numpy()[m]).mean()
            row = table[(table["character"] == char) & (table["label_source"] == src)].iloc[0]
            assert row["mean_loss"] == pytest.approx(loss[char, src]) and row["n"] == m.sum()
    q = min(loss["alice", "bob"] - loss["alice", "alice"], loss["bob", "alice"] - loss["bob", "bob"])
    assert table["quirkiness"].unique() == pytest.approx([q])
    # with a two-way softmax the coefficient is the smaller mean own-label log-odds
    q_logits = min(own[:n][dis[:n]].mean(), own[n:][dis[n:]].mean())
    assert q == pytest.approx(q_logits) and q == pytest.approx(1.0, abs=0.2)
    # the "all" subset includes the junk agreeing rows and changes the answer
    assert qk.quirkiness_table(ex, subset="all")["quirkiness"].iloc[0] != pytest.approx(q)
    with pytest.raises(ValueError, match="subset='hard'"):
        qk.quirkiness_table(ex, subset="hard")


def test_log_odds_table_errors():
    rec = _test_records(5)
    with pytest.raises(ValueError, match="log_odds has 3 values for 10"):
        qk.log_odds_table(rec, np.zeros(3))
    with pytest.raises(ValueError, match="agreement"):
        qk.log_odds_table(rec.drop(columns="agreement"), np.zeros(10))


def test_confidence_table_signs():
    n = 50
    rec = _test_records(n, seed=3)
    own = np.r_[np.full(n, 4.0), np.full(n, -3.0)]  # Alice right and sure, Bob confidently wrong
    own_label = np.where(rec["character_type"] == "alice", rec["alice_label"], rec["bob_label"])
    ex = qk.log_odds_table(rec, np.where(own_label == 1, own, -own)).assign(model="m")
    c = qk.confidence_table(ex).iloc[0]
    assert c["confidence"] == pytest.approx(3.5) and c["own_log_odds"] == pytest.approx(0.5)
    assert c["confidently_wrong"] == pytest.approx(0.5)
    assert c["truth_bias"] == pytest.approx(3.0 - (-4.0))  # Bob's prompts lean to Alice's label


def test_variance_ratio_of_two_gaussian_clusters():
    rng = np.random.default_rng(0)
    n, d, m, sigma = 20_000, 8, 1.5, 0.7
    ctx = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    x = rng.normal(0, sigma, size=(2 * n, d))
    x[:, 0] += np.where(ctx, m, -m)
    v = qk.variance_decomposition(x, ctx)
    # between = ||mu_A - mu_B||^2 / 4 = m^2 for a 50/50 split, within = d sigma^2
    assert v["ratio"] == pytest.approx(m**2 / (m**2 + d * sigma**2), rel=0.02)
    # exact identities against direct computations
    assert v["total"] == pytest.approx(np.trace(np.cov(x.T, bias=True)))
    within = (n * np.trace(np.cov(x[~ctx].T, bias=True)) + n * np.trace(np.cov(x[ctx].T, bias=True))) / (2 * n)
    assert v["within"] == pytest.approx(within)
    assert v["between"] == pytest.approx(v["total"] - v["within"])
    assert v["between"] == pytest.approx(0.25 * ((x[ctx].mean(0) - x[~ctx].mean(0)) ** 2).sum())


def test_variance_ratio_unbalanced_1d_and_tensor_input():
    x = np.array([0.0, 0.0, 0.0, 4.0])
    ctx = np.array([False, False, False, True])
    v = qk.variance_decomposition(x, ctx)
    assert v["total"] == pytest.approx(3.0) and v["within"] == pytest.approx(0.0) and v["ratio"] == pytest.approx(1.0)
    assert qk.variance_decomposition(torch.tensor(x)[:, None].float(), ctx)["ratio"] == pytest.approx(1.0)
    # centroid form: n_A n_B / n^2 ||mu_A - mu_B||^2
    rng = np.random.default_rng(1)
    y, c = rng.normal(size=(37, 3)), rng.random(37) < 0.3
    diff = ((y[c].mean(0) - y[~c].mean(0)) ** 2).sum()
    assert qk.variance_decomposition(y, c)["between"] == pytest.approx(c.sum() * (~c).sum() / 37**2 * diff)


def test_variance_ratio_errors():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="both must be non-empty"):
        qk.variance_decomposition(x, np.zeros(4, bool))
    with pytest.raises(ValueError, match="boolean"):
        qk.variance_decomposition(x, np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="one context per row"):
        qk.variance_decomposition(x, np.array([True, False]))
    with pytest.raises(ValueError, match="non-finite"):
        qk.variance_decomposition(np.array([0.0, np.nan]), np.array([True, False]))


def test_separation_table_layers_and_logit_columns():
    rng = np.random.default_rng(4)
    ctx = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    acts = {2: torch.tensor(rng.normal(size=(200, 4))), 1: torch.tensor(rng.normal(size=(200, 4)) + 3 * ctx[:, None])}
    lo = rng.normal(size=200) + 2 * ctx
    t = qk.separation_table(acts, lo, ctx)
    assert t["layer"].tolist() == [1, 2] and t["hidden_ratio"].iloc[0] > 0.6 > 0.1 > t["hidden_ratio"].iloc[1]
    v = qk.variance_decomposition(lo, ctx)
    assert (t["logit_ratio"] == v["ratio"]).all() and (t["logit_total_var"] == v["total"]).all()
    assert (t["logit_between_var"] == v["between"]).all() and t["logit_between_var"].iloc[0] == pytest.approx(
        1.0, rel=0.3
    )


def test_logistic_fit_recovers_known_parameters():
    rng = np.random.default_rng(5)
    x = 10 ** rng.uniform(-4, 0, 400)
    truth = qk.LogisticFit(slope=3.0, midpoint=-1.7, floor=0.5, ceiling=1.0, log_x=True, r2=1.0, n=400)
    fit = qk.fit_logistic(x, truth.predict(x) + rng.normal(0, 0.02, 400))
    assert fit.slope == pytest.approx(3.0, rel=0.1) and fit.midpoint == pytest.approx(-1.7, abs=0.05)
    assert fit.midpoint_x == pytest.approx(10**-1.7, rel=0.15) and fit.r2 > 0.9
    assert fit.predict(np.array([10**-1.7]))[0] == pytest.approx(0.75, abs=0.02)
    # a falling curve on a linear axis
    t = np.linspace(-2, 2, 50)
    y = 0.2 + 0.6 / (1 + np.exp(2.0 * (t - 0.3)))
    lin = qk.fit_logistic(t, y, floor=0.2, ceiling=0.8, log_x=False)
    assert lin.slope == pytest.approx(-2.0, rel=1e-3) and lin.midpoint == pytest.approx(0.3, abs=1e-3)


def test_logistic_fit_errors_and_outliers():
    with pytest.raises(ValueError, match="positive x"):
        qk.fit_logistic([0.0, 0.1, 0.2], [0.5, 0.6, 0.9])
    with pytest.raises(ValueError, match="ceiling=0.5"):
        qk.fit_logistic([0.01, 0.1, 1.0], [0.5, 0.6, 0.9], floor=0.5, ceiling=0.5)
    with pytest.raises(ValueError, match="at least 3"):
        qk.fit_logistic([0.01, 0.1], [0.5, 0.9])
    x = np.logspace(-4, 0, 30)
    fit = qk.LogisticFit(2.0, -2.0, 0.5, 1.0, True, 1.0, 30)
    df = pd.DataFrame(dict(hidden_ratio=x, auroc=fit.predict(x)))
    df.loc[3, "auroc"] = 0.98  # high AUROC at a tiny ratio
    out = qk.logistic_outliers(df, fit)
    assert out.index.tolist() == [3] and out["residual"].iloc[0] > 0.4


def test_s_curve_claims_hold_fail_or_cannot_be_checked():
    x = np.logspace(-4, 0, 40)
    fit = qk.LogisticFit(2.0, -2.0, 0.5, 1.0, True, 1.0, 40)
    sep = pd.DataFrame(dict(model="m", dataset="d", layer=1, hidden_ratio=x, auroc=fit.predict(x)))
    sep.loc[3, "auroc"] = 0.98
    outliers = qk.logistic_outliers(sep, fit)
    c = qk.s_curve_claims(sep, fit, qk.ratio_bins(sep), outliers)
    assert c["verdict_s"].startswith("holds: near chance below a ratio of 0.005 and near 1 above 0.1")
    assert c["outlier_kind"].startswith("1 of the 1 named exceptions lie above") and "above the curve by" in c["outliers"]
    assert c["fit_mid"] == "0.01" and c["below_chance"] == "0 of 40"
    flat = sep.assign(auroc=0.7)
    c = qk.s_curve_claims(flat, fit, qk.ratio_bins(flat), qk.logistic_outliers(flat, fit).iloc[:0])
    assert c["verdict_s"].startswith("does not hold: mean AUROC 0.700 below") and c["outliers"] == "none"
    high = sep[sep["hidden_ratio"] > 0.01]
    c = qk.s_curve_claims(high, fit, qk.ratio_bins(high), outliers.iloc[:0])
    assert c["verdict_s"] == "cannot be checked at both ends: no point has a ratio below 0.005"


def test_linear_fit_and_correlation_ci():
    rng = np.random.default_rng(6)
    x = rng.normal(size=40)
    y = 2 * x + rng.normal(size=40)
    lf = qk.linear_fit(x, y)
    assert lf["r2"] == pytest.approx(stats.pearsonr(x, y)[0] ** 2) and lf["slope"] == pytest.approx(2.0, abs=0.4)
    assert qk.linear_fit(x, 3 - x)["r2"] == pytest.approx(1.0)
    c = qk.correlation_ci(x, y, n_boot=500, seed=0)
    assert c["r"] == pytest.approx(stats.pearsonr(x, y)[0]) and c["ci_low"] < c["r"] < c["ci_high"] and c["n"] == 40
    assert qk.correlation_ci(x, y, method="spearman", n_boot=50)["r"] == pytest.approx(stats.spearmanr(x, y)[0])
    perfect = qk.correlation_ci(x, 5 * x + 1, n_boot=100)
    assert perfect["ci_low"] == pytest.approx(1.0) and perfect["ci_high"] == pytest.approx(1.0)
    # non-finite pairs are dropped
    assert qk.correlation_ci(np.r_[x, np.nan], np.r_[y, 1.0], n_boot=10)["n"] == 40
    with pytest.raises(ValueError, match="method='kendall'"):
        qk.correlation_ci(x, y, method="kendall")
    with pytest.raises(ValueError, match="x is constant"):
        qk.linear_fit(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="shapes"):
        qk.correlation_ci(x, y[:5])


def _points() -> pd.DataFrame:
    return pd.DataFrame(dict(
        model=["a", "a", "a-early", "a-early", "b", "b"], dataset=["x", "y"] * 3,
        quirkiness=[2.0, -0.5, 0.5, -1.0, 1.0, 0.2], hidden_ratio=[0.2, 0.1, 0.05, 0.02, 0.3, 0.3],
        auroc=[0.99, 0.8, 0.7, 0.5, 0.9, 0.95],
    ))  # fmt: skip


def test_variant_pairs_and_model_summary():
    pairs = qk.variant_pairs(_points())
    assert pairs[["model", "variant", "dataset"]].values.tolist() == [["a", "a-early", "x"], ["a", "a-early", "y"]]
    np.testing.assert_allclose(pairs["d_quirkiness"], [-1.5, -0.5])
    np.testing.assert_allclose(pairs["d_auroc"], [-0.29, -0.3])
    s = qk.model_summary(_points()).set_index("model")
    assert s.loc["a", "quirky_datasets"] == 1 and s.loc["b", "auroc"] == pytest.approx(0.925)
    seeded = _points().assign(model=lambda d: d["model"] + "@1")
    seeded = pd.concat([seeded, _points().assign(model=lambda d: d["model"] + "@2")])
    pairs = qk.variant_pairs(seeded)
    assert sorted(set(zip(pairs["model"], pairs["variant"]))) == [("a@1", "a-early@1"), ("a@2", "a-early@2")]
    bins = qk.ratio_bins(pd.DataFrame(dict(hidden_ratio=[1e-3, 2e-3, 0.05, 0.5], auroc=[0.5, 0.6, 0.8, 1.0])))
    assert bins["n"].tolist() == [2, 1, 1] and bins["mean_auroc"].tolist() == pytest.approx([0.55, 0.8, 1.0])


def test_config_errors():
    with pytest.raises(ValueError, match="datasets='authors'"):
        qk.QuirkConfig(datasets=["authors"])
    with pytest.raises(ValueError, match="detectors='nope'"):
        qk.QuirkConfig(detectors=["nope"])
    with pytest.raises(ValueError, match="max_test=1"):
        qk.QuirkConfig(max_test=1)
    with pytest.raises(ValueError, match="at least 3"):
        qk.QuirkConfig(models=["zoo-gpt2"], datasets=["addition", "hemisphere"])
    with pytest.raises(ValueError, match="appears more than once"):  # two copies of one model fake a correlation
        qk.QuirkConfig(models=["zoo-gpt2", "zoo-gpt2"], datasets=["addition", "hemisphere"])
    with pytest.raises(ValueError, match=r"datasets=\['nli', 'sciq', 'nli'\]"):
        qk.QuirkConfig(models=["zoo-gpt2"], datasets=["nli", "sciq", "nli"])
    assert qk.QuirkConfig(detectors=["mahalanobis"], separation_detector="mahalanobis").run_detectors == ["mahalanobis"]


def test_figures_on_constructed_tables():
    rec = _test_records(20, seed=7)
    ex = pd.concat(
        [qk.log_odds_table(rec, np.random.default_rng(i).normal(size=40)).assign(model=m) for i, m in enumerate("ab")]
    )
    quirk = qk.quirkiness_table(ex)
    pts = _points().assign(ci_low=0.4, ci_high=1.0, detector="mahalanobis")
    sep = pts.assign(layer=1)
    fit = qk.fit_logistic(sep["hidden_ratio"], sep["auroc"])
    figs = [
        qk_plots.log_odds_figure(ex, "own"),
        qk_plots.log_odds_figure(ex, "opposing"),
        qk_plots.loss_figure(quirk, "opposing"),
        qk_plots.quirkiness_auroc_figure(pts, qk.correlation_ci(pts["quirkiness"], pts["auroc"], n_boot=20)),
        qk_plots.ratio_auroc_figure(sep, fit, qk.logistic_outliers(sep, fit, min_residual=0.0)),
        qk_plots.ratio_scatter_figure(
            pts, "hidden_ratio", "auroc", qk.linear_fit(pts["hidden_ratio"], pts["auroc"]), "x", "y", "t"
        ),
    ]
    assert all(len(f.axes) >= 1 for f in figs)
    from madlib.plots.common import displayed_text_px

    # the whole zoo over three fine-tuning seeds is twelve models: each gets a style, none is dropped
    many = pd.concat([pts.assign(model=f"{m}@{i}") for i in range(6) for m in pts["model"].unique()], ignore_index=True)
    assert many["model"].nunique() > 10
    f_many = qk_plots.quirkiness_auroc_figure(many, qk.correlation_ci(many["quirkiness"], many["auroc"], n_boot=20))
    assert sum(len(c.get_offsets()) for c in f_many.axes[0].collections if hasattr(c, "get_offsets")) >= len(many)
    figs.append(f_many)

    assert min(displayed_text_px(f) for f in figs) >= 9, "every text legible at the book's column width"
    with pytest.raises(ValueError, match="which='both'"):
        qk_plots.loss_figure(quirk, "both")
    matplotlib.pyplot.close("all")


def test_analyse_on_a_tiny_model(tiny_model):
    cfg = qk.QuirkConfig(
        models=["tiny"],
        datasets=["addition", "hemisphere", "population"],
        layers=[1, 2],
        max_test=60,
        n_boot=20,
        batch_size=64,
    )
    res = qk.analyse({"tiny": tiny_model}, cfg, progress=False)
    assert list(res.separation.columns) == qk.SEPARATION_COLUMNS and len(res.separation) == 3 * 2
    assert res.separation["hidden_ratio"].between(0, 1).all() and res.separation["auroc"].between(0, 1).all()
    auc = res.auc[(res.auc["subset"] == "all") & (res.auc["layer"] == "1")].set_index("dataset")["auroc"]
    sep = res.separation[res.separation["layer"] == 1].set_index("dataset")["auroc"]
    assert sep.to_dict() == pytest.approx(auc.to_dict())
    # the coefficient is the smaller mean own-label log-odds on disagreeing examples
    ex = res.examples[(res.examples["dataset"] == "hemisphere") & ~res.examples["agreement"]]
    own = ex[ex["character"] == ex["label_source"]].groupby("character")["log_odds"].mean()
    q = res.quirk.set_index("dataset").loc["hemisphere", "quirkiness"].iloc[0]
    assert q == pytest.approx(own.min())
    pts = qk.points_table(res, "mahalanobis")
    assert len(pts) == 3 and pts["hidden_ratio"].notna().all()
    with pytest.raises(ValueError, match="detector='lof'"):
        qk.points_table(res, "lof")


# ---------------------------------------------------------------------------------------------
# The chapter's statements (madlib.analyses.quirkiness, glued by notebooks/quirkiness.ipynb)


def _cells(q, auroc, confidence) -> pd.DataFrame:
    """Model x dataset points with given quirkiness, AUROC and confidence (two models, three datasets each)."""
    n = len(q)
    return pd.DataFrame(dict(model=["m1", "m2"] * (n // 2), dataset=[f"d{i // 2}" for i in range(n)], quirkiness=q, auroc=auroc,
                             hidden_ratio=np.linspace(0.01, 0.3, n), confidence=confidence, confidently_wrong=np.linspace(0, 0.5, n),
                             truth_bias=np.linspace(-1, 2, n)))  # fmt: skip


def test_confidence_and_auroc_claims_hold_or_do_not():
    q = np.linspace(-1, 3, 12)
    holds = _cells(q, auroc=0.5 + 0.12 * q + 0.001 * np.arange(12) ** 2, confidence=1 + q)
    c = qk.confidence_claims(holds, holds, n_boot=200)
    assert c["verdict_conf"] == qk.CONFIDENCE_VERDICTS[1] and c["corr_conf"].startswith("r = 1.00")
    assert c["least_confident"].startswith("m1 on d0 (mean |log-odds| 0.00") and c["truth_bias_cells"] == "8 of 12"
    corr = qk.auroc_correlations({"mahalanobis": holds}, ["mahalanobis"], n_boot=200)
    a = qk.auroc_claims(holds, corr, n_boot=200)
    assert a["verdict_q_auc"] == qk.Q_AUROC_VERDICTS[1] and a["corr_q_auc"].startswith("mahalanobis: r = ")
    assert a["corr_q_auc_models"].startswith("m1 r = ") and "; m2 r = " in a["corr_q_auc_models"]
    reversed_ = _cells(q, auroc=0.85 - 0.1 * q, confidence=5 - q)
    c = qk.confidence_claims(reversed_, reversed_, n_boot=200)
    assert c["verdict_conf"] == qk.CONFIDENCE_VERDICTS[-1]
    a = qk.auroc_claims(reversed_, qk.auroc_correlations({"d": reversed_}, ["d"], n_boot=200), n_boot=200)
    assert a["verdict_q_auc"] == qk.Q_AUROC_VERDICTS[-1]
    # the exceptions: detected without quirkiness (Q <= 0, AUROC >= 0.9) and quirky but barely detected
    assert a["no_quirk_high_auc"] == "m1 on d0 (Q -1.00, AUROC 0.950); m2 on d0 (Q -0.64, AUROC 0.914)"
    assert a["quirk_low_auc"] == "m1 on d5 (Q 2.64, AUROC 0.586); m2 on d5 (Q 3.00, AUROC 0.550)"
    flat = _cells(np.array([1.0, 0.5] * 6), auroc=np.array([0.55, 0.7] * 6), confidence=np.ones(12))
    a = qk.auroc_claims(flat, {}, n_boot=50)
    assert a["quirk_low_auc"].count("AUROC 0.550") == 6 and a["auc_qneg"] == "no cell" and a["auc_qpos"] == "0.625 over 12 cells"
    with pytest.raises(ValueError, match="conf is empty"):
        qk.confidence_claims(holds.iloc[:0], holds)


def test_loss_and_sign_claims_count_against_ln2():
    quirk = pd.DataFrame([dict(model=m, dataset=d, character=c, label_source=s, mean_loss=loss, quirkiness=q)
                          for m, d, q, own_loss in (("m", "x", 1.0, 0.2), ("m", "y", -0.4, 0.9))
                          for c in ("alice", "bob") for s in ("alice", "bob")
                          for loss in [own_loss if c == s else 1.5]])  # fmt: skip
    c = qk.loss_claims(quirk)
    assert c["own_below_ln2"] == "2 of 4" and c["own_above_list"] == "m: y (Alice and Bob)" and c["opp_above_ln2"] == "4 of 4"
    assert c["own_loss_by_model"] == "m 0.550" and c["alice_on_bob_by_model"] == "m 1.500"
    grid = qk.quirkiness_grid(quirk, ["y", "x", "z"], ["m"])
    assert list(grid.index) == ["y", "x", "z"] and grid.loc["x", "m"] == 1.0 and np.isnan(grid.loc["z", "m"])
    s = qk.sign_claims(quirk, grid)
    assert s == dict(negative_q="m on y (-0.40)", positive_q="1 of 3")
    c = qk.loss_claims(quirk.assign(mean_loss=0.1))
    assert c["own_above_list"] == "no cell" and c["opp_above_ln2"] == "0 of 4"


def test_logit_and_ratio_claims_name_their_strength_and_direction():
    assert [qk.r2_strength(r) for r in (0.0, 0.249, 0.25, 0.49, 0.5, 1.0)] == ["weak", "weak", "moderate", "moderate", "strong", "strong"]
    rng = np.random.default_rng(0)
    pts = _points().assign(logit_total_var=lambda d: 2 * d["hidden_ratio"], logit_between_var=rng.uniform(size=6))
    sep = pd.concat([pts.assign(layer=layer, logit_ratio=pts["hidden_ratio"] * layer) for layer in (1, 2)], ignore_index=True)
    fits = qk.logit_fits(sep, pts)
    assert set(fits) == set(qk.LOGIT_COMPARISONS) and fits["fig11"]["r2"] == pytest.approx(1.0)
    c = qk.logit_claims(sep, pts, fits, n_boot=50)
    assert c["verdict_fig11"] == "strong (R² 1.00)" and c["r2_fig11"] == "1.00" and c["rho_fig11"].startswith("ρ = 1.00")
    r = qk.ratio_claims(pts, qk.variant_pairs(pts), n_boot=200)
    assert r["verdict_ratio_auc"] in qk.RATIO_AUROC_VERDICTS.values() and r["corr_ratio_auc"].startswith("r = ")
    assert r["pairs_text"].startswith("In 2 of 2 (variant, dataset) pairs the variant is less quirky than its model; in 2 of those")
    up = pd.DataFrame(dict(model="m", dataset=[f"d{i}" for i in range(8)], hidden_ratio=np.linspace(0, 1, 8), auroc=np.linspace(0.5, 1, 8) ** 2))
    assert qk.ratio_claims(up, up.iloc[:0], n_boot=200)["verdict_ratio_auc"] == "goes with higher AUROC"
    down = up.assign(auroc=up["auroc"].to_numpy()[::-1])
    c = qk.ratio_claims(down, up.iloc[:0], n_boot=200)
    assert c["verdict_ratio_auc"] == "goes with lower AUROC" and c["pairs_text"].startswith("This run has no less-trained variants")
    no_less = qk.variant_pairs(_points()).assign(d_quirkiness=1.0)
    assert qk.ratio_claims(up, no_less, n_boot=50)["pairs_text"] == "No variant is less quirky than its model on any of the 2 datasets compared."


def test_chapter_points_setup_claims_and_s_curve(tiny_model):
    cfg = qk.QuirkConfig(models=["tiny"], datasets=["addition", "hemisphere", "population"], layers=[1, 2], max_test=60, n_boot=20,
                         batch_size=64, detectors=["mahalanobis"])  # fmt: skip
    res = qk.analyse({"tiny": tiny_model}, cfg, progress=False)
    conf, points, pts = qk.chapter_points(res, cfg)
    assert list(points) == ["mahalanobis"] and len(pts) == len(conf) == 3 and {"confidence", "truth_bias", "auroc"} <= set(pts.columns)
    c = qk.setup_claims(res, pts, cfg)
    assert c["n_points"] == 3 and c["sep_detector"] == "mahalanobis" and c["model_list"] == "tiny" and " to " in c["n_disagree"]
    sep = res.separation.assign(hidden_ratio=lambda d: d["hidden_ratio"].clip(lower=1e-6))
    fit, outliers, bins = qk.s_curve(sep)
    assert isinstance(fit, qk.LogisticFit) and len(bins) == 3 and outliers["residual"].abs().ge(0.1).all()


def test_logit_figures_are_the_ratio_scatters_of_figs_10_to_12():
    from madlib.plots.common import displayed_text_px

    pts = _points().assign(logit_total_var=lambda d: 2 * d["hidden_ratio"], logit_between_var=lambda d: d["hidden_ratio"] ** 2)
    sep = pd.concat([pts.assign(layer=layer, logit_ratio=pts["hidden_ratio"] * layer) for layer in (1, 2)], ignore_index=True)
    fits = qk.logit_fits(sep, pts)
    figs = [qk_plots.logit_figure(key, sep, pts, fits) for key in qk.LOGIT_COMPARISONS]
    try:
        assert [f.axes[0].get_title() for f in figs] == [v[2] for v in qk_plots.LOGIT_LABELS.values()]
        assert len(figs[0].axes[0].collections[0].get_offsets()) == 4  # fig 10: per layer, a model's points in one colour
        assert min(displayed_text_px(f) for f in figs) >= 9
        with pytest.raises(ValueError, match="key='fig13'"):
            qk_plots.logit_figure("fig13", sep, pts, fits)
    finally:
        matplotlib.pyplot.close("all")
