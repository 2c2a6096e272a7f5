import numpy as np
import pytest
import torch

from madlib.mad import suite
from madlib.models import zoo


def test_best_layer_is_chosen_on_one_half_and_reported_on_the_other():
    rng = np.random.default_rng(0)
    y = np.repeat([False, True], 200)
    select = suite._split_halves(y, seed=0)
    assert select.sum() == 200 and y[select].sum() == 100, "a stratified half"
    good = y + rng.normal(0, 0.5, len(y))
    # layer 3 separates only on the selection half: chosen there, but its reported AUROC is near chance
    cheat = np.where(select, y * 10.0, 0.0) + rng.normal(0, 1, len(y))
    row = suite.best_layer_rows(y, {1: rng.normal(size=len(y)), 2: good, 3: cheat}, select, n_boot=200, seed=0)
    assert row["selected_layer"] == "3" and row["n"] == 200
    assert abs(row["auroc"] - 0.5) < 0.15 and row["ci_low"] <= row["auroc"] <= row["ci_high"]
    row = suite.best_layer_rows(y, {1: rng.normal(size=len(y)), 2: good}, select, n_boot=200, seed=0)
    assert row["selected_layer"] == "2" and row["auroc"] > 0.8


def test_methods_cover_every_feature_source_and_bad_names_are_named():
    table = suite.methods()
    assert {m.features for m in table.values()} == {"activations", *suite.SAE_SOURCES, "atp_mean", "atp_pcs", "atp_grad_norm", "probe_shift", "prompts"}
    assert set(suite.DEFAULT_METHODS) <= set(table) and table["probe_skyline"].skyline
    assert [m.name for m in suite.resolve_methods([])] == list(suite.DEFAULT_METHODS)
    with pytest.raises(ValueError, match="methods='mahalanobiss'"):
        suite.resolve_methods(["mahalanobiss"])
    with pytest.raises(ValueError, match=r"^detectors='mahalanobs' is not accepted \(did you mean 'mahalanobis'\?\); choose from"):
        suite.resolve_methods(["mahalanobs"], "detectors")


def test_run_suite_on_the_tiny_model(tiny_model):
    recs = zoo.model_records(tiny_model, "hemisphere")
    chosen = ["mahalanobis", "atp_mean_mahalanobis", "finetune_kl", "probe_skyline"]
    cfg = suite.SuiteConfig(kl_steps=5, kl_batch_size=8)
    auc, scores, task = suite.run_suite(tiny_model, "tiny", recs, [1, 2], chosen, cfg=cfg, max_test=120, n_boot=20, progress=False)
    assert set(auc["method"]) == set(chosen) and set(auc["task"]) == {"quirky"}
    kl = auc[auc["method"] == "finetune_kl"]
    assert set(kl["layer"]) == {"aggregated"}, "one score per prompt: no per-layer rows"
    maha = auc[(auc["method"] == "mahalanobis") & (auc["subset"] == "all")]
    assert set(maha["layer"]) == {"1", "2", "aggregated", "mean", "best"}
    assert auc.loc[auc["method"] == "probe_skyline", "skyline"].all()
    atp = scores[scores["method"] == "atp_mean_mahalanobis"]
    assert set(atp["layer"]) == {"0", "1", "aggregated"}, "keyed by the blocks whose heads write into layers 1 and 2"
    assert len(atp) == 3 * len(task.test), "one score per test prompt and key"
    # recall at low false-positive rates on held-out trusted scores, beside every layered AUROC
    assert {"recall_fpr1", "recall_fpr1_low", "recall_fpr1_high", "recall_fpr5"} <= set(auc.columns)
    r = maha.set_index("layer")
    assert r.loc[["1", "2", "aggregated", "best"], "recall_fpr5"].between(0, 1).all() and r.loc["mean", "recall_fpr5"] != r.loc["mean", "recall_fpr5"]
    assert (r.loc[["1", "2", "aggregated"], "recall_fpr1"] <= r.loc[["1", "2", "aggregated"], "recall_fpr5"]).all()
    assert kl["recall_fpr5"].isna().all(), "finetune_kl has no held-out trusted scores"


def test_sae_controls_are_methods_and_share_latents_as_measured(tiny_model):
    from madlib.models import zoo
    from madlib.features.sae import shared_latents
    from madlib.mad.suite import SAE_SOURCES, random_init, sae_controls

    table = suite.methods()
    assert table["sae_seed2_diag_mahalanobis"].features == "sae_seed2" and table["sae_random_new_latents"].detector == "sae_new_latents"
    rnd = random_init(tiny_model, seed=1)
    assert rnd.zoo_config == tiny_model.zoo_config and not hasattr(rnd, "model_dir")
    assert all(not torch.equal(a, b) for (k, a), (_, b) in zip(tiny_model.state_dict().items(), rnd.state_dict().items())
               if k.endswith(".W_Q"))  # fmt: skip
    assert torch.equal(random_init(tiny_model, seed=1).W_Q, rnd.W_Q), "seeded"
    cfg = suite.SuiteConfig(sae_d_sae=32, sae_k=4, sae_training_tokens=8192)
    records = zoo.training_records(tiny_model.zoo_config)
    t = sae_controls(tiny_model, "tiny", records, [1, 2], cfg, progress=False)
    assert list(t["layer"]) == [1, 2] and t[["shared_with_seed2", "shared_with_random"]].stack().between(0, 1).all()
    from madlib.mad.suite import _saes

    a, b = (_saes(tiny_model, "tiny", records, [1], cfg, False, c)[1] for c in ("", "seed2"))
    assert t.loc[0, "shared_with_seed2"] == shared_latents(a, b)
    assert shared_latents(a, a) == 1.0
    assert set(SAE_SOURCES) == {"sae", "sae_seed2", "sae_random"}
