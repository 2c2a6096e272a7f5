"""AUROC, layer aggregation and stratified bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int
from sklearn.metrics import roc_auc_score


def auroc(is_anomalous: np.ndarray, score: np.ndarray) -> float:
    """``roc_auc_score(is_anomalous, score)``; NaN when only one class is present."""
    y = np.asarray(is_anomalous).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(score)))


def bootstrap_counts(is_anomalous: np.ndarray, n_boot: int, seed: int) -> Int[np.ndarray, "n_boot n"]:
    """How often each example is drawn in each stratified bootstrap resample (classes resampled
    separately, so every resample keeps the class sizes)."""
    y = np.asarray(is_anomalous).astype(bool)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(y)), dtype=np.int64)
    for cls in (False, True):
        idx = np.flatnonzero(y == cls)
        if len(idx):
            counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return counts


def weighted_auroc(is_anomalous: np.ndarray, score: np.ndarray, counts: Int[np.ndarray, "b n"]) -> Float[np.ndarray, " b"]:
    """AUROC of each weighted resample (ties count one half), exact and vectorised.

    With all counts equal to one this is the ordinary AUROC.
    """
    y = np.asarray(is_anomalous).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    counts = np.atleast_2d(counts)
    uniq, inv = np.unique(s, return_inverse=True)
    w_pos = np.zeros((len(counts), len(uniq)))
    w_neg = np.zeros((len(counts), len(uniq)))
    np.add.at(w_pos.T, inv[y], counts[:, y].T)
    np.add.at(w_neg.T, inv[~y], counts[:, ~y].T)
    below = np.cumsum(w_neg, axis=1) - w_neg
    wins = (w_pos * (below + 0.5 * w_neg)).sum(1)
    return wins / (w_pos.sum(1) * w_neg.sum(1))


def standardise(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(scores - mean(reference)) / std(reference)``; the reference is trusted data."""
    ref = np.asarray(reference, dtype=np.float64)
    sd = ref.std()
    return (np.asarray(scores, dtype=np.float64) - ref.mean()) / (sd if sd > 0 else 1.0)


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(fit, reference)`` of ``n`` trusted rows: a random ``fraction`` of them (at least
    two) is held out of fitting, to standardise each layer's scores on points the detector never
    saw; ``fraction = 0`` gives every row to both (in-sample standardisation)."""
    if not (0.0 <= fraction < 1.0):
        raise ValueError(f"standardise_holdout={fraction!r} is not accepted; give a number in [0, 1)")
    idx = np.arange(n)
    if fraction == 0:
        return idx, idx
    n_ref = max(2, int(round(fraction * n)))
    if n - n_ref < 2:
        raise ValueError(f"standardise_holdout={fraction!r} is not accepted with {n} trusted prompts; it leaves {n - n_ref} to fit on")
    perm = np.random.default_rng([seed, 11]).permutation(n)
    return np.sort(perm[n_ref:]), np.sort(perm[:n_ref])


def aggregate_layers(test_scores: dict, trusted_scores: dict | None = None) -> np.ndarray:
    """Mean over layers of the per-layer scores, each standardised on trusted data first
    (``trusted_scores=None`` averages raw scores, as the seed's code did). The trusted scores
    should be of points the detector was not fitted on (:func:`holdout_split`): in-sample
    scores understate the spread of a layer's scores on new points, the more so the more
    dimensions the detector fits."""
    layers = sorted(test_scores)
    if trusted_scores is None:
        return np.mean([np.asarray(test_scores[layer], dtype=np.float64) for layer in layers], axis=0)
    return np.mean([standardise(test_scores[layer], trusted_scores[layer]) for layer in layers], axis=0)


FPRS: tuple[float, ...] = (0.01, 0.05)
"""False-positive rates at which :func:`recall_at_fpr` is reported beside AUROC."""


def recall_columns(fpr: float) -> tuple[str, str, str, str]:
    """Column names of the recall at ``fpr``, its interval, and the false-positive rate the same
    threshold gives on the test set's normal points: ``recall_fpr1``, ``..._low``, ``..._high``,
    ``test_fpr1``."""
    name = f"recall_fpr{100 * fpr:g}".replace(".", "_")
    return name, f"{name}_low", f"{name}_high", name.replace("recall_", "test_")


def recall_at_fpr(
    anomalous: np.ndarray, reference: np.ndarray, fpr: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
    normal: np.ndarray | None = None,
) -> tuple[float, float, float, float]:  # fmt: skip
    """Share of ``anomalous`` scores above the threshold that flags a share ``fpr`` of the
    ``reference`` (held-out trusted) scores, i.e. their ``1 - fpr`` quantile, with a percentile
    bootstrap interval that resamples both the reference (the threshold) and the anomalies, and
    the share of ``normal`` (test) scores above the same threshold: the false-positive rate the
    threshold really gives where the test set's normal points differ from the trusted ones.
    NaN when a set is empty."""
    a, r = np.asarray(anomalous, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if len(a) == 0 or len(r) == 0:
        return np.nan, np.nan, np.nan, np.nan
    thr = np.quantile(r, 1 - fpr)
    recall = float((a > thr).mean())
    n = np.asarray(normal if normal is not None else [], dtype=np.float64)
    test_fpr = float((n > thr).mean()) if len(n) else np.nan
    if n_boot < 1:
        return recall, np.nan, np.nan, test_fpr
    rng = np.random.default_rng([seed, 13])
    thr = np.quantile(r[rng.integers(len(r), size=(n_boot, len(r)))], 1 - fpr, axis=1)
    boot = (a[rng.integers(len(a), size=(n_boot, len(a)))] > thr[:, None]).mean(axis=1)
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return recall, float(lo), float(hi), test_fpr


def auroc_table(
    is_anomalous: np.ndarray,
    layer_scores: dict,
    aggregated: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[dict]:
    """Rows ``layer, auroc, ci_low, ci_high, n`` for each layer, ``aggregated`` and ``mean``
    (mean of per-layer AUROCs; absent when there are no layers), with percentile CIs from one
    shared stratified bootstrap."""
    y = np.asarray(is_anomalous).astype(bool)
    rows = []
    if y.all() or not y.any():
        for layer in [*sorted(layer_scores), "aggregated", *(["mean"] if layer_scores else [])]:
            rows.append(dict(layer=str(layer), auroc=np.nan, ci_low=np.nan, ci_high=np.nan, n=len(y)))
        return rows
    counts = bootstrap_counts(y, n_boot, seed)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    per_layer_boot = []
    for layer in sorted(layer_scores):
        boot = weighted_auroc(y, layer_scores[layer], counts)
        per_layer_boot.append(boot)
        lo, hi = np.percentile(boot, q)
        rows.append(dict(layer=str(layer), auroc=auroc(y, layer_scores[layer]), ci_low=lo, ci_high=hi, n=len(y)))
    lo, hi = np.percentile(weighted_auroc(y, aggregated, counts), q)
    rows.append(dict(layer="aggregated", auroc=auroc(y, aggregated), ci_low=lo, ci_high=hi, n=len(y)))
    if not layer_scores:  # one score per example (no layers): the aggregated row is the only one
        return rows
    lo, hi = np.percentile(np.mean(per_layer_boot, axis=0), q)
    rows.append(dict(layer="mean", auroc=float(np.mean([r["auroc"] for r in rows[: len(layer_scores)]])), ci_low=lo, ci_high=hi, n=len(y)))
    return rows
