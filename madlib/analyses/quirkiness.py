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
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from jaxtyping import Bool, Float
from scipy import optimize, stats
from torch import Tensor
from tqdm.auto import tqdm

from ..data import datasets as qdata
from ..features.activations import resolve_layers
from ..features.cache import cached_extract
from ..paths import atomic_path, results_dir
from ..plots.common import COLUMN_INCHES
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
# Figures

_PAIRS = {
    "own": (("alice", "alice", "Alice's labels on Alice's prompts"), ("bob", "bob", "Bob's labels on Bob's prompts")),
    "opposing": (
        ("bob", "alice", "Alice's labels on Bob's prompts"),
        ("alice", "bob", "Bob's labels on Alice's prompts"),
    ),
}


def _check_which(which: str) -> None:
    qdata.check_choice("which", which, list(_PAIRS))


def log_odds_figure(examples: pd.DataFrame, which: str = "own"):
    """Distributions of the log-odds assigned to each character's own (seed Fig. 3) or the opposing
    (Fig. 4) labels, on disagreeing examples, per dataset and model (one panel per character,
    stacked at the column's width)."""
    _check_which(which)
    ex = examples[~examples["agreement"]]
    fig, axes = plt.subplots(2, 1, figsize=(COLUMN_INCHES, 7.2), sharex=True)
    order = list(dict.fromkeys(ex["dataset"]))
    for ax, (char, source, title) in zip(axes, _PAIRS[which]):
        d = ex[(ex["character"] == char) & (ex["label_source"] == source)]
        sns.violinplot(data=d, x="dataset", y="log_odds", hue="model", order=order, cut=0, inner="quart",
                       density_norm="width", linewidth=0.8, ax=ax)  # fmt: skip
        ax.axhline(0, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="", ylabel="log-odds of the label (nats)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_figure(quirk: pd.DataFrame, which: str = "own"):
    """Mean loss against the own (seed Fig. 7) or opposing (Fig. 8) labels on hard disagreeing
    examples, per dataset and model, with the 50/50 line ln 2 (one panel per character, stacked)."""
    _check_which(which)
    fig, axes = plt.subplots(2, 1, figsize=(COLUMN_INCHES, 6.8), sharex=True, sharey=True)
    for ax, (char, source, title) in zip(axes, _PAIRS[which]):
        d = quirk[(quirk["character"] == char) & (quirk["label_source"] == source)]
        sns.barplot(data=d, x="dataset", y="mean_loss", hue="model", ax=ax)
        ax.axhline(LN2, color="red", ls="--", lw=1, label="ln 2 (50/50)")
        ax.set_title(f"Loss on {title}", fontsize=10)
        ax.set(xlabel="", ylabel="mean loss (nats)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _model_styles(models) -> dict:
    """A colour and a marker per model, for any number of models (the palette and the markers cycle)."""
    markers = "osD^vP*Xph"
    palette = sns.color_palette("tab10" if len(models) <= 10 else "tab20")
    return {m: (palette[i % len(palette)], markers[i % len(markers)]) for i, m in enumerate(models)}


def _scatter_by_model(ax, df: pd.DataFrame, x: str, y: str, label_datasets: bool = True) -> list:
    """A marker per model; with ``label_datasets`` a colour per dataset too (labels written beside
    the points would overlap), and the legend handles naming both are returned for the caller's
    one legend."""
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys(df["model"]))
    styles = _model_styles(models)
    datasets = list(dict.fromkeys(df["dataset"])) if label_datasets else []
    colours = dict(zip(datasets, sns.color_palette("tab10", max(1, len(datasets)))))
    for m in models:
        g = df[df["model"] == m]
        colour, marker = styles[m]
        c = [colours[d] for d in g["dataset"]] if label_datasets else [colour] * len(g)
        ax.scatter(g[x], g[y], c=c, marker=marker, label=None if label_datasets else m, s=36, alpha=0.85,
                   edgecolors="black" if label_datasets else "none", linewidths=0.4)  # fmt: skip
    if not label_datasets:
        return []
    return ([Line2D([], [], ls="", marker="o", color=colours[d], label=d) for d in datasets]
            + [Line2D([], [], ls="", marker=styles[m][1], color="lightgrey", markeredgecolor="black", label=m) for m in models])  # fmt: skip


def _outside_legend(ax, handles: list) -> None:
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def quirkiness_auroc_figure(points: pd.DataFrame, corr: dict):
    """MAD AUROC vs quirkiness coefficient, one point per model and dataset (seed Figs. 5-6)."""
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 4.5))
    handles = _scatter_by_model(ax, points, "quirkiness", "auroc")
    ax.errorbar(
        points["quirkiness"],
        points["auroc"],
        yerr=[points["auroc"] - points["ci_low"], points["ci_high"] - points["auroc"]],
        fmt="none",
        ecolor="grey",
        alpha=0.4,
        lw=0.8,
    )
    ax.axvline(0, color="grey", ls=":", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    det = points["detector"].iloc[0]
    ax.set(
        xlabel="quirkiness coefficient Q (nats)",
        ylabel=f"AUROC ({det}, aggregated)",
    )
    ax.set_title(f"{det}: Pearson r = {corr['r']:.2f} [{corr['ci_low']:.2f}, {corr['ci_high']:.2f}], n = {corr['n']}", fontsize=10)
    _outside_legend(ax, handles)
    fig.tight_layout()
    return fig


def ratio_auroc_figure(sep: pd.DataFrame, fit: LogisticFit, outliers: pd.DataFrame):
    """AUROC vs hidden-state variance ratio per model, dataset and layer, log x, with the fitted
    S-curve; outliers circled and named (seed Fig. 9)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _scatter_by_model(ax, sep, "hidden_ratio", "auroc", label_datasets=False)
    grid = np.logspace(np.log10(sep["hidden_ratio"].min()), np.log10(sep["hidden_ratio"].max()), 200)
    ax.plot(
        grid,
        fit.predict(grid),
        color="black",
        lw=1.5,
        label=f"logistic fit: midpoint {fit.midpoint_x:.3g}, slope {fit.slope:.2f}/decade, R² {fit.r2:.2f}",
    )
    for _, r in outliers.iterrows():
        ax.scatter(r["hidden_ratio"], r["auroc"], s=140, facecolors="none", edgecolors="red")
        ax.annotate(
            f"{r['model']} {r['dataset']} L{r['layer']}",
            (r["hidden_ratio"], r["auroc"]),
            fontsize=8,
            color="red",
            xytext=(5, -10),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel="hidden-state variance ratio (between-context / total)", ylabel="AUROC (per layer)", ylim=(0, 1.03))
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def ratio_scatter_figure(
    df: pd.DataFrame, x: str, y: str, fit: dict, xlabel: str, ylabel: str, title: str, label_datasets: bool = True
):
    """``y`` vs ``x`` per model (datasets labelled), with the least-squares line and its R² (seed Figs. 10-12)."""
    fig, ax = plt.subplots(figsize=(COLUMN_INCHES, 4.3))
    handles = _scatter_by_model(ax, df, x, y, label_datasets=label_datasets)
    grid = np.linspace(df[x].min(), df[x].max(), 50)
    (line,) = ax.plot(
        grid, fit["intercept"] + fit["slope"] * grid, color="black", lw=1, label=f"least squares, R² = {fit['r2']:.2f}"
    )
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    if handles:
        _outside_legend(ax, [line, *handles])
    else:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
