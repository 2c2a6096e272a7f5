"""The MAD chapter (``notebooks/mad_auc.ipynb``): its run over models, datasets and fine-tuning
seeds (:func:`run_chapter`), and the tables and statements the page shows beside the figures of
:mod:`madlib.plots.mad`. The chapter's findings against EleutherAI's Research Update 2 are
:func:`madlib.mad.task.chapter_claims`.

The full comparison (every chosen method) runs on the first fine-tuning seed's models; the
``seed_methods`` run on every seed's. A zoo family's SAE controls are measured once (its SAEs serve
all its fine-tunes); the backdoor task runs once per zoo model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

AUC_COLUMNS: list[str] = [
    "model", "task", "dataset", "method", "feature_source", "skyline", "layer", "selected_layer", "subset", "auroc",
    "ci_low", "ci_high", "recall_fpr1", "recall_fpr1_low", "recall_fpr1_high", "test_fpr1", "recall_fpr5",
    "recall_fpr5_low", "recall_fpr5_high", "test_fpr5", "n", "seed", "finetune_seed",
]  # fmt: skip
"""Columns of the book's ``auc.csv``."""
MAIN_METHOD = "mahalanobis"
"""The method the chapter reports by family and over seeds (the first chosen one if not run)."""
HISTOGRAM_METHODS: tuple[str, ...] = ("mahalanobis", "sae_diag_mahalanobis", "atp_mean_mahalanobis", "flow_nll")
"""Methods whose score histograms are drawn, where run (else the first chosen one)."""
RECALL_NAMES: dict[str, str] = {"recall_fpr1": "recall at 1%", "test_fpr1": "test FPR at 1%", "recall_fpr5": "recall at 5%",
                                "test_fpr5": "test FPR at 5%"}  # fmt: skip
"""Columns of the recall table, by metric of the AUROC table."""


@dataclass
class MadChapter:
    """The tables of the chapter's run: the AUROC rows of every fine-tuning seed (``auc_all``) and
    of the first seed (``auc``: the full comparison), the first seed's per-prompt test scores, the
    MAD task of each model, task and dataset, the backdoor's behaviour per zoo model, the SAE
    controls, and the methods run (``methods``, in the chapter's order)."""

    auc_all: pd.DataFrame
    auc: pd.DataFrame
    scores: pd.DataFrame
    tasks: pd.DataFrame
    backdoor: pd.DataFrame
    sae_controls: pd.DataFrame
    methods: list[str]


def check_inputs(models: list[str], datasets: list[str], seeds: list[int], layers: list[int], detectors: list[str],
                 data_source: str = "zoo") -> list[str]:  # fmt: skip
    """Fail in one line, before any work, on a model that cannot be loaded, a repeated item, a
    misspelt dataset, a layer that is not an integer >= 0, or an unknown method; return the
    chosen methods' names (:func:`madlib.mad.suite.resolve_methods`, the full comparison for none)."""
    from ..data import datasets as qdata, hub as hub_data
    from ..models.hub import check_available
    from .suite import resolve_methods

    check_available(models, "model")  # a misspelt zoo name or an unreachable hub id fails here, not after the first models' analyses
    for param, values in (("model", models), ("datasets", datasets), ("seeds", seeds), ("layers", layers), ("detectors", detectors)):
        qdata.check_unique(param, values)  # a repeated item would count twice or collide in the tables
    for ds in datasets:  # a misspelt dataset fails here, not after the first datasets' analyses
        qdata.check_choice("datasets", ds, qdata.DATASETS if data_source == "zoo" else hub_data.HUB_DATASETS)
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(f"layers={layers!r} is not accepted; give residual-stream layers as integers >= 0")
    return [m.name for m in resolve_methods(detectors, "detectors")]


def run_chapter(
    *, models: list[str], adapter: str, data_source: str, zoo_preset: str, datasets: list[str], seeds: list[int],
    seed_methods: list[str], layers: list[int], detectors: list[str], backdoor_dataset: str, backdoor_steps: int,
    sae_training_tokens: int, seed: int, max_test: int, n_boot: int, batch_size: int,
) -> MadChapter:  # fmt: skip
    """The MAD chapter's run, from its parameters (see the notebook's parameters cell): the suite
    (:func:`madlib.mad.suite.run_suite`) on every model, dataset and fine-tuning seed (the full
    comparison on the first seed, ``seed_methods`` on the others; models outside the zoo once),
    the SAE controls (:func:`madlib.mad.suite.sae_controls`) when the chosen methods include every
    SAE source, and the backdoor task on each zoo model (unless ``backdoor_dataset`` is empty)."""
    from ..data import hub as hub_data
    from ..features.activations import resolve_layers
    from ..models import zoo
    from ..models.finetune import FinetuneConfig
    from ..models.hub import ModelLoader, model_label
    from .backdoor import BackdoorConfig, backdoor, backdoor_metrics
    from .suite import SAE_SOURCES, SuiteConfig, resolve_methods, run_suite, sae_controls

    models = list(models)
    chosen = check_inputs(models, datasets, seeds, layers, detectors, data_source)
    loaders = {s: ModelLoader(adapter, preset=zoo_preset, seed=s) for s in seeds}
    suite_cfg = SuiteConfig(sae_training_tokens=sae_training_tokens, seed=seed)
    bd_cfg = BackdoorConfig(dataset=backdoor_dataset or "hemisphere", finetune=FinetuneConfig(steps=backdoor_steps, seed=seed))
    aucs, scores, tasks, bd, sae_ctrl = [], [], [], [], []
    with_controls = set(SAE_SOURCES) <= {m.features for m in resolve_methods(chosen)}
    for name in models:
        label = model_label(name)
        for ds in datasets:
            for s in (seeds if name in zoo.ZOO else seeds[:1]):
                m = loaders[s](name, ds)
                lay = resolve_layers(layers, m.cfg.n_layers)
                records = hub_data.dataset_records(ds, source=data_source, model=m)
                run = chosen if s == seeds[0] else [x for x in chosen if x in seed_methods]
                auc_ds, sc, task = run_suite(m, label, records, lay, run, cfg=suite_cfg, max_test=max_test, n_boot=n_boot, seed=seed,
                                             batch_size=batch_size)  # fmt: skip
                aucs.append(auc_ds.assign(finetune_seed=s))
                scores.append(sc.assign(finetune_seed=s))
                tasks.append({"model": label, "task": "quirky", "finetune_seed": s, **task.summary()})
                if with_controls and s == seeds[0] and (ds == datasets[0] or name not in zoo.ZOO):  # a zoo family's SAEs serve all its fine-tunes
                    sae_ctrl.append(sae_controls(m, label, records, lay, suite_cfg, progress=False).assign(dataset=ds if name not in zoo.ZOO else "all"))
        if backdoor_dataset and name in zoo.ZOO:
            bd_model, bd_records = backdoor(zoo.get_model(name, preset=zoo_preset), bd_cfg)
            bd.append({"model": label, **backdoor_metrics(bd_model, bd_records, batch_size=batch_size)})
            auc_ds, sc, task = run_suite(bd_model, label, bd_records, lay, chosen, task_name="backdoor", cfg=suite_cfg, max_test=max_test,
                                         n_boot=n_boot, seed=seed, batch_size=batch_size)  # fmt: skip
            aucs.append(auc_ds.assign(finetune_seed=seeds[0]))
            scores.append(sc.assign(finetune_seed=seeds[0]))
            tasks.append({"model": label, "task": "backdoor", **task.summary()})
    auc_all = pd.concat(aucs, ignore_index=True)
    all_scores = pd.concat(scores, ignore_index=True)
    return MadChapter(
        auc_all=auc_all,
        auc=auc_all[auc_all["finetune_seed"] == seeds[0]],  # the full comparison: the first seed's fine-tunes
        scores=all_scores[all_scores["finetune_seed"] == seeds[0]],
        tasks=pd.DataFrame(tasks),
        backdoor=pd.DataFrame(bd),
        sae_controls=pd.concat(sae_ctrl, ignore_index=True) if sae_ctrl else pd.DataFrame(),
        methods=chosen,
    )


def main_method(methods: list[str]) -> str:
    """:data:`MAIN_METHOD` if it was run, else the first method run."""
    return MAIN_METHOD if MAIN_METHOD in methods else methods[0]


def _recall_rows(auc: pd.DataFrame) -> pd.DataFrame:
    return auc[(auc["layer"] == "aggregated") & (auc["subset"] == "all") & (auc["task"] == "quirky")]


def recall_table(auc: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Recall of anomalies at 1% and 5% false-positive rate on held-out trusted prompts, with the
    false-positive rate on the test set's normal prompts beside each: aggregated score, all test
    prompts of the quirky task, mean over datasets; one row per method (in ``methods``' order),
    a column per model and :data:`RECALL_NAMES` entry."""
    rec = _recall_rows(auc)
    recall = rec.pivot_table(index="method", columns="model", values=list(RECALL_NAMES)).reindex(methods)
    recall = recall[[(c, m) for m in rec["model"].unique() for c in RECALL_NAMES]]
    recall.columns = [f"{m}: {RECALL_NAMES[c]}" for c, m in recall.columns]
    return recall


def recall_claims(auc: pd.DataFrame, top: int = 3) -> dict[str, str]:
    """The ``top`` detectors (skylines left out) by mean recall at 1% FPR, and the median
    false-positive rate on the test set's normal prompts at the 1% threshold."""
    rec = _recall_rows(auc)
    by_method = rec[~rec["skyline"]].groupby("method")["recall_fpr1"].mean().dropna().sort_values(ascending=False)
    return dict(best_recall=", ".join(f"{k} {v:.2f}" for k, v in by_method.head(top).items()) or "no method",
                median_test_fpr1=f"{rec['test_fpr1'].median():.2f}" if rec["test_fpr1"].notna().any() else "not measured")  # fmt: skip


def over_seeds_table(auc_all: pd.DataFrame, methods: list[str], seed_methods: list[str]) -> pd.DataFrame:
    """:func:`madlib.mad.task.over_seeds` of every method run on every seed, stacked with a
    ``method`` column (empty when none was)."""
    from .task import over_seeds

    if not any(m in seed_methods for m in methods):
        return pd.DataFrame()
    return pd.concat([over_seeds(auc_all, m).assign(method=m) for m in methods if m in seed_methods])


def seed_notes(seeds: list[int], methods: list[str], seed_methods: list[str]) -> dict[str, object]:
    """The number of fine-tuning seeds and the methods run on each, as the chapter tells them."""
    return dict(n_seeds=len(seeds), seed_methods_used=", ".join(m for m in methods if m in seed_methods) or "no method")


def histogram_choice(scores: pd.DataFrame, hist_layer: int, methods: list[str]) -> tuple[str, list[str], str]:
    """The layer whose score histograms are drawn (``hist_layer`` if scored there, else the
    aggregate), the methods drawn (:data:`HISTOGRAM_METHODS` that were run, else the first method)
    and the layer in words."""
    layer = str(hist_layer) if str(hist_layer) in set(scores["layer"]) else "aggregated"
    shown = [m for m in HISTOGRAM_METHODS if m in methods] or methods[:1]
    return layer, shown, f"layer {layer}" if layer != "aggregated" else "aggregated over layers"
