import json

import numpy as np
import pytest
import torch

from madlib.detectors import FeatureSource, Mahalanobis
from madlib.mad import suite
from madlib.models import zoo
from madlib.models.info import info_of, zoo_info


def test_best_layer_is_chosen_on_one_half_and_reported_on_the_other():
    rng = np.random.default_rng(0)
    y = np.repeat([False, True], 200)
    select = suite.selection_half(y, seed=0)
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
    assert all(isinstance(m.features, FeatureSource) for m in table.values()) and set(FeatureSource) == {m.features for m in table.values()}
    assert table["atp_pcs_lof"].features is FeatureSource.ATP_PCS and table["atp_pcs_lof"].detector == "lof"
    assert table["finetune_kl"].features is FeatureSource.PROMPTS and not FeatureSource.PROMPTS.layered
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
    # the settings each method ran with: a JSON column after the columns the table always had, and a table of its own
    assert list(auc.columns[-3:]) == ["seed", "config", "detector_config"] and list(auc.columns[:6]) == [
        "model", "task", "dataset", "method", "feature_source", "skyline"]
    assert (auc.groupby("method")["detector_config"].nunique() == 1).all()
    settings = suite.detector_settings(auc)
    assert list(settings.columns) == ["model", "task", "dataset", "method", "feature_source", "detector", "detector_config", "config"]
    assert list(settings["method"]) == chosen and list(settings["detector"]) == ["mahalanobis", "mahalanobis", "finetune_kl", "probe_skyline"]
    maha_cfg = json.loads(settings.loc[0, "detector_config"])
    assert maha_cfg == {"detector": "mahalanobis", "seed": 0, "config": Mahalanobis().config.to_dict()}
    kl_cfg = json.loads(settings.loc[2, "detector_config"])["config"]
    assert kl_cfg["cfg"]["steps"] == 5 and kl_cfg["cfg"]["batch_size"] == 8 and kl_cfg["over"] == "answers"
    assert list(settings["feature_source"]) == ["activations", "atp_mean", "prompts", "activations"]


def test_sae_controls_are_methods_and_share_latents_as_measured(tiny_model):
    from madlib.models import zoo
    from madlib.features.sae import shared_latents
    from madlib.mad.suite import SAE_SOURCES, layer_saes, random_init, sae_controls

    table = suite.methods()
    assert table["sae_seed2_diag_mahalanobis"].features == "sae_seed2" and table["sae_random_new_latents"].detector == "sae_new_latents"
    rnd = random_init(tiny_model, seed=1)
    assert zoo_info(rnd) == zoo_info(tiny_model) and info_of(rnd).model_dir is None
    assert all(not torch.equal(a, b) for (k, a), (_, b) in zip(tiny_model.state_dict().items(), rnd.state_dict().items())
               if k.endswith(".W_Q"))  # fmt: skip
    assert torch.equal(random_init(tiny_model, seed=1).W_Q, rnd.W_Q), "seeded"
    cfg = suite.SuiteConfig(sae_d_sae=32, sae_k=4, sae_training_tokens=8192)
    records = zoo.training_records(zoo_info(tiny_model))
    t = sae_controls(tiny_model, "tiny", records, [1, 2], cfg, progress=False)
    assert list(t["layer"]) == [1, 2] and t[["shared_with_seed2", "shared_with_random"]].stack().between(0, 1).all()
    a, b = (layer_saes(tiny_model, "tiny", records, [1], cfg, False, c)[1] for c in ("", "seed2"))
    assert t.loc[0, "shared_with_seed2"] == shared_latents(a, b)
    assert shared_latents(a, a) == 1.0
    assert set(SAE_SOURCES) == {"sae", "sae_seed2", "sae_random"}
