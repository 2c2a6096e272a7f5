"""Every MAD method of methods.md §3 on one MAD task, from cached features.

A *method* is a feature source plus a detector (:class:`madlib.detectors.Method`; the list of every
method is :mod:`madlib.detectors.registry`), and the suite makes each method's features according
to its :class:`~madlib.detectors.FeatureSource`:

* ``activations``: the residual stream at the last prompt token (:mod:`madlib.features.activations`),
  scored by any activation detector of :mod:`madlib.detectors` (the Gaussian family, LOF,
  isolation forest, flows, autoencoders, Beatrix, TED, and the supervised ``probe_skyline``);
* ``sae``: the same activations encoded by a top-k SAE per layer, trained with sae-lens on the
  model's activations at every token of a sample of the training prompts (:func:`madlib.features.sae.cached_sae`),
  scored by ``sae_diag_mahalanobis`` and ``sae_new_latents``;
* ``atp_mean``, ``atp_pcs``, ``atp_grad_norm``, ``probe_shift``: attribution-patching effects per
  attention head and probe-shift features (:mod:`madlib.features.attribution`), keyed by block (AtP) or
  residual layer (probe shift), scored by Mahalanobis and LOF (layer ``L`` of the analysis brings
  in the heads of block ``L - 1``, the last to write into that stream);
* ``prompts``: ``finetune_kl``, the KL between the model's answer distribution and that of a copy
  fine-tuned on the trusted prompts — one score per prompt, no layers.

Every detector runs with its default settings (the SAE detectors on the SAEs above, ``finetune_kl``
with the fine-tune of :class:`SuiteConfig`); the AUROC table records them per method in its
``detector_config`` column (:meth:`madlib.detectors.Detector.settings` as JSON), and
:func:`detector_settings` reduces it to one row per method.

Features are computed once per model, prompts and options and cached on disk
(:mod:`madlib.features.cache`), so choosing other methods reruns scoring only. Besides the per-layer,
``aggregated`` and ``mean`` rows of :func:`madlib.mad.metrics.auroc_table`, every layered method gets a
``best`` row: the layer with the highest AUROC on a *selection* half of the test set, reported on
the other half (never chosen on the scores it reports).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models.info import ModelInfo, attach, zoo_info
from ..models.hooks import hook_name
from ..features.cache import cached_tensors, feature_key
from ..detectors import KL_FINETUNE, SAE_LATENTS, Detector, FeatureSource, LabelledFeatures, Method, PromptDetector, method
from ..detectors import methods as registry_methods
from .task import SUBSETS, MadFeatures, MadTask, auroc_rows, extract_task, mad_task, score_frame, split_trusted
from .metrics import FPRS, aggregate_layers, auroc, bootstrap_counts, recall_at_fpr, recall_columns, weighted_auroc

ATP_SOURCES = {s.value: s.ablation for s in (FeatureSource.ATP_MEAN, FeatureSource.ATP_PCS, FeatureSource.ATP_GRAD_NORM)}
"""The AtP feature sources and the ablation of each (:class:`madlib.features.attribution.AttributionConfig`)."""
SAE_SOURCES = {s.value: s.sae_control for s in SAE_LATENTS}
"""Feature sources of the SAE-latent detectors: the SAE of each layer, and two controls (seed 002's
question read against them): an SAE of another seed on the same activations, and an SAE trained
on a randomly initialised model of the same architecture (applied to the real activations)."""


DEFAULT_METHODS: tuple[str, ...] = (
    "mahalanobis", "pca_mahalanobis", "diag_mahalanobis", "que", "spectral_signature", "likelihood_ratio", "lof",
    "isolation_forest", "flow_nll", "flow_mahalanobis", "dense_ae", "vae", "beatrix", "ted", "sae_diag_mahalanobis",
    "sae_new_latents", "sae_seed2_diag_mahalanobis", "sae_random_diag_mahalanobis", "atp_mean_mahalanobis", "atp_mean_lof", "atp_pcs_mahalanobis", "atp_grad_norm_mahalanobis",
    "probe_shift_mahalanobis", "finetune_kl", "probe_skyline",
)  # fmt: skip
"""The methods the MAD chapter compares (every feature source, every detector family)."""


def methods() -> dict[str, Method]:
    """Every method by name: the registry's (:func:`madlib.detectors.methods`)."""
    return registry_methods()


def resolve_methods(names, param: str = "methods") -> list[Method]:
    """Validated methods for a ``methods`` parameter (empty means :data:`DEFAULT_METHODS`); a
    misspelt one is refused naming ``param`` and the closest method (:func:`madlib.detectors.method`)."""
    return [method(n, param) for n in list(names) or list(DEFAULT_METHODS)]


@dataclass(frozen=True)
class SuiteConfig:
    """Settings of the features that several methods share."""

    sae_d_sae: int = 256  # latents of each layer's SAE
    sae_k: int = 8  # active latents per token (top-k)
    sae_training_tokens: int = 200_000  # activations each SAE trains on (repeated epochs over the training prompts)
    n_pcs: int = 10  # principal components per block for atp_pcs
    kl_steps: int = 150  # fine-tuning steps of the trusted copy for finetune_kl
    kl_batch_size: int = 32  # texts per fine-tuning step for finetune_kl
    standardise_holdout: float = 0.2  # share of trusted prompts held out of fitting, on which each layer's scores are standardised (0: in-sample)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sae_d_sae", "sae_k", "sae_training_tokens", "n_pcs", "kl_steps", "kl_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a positive integer")
        if not 0.0 <= self.standardise_holdout < 1.0:
            raise ValueError(f"standardise_holdout={self.standardise_holdout!r} is not accepted; give a number in [0, 1)")


# ---------------------------------------------------------------------------------------------
# Features


def _attribution_features(model, task: MadTask, ablation: str, layers: list[int], cfg: SuiteConfig, progress: bool) -> dict:
    """AtP (by block) and probe-shift (by residual layer) features of the trusted and test roles, cached."""
    from ..detectors.base import StreamingMoments
    from ..features.attribution import Attribution, AttributionConfig

    n = model.cfg.n_layers
    blocks = sorted({min(max(layer - 1, 0), n - 1) for layer in layers})  # heads writing into the analysed streams
    probe_layers = sorted({layer for layer in layers if layer >= 1})
    acfg = AttributionConfig(ablation=ablation, n_pcs=cfg.n_pcs)
    trusted, test = task.trusted["prompt"].tolist(), task.test["prompt"].tolist()
    labels = task.trusted["label"].to_numpy()
    options = dict(cfg=asdict(acfg), blocks=blocks, probe_layers=probe_layers, labels=labels.tolist(), n_trusted=len(trusted))
    key = feature_key(model, trusted + test, options, (Attribution.__module__, StreamingMoments.__module__))  # the code that computes them, wherever it lives

    def compute() -> dict[str, torch.Tensor]:
        atp = Attribution(model, acfg, blocks=blocks, probe_layers=probe_layers or None)
        atp.fit(trusted, labels if len(np.unique(labels)) == 2 else None, progress=progress)
        out = {}
        for role, prompts in (("trusted", trusted), ("test", test)):
            f = atp.features(prompts, progress=progress, desc=f"{task.dataset}/{role} attribution ({ablation})")
            out.update({f"{role}/atp/{b}": v for b, v in f.effects.items()})
            out.update({f"{role}/probe/{layer}": v for layer, v in f.probe.items()})
        return out

    t = cached_tensors("attribution", key, compute)

    def role(kind: str, r: str) -> dict[int, torch.Tensor]:
        return {int(k.split("/")[-1]): v for k, v in t.items() if k.startswith(f"{r}/{kind}/")}

    return {kind: (role(kind, "trusted"), role(kind, "test")) for kind in ("atp", "probe")}


def random_init(model, seed: int = 0):
    """A model of ``model``'s architecture and tokenizer with freshly initialised weights (seeded;
    the global random state is left as it was). It keeps a zoo model's zoo entry (its
    tokenizer) and nothing that names the trained weights, so caches key it by its own weights."""
    from transformer_lens import HookedTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = HookedTransformer(replace(model.cfg, seed=None), tokenizer=model.tokenizer).eval()
    if zoo_info(model) is not None:
        attach(out, ModelInfo(zoo=zoo_info(model)))
    return out


def layer_saes(model, model_name: str, records: pd.DataFrame, layers: list[int], cfg: SuiteConfig, progress: bool,
               control: str = "") -> dict:  # fmt: skip
    """A top-k SAE per layer, trained at every token of train-split prompts (a seeded sample
    holding as many tokens as the SAE trains on, :func:`madlib.features.sae.sample_texts`): for a zoo fine-tune,
    on its family's base model and the train prompts of every dataset (as the seeds' SAEs were
    trained on the base model; one SAE per layer serves all fine-tunes of the family), else on
    the model itself and ``records``. ``control``: "" (the SAEs), "seed2" (the next SAE seed) or
    "random" (trained on :func:`random_init` of the model: a dictionary that owes nothing to training)."""
    from ..features.sae import SAEConfig, cached_sae, sample_texts
    from ..models.zoo import get_model, training_records

    info = zoo_info(model)
    if info is not None:
        records = training_records(info)
        model = get_model(f"zoo-{info.family}", preset=info.preset, progress=progress)
        model_name = f"zoo-{info.family}-base"
    scfg = SAEConfig(d_sae=cfg.sae_d_sae, k=cfg.sae_k, training_tokens=cfg.sae_training_tokens,
                     seed=cfg.seed + (control == "seed2"))  # fmt: skip
    texts = sample_texts(sorted(set(records.loc[records["split"] == "train", "prompt"])), scfg.training_tokens, cfg.seed)
    if control == "random":
        model, model_name = random_init(model, cfg.seed), f"{model_name}-random-init"
    n, tag = model.cfg.n_layers, f"-{control}" if control == "seed2" else ""
    return {
        layer: cached_sae(model, hook_name(layer, n), texts, scfg, name=f"{model_name}-sae{tag}-L{layer}", progress=progress)
        for layer in layers
    }


def sae_controls(model, model_name: str, records: pd.DataFrame, layers: list[int], cfg: SuiteConfig = SuiteConfig(),
                 threshold: float = 0.7, progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """Per layer, the SAEs of the MAD methods against their controls (cached, so free after a
    suite run): the share of latents of the SAE that the second seed's SAE shares
    (:func:`madlib.features.sae.shared_latents` at decoder cosine ``threshold``) and each SAE's explained
    variance on its training activations."""
    from ..features.sae import sae_record, shared_latents

    saes = {c: layer_saes(model, model_name, records, layers, cfg, progress, c) for c in SAE_SOURCES.values()}
    return pd.DataFrame([
        dict(model=model_name, layer=layer, shared_with_seed2=shared_latents(saes[""][layer], saes["seed2"][layer], threshold),
             shared_with_random=shared_latents(saes[""][layer], saes["random"][layer], threshold), threshold=threshold,
             explained_variance=sae_record(saes[""][layer]).explained_variance,
             explained_variance_seed2=sae_record(saes["seed2"][layer]).explained_variance,
             explained_variance_random=sae_record(saes["random"][layer]).explained_variance)
        for layer in layers
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Scoring


def selection_half(y: np.ndarray, seed: int) -> np.ndarray:
    """A boolean mask selecting a stratified half of the test set (the layer-selection half)."""
    rng = np.random.default_rng(seed + 7)
    sel = np.zeros(len(y), dtype=bool)
    for cls in (False, True):
        idx = np.flatnonzero(y == cls)
        sel[rng.permutation(idx)[: len(idx) // 2]] = True
    return sel


def best_layer_rows(
    y: np.ndarray, layer_scores: dict, select: np.ndarray, n_boot: int, seed: int, ref_scores: dict | None = None,
    alpha: float = 0.05,
) -> dict:  # fmt: skip
    """The layer with the best AUROC on the ``select`` half, with its AUROC and CI on the other
    half (and its recall at the false-positive rates :data:`madlib.mad.metrics.FPRS` of ``ref_scores``,
    the held-out trusted scores)."""
    rep = ~select
    nan_recall = {c: np.nan for fpr in FPRS for c in recall_columns(fpr)}
    if len(layer_scores) == 0 or y[select].all() or not y[select].any() or y[rep].all() or not y[rep].any():
        return dict(layer="best", auroc=np.nan, ci_low=np.nan, ci_high=np.nan, n=int(rep.sum()), selected_layer=None, **nan_recall)
    sel_auc = {layer: auroc(y[select], s[select]) for layer, s in layer_scores.items()}
    best = max(sorted(sel_auc), key=lambda k: sel_auc[k])
    s = np.asarray(layer_scores[best])[rep]
    boot = weighted_auroc(y[rep], s, bootstrap_counts(y[rep], n_boot, seed))
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    recall = dict(nan_recall)
    if ref_scores is not None:
        for fpr in FPRS:
            full = np.asarray(layer_scores[best])
            recall.update(zip(recall_columns(fpr), recall_at_fpr(full[rep & y], np.asarray(ref_scores[best]), fpr, n_boot, seed,
                                                                 normal=full[rep & ~y])))  # fmt: skip
    return dict(layer="best", auroc=auroc(y[rep], s), ci_low=lo, ci_high=hi, n=int(rep.sum()), selected_layer=str(best), **recall)


def build_detector(m: Method, model, model_name: str, task: MadTask, extra: dict,
                   cfg: SuiteConfig) -> Detector | PromptDetector:  # fmt: skip
    """The detector of method ``m`` as the suite runs it: default settings and seed; on an SAE
    source, the SAE of each layer (``extra[source]``); ``finetune_kl`` with the model and the
    fine-tune of ``cfg``."""
    if m.features is FeatureSource.PROMPTS:
        ft_cfg = replace(KL_FINETUNE, steps=cfg.kl_steps, batch_size=cfg.kl_batch_size, seed=cfg.seed)
        return m.make(model=model, cfg=ft_cfg, name=f"{model_name}-{task.dataset}-trusted")
    if m.features.family == "sae":
        return m.make(saes=extra[m.features])
    return m.make()


def _scores_of(m: Method, det: Detector, feats: MadFeatures, extra: dict, task: MadTask, seed: int,
               holdout: float = 0.0) -> tuple[dict, dict] | None:  # fmt: skip
    """(test scores, held-out trusted scores) per layer for a layered method ``m``: its detector ``det`` is
    fitted on the trusted rows outside a ``holdout`` share (:func:`madlib.mad.metrics.holdout_split`)
    and scores the held-out ones, the reference of each layer's standardisation; ``None`` when the
    task yields no features for it (probe shift needs trusted labels of both classes)."""
    if m.features.family in ("activations", "sae"):
        trusted, test, untrusted = feats.trusted.acts, feats.test.acts, feats.untrusted.acts
    else:  # attribution: AtP effects by block, probe-shift features by residual layer
        kind = "probe" if m.features is FeatureSource.PROBE_SHIFT else "atp"
        trusted, test = extra[m.features][kind]
        untrusted = None
        if not trusted:
            return None
    fit, ref = split_trusted(trusted, holdout, seed)
    if m.skyline:
        y_unt = (task.untrusted["character_type"] == "bob").to_numpy()
        det.fit(fit, labelled=LabelledFeatures(untrusted, y_unt, split="train"))
    else:
        det.fit(fit, untrusted if det.uses_untrusted else None)
    return det.score(test), det.score(ref)


def score_methods(
    model,
    model_name: str,
    task: MadTask,
    records: pd.DataFrame,
    layers: list[int],
    chosen: list[Method],
    cfg: SuiteConfig = SuiteConfig(),
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """AUROC rows (``method, feature_source, layer, subset, auroc, ci_low, ci_high, n,
    selected_layer, detector_config``) and per-example scores (``method, layer, is_anomalous,
    agreement, score``). ``detector_config`` is the JSON of the method's detector settings
    (:meth:`madlib.detectors.Detector.settings`: detector name, config, seed)."""
    needs_untrusted = any(m.skyline or (m.features is FeatureSource.ACTIVATIONS and m.detector_class.uses_untrusted)
                          for m in chosen)  # fmt: skip
    feats = extract_task(model, task, layers, batch_size=batch_size, progress=progress, untrusted=needs_untrusted)
    sources = {m.features for m in chosen}
    passes: dict = {}  # one attribution pass per ablation (probe shift comes with the mean-ablation pass)
    extra: dict = {}
    for src in FeatureSource:
        if src in sources and src.family == "attribution":
            if src.ablation not in passes:
                passes[src.ablation] = _attribution_features(model, task, src.ablation, layers, cfg, progress)
            extra[src] = passes[src.ablation]
        elif src in sources and src.family == "sae":
            extra[src] = layer_saes(model, model_name, records, layers, cfg, progress, src.sae_control)

    y = task.test["is_anomalous"].to_numpy()
    agree = task.test["agreement"].to_numpy()
    select = selection_half(y, seed)
    rows, score_rows, settings = [], [], {}
    for m in tqdm(chosen, desc=f"{model_name}/{task.dataset} methods", disable=not progress):
        det = build_detector(m, model, model_name, task, extra, cfg)
        settings[m.name] = json.dumps(det.settings(), sort_keys=True)
        source = m.features.value
        if not m.features.layered:  # a prompt-level detector: one score per prompt
            det.fit(task.trusted["prompt"].tolist(), task.trusted["label"].to_numpy(), progress=progress)
            test_scores, agg, ref = {}, det.score(task.test["prompt"].tolist()), None
        else:
            scored = _scores_of(m, det, feats, extra, task, seed, cfg.standardise_holdout)
            if scored is None:  # no features for this task (e.g. probe shift when trusted labels have one class)
                rows.extend(dict(method=m.name, feature_source=source, skyline=m.skyline, subset=subset, layer="aggregated",
                                 auroc=np.nan, ci_low=np.nan, ci_high=np.nan, n=len(y),
                                 **{c: np.nan for fpr in FPRS for c in recall_columns(fpr)}) for subset in SUBSETS)  # fmt: skip
                continue
            test_scores, ref = scored
            agg = aggregate_layers(test_scores, ref)
        score_rows.append(score_frame(y, agree, test_scores, agg).assign(method=m.name))
        table = auroc_rows(y, agree, test_scores, agg, n_boot, seed, ref)
        if test_scores:
            table.append(dict(subset="all", **best_layer_rows(y, test_scores, select, n_boot, seed, ref)))
        rows.extend(dict(method=m.name, feature_source=source, skyline=m.skyline, **r) for r in table)
    auc = pd.DataFrame(rows)
    if "selected_layer" not in auc:
        auc["selected_layer"] = None
    auc["detector_config"] = auc["method"].map(settings)
    scores = pd.concat(score_rows, ignore_index=True)
    return auc, scores[["method", *[c for c in scores.columns if c != "method"]]]


def run_suite(
    model,
    model_name: str,
    records: pd.DataFrame,
    layers: list[int],
    method_names,
    task_name: str = "quirky",
    cfg: SuiteConfig = SuiteConfig(),
    max_test: int = 4000,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, MadTask]:
    """Every chosen method on the MAD task of ``records`` (one dataset): tidy AUROC rows with
    ``model, task, dataset, seed`` columns, per-example scores and the task.

    The AUROC table ends with two JSON columns of settings: ``config`` (the :class:`SuiteConfig`)
    and ``detector_config`` (each method's detector settings; :func:`detector_settings` makes the
    one-row-per-method table of them)."""
    chosen = resolve_methods(method_names)
    task = mad_task(records, max_test=max_test, seed=seed)
    auc, scores = score_methods(model, model_name, task, records, layers, chosen, cfg, n_boot, seed, batch_size, progress)
    for df in (auc, scores):
        df.insert(0, "dataset", task.dataset)
        df.insert(0, "task", task_name)
        df.insert(0, "model", model_name)
    auc["seed"] = seed
    auc["config"] = json.dumps(asdict(cfg), sort_keys=True)
    auc["detector_config"] = auc.pop("detector_config")  # last, after the columns it always had
    return auc, scores, task


def detector_settings(auc: pd.DataFrame) -> pd.DataFrame:
    """The settings each method ran with, one row per model, task, dataset, ``finetune_seed`` (if
    the table has one) and method of a :func:`run_suite` AUROC table, or a concatenation of them:
    ``model, task, dataset, [finetune_seed,] method, feature_source, detector, detector_config,
    config`` (the detector's registered name, its settings as JSON, the suite's as JSON)."""
    keys = [c for c in ("model", "task", "dataset", "finetune_seed", "method") if c in auc]
    out = auc.drop_duplicates(keys)[[*keys, "feature_source", "detector_config", "config"]].reset_index(drop=True)
    out.insert(out.columns.get_loc("detector_config"), "detector", [json.loads(s)["detector"] for s in out["detector_config"]])
    return out
