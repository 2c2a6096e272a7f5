"""Why detection works on one model and fails on another: quirkiness and separation (methods.md §4-5).

Everything is measured on the MAD **test** prompts of each model and dataset (validation split,
hard examples, held-out names; :func:`madlib.mad.task.mad_task`), at the last prompt token:

* **log-odds assigned to a label** ``y``: ``s`` if ``y = 1`` else ``-s``, with ``s = logit(" Yes") -
  logit(" No")``; the **loss** against ``y`` is ``-log softmax`` over the two answer logits,
  ``log(1 + exp(-log_odds))``;
* **quirkiness coefficient**, on the examples where Alice's and Bob's labels disagree, with
  ``L_c(y)`` the mean loss on character ``c``'s prompts against the labels of ``y``:
  ``Q = min(L_Alice(y_Bob) - L_Alice(y_Alice), L_Bob(y_Alice) - L_Bob(y_Bob))``;
* **variance ratio** between the two contexts (Alice prompts, Bob prompts): ``total = tr S_all``,
  ``within = (n_A tr S_A + n_B tr S_B) / n``, ``between = total - within``, ``ratio = between / total``
  (maximum-likelihood covariances), on the residual stream per layer and on the answer log-odds.

The chapter's figures are in :mod:`madlib.plots.quirkiness`; this module computes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float
from scipy import optimize, stats
from torch import Tensor
from tqdm.auto import tqdm

from ..data import datasets as qdata
from ..features.activations import resolve_layers
from ..features.cache import cached_extract
from ..paths import atomic_path, results_dir
from ..models.quirky import ZOO_DATASETS

CHARACTERS = ("alice", "bob")
SUBSETS = ("disagree", "all")
LN2 = math.log(2)
QUIRK_COLUMNS = ["model", "dataset", "character", "label_source", "mean_loss", "mean_log_odds", "quirkiness", "n"]
SEPARATION_COLUMNS = [
    "model",
    "dataset",
    "layer",
    "hidden_ratio",
    "logit_ratio",
    "logit_total_var",
    "logit_between_var",
    "auroc",
]


# ---------------------------------------------------------------------------------------------
# Log-odds, losses and the quirkiness coefficient


def label_log_odds(log_odds: Float[np.ndarray, " n"], labels) -> Float[np.ndarray, " n"]:
    """Log-odds the model assigns to ``labels`` (1 = " Yes", 0 = " No"): ``s`` for 1, ``-s`` for 0."""
    s, y = np.asarray(log_odds, dtype=np.float64), np.asarray(labels)
    if s.shape != y.shape:
        raise ValueError(f"labels has shape {y.shape}; it must match log_odds {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels={sorted(set(y.tolist()))!r} is not accepted; give 0/1 labels")
    return np.where(y == 1, s, -s)


def two_way_loss(log_odds_of_label: Float[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
    """``-log softmax`` over the two answer logits for a label with these log-odds: ``log(1 + e^-x)``."""
    return np.logaddexp(0.0, -np.asarray(log_odds_of_label, dtype=np.float64))


def log_odds_table(test: pd.DataFrame, log_odds: Float[np.ndarray, " n"]) -> pd.DataFrame:
    """Long table, two rows per test prompt (one per label source): ``example, dataset, character,
    label_source, agreement, log_odds, loss`` (log-odds of and loss against that source's label)."""
    s = np.asarray(log_odds, dtype=np.float64)
    if len(s) != len(test):
        raise ValueError(f"log_odds has {len(s)} values for {len(test)} test records; give one per record")
    missing = {"dataset", "character_type", "alice_label", "bob_label", "agreement"} - set(test.columns)
    if missing:
        raise ValueError(f"test records lack columns {sorted(missing)}")
    cols = dict(
        example=np.arange(len(test)),
        dataset=test["dataset"].to_numpy(),
        character=test["character_type"].to_numpy(),
        agreement=test["agreement"].to_numpy(dtype=bool),
    )
    parts = []
    for source in CHARACTERS:
        lo = label_log_odds(s, test[f"{source}_label"].to_numpy())
        parts.append(pd.DataFrame(dict(cols, label_source=source, log_odds=lo, loss=two_way_loss(lo))))
    return pd.concat(parts, ignore_index=True)


def quirkiness_coefficient(alice_own: float, alice_opposing: float, bob_own: float, bob_opposing: float) -> float:
    """``min(L_Alice(y_Bob) - L_Alice(y_Alice), L_Bob(y_Alice) - L_Bob(y_Bob))`` from mean losses on
    each character's prompts against its own and the opposing labels; below 0, at least one
    character does not follow its own label."""
    return float(min(alice_opposing - alice_own, bob_opposing - bob_own))


def quirkiness_table(examples: pd.DataFrame, subset: str = "disagree") -> pd.DataFrame:
    """Mean loss and log-odds per ``model, dataset, character, label_source`` with the quirkiness
    coefficient of each model and dataset (columns :data:`QUIRK_COLUMNS`); ``subset`` "disagree"
    (the definition) keeps the examples where Alice's and Bob's labels differ."""
    qdata.check_choice("subset", subset, SUBSETS)
    ex = examples[~examples["agreement"]] if subset == "disagree" else examples
    keys = ["model", "dataset", "character", "label_source"]
    g = (
        ex.groupby(keys, sort=False)
        .agg(mean_loss=("loss", "mean"), mean_log_odds=("log_odds", "mean"), n=("loss", "size"))
        .reset_index()
    )
    full = examples[["model", "dataset"]].drop_duplicates()
    grid = pd.MultiIndex.from_tuples(
        [(m, d, c, s) for m, d in full.itertuples(index=False) for c in CHARACTERS for s in CHARACTERS], names=keys
    )
    g = g.set_index(keys).reindex(grid).reset_index()
    g["n"] = g["n"].fillna(0).astype(int)
    loss = g.set_index(keys)["mean_loss"]
    q = {
        (m, d): quirkiness_coefficient(
            loss[m, d, "alice", "alice"],
            loss[m, d, "alice", "bob"],
            loss[m, d, "bob", "bob"],
            loss[m, d, "bob", "alice"],
        )
        for m, d in full.itertuples(index=False)
    }
    g["quirkiness"] = [q[m, d] for m, d in zip(g["model"], g["dataset"])]
    return g[QUIRK_COLUMNS]


def confidence_table(examples: pd.DataFrame) -> pd.DataFrame:
    """Per model and dataset, on disagreeing examples: ``confidence`` (mean absolute answer log-odds),
    ``own_log_odds`` (mean log-odds of the own label, both characters), ``confidently_wrong`` (share of
    prompts whose own label gets probability below 0.1) and ``truth_bias`` (mean log-odds of Alice's
    label on Bob's prompts minus that of Bob's label on Alice's prompts; > 0: leaning to the truth)."""
    ex = examples[~examples["agreement"]]
    own = ex[ex["character"] == ex["label_source"]]
    opp = ex[ex["character"] != ex["label_source"]]
    keys = ["model", "dataset"]
    out = own.groupby(keys, sort=False).agg(
        confidence=("log_odds", lambda x: float(np.abs(x).mean())),
        own_log_odds=("log_odds", "mean"),
        confidently_wrong=("log_odds", lambda x: float((x < -math.log(9)).mean())),
    )
    opp_mean = opp.groupby([*keys, "character"])["log_odds"].mean().unstack("character")
    out["truth_bias"] = opp_mean.get("bob") - opp_mean.get("alice")
    return out.reset_index()


# ---------------------------------------------------------------------------------------------
# Variance ratio (separation)


def variance_decomposition(x: Float[np.ndarray, "n *d"], context: Bool[np.ndarray, " n"]) -> dict:
    """``total``, ``within``, ``between`` variance (traces of maximum-likelihood covariances) and
    ``ratio = between / total`` of rows ``x`` (one value per row, or one vector) split by a boolean
    ``context``; float64 throughout."""
    x = x.double().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    c = np.asarray(context)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or len(x) != len(c) or c.ndim != 1:
        raise ValueError(
            f"x has shape {x.shape} and context {c.shape}; give x as (n,) or (n, d) and one context per row"
        )
    if c.dtype != bool:
        raise ValueError(f"context has dtype {c.dtype}; give a boolean array (True for the second context)")
    n_b = int(c.sum())
    n_a = len(c) - n_b
    if n_a == 0 or n_b == 0:
        raise ValueError(f"context has {n_a} and {n_b} rows in its two groups; both must be non-empty")
    if not np.isfinite(x).all():
        raise ValueError("x holds non-finite values")
    n = len(c)
    mu = x.mean(0)
    total = float(((x - mu) ** 2).sum(1).mean())
    within = float((((x[~c] - x[~c].mean(0)) ** 2).sum() + ((x[c] - x[c].mean(0)) ** 2).sum()) / n)
    between = float((n_a * ((x[~c].mean(0) - mu) ** 2).sum() + n_b * ((x[c].mean(0) - mu) ** 2).sum()) / n)
    return dict(total=total, within=within, between=between, ratio=between / total if total > 0 else float("nan"))


def separation_table(
    acts: dict[int, Float[Tensor, "n d_model"]], log_odds: Float[np.ndarray, " n"], is_bob: Bool[np.ndarray, " n"]
) -> pd.DataFrame:
    """Per layer: ``hidden_ratio`` of the residual stream, and (the same on every row) ``logit_ratio``,
    ``logit_total_var`` and ``logit_between_var`` of the answer log-odds, Alice vs Bob prompts."""
    lo = variance_decomposition(np.asarray(log_odds), is_bob)
    rows = [
        dict(layer=layer, hidden_ratio=variance_decomposition(x, is_bob)["ratio"], logit_ratio=lo["ratio"],
             logit_total_var=lo["total"], logit_between_var=lo["between"])
        for layer, x in sorted(acts.items())
    ]  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Fits and correlations


def _xy(x, y, min_n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y have shapes {x.shape} and {y.shape}; give two 1-d arrays of one length")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < min_n:
        raise ValueError(f"x and y have {len(x)} finite pairs; need at least {min_n}")
    if np.ptp(x) == 0:
        raise ValueError("x is constant; a fit needs at least two distinct x values")
    return x, y


def linear_fit(x, y) -> dict:
    """Least-squares line ``y = intercept + slope x`` and its ``r2`` (non-finite pairs dropped)."""
    x, y = _xy(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    ss_tot = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (resid**2).sum() / ss_tot if ss_tot > 0 else float("nan")
    return dict(slope=float(slope), intercept=float(intercept), r2=float(r2), n=len(x))


def correlation_ci(x, y, method: str = "pearson", n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Correlation ``r`` with a percentile bootstrap interval over the (x, y) pairs."""
    qdata.check_choice("method", method, ("pearson", "spearman"))
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} is not accepted; give an integer >= 1")
    x, y = _xy(x, y)

    def corr(a, b):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return np.nan
        return (stats.pearsonr if method == "pearson" else stats.spearmanr)(a, b)[0]

    rng = np.random.default_rng(seed)
    idx = rng.integers(len(x), size=(n_boot, len(x)))
    boot = np.array([corr(x[i], y[i]) for i in idx])
    boot = boot[np.isfinite(boot)]
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(boot) else (np.nan, np.nan)
    return dict(r=float(corr(x, y)), ci_low=float(lo), ci_high=float(hi), n=len(x), method=method)


def format_corr(c: dict) -> str:
    """``r = 0.42 (95% CI 0.10 to 0.70, n = 14)`` for a :func:`correlation_ci` result."""
    name = "r" if c["method"] == "pearson" else "ρ"
    return f"{name} = {c['r']:.2f} (95% CI {c['ci_low']:.2f} to {c['ci_high']:.2f}, n = {c['n']})"


def ci_sign(c: dict) -> int:
    """+1 if the interval lies above 0, -1 if below, 0 if it straddles 0."""
    return 1 if c["ci_low"] > 0 else (-1 if c["ci_high"] < 0 else 0)


@dataclass
class LogisticFit:
    """``y = floor + (ceiling - floor) / (1 + exp(-slope (t - midpoint)))`` with ``t = log10 x`` (or
    ``t = x`` if not ``log_x``)."""

    slope: float
    midpoint: float
    floor: float
    ceiling: float
    log_x: bool
    r2: float
    n: int

    def predict(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        t = np.log10(x) if self.log_x else x
        return self.floor + (self.ceiling - self.floor) * (1.0 / (1.0 + np.exp(-self.slope * (t - self.midpoint))))

    @property
    def midpoint_x(self) -> float:
        """The x at which y is half-way between floor and ceiling."""
        return float(10**self.midpoint) if self.log_x else self.midpoint


def fit_logistic(x, y, floor: float = 0.5, ceiling: float = 1.0, log_x: bool = True) -> LogisticFit:
    """Least-squares S-curve from ``floor`` to ``ceiling`` (fixed) in ``log10 x``: fits slope and midpoint,
    started from a grid of midpoints and both slope signs so the best local optimum is kept."""
    if not ceiling > floor:
        raise ValueError(f"ceiling={ceiling!r} is not accepted; it must exceed floor={floor!r}")
    x, y = _xy(x, y)
    if log_x and (x <= 0).any():
        raise ValueError(f"x holds {(x <= 0).sum()} values <= 0; a log axis needs positive x")
    t = np.log10(x) if log_x else x
    span = np.ptp(t)

    def resid(p):
        z = np.clip(-p[0] * (t - p[1]), -500, 500)
        return floor + (ceiling - floor) / (1.0 + np.exp(z)) - y

    best = None
    for mid in np.quantile(t, [0.1, 0.3, 0.5, 0.7, 0.9]):
        for slope in (4.0 / span, -4.0 / span):
            r = optimize.least_squares(resid, [slope, mid], method="lm")
            if best is None or r.cost < best.cost:
                best = r
    ss_tot = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - 2 * best.cost / ss_tot if ss_tot > 0 else float("nan")
    return LogisticFit(float(best.x[0]), float(best.x[1]), floor, ceiling, log_x, float(r2), len(x))


def logistic_outliers(
    df: pd.DataFrame, fit: LogisticFit, x: str = "hidden_ratio", y: str = "auroc", k: int = 3, min_residual: float = 0.1
) -> pd.DataFrame:
    """The ``k`` rows farthest from the fitted curve (by absolute residual), among those at least
    ``min_residual`` away, with ``fitted`` and ``residual`` columns."""
    out = df.assign(fitted=fit.predict(df[x].to_numpy()))
    out["residual"] = out[y] - out["fitted"]
    out = out[out["residual"].abs() >= min_residual]
    return out.reindex(out["residual"].abs().sort_values(ascending=False).index).head(k)


# ---------------------------------------------------------------------------------------------
# The analysis


@dataclass
class QuirkConfig:
    """Parameters of the quirkiness and separation analysis (saved as JSON next to its tables)."""

    models: list = field(default_factory=lambda: ["zoo-gpt2", "zoo-llama"])  # model names (for the record)
    datasets: list = field(default_factory=lambda: list(ZOO_DATASETS))  # quirky datasets
    layers: list = field(default_factory=list)  # residual-stream layers; empty means every layer
    detectors: list = field(default_factory=lambda: ["mahalanobis"])  # detectors whose AUROC meets quirkiness
    separation_detector: str = "mahalanobis"  # detector whose per-layer AUROC meets the variance ratio
    zoo_preset: str = "default"  # zoo preset the models were built with
    seed: int = 0  # test sampling and bootstrap seed
    max_test: int = 4000  # cap on test prompts per dataset
    n_boot: int = 1000  # bootstrap resamples (AUROC intervals and correlation intervals)
    batch_size: int = 256  # prompts per forward pass
    data_source: str = "zoo"  # where the records come from (madlib.data.hub.dataset_records)

    def __post_init__(self) -> None:
        for name in ("models", "datasets", "layers", "detectors"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a list")
            qdata.check_unique(name, getattr(self, name))
        if len(self.models) == 0:
            raise ValueError("models=[] is not accepted; give at least one model name")
        if len(self.datasets) == 0:
            raise ValueError(f"datasets=[] is not accepted; choose from {list(qdata.DATASETS)}")
        from ..data.hub import HUB_DATASETS

        for d in self.datasets:
            qdata.check_choice("datasets", d, qdata.DATASETS if self.data_source == "zoo" else HUB_DATASETS)
        if len(self.models) * len(self.datasets) < 3:
            raise ValueError(
                f"models={self.models!r} and datasets={self.datasets!r} give {len(self.models) * len(self.datasets)} "
                "model x dataset points; the correlations need at least 3"
            )
        from ..mad.suite import resolve_methods

        resolve_methods(self.detectors, "detectors")
        resolve_methods([self.separation_detector], "separation_detector")
        for name in ("max_test", "n_boot", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "max_test" else 1):
                raise ValueError(
                    f"{name}={value!r} is not accepted; give an integer >= {2 if name == 'max_test' else 1}"
                )

    @property
    def run_detectors(self) -> list[str]:
        return list(dict.fromkeys([*self.detectors, self.separation_detector]))


@dataclass
class QuirkResults:
    """Tables of the analysis: per-example log-odds and losses, the quirkiness table, the MAD AUROC
    rows of :func:`madlib.mad.suite.run_suite` (``detector`` names the method), and the per-layer
    separation table."""

    examples: pd.DataFrame
    quirk: pd.DataFrame
    auc: pd.DataFrame
    separation: pd.DataFrame


def analyse(models, cfg: QuirkConfig, records_fn=None, progress: bool = True) -> QuirkResults:
    """Run MAD (:func:`madlib.mad.suite.run_suite`, so ``detectors`` may name any MAD method, e.g.
    ``atp_mean_mahalanobis``) and the quirkiness and separation measurements for every model and
    dataset of ``cfg``. ``models`` maps names to loaded models, or is a callable ``(name, dataset) ->
    model`` (e.g. :class:`madlib.models.hub.ModelLoader`, for per-dataset adapters);
    ``records_fn(model, dataset)`` gives the records (default :func:`madlib.models.zoo.model_records`)."""
    from ..mad.suite import run_suite
    from ..models.zoo import model_records

    records_fn = records_fn or model_records
    load = models if callable(models) else (lambda name, ds: models[name])
    names = list(cfg.models) if callable(models) else list(models)
    examples, aucs, seps = [], [], []
    for name in names:
        for ds in tqdm(cfg.datasets, desc=name, disable=not progress):
            model = load(name, ds)
            layers = resolve_layers(cfg.layers, model.cfg.n_layers)
            auc, _, task = run_suite(
                model, name, records_fn(model, ds), layers, cfg.run_detectors, max_test=cfg.max_test, n_boot=cfg.n_boot,
                seed=cfg.seed, batch_size=cfg.batch_size, progress=False,
            )  # fmt: skip
            auc = auc.rename(columns={"method": "detector"})
            # the test features run_suite just extracted, read back from the on-disk cache
            ext = cached_extract(model, task.test["prompt"].tolist(), layers, batch_size=cfg.batch_size, progress=False)
            lo = ext.log_odds.numpy()
            examples.append(log_odds_table(task.test, lo).assign(model=name))
            sep = separation_table(ext.acts, lo, (task.test["character_type"] == "bob").to_numpy())
            per_layer = auc[
                (auc["detector"] == cfg.separation_detector) & (auc["subset"] == "all") & auc["layer"].str.isdigit()
            ]
            sep["auroc"] = sep["layer"].map(dict(zip(per_layer["layer"].astype(int), per_layer["auroc"])))
            seps.append(sep.assign(model=name, dataset=ds))
            aucs.append(auc)
    ex = pd.concat(examples, ignore_index=True)
    ex = ex[["model", *[c for c in ex.columns if c != "model"]]]
    return QuirkResults(
        ex,
        quirkiness_table(ex),
        pd.concat(aucs, ignore_index=True),
        pd.concat(seps, ignore_index=True)[SEPARATION_COLUMNS],
    )


def points_table(res: QuirkResults, detector: str, layer: str = "aggregated") -> pd.DataFrame:
    """One row per model and dataset: quirkiness, the detector's AUROC (``layer``: aggregated, mean or
    a layer number; all test prompts), the layer-mean hidden ratio and the logit variances."""
    q = res.quirk.drop_duplicates(["model", "dataset"])[["model", "dataset", "quirkiness"]]
    a = res.auc[(res.auc["detector"] == detector) & (res.auc["layer"] == str(layer)) & (res.auc["subset"] == "all")]
    if a.empty:
        raise ValueError(
            f"detector={detector!r} with layer={layer!r} has no AUROC rows; "
            f"detectors run: {sorted(res.auc['detector'].unique())}"
        )
    s = res.separation.groupby(["model", "dataset"], sort=False).agg(
        hidden_ratio=("hidden_ratio", "mean"), logit_ratio=("logit_ratio", "first"),
        logit_total_var=("logit_total_var", "first"), logit_between_var=("logit_between_var", "first"),
    ).reset_index()  # fmt: skip
    out = q.merge(a[["model", "dataset", "auroc", "ci_low", "ci_high"]], on=["model", "dataset"]).merge(
        s, on=["model", "dataset"]
    )
    return out.assign(detector=detector)


def ratio_bins(sep: pd.DataFrame, edges: tuple[float, ...] = (5e-3, 1e-1)) -> pd.DataFrame:
    """Mean per-layer AUROC and count of points in hidden-ratio bins split at ``edges`` (the seed's
    "about 0.5 below 5e-3, about 1 above 0.1")."""
    bounds = [0.0, *edges, np.inf]
    labels = [f"< {edges[0]:g}"] + [f"{a:g} to {b:g}" for a, b in zip(edges[:-1], edges[1:])] + [f">= {edges[-1]:g}"]
    b = pd.cut(sep["hidden_ratio"], bounds, right=False, labels=labels)
    return (
        sep.groupby(b, observed=False)["auroc"].agg(mean_auroc="mean", n="size").reset_index(names="hidden_ratio_bin")
    )


RATIO_EDGES: tuple[float, float] = (5e-3, 1e-1)
"""Research Update 2's ends of the S-curve: AUROC about 0.5 below the first ratio, about 1 above the second."""
NEAR_CHANCE = 0.6
"""Mean AUROC below which the low end counts as "near chance"."""
NEAR_ONE = 0.9
"""Mean AUROC from which the high end counts as "near 1"."""


def s_curve_claims(sep: pd.DataFrame, fit: LogisticFit, bins: pd.DataFrame, outliers: pd.DataFrame,
                   edges: tuple[float, ...] = RATIO_EDGES) -> dict[str, str]:  # fmt: skip
    """The statements the separation chapter glues about AUROC against the hidden-state variance
    ratio, by glue key: the fitted curve (midpoint, slope per decade, R²), the bins' mean AUROC,
    the named exceptions and their side of the curve, the points below chance, and the verdict on
    the S-curve: it holds when the lowest bin's mean AUROC is below :data:`NEAR_CHANCE`, the highest
    bin's at least :data:`NEAR_ONE` and the fitted slope positive; it cannot be checked when an end
    holds no point."""
    out = dict(fit_mid=f"{fit.midpoint_x:.3g}", edge_lo=f"{edges[0]:g}", edge_hi=f"{edges[-1]:g}",
               fit_slope=f"{fit.slope:.2f}", fit_r2=f"{fit.r2:.2f}")  # fmt: skip
    out["bins"] = "; ".join(f"{r.hidden_ratio_bin}: {r.mean_auroc:.3f} ({r.n} points)" if r.n else f"{r.hidden_ratio_bin}: no point"
                            for r in bins.itertuples())  # fmt: skip
    out["outliers"] = "; ".join(
        f"{r['model']} on {r['dataset']}, layer {r['layer']} (ratio {r['hidden_ratio']:.3g}, AUROC {r['auroc']:.3f}, "
        f"{'above' if r['residual'] > 0 else 'below'} the curve by {abs(r['residual']):.2f})"
        for _, r in outliers.iterrows()
    ) or "none"  # fmt: skip
    n_above = int((outliers["residual"] > 0).sum()) if len(outliers) else 0
    out["outlier_kind"] = (f"{n_above} of the {len(outliers)} named exceptions lie above the curve (high AUROC at a low ratio, "
                           "the kind Research Update 2 found)" if len(outliers) else "no point lies 0.1 or more from the curve")  # fmt: skip
    out["below_chance"] = f"{int((sep['auroc'] < 0.5).sum())} of {len(sep)}"
    low, high = bins.iloc[0], bins.iloc[-1]
    if not (low["n"] and high["n"]):
        missing = f"below {edges[0]:g}" if not low["n"] else f"above {edges[-1]:g}"
        out["verdict_s"] = f"cannot be checked at both ends: no point has a ratio {missing}"
    elif low["mean_auroc"] < NEAR_CHANCE and high["mean_auroc"] >= NEAR_ONE and fit.slope > 0:
        out["verdict_s"] = f"holds: near chance below a ratio of {edges[0]:g} and near 1 above {edges[-1]:g}"
    else:
        out["verdict_s"] = (f"does not hold: mean AUROC {low['mean_auroc']:.3f} below a ratio of {edges[0]:g} and "
                            f"{high['mean_auroc']:.3f} above {edges[-1]:g} (an S from chance to 1 needs about 0.5 and about 1)")  # fmt: skip
    return out


def model_summary(points: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean quirkiness, mean layer-mean hidden ratio and mean AUROC over datasets, and how
    many datasets have ``Q > 0``."""
    return points.groupby("model", sort=False).agg(
        quirkiness=("quirkiness", "mean"), hidden_ratio=("hidden_ratio", "mean"), auroc=("auroc", "mean"),
        quirky_datasets=("quirkiness", lambda q: int((q > 0).sum())), datasets=("dataset", "size"),
    ).reset_index()  # fmt: skip


def variant_pairs(points: pd.DataFrame) -> pd.DataFrame:
    """For every model ``m`` with a variant ``m-<suffix>`` among the points (e.g. ``zoo-gpt2`` and
    ``zoo-gpt2-early``, or ``zoo-gpt2@1`` and ``zoo-gpt2-early@1``: the same fine-tuning seed), per shared dataset: the variant's quirkiness, layer-mean hidden ratio and
    AUROC minus the model's (``d_quirkiness, d_hidden_ratio, d_auroc``)."""
    models = list(dict.fromkeys(points["model"]))
    p = points.set_index(["model", "dataset"])
    rows = []
    def variant_of(var: str, base: str) -> bool:  # zoo-gpt2-early@1 is a variant of zoo-gpt2@1
        (v, _, vs), (b, _, bs) = var.partition("@"), base.partition("@")
        return v.startswith(f"{b}-") and vs == bs

    for base in models:
        for var in (m for m in models if variant_of(m, base)):
            for ds in p.loc[base].index.intersection(p.loc[var].index):
                a, b = p.loc[(base, ds)], p.loc[(var, ds)]
                rows.append(
                    dict(
                        model=base,
                        variant=var,
                        dataset=ds,
                        **{f"d_{k}": b[k] - a[k] for k in ("quirkiness", "hidden_ratio", "auroc")},
                    )
                )
    return pd.DataFrame(rows, columns=["model", "variant", "dataset", "d_quirkiness", "d_hidden_ratio", "d_auroc"])


def write_config(cfg: QuirkConfig, analysis: str) -> str:
    """``_build/results/<analysis>/config.json``: the parameters (seed included) behind the tables."""
    path = results_dir(analysis) / "config.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(cfg), indent=2))
    return str(path)


# ---------------------------------------------------------------------------------------------
# The chapter's tables and statements (glue keys of notebooks/quirkiness.ipynb)

CONFIDENCE_VERDICTS: dict[int, str] = {
    1: "holds: more confident cells are quirkier",
    0: "is not supported: the interval includes 0",
    -1: "is reversed: more confident cells are less quirky",
}
"""Research Update 2's link between low confidence and low quirkiness, by :func:`ci_sign` of the
correlation of confidence with quirkiness across model x dataset cells."""
Q_AUROC_VERDICTS: dict[int, str] = {
    1: "holds on the zoo: quirkier cells are detected better",
    0: "does not hold on the zoo: the interval includes 0",
    -1: "is reversed on the zoo: quirkier cells are detected worse",
}
"""Research Update 2's correlation of quirkiness with MAD AUROC, by :func:`ci_sign`."""
RATIO_AUROC_VERDICTS: dict[int, str] = {1: "goes with higher AUROC", 0: "shows no clear relation to AUROC", -1: "goes with lower AUROC"}
"""What a higher layer-mean hidden-state ratio goes with, by :func:`ci_sign` of its correlation with AUROC."""
DETECTED_UNQUIRKY = 0.9
"""AUROC from which a cell with ``Q <= 0`` counts as "detected without being quirky"."""
CLEARLY_QUIRKY = 0.5
"""Quirkiness coefficient (nats) from which a cell counts as clearly quirky ..."""
BARELY_DETECTED = 0.6
"""... and AUROC below which such a cell counts as "barely detected"."""
MIN_MODEL_POINTS = 3
"""Datasets a model needs (with distinct Q) for its own correlation of quirkiness with AUROC."""
WEAK_R2 = 0.25
"""R² of a least-squares line below which the relation is called weak ..."""
MODERATE_R2 = 0.5
"""... and below which (from :data:`WEAK_R2`) moderate; strong from here."""
LOGIT_COMPARISONS: dict[str, tuple[str, str]] = {
    "fig10": ("layers", "logit_ratio"),
    "fig11": ("cells", "logit_total_var"),
    "fig12": ("cells", "logit_between_var"),
}
"""Research Update 2's Figs. 10-12: a logit quantity against the hidden-state ratio, over the
per-layer rows (``layers``: the separation table) or the model x dataset points (``cells``: the
layer-mean ratio of :func:`points_table`)."""


def chapter_points(res: QuirkResults, cfg: QuirkConfig) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], pd.DataFrame]:
    """The chapter's model x dataset tables: the confidence table (:func:`confidence_table`), the
    points of every detector run (:func:`points_table`) and the separation detector's points with
    the confidence columns (the ``points.csv`` of the book)."""
    conf = confidence_table(res.examples)
    points = {det: points_table(res, det) for det in cfg.run_detectors}
    pts = points[cfg.separation_detector].merge(conf, on=["model", "dataset"])
    return conf, points, pts


def _cell(r) -> str:
    return f"{r['model']} on {r['dataset']}"


def setup_claims(res: QuirkResults, pts: pd.DataFrame, cfg: QuirkConfig) -> dict[str, object]:
    """What the chapter says about the run: the models, the separation detector, the number of
    points and the range of each character's disagreeing test prompts."""
    n_dis = res.quirk.drop_duplicates(["model", "dataset", "character"]).groupby("character")["n"]
    return dict(n_disagree=f"{int(n_dis.min().min())} to {int(n_dis.max().max())}", n_points=len(pts),
                sep_detector=cfg.separation_detector, model_list=", ".join(cfg.models))  # fmt: skip


def confidence_claims(conf: pd.DataFrame, pts: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, str]:
    """Research Update 2's Figs. 3-4 on the zoo: the least and most confident cells, the mean
    confidence per model, the most confidently wrong cell, the correlation of confidence with
    quirkiness and its verdict (:data:`CONFIDENCE_VERDICTS`), and the bias towards the truth."""
    if conf.empty:
        raise ValueError("conf is empty; give the confidence table of at least one model and dataset")
    lo, hi, wrong = (
        conf.loc[conf["confidence"].idxmin()],
        conf.loc[conf["confidence"].idxmax()],
        conf.loc[conf["confidently_wrong"].idxmax()],
    )
    out = dict(
        least_confident=f"{_cell(lo)} (mean |log-odds| {lo['confidence']:.2f} nats)",
        most_confident=f"{_cell(hi)} ({hi['confidence']:.2f} nats)",
        confidence_by_model="; ".join(f"{m} {g['confidence'].mean():.2f}" for m, g in conf.groupby("model", sort=False)),
        most_wrong=f"{_cell(wrong)}, {wrong['confidently_wrong']:.0%} of its disagreeing prompts",
    )
    c_conf = correlation_ci(pts["confidence"], pts["quirkiness"], n_boot=n_boot, seed=seed)
    out["corr_conf"] = format_corr(c_conf)
    out["verdict_conf"] = CONFIDENCE_VERDICTS[ci_sign(c_conf)]
    bias = conf.groupby("model", sort=False)["truth_bias"].mean()
    out["truth_bias"] = "; ".join(f"{m} {b:+.2f} nats" for m, b in bias.items())
    out["truth_bias_cells"] = f"{int((conf['truth_bias'] > 0).sum())} of {len(conf)}"
    return out


def loss_claims(quirk: pd.DataFrame) -> dict[str, str]:
    """Research Update 2's Figs. 7-8 on the zoo: in how many cells the own-label loss beats a
    50/50 guess (:data:`LN2`) and which do not, the mean own-label loss per model, in how many
    cells the opposing-label loss exceeds ln 2, and the loss on Alice's labels of Bob's prompts."""
    own = quirk[quirk["character"] == quirk["label_source"]]
    opp = quirk[quirk["character"] != quirk["label_source"]]
    above = own[own["mean_loss"] >= LN2]
    who = above.groupby(["model", "dataset"], sort=False)["character"].agg(lambda c: " and ".join(x.capitalize() for x in c))
    alice_on_bob = opp[opp["character"] == "bob"].groupby("model", sort=False)["mean_loss"].mean()
    return dict(
        own_below_ln2=f"{int((own['mean_loss'] < LN2).sum())} of {len(own)}",
        own_above_list="; ".join(f"{m}: " + ", ".join(f"{d} ({c})" for (_, d), c in g.items())
                                 for m, g in who.groupby(level=0, sort=False)) or "no cell",
        own_loss_by_model="; ".join(f"{m} {g['mean_loss'].mean():.3f}" for m, g in own.groupby("model", sort=False)),
        opp_above_ln2=f"{int((opp['mean_loss'] > LN2).sum())} of {len(opp)}",
        alice_on_bob_by_model="; ".join(f"{m} {v:.3f}" for m, v in alice_on_bob.items()),
    )  # fmt: skip


def quirkiness_grid(quirk: pd.DataFrame, datasets: list[str], models: list[str]) -> pd.DataFrame:
    """The quirkiness coefficient per dataset (rows, in ``datasets``' order) and model (columns)."""
    qtab = quirk.drop_duplicates(["model", "dataset"]).pivot(index="dataset", columns="model", values="quirkiness")
    return qtab.reindex(index=datasets, columns=models)


def sign_claims(quirk: pd.DataFrame, qtab: pd.DataFrame) -> dict[str, str]:
    """The cells with ``Q < 0`` (named, with their Q) and the count of ``Q > 0`` in the grid
    ``qtab`` (:func:`quirkiness_grid`; a missing cell counts as not positive)."""
    neg = quirk.drop_duplicates(["model", "dataset"]).query("quirkiness < 0")
    return dict(negative_q=", ".join(f"{r.model} on {r.dataset} ({r.quirkiness:.2f})" for r in neg.itertuples()) or "no cell",
                positive_q=f"{int((qtab > 0).sum().sum())} of {qtab.size}")  # fmt: skip


def auroc_correlations(points: dict[str, pd.DataFrame], detectors: list[str], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per detector: the correlation of quirkiness with its aggregated AUROC across its points
    (:func:`correlation_ci`; Research Update 2's Figs. 5-6)."""
    return {det: correlation_ci(points[det]["quirkiness"], points[det]["auroc"], n_boot=n_boot, seed=seed) for det in detectors}


def auroc_claims(pts: pd.DataFrame, corr: dict[str, dict], n_boot: int = 1000, seed: int = 0) -> dict[str, str]:
    """Quirkiness against AUROC: the correlation per detector (``corr``, :func:`auroc_correlations`),
    the rank correlation and the verdict (:data:`Q_AUROC_VERDICTS`) on the separation detector's
    points ``pts``, the correlation within each model with at least :data:`MIN_MODEL_POINTS`
    datasets, the mean AUROC where ``Q > 0`` and where ``Q <= 0``, and the exceptions: cells
    detected without being quirky (``Q <= 0``, AUROC at least :data:`DETECTED_UNQUIRKY`) and
    quirky cells barely detected (``Q`` at least :data:`CLEARLY_QUIRKY`, AUROC below
    :data:`BARELY_DETECTED`)."""
    out = {"corr_q_auc": "; ".join(f"{det}: {format_corr(c)}" for det, c in corr.items())}
    c0 = correlation_ci(pts["quirkiness"], pts["auroc"], n_boot=n_boot, seed=seed)
    rho = correlation_ci(pts["quirkiness"], pts["auroc"], method="spearman", n_boot=n_boot, seed=seed)
    out["rho_q_auc"] = format_corr(rho)
    out["verdict_q_auc"] = Q_AUROC_VERDICTS[ci_sign(c0)]
    per_model = [
        f"{m} {format_corr(correlation_ci(g['quirkiness'], g['auroc'], n_boot=n_boot, seed=seed))}"
        for m, g in pts.groupby("model", sort=False)
        if len(g) >= MIN_MODEL_POINTS and g["quirkiness"].nunique() > 1
    ]
    out["corr_q_auc_models"] = "; ".join(per_model) or "too few datasets per model"
    qpos, qneg = pts[pts["quirkiness"] > 0], pts[pts["quirkiness"] <= 0]
    out["auc_qpos"] = f"{qpos['auroc'].mean():.3f} over {len(qpos)} cells" if len(qpos) else "no cell"
    out["auc_qneg"] = f"{qneg['auroc'].mean():.3f} over {len(qneg)} cells" if len(qneg) else "no cell"

    def named(r) -> str:
        return f"{r['model']} on {r['dataset']} (Q {r['quirkiness']:.2f}, AUROC {r['auroc']:.3f})"

    no_quirk_hi = pts[(pts["quirkiness"] <= 0) & (pts["auroc"] >= DETECTED_UNQUIRKY)]
    quirk_lo = pts[(pts["quirkiness"] >= CLEARLY_QUIRKY) & (pts["auroc"] < BARELY_DETECTED)]
    out["no_quirk_high_auc"] = "; ".join(named(r) for _, r in no_quirk_hi.iterrows()) or "no cell"
    out["quirk_low_auc"] = "; ".join(named(r) for _, r in quirk_lo.iterrows()) or "no cell"
    return out


def s_curve(sep: pd.DataFrame, edges: tuple[float, ...] = RATIO_EDGES) -> tuple[LogisticFit, pd.DataFrame, pd.DataFrame]:
    """Research Update 2's Fig. 9 on the per-layer rows ``sep``: the logistic S-curve of AUROC in
    the log hidden-state ratio (:func:`fit_logistic`), the points farthest from it
    (:func:`logistic_outliers`) and the mean AUROC per bin of the ratio (:func:`ratio_bins`)."""
    fit = fit_logistic(sep["hidden_ratio"], sep["auroc"])
    return fit, logistic_outliers(sep, fit), ratio_bins(sep, edges)


def r2_strength(r2: float) -> str:
    """"weak" below :data:`WEAK_R2`, "moderate" below :data:`MODERATE_R2`, else "strong"."""
    return "weak" if r2 < WEAK_R2 else ("moderate" if r2 < MODERATE_R2 else "strong")


def logit_fits(sep: pd.DataFrame, pts: pd.DataFrame) -> dict[str, dict]:
    """The least-squares line (:func:`linear_fit`) of each of :data:`LOGIT_COMPARISONS` against
    the hidden-state ratio: over the per-layer rows ``sep`` or the points ``pts``."""
    frames = {"layers": sep, "cells": pts}
    return {key: linear_fit(frames[frame]["hidden_ratio"], frames[frame][y]) for key, (frame, y) in LOGIT_COMPARISONS.items()}


def logit_claims(sep: pd.DataFrame, pts: pd.DataFrame, fits: dict[str, dict], n_boot: int = 1000, seed: int = 0) -> dict[str, str]:
    """Research Update 2's Figs. 10-12 on the zoo: per comparison of :data:`LOGIT_COMPARISONS`, the
    rank correlation with the hidden-state ratio (``rho_<fig>``), the R² of its line (``fits``,
    :func:`logit_fits`; ``r2_<fig>``) and its strength (``verdict_<fig>``, :func:`r2_strength`)."""
    frames = {"layers": sep, "cells": pts}
    out = {}
    for key, (frame, y) in LOGIT_COMPARISONS.items():
        df = frames[frame]
        out[f"rho_{key}"] = format_corr(correlation_ci(df["hidden_ratio"], df[y], method="spearman", n_boot=n_boot, seed=seed))
    for key, lf in fits.items():
        out[f"r2_{key}"] = f"{lf['r2']:.2f}"
    for key, lf in fits.items():
        out[f"verdict_{key}"] = f"{r2_strength(lf['r2'])} (R² {lf['r2']:.2f})"
    return out


def ratio_claims(pts: pd.DataFrame, pairs: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, str]:
    """Lower separation and lower quirkiness against lower AUROC: the correlation of the layer-mean
    hidden-state ratio with AUROC and its verdict (:data:`RATIO_AUROC_VERDICTS`), and what the
    less-trained variants (``pairs``, :func:`variant_pairs`) show."""
    c_ratio = correlation_ci(pts["hidden_ratio"], pts["auroc"], n_boot=n_boot, seed=seed)
    out = dict(corr_ratio_auc=format_corr(c_ratio), verdict_ratio_auc=RATIO_AUROC_VERDICTS[ci_sign(c_ratio)])
    if len(pairs):
        less = pairs[pairs["d_quirkiness"] < 0]
        out["pairs_text"] = (
            f"In {len(less)} of {len(pairs)} (variant, dataset) pairs the variant is less quirky than its model; in "
            f"{int((less['d_auroc'] < 0).sum())} of those its AUROC is also lower and in "
            f"{int((less['d_hidden_ratio'] < 0).sum())} its hidden-state ratio is lower "
            f"(mean AUROC change {less['d_auroc'].mean():+.3f}, mean Q change {less['d_quirkiness'].mean():+.2f} nats)."
            if len(less)
            else f"No variant is less quirky than its model on any of the {len(pairs)} datasets compared."
        )
    else:
        out["pairs_text"] = ("This run has no less-trained variants, so the comparison rests on the variation across datasets and "
                             "model families alone.")  # fmt: skip
    return out
