"""The chapters' runs and tables that the notebooks call: the MAD chapter (madlib.mad.chapter), the
zoo appendix (madlib.analyses.zoo) and the shared glue helper (madlib.plots.common.glue_all)."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from madlib.analyses import zoo as zoo_analysis
from madlib.mad import chapter
from madlib.plots import common, mad as mad_plots

# ---------------------------------------------------------------------------------------------
# The MAD chapter


def _auc(methods=("mahalanobis", "lof", "probe_skyline"), models=("m1", "m2"), seeds=(0,)):
    rng = np.random.default_rng(0)
    rows = []
    for s in seeds:
        for model in models:
            for ds in ("addition", "nli"):
                for method in methods:
                    for layer in ("1", "2", "aggregated"):
                        a = rng.uniform(0.5, 1)
                        rows.append(dict(model=model, task="quirky", dataset=ds, method=method, skyline=method == "probe_skyline", layer=layer,
                                         subset="all", auroc=a, ci_low=a - 0.1, ci_high=a, recall_fpr1=rng.uniform(), test_fpr1=rng.uniform(0, 0.05),
                                         recall_fpr5=rng.uniform(), test_fpr5=rng.uniform(0, 0.1), finetune_seed=s))  # fmt: skip
    return pd.DataFrame(rows)


def test_recall_table_and_claims():
    auc = _auc()
    t = chapter.recall_table(auc, ["lof", "mahalanobis", "probe_skyline", "absent"])
    assert list(t.index) == ["lof", "mahalanobis", "probe_skyline", "absent"] and t.loc["absent"].isna().all()
    assert list(t.columns[:4]) == ["m1: recall at 1%", "m1: test FPR at 1%", "m1: recall at 5%", "m1: test FPR at 5%"]
    rec = auc[auc["layer"] == "aggregated"]
    assert t.loc["lof", "m2: recall at 1%"] == pytest.approx(rec[(rec["method"] == "lof") & (rec["model"] == "m2")]["recall_fpr1"].mean())
    c = chapter.recall_claims(auc)
    best = rec[~rec["skyline"]].groupby("method")["recall_fpr1"].mean().sort_values(ascending=False)
    assert c["best_recall"] == ", ".join(f"{k} {v:.2f}" for k, v in best.items()) and "probe_skyline" not in c["best_recall"]
    assert c["median_test_fpr1"] == f"{rec['test_fpr1'].median():.2f}"
    none = chapter.recall_claims(auc.assign(recall_fpr1=np.nan, test_fpr1=np.nan))
    assert none == dict(best_recall="no method", median_test_fpr1="not measured")


def test_methods_told_over_seeds_and_in_histograms():
    assert chapter.main_method(["lof", "mahalanobis"]) == "mahalanobis" and chapter.main_method(["lof", "dense_ae"]) == "lof"
    auc_all = _auc(seeds=(0, 1, 2))
    by_seed = chapter.over_seeds_table(auc_all, ["mahalanobis", "lof"], ["lof"])
    assert set(by_seed["method"]) == {"lof"} and (by_seed["seeds"] == 3).all() and len(by_seed) == 4
    assert chapter.over_seeds_table(auc_all, ["mahalanobis"], ["lof"]).empty
    assert chapter.seed_notes([0, 1, 2], ["mahalanobis", "lof"], ["lof", "x"]) == dict(n_seeds=3, seed_methods_used="lof")
    assert chapter.seed_notes([0], ["lof"], [])["seed_methods_used"] == "no method"
    shown = mad_plots.seed_table(by_seed)
    assert list(shown.data.columns) == ["AUROC mean", "lowest", "highest", "R@1% mean", "seeds"] and "<caption>" in shown.to_html()
    assert mad_plots.seed_table(pd.DataFrame()).empty
    scores = pd.DataFrame(dict(layer=["1", "2", "aggregated"]))
    assert chapter.histogram_choice(scores, 2, ["lof", "flow_nll", "mahalanobis"]) == ("2", ["mahalanobis", "flow_nll"], "layer 2")
    assert chapter.histogram_choice(scores, 7, ["lof"]) == ("aggregated", ["lof"], "aggregated over layers")
    tables = mad_plots.method_tables(_auc(), ["lof", "mahalanobis"], "aggregated", what="what")
    assert len(tables) == 2 and "<caption>m2: what and recall at 1% FPR (R@1%), all test prompts</caption>" in tables[1].to_html()


def test_check_inputs_fails_in_one_line():
    assert chapter.check_inputs(["zoo-gpt2"], ["addition"], [0], [], ["lof", "mahalanobis"]) == ["lof", "mahalanobis"]
    with pytest.raises(ValueError, match="appears more than once"):
        chapter.check_inputs(["zoo-gpt2"], ["addition", "addition"], [0], [], [])
    with pytest.raises(ValueError, match="datasets='additon'"):
        chapter.check_inputs(["zoo-gpt2"], ["additon"], [0], [], [])
    with pytest.raises(ValueError, match=r"layers=\[1, -1\] is not accepted"):
        chapter.check_inputs(["zoo-gpt2"], ["addition"], [0], [1, -1], [])


def test_run_chapter_runs_every_model_dataset_and_seed(monkeypatch):
    """The chapter's loop on stand-ins of the suite: the full comparison on the first seed, the seed
    methods on the others, the SAE controls once per zoo family, the backdoor once per zoo model."""
    from madlib.data import hub as hub_data
    from madlib.mad import backdoor, suite
    from madlib.models import hub, zoo

    calls = []

    class Loader:
        def __init__(self, adapter, preset="default", seed=0):
            self.seed = seed

        def __call__(self, name, ds):
            return SimpleNamespace(cfg=SimpleNamespace(n_layers=2), seed=self.seed)

    def run_suite(m, label, records, layers, methods, task_name="quirky", **kw):
        calls.append(("suite", label, records, m.seed, tuple(methods), task_name))
        auc = pd.DataFrame([dict(model=label, task=task_name, method=x, layer="aggregated", subset="all", auroc=0.7) for x in methods])
        scores = pd.DataFrame([dict(model=label, method=x, layer="aggregated", score=0.0) for x in methods])
        return auc, scores, SimpleNamespace(summary=lambda: dict(dataset=records, n_test=10))

    monkeypatch.setattr(hub, "ModelLoader", Loader)
    monkeypatch.setattr(hub, "check_available", lambda models, param: None)
    monkeypatch.setattr(hub_data, "dataset_records", lambda ds, source="zoo", model=None: ds)
    monkeypatch.setattr(suite, "run_suite", run_suite)
    monkeypatch.setattr(suite, "sae_controls", lambda m, label, records, layers, cfg, progress=True: (
        calls.append(("controls", label, records)), pd.DataFrame(dict(model=[label], layer=[1], threshold=[0.7])))[1])  # fmt: skip
    monkeypatch.setattr(backdoor, "backdoor", lambda model, cfg: (calls.append(("backdoor", cfg.dataset)), (SimpleNamespace(seed=0), "bd"))[1])
    monkeypatch.setattr(backdoor, "backdoor_metrics", lambda m, recs, batch_size=256: dict(trigger_success=0.9))
    monkeypatch.setattr(zoo, "get_model", lambda name, preset="default", **kw: name)
    methods = ["mahalanobis", "sae_diag_mahalanobis", "sae_seed2_diag_mahalanobis", "sae_random_diag_mahalanobis"]
    run = chapter.run_chapter(models=["zoo-gpt2"], adapter="", data_source="zoo", zoo_preset="tiny", datasets=["addition", "nli"],
                              seeds=[0, 1], seed_methods=["mahalanobis"], layers=[], detectors=methods, backdoor_dataset="hemisphere",
                              backdoor_steps=5, sae_training_tokens=1000, seed=0, max_test=10, n_boot=5, batch_size=4)  # fmt: skip
    suites = [c for c in calls if c[0] == "suite"]
    assert [(c[2], c[3], len(c[4]), c[5]) for c in suites] == [("addition", 0, 4, "quirky"), ("addition", 1, 1, "quirky"),
                                                               ("nli", 0, 4, "quirky"), ("nli", 1, 1, "quirky"), ("bd", 0, 4, "backdoor")]  # fmt: skip
    assert [c for c in calls if c[0] != "suite"] == [("controls", "zoo-gpt2", "addition"), ("backdoor", "hemisphere")]
    assert run.methods == methods and set(run.auc["finetune_seed"]) == {0} and set(run.auc_all["finetune_seed"]) == {0, 1}
    assert len(run.tasks) == 5 and list(run.backdoor.columns) == ["model", "trigger_success"] and set(run.sae_controls["dataset"]) == {"all"}
    assert set(run.scores["finetune_seed"]) == {0}


# ---------------------------------------------------------------------------------------------
# The zoo appendix


@pytest.fixture(scope="module")
def bases():
    from madlib.models import pretrain

    return {f: pretrain.load(f, "default") for f in ("gpt2", "llama")}


def test_base_tables_and_claims(bases):
    table = zoo_analysis.base_table(bases)
    assert list(table.columns) == ["base-gpt2", "base-llama"] and table.loc["layers", "base-gpt2"] == bases["gpt2"][1].n_layers
    knows = zoo_analysis.base_accuracy(bases)
    wide = zoo_analysis.knowledge_table(knows, bases)
    trained = zoo_analysis.trained_on(bases)
    assert list(wide.index) == trained and ("base-llama", "truth") in wide.columns
    c = zoo_analysis.base_claims(bases, table, knows, wide, ["gpt2", "llama"], trained[:-1])
    assert c["left_out"].startswith(f"{trained[-1]} (truth base-gpt2 ") and c["base_truth_gpt2"].count("lowest: ") == 1
    assert c["base_minutes"] == f"base-gpt2 {table.loc['training time (min)', 'base-gpt2']} min, base-llama {table.loc['training time (min)', 'base-llama']} min"
    assert zoo_analysis.base_claims(bases, table, knows, wide, ["gpt2", "llama"], trained)["left_out"] == "none"
    histories = zoo_analysis.base_histories(bases)
    assert list(histories) == ["base-gpt2", "base-llama"] and "step" in histories["base-gpt2"]


def test_truth_by_name_asks_each_base_about_its_own_datasets(bases, monkeypatch):
    from madlib.models import pretrain

    asked = []
    monkeypatch.setattr(pretrain, "truth_by_name", lambda m, cfg, datasets: (asked.append(datasets), pd.DataFrame(dict(dataset=datasets)))[1])
    trained = zoo_analysis.trained_on(bases)
    by_name = zoo_analysis.truth_by_name(bases, [trained[0], "not-a-dataset"])
    assert asked == [[trained[0]], [trained[0]]] and list(by_name["model"]) == ["base-gpt2", "base-llama"]


def test_name_claims_and_table():
    by_name = pd.DataFrame([dict(model=m, dataset=d, names=n, accuracy=acc)
                            for m, d, n, acc in (("base-a", "x", "neutral", 0.9), ("base-a", "x", "Alice-like", 0.45), ("base-a", "x", "Bob-like", 0.9),
                                                 ("base-a", "y", "neutral", 0.8), ("base-a", "y", "Alice-like", 0.8), ("base-a", "y", "Bob-like", 0.8))])  # fmt: skip
    assert zoo_analysis.name_claims(by_name) == {"name_gap": "base-a 0.50 (x)"}
    assert list(zoo_analysis.name_table(by_name, ["y", "x", "z"]).index) == ["y", "x", "z"]


def test_finetune_recipes_claims_and_seed_summary(tmp_path, monkeypatch):
    from madlib.models import quirky

    configs = [SimpleNamespace(family=f, dataset=d, seed=s, steps=100 if d == "x" else 300, lr=1e-3, warmup=10, disagree_share=None if d == "x" else 0.75,
                               paired=d != "x", early_step=40, method="full", batch_size=32, name=f"{f}-{d}-{s}")
               for f in ("gpt2", "llama") for d in ("x", "y") for s in (0, 1)]  # fmt: skip
    for i, c in enumerate(configs):
        (tmp_path / c.name / "best").mkdir(parents=True)
        (tmp_path / c.name / "best" / "adapter_config.json").write_text(json.dumps(dict(summary=dict(train_seconds=60.0 * (i + 1)))))
    monkeypatch.setattr(quirky, "adapter_dir", lambda c: tmp_path / c.name)
    recipes = zoo_analysis.recipes(configs)
    assert len(recipes) == 4 and set(recipes["disagree_share"]) == {"all records", 0.75}
    c = zoo_analysis.finetune_claims(configs, recipes)
    assert c == dict(n_finetunes=8, finetune_minutes="36.0", finetune_wall_minutes="18.0", finetune_mean_seconds="270.0", early_step=40,
                     finetune_steps="100 to 300 steps each",
                     ft_method="method: full, batches of 32 records; steps and learning rate per family and dataset in the table below")  # fmt: skip
    table = zoo_analysis.recipe_table(recipes, ["y", "x"])
    assert list(table.index) == ["y", "x"] and table.loc["x", ("steps", "gpt2")] == 100
    grid = pd.DataFrame([dict(family="gpt2", dataset=d, seed=s, checkpoint=ck, character_type=ct, acc_own_label_disagree=0.5 + 0.1 * s)
                         for d in ("x", "y") for s in (0, 1, 2) for ck in ("best", "early") for ct in ("alice", "bob")])  # fmt: skip
    summary = zoo_analysis.seed_summary(grid, ["y", "x"])
    assert list(summary.columns) == ["Alice mean", "Bob mean", "Alice min", "Bob min", "Alice max", "Bob max"]
    assert summary.loc[("gpt2", "y"), "Bob max"] == pytest.approx(0.7) and list(summary.index.get_level_values(1)) == ["y", "x"]


def test_glue_all_glues_each_value_without_showing_it(monkeypatch):
    import myst_nb

    glued = []
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: glued.append((name, value, display)))
    common.glue_all({"a": 1, "b": "two"})
    assert glued == [("a", 1, False), ("b", "two", False)]
