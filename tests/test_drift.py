import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from madlib.analyses import drift
from madlib.plots import drift as drift_plots
from madlib.models import zoo
from madlib.features.sae import SAEConfig, cached_sae


def test_topk_over_latents_and_overlap_known_answer():
    # before ranks latents 0, 1, ..., 9; after swaps the ranks of latents 1 and 8
    before = torch.arange(10, 0, -1).float()[None].repeat(3, 1)
    after = before.clone()
    after[:, [1, 8]] = after[:, [8, 1]]
    assert drift.topk_latents(before, 3).tolist() == [[0, 1, 2]] * 3, "over latents, best first"
    ov = drift.overlap_by_k(before, after, [1, 2, 5, 8, 9, 10])
    # top-k(after) = {0, 8, 2, ...}: latent 1 leaves for k in 2..8, both are back from k = 9
    want = {1: 1, 2: 1, 5: 4, 8: 7, 9: 9, 10: 10}
    assert {k: v.tolist() for k, v in ov.items()} == {k: [w] * 3 for k, w in want.items()}


def test_overlap_matches_set_intersection():
    g = torch.Generator().manual_seed(0)
    before, after = torch.randn(200, 40, generator=g), torch.randn(200, 40, generator=g)
    after[:100] = before[:100] + 0.3 * after[:100]  # half the positions barely move
    for k, got in drift.overlap_by_k(before, after, [1, 3, 7, 19]).items():
        a, b = before.argsort(1, descending=True)[:, :k], after.argsort(1, descending=True)[:, :k]
        want = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)]
        assert got.tolist() == want
        assert got[:100].float().mean() > got[100:].float().mean()


def test_rates_known_answers():
    # the seed's Gemma math cell: S = 3.47, G = 3.93 at k = 5
    r = drift.rates(3.47, 3.93, 5)
    assert r["rate_gap_over_k"] == pytest.approx(0.46 / 5)
    assert r["rate_gap_over_general"] == pytest.approx(0.46 / 3.93)
    assert r["rate_nonoverlap"] == pytest.approx((1.53 - 1.07) / 1.07)  # N_S = 5 - 3.47, N_G = 5 - 3.93
    assert r["rate_nonoverlap"] > 0.15 > r["rate_gap_over_general"] > r["rate_gap_over_k"]
    same = drift.rates(4.0, 4.0, 5)
    assert all(v == 0 for v in same.values())
    assert math.isnan(drift.rates(4.0, 5.0, 5)["rate_nonoverlap"]), "no drift on the general set: N_G = 0"
    assert drift.rates(5.0, 4.0, 5)["rate_nonoverlap"] == -1.0


def test_value_change_known_answer():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    z = scores.clamp_min(0)
    after = z.clone()
    after[0, 0] = 6.0  # +3 on the top latent of row 0
    after[1, 3] = 0.0  # row 1 loses its top latent (3)
    after[0, 3] = 9.0  # outside row 0's top-2: ignored
    assert drift.value_change(scores, z, after, 2) == pytest.approx((3 + 3) / (3 + 2 + 3 + 2))
    assert drift.value_change(scores, z, z, 2) == 0.0


def test_task_names():
    assert drift.DriftTask.parse("population") == drift.DriftTask("population", "population", None)
    assert drift.DriftTask.parse("addition-large").max_digits == 3.0
    assert drift.DriftTask.parse("squaring-large", large_digits=3).max_digits == 2.0
    for bad in ("population-large", "capitals", "sentiment-large"):
        with pytest.raises(ValueError, match=f"tasks='{bad}'"):
            drift.DriftTask.parse(bad)


def test_training_data_labels():
    recs = pd.DataFrame(dict(split=["train"] * 3 + ["validation"], prompt=list("abcd"), alice_label=[1, 0, 1, 1],
                             bob_label=[0, 0, 1, 0], label=[1, 0, 1, 0]))  # fmt: skip
    texts, y = drift.training_data(recs, "truth", 10, 0)
    assert sorted(texts) == ["a", "b", "c"] and dict(zip(texts, y)) == {"a": 1, "b": 0, "c": 1}
    texts, y = drift.training_data(recs, "bob", 10, 0)
    assert dict(zip(texts, y)) == {"a": 0, "b": 0, "c": 1}
    assert drift.training_data(recs, "none", 2, 0)[1] is None and len(drift.training_data(recs, "none", 2, 0)[0]) == 2
    with pytest.raises(ValueError, match="finetune_labels='alice'"):
        drift.training_data(recs, "alice", 10, 0)


def test_audit_ranks_candidates():
    rows = []
    cells = [("m-a", "a", [2.0, 4.0, 4.5], [0.1, 0.3, 0.2]), ("m-b", "b", [3.0, 4.2, 4.1], [0.1, 0.4, 0.2])]
    for ft, task, means, dists in cells:
        for s, m, d in zip(["a", "b", drift.GENERAL], means, dists):
            rows.append(dict(finetuned=ft, task=task, eval_set=s, k=5, intersection_mean=m, value_change=-m,
                             act_distance=d))  # fmt: skip
    a = drift.audit(pd.DataFrame(rows), 5).set_index(["task", "signal"])
    assert a.loc[("a", "sae_intersection"), "predicted"] == "a"
    assert a.loc[("b", "sae_intersection"), "true_rank"] == 2
    assert a.loc[("a", "activation_distance"), "true_rank"] == 2 and a.loc[("b", "activation_distance"), "hit"]
    assert (a["n_candidates"] == 2).all(), "the general set is no candidate"
    # centred: candidate a has mean 2.5 over the fine-tunes, b 4.1; m-b's centred values are a: 0.5, b: 0.1
    assert a.loc[("b", "sae_intersection_centred"), "hit"] and a.loc[("a", "sae_intersection_centred"), "hit"]
    with pytest.raises(ValueError, match="k=3"):
        drift.audit(pd.DataFrame(rows), 3)


def _zoo_entry(model):
    """The zoo entry of a zoo model (its typed record where the loaders attach one)."""
    try:
        from madlib.models.info import require_zoo
    except ImportError:
        return model.zoo_config
    return require_zoo(model)


def test_drift_table_identity_and_perturbed_copy(tiny_model):
    hook = "blocks.1.hook_resid_pre"
    recs = zoo.model_records(tiny_model, "addition")
    cfg = SAEConfig(d_sae=64, k=8, training_tokens=256 * 20, batch_size=256, lr=3e-3)
    sae = cached_sae(tiny_model, hook, recs["prompt"].head(200).tolist(), cfg, "tiny-drift", progress=False)
    noisy = copy.deepcopy(tiny_model)
    with torch.no_grad():
        w = noisy.blocks[0].mlp.W_out
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    sets = drift.eval_sets(tiny_model, [drift.DriftTask.parse("addition")], 14, 0)
    general = sets[drift.GENERAL]
    assert len(sets["addition"]) == 14 and set(general) == set(_zoo_entry(tiny_model).datasets)
    assert all(len(v) == 2 for v in general.values()), "ceil(14 / 9) per dataset: 14 or more without any one dataset"
    own = drift.general_texts(general, "addition-large")
    assert len(own) == 18 and not set(own) & set(general["addition"]), "the task's dataset is left out of its general set"
    assert len(drift.general_texts(general, "noisy")) == 20 and drift.general_texts(["a", "b"], "addition") == ["a", "b"]
    tab = drift.drift_table(tiny_model, "tiny", {"addition": tiny_model, "noisy": noisy}, sae, hook, sets, [1, 5, 19],
                            progress=False)  # fmt: skip
    same = tab[tab["task"] == "addition"]
    assert (same["intersection_mean"] == same["k"]).all() and (same["act_distance"] == 0).all()
    assert (same["value_change"] == 0).all() and (same["rate_gap_over_k"] == 0).all()
    assert np.allclose(same["recon_explained_variance"], same["recon_base_explained_variance"])
    moved = tab[tab["task"] == "noisy"]
    assert (moved["intersection_mean"] < moved["k"]).all() and (moved["act_distance"] > 0).all()
    gen = moved[moved["eval_set"] == drift.GENERAL]
    assert (gen["n_tokens"] > tab.loc[(tab["task"] == "addition") & (tab["eval_set"] == drift.GENERAL), "n_tokens"].max()).all()
    assert (gen[list(drift.RATES)].fillna(0) == 0).all().all(), "the general set's rates against itself are 0"
    assert {"base", "finetuned", "task", "eval_set", "k", "intersection_mean", "recon_kl_div_score"} <= set(tab.columns)
    with pytest.raises(ValueError, match="k=65"):
        drift.drift_table(tiny_model, "tiny", {}, sae, hook, sets, [65], progress=False)


def test_drift_figures_are_legible_at_the_column_width():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from madlib.plots.common import displayed_text_px

    rng = np.random.default_rng(0)
    tasks = ["addition", "subtraction", "hemisphere", "sentiment", "nli", "sciq"]
    rows = []
    for k in (4, 8, 16, 32):
        for task in tasks:
            for ev in [*tasks, drift.GENERAL]:
                rows.append(dict(k=k, task=task, eval_set=ev, is_task=ev == task, intersection_mean=rng.uniform(0, k),
                                 value_change=rng.uniform(), act_distance=rng.uniform(),
                                 **{r: rng.uniform(-0.2, 0.5) for r in drift.RATES}))  # fmt: skip
    table = pd.DataFrame(rows)
    figs = [drift_plots.plot_task_vs_general(table, 16), drift_plots.plot_k_ablation(table), drift_plots.plot_drift_matrix(table, 16)]
    try:
        assert min(displayed_text_px(f) for f in figs) >= 9
    finally:
        plt.close("all")


def _claims_tables(own: float, general: float, rates: list[float], kl: float):
    rows = []
    for task in ("math", "code"):
        for ev in ("math", "code", "general"):
            for k, r in zip((1, 2, 3), rates):
                rows.append(dict(task=task, eval_set=ev, k=k, is_task=ev == task, intersection_mean=own if ev == task else general,
                                 rate_nonoverlap=r, rate_gap_over_general=r / 2, recon_base_explained_variance=0.9,
                                 recon_explained_variance=0.85, recon_kl_div_score=kl, recon_ce_loss_score=0.95))  # fmt: skip
    summary = pd.DataFrame([dict(k=k, signal=s, accuracy=a) for k in (1, 2, 3)
                            for s, a in (("sae_intersection", 1.0), ("activation_distance", 0.5), ("sae_intersection_centred", 0.5))])  # fmt: skip
    return pd.DataFrame(rows), summary, pd.DataFrame({"n_candidates": [4, 4]})


def test_chapter_claims_tell_what_holds_and_what_does_not():
    table, summary, audit = _claims_tables(own=0.3, general=0.6, rates=[0.4, 0.2, 0.1], kl=0.97)
    c = drift.chapter_claims(table, summary, audit, k=2, k_max=3)
    assert c["task_general_verdict"].startswith("Task < general holds for every one of the 2 fine-tunes")
    assert c["abl_verdict"].startswith("falls with k") and c["abl_rho"] == pytest.approx(-1.0)
    assert c["n_over15"] == "2 of 2" and c["n_cells_hold"] == "6 of 6" and c["chance"] == 0.25
    assert c["acc_sae_intersection"] == 1.0 and "still fits" in c["control_verdict"]
    table, summary, audit = _claims_tables(own=0.6, general=0.3, rates=[0.1, 0.2, 0.3], kl=0.5)
    c = drift.chapter_claims(table, summary, audit, k=2, k_max=3)
    assert c["task_general_verdict"].startswith("Task < general holds for 0 of the 2 fine-tunes, not for math, code")
    assert c["abl_verdict"].startswith("does not fall") and c["abl_rho"] == pytest.approx(1.0) and c["n_cells_hold"] == "0 of 6"
    assert "reconstruction failure" in c["control_verdict"]


# ---------------------------------------------------------------------------------------------
# The chapter's run and tables (madlib.analyses.drift, notebooks/drift.ipynb)


def _run_table(tasks=("addition", "nli"), ks=(1, 2, 3)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for t in tasks:
        for ev in [*tasks, drift.GENERAL]:
            for k in ks:
                rows.append(dict(task=t, eval_set=ev, is_task=ev == t, k=k, intersection_mean=k * rng.uniform(0.3, 0.9),
                                 finetuned=f"b-{t}", value_change=rng.uniform(), act_distance=rng.uniform(),
                                 **{f"recon_{c}": 0.9 for c in drift.RECON_COLUMNS}, **{f"recon_base_{c}": 0.95 for c in drift.RECON_COLUMNS},
                                 **{r: 0.1 * k for r in drift.RATES}))  # fmt: skip
    return pd.DataFrame(rows)


def test_chapter_tables_of_the_drift_table():
    table = _run_table()
    recon = drift.reconstruction_table(table, 2)
    assert list(recon.columns) == list(drift.RECON_COLUMNS) and recon.index.names == ["model", "eval_set"]
    assert list(recon.index.get_level_values(0).unique()) == ["base", "fine-tuned on addition", "fine-tuned on nli"]
    assert len(recon.loc["base"]) == 3 and (recon.loc["base", "kl_div_score"] == 0.95).all()
    cell = drift.task_general_table(table, 2)
    own = table[(table["k"] == 2) & table["is_task"]].set_index("task")["intersection_mean"]
    assert list(cell.columns) == ["S (task set)", "G (general set)", *drift.RATES] and cell["S (task set)"].equals(own.rename("S (task set)"))
    audits = pd.concat([drift.audit(table, k) for k in (1, 2, 3)], ignore_index=True)
    summary = drift.audit_summary(audits)
    assert len(summary) == 6 * 3 and summary["n_finetunes"].eq(2).all() and summary["accuracy"].between(0, 1).all()
    assert summary.loc[0, "signal"] == "sae_intersection" and summary.loc[0, "k"] == 1


def test_run_drift_wires_the_chapter_and_tells_its_subjects(monkeypatch, tmp_path):
    """run_drift on stand-ins of the heavy steps: which SAE, fine-tunes and sets it builds, and the
    table's settings columns; the run's statements; its errors."""
    from types import SimpleNamespace

    from madlib.features import sae as msae
    from madlib.models import hub

    entry = SimpleNamespace(datasets=["addition", "nli", "sciq"])
    base = SimpleNamespace(cfg=SimpleNamespace(device="cpu", n_layers=4, model_name="zoo-gpt2"), zoo_config=entry)
    try:  # the typed model record, where the loaders attach one
        from madlib.models.info import ModelInfo, attach

        attach(base, ModelInfo(zoo=entry))
    except ImportError:
        pass
    calls = {}
    monkeypatch.setattr(hub, "load_model", lambda model, preset="default": base)
    monkeypatch.setattr(hub, "load_sae", lambda spec, sae_id, device=None: calls.setdefault("load_sae", (spec, sae_id)) and "SAE")
    monkeypatch.setattr(hub, "sae_hook_name", lambda s: "blocks.3.hook_resid_post")
    recs = pd.DataFrame(dict(split="train", dataset=["addition", "nli"] * 10, prompt=[f"p{i}" for i in range(20)]))
    monkeypatch.setattr(zoo, "training_records", lambda info: recs)
    monkeypatch.setattr(msae, "cached_sae", lambda m, hook, texts, cfg, name: calls.setdefault("sae", (hook, len(texts), cfg.d_sae, name)))
    monkeypatch.setattr(drift, "finetune_tasks", lambda b, name, tl, cfg, labels, n: {t.name: f"ft-{t.name}" for t in tl})
    monkeypatch.setattr(drift, "eval_sets", lambda b, tl, n, seed: {**{t.name: ["q"] for t in tl}, drift.GENERAL: ["g"]})
    monkeypatch.setattr(drift, "drift_table", lambda b, name, fts, sae, hook, sets, ks, **kw: _run_table(tuple(fts), tuple(ks)))
    params = dict(model="zoo-gpt2", finetuned={}, task_prompts={}, sae="", sae_id="", max_tokens=128, zoo_preset="tiny", layer=2,
                  tasks=["addition", "nli"], large_digits=3.0, finetune_labels="quirky", finetune_steps=5, finetune_batch_size=8,
                  finetune_lr=1e-3, n_finetune=16, sae_d_sae=64, sae_k=8, sae_training_tokens=4096, sae_batch_size=512, sae_lr=1e-3,
                  n_sae_texts=5, n_eval=10, k=2, k_max=3, seed=0, batch_size=8)  # fmt: skip
    run = drift.run_drift(**params)
    assert run.base_name == "zoo-gpt2-tiny" and run.is_zoo and run.hook == "blocks.2.hook_resid_pre"
    assert calls["sae"] == ("blocks.2.hook_resid_pre", 10, 64, "zoo-gpt2-tiny-sae-L2")  # five train prompts of each dataset
    assert [t.name for t in run.tasks] == ["addition", "nli"] and set(run.sets) == {"addition", "nli", drift.GENERAL}
    assert run.table[["layer", "hook", "sae_k", "finetune_labels", "seed"]].drop_duplicates().values.tolist() == [[2, "blocks.2.hook_resid_pre", 8, "quirky", 0]]
    assert sorted(run.audit["k"].unique()) == [1, 2, 3] and (run.audit["seed"] == 0).all()
    c = drift.run_claims(run, "zoo-gpt2", {}, "", "")
    assert c["n_finetunes"] == 2 and c["n_base_datasets"] == 3 and c["base_name"] == "zoo-gpt2-tiny" and c["total_minutes"] >= 0
    assert c["subjects_note"] == "This run audits 2 fine-tunes that madlib trains from the zoo model zoo-gpt2-tiny."
    assert c["sae_note"] == "This run's SAE was trained on the base model at blocks.2.hook_resid_pre."
    # external fine-tunes with a pretrained SAE
    monkeypatch.setattr(drift, "text_sets", lambda tp, names, n, seed: {**{k: ["q"] for k in names}, drift.GENERAL: ["g"]})
    ext = dict(params, model="org/base", finetuned={"addition": "org/ft", "nli": ["org/base", "org/adapter"]}, sae="release", sae_id="L3")
    run = drift.run_drift(**ext)
    assert run.base_name == "base" and not run.is_zoo and run.hook == "blocks.3.hook_resid_post" and run.tasks == []
    assert run.table["layer"].isna().all() and calls["load_sae"] == ("release", "L3") and callable(run.fine_tunes["nli"])
    c = drift.run_claims(run, ext["model"], ext["finetuned"], "release", "L3")
    assert c["subjects_note"].startswith("This run audits external fine-tunes of org/base: addition (org/ft), nli (org/base + org/adapter)")
    assert c["sae_note"] == "This run's SAE is the pretrained release / L3 at blocks.3.hook_resid_post." and c["n_base_datasets"] == len(drift.qdata.DATASETS)
    with pytest.raises(ValueError, match=r"k=4 is not accepted; give a k in 1..k_max=3"):
        drift.run_drift(**dict(params, k=4))
    with pytest.raises(ValueError, match=r"finetuned=\{\} is not accepted for model='org/base'"):
        drift.run_drift(**dict(params, model="org/base"))


def test_behaviour_table_before_and_after_each_fine_tune(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(drift, "truth_accuracy", lambda model, recs, n=500, seed=0, batch_size=128: dict(truth_acc_alice=0.9 if model == "base" else 0.6))
    monkeypatch.setattr(zoo, "history", lambda m: pd.DataFrame(dict(loss=np.arange(40.0))))
    task = SimpleNamespace(name="addition", records=lambda base: "records")
    run = SimpleNamespace(tasks=[task], base="base", fine_tunes={"addition": "ft"})
    t = drift.behaviour_table(run, n_eval=10)
    assert t.to_dict("records") == [dict(task="addition", final_loss=29.5, base_truth_acc_alice=0.9, finetuned_truth_acc_alice=0.6)]
    assert drift.behaviour_table(SimpleNamespace(tasks=[]), n_eval=10).empty
    assert drift.base_name_of("zoo-gpt2", "default", True) == "zoo-gpt2" and drift.base_name_of("zoo-gpt2", "tiny", True) == "zoo-gpt2-tiny"
