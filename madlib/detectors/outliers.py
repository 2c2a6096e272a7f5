"""Outlier scores that fit no Gaussian (methods.md §3): the isolation forest, and Beatrix's
Gram-matrix deviations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from sklearn.ensemble import IsolationForest as SklearnIsolationForest
from torch import Tensor

from .base import Detector, DetectorConfig, finite_number, to_float64


@dataclass(frozen=True)
class IsolationForestConfig(DetectorConfig):
    n_estimators: int = 100  # trees of the forest


class IsolationForestDetector(Detector):
    """Isolation forest (sklearn) fitted on trusted features; score ``-decision_function(x)``
    (shorter average isolation paths = more anomalous). ``seed`` is the forest's ``random_state``.
    Settings: :class:`IsolationForestConfig`."""

    name = "isolation_forest"
    Config = IsolationForestConfig

    def fit_layer(self, layer, x, paired) -> SklearnIsolationForest:
        forest = SklearnIsolationForest(n_estimators=self.config.n_estimators, random_state=self.seed)
        return forest.fit(to_float64(x).numpy())

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        return -self.fitted[layer].decision_function(to_float64(x).numpy())


def gram_features(x: Float[Tensor, "n d"], power: int, pairs: Tensor) -> Float[Tensor, "n f"]:
    """Beatrix's p-th order Gram features of single vectors: for each pair ``a <= b`` in ``pairs``,
    ``sign(g) |g|^(1/p)`` with ``g = x_a^p x_b^p``. This equals ``x_a x_b`` for odd ``p`` and
    ``|x_a x_b|`` for even ``p``; it is computed that way (no overflow for large ``p``)."""
    g = x[:, pairs[0]] * x[:, pairs[1]]
    return g if power % 2 else g.abs()


@dataclass(frozen=True)
class BeatrixConfig(DetectorConfig):
    powers: tuple[int, ...] = tuple(range(1, 9))  # Gram orders p (only their parity matters for single vectors)
    mad_scale: float = 10.0  # half-width of the normal band, in median absolute deviations
    chunk: int = 1 << 22  # Gram features per block (examples x pairs), bounding memory

    def __post_init__(self) -> None:
        powers = self.powers
        if not powers or any(not isinstance(p, (int, np.integer)) or p < 1 for p in powers):
            raise ValueError(f"powers={powers!r} is not accepted; give a non-empty list of integers >= 1")
        if not (finite_number(self.mad_scale) and self.mad_scale >= 0):
            raise ValueError(f"mad_scale={self.mad_scale!r} is not accepted; give a finite number >= 0")
        object.__setattr__(self, "powers", tuple(int(p) for p in powers))


class Beatrix(Detector):
    """Beatrix (Ma et al. 2022, "The Beatrix Resurrections"; cupbearer's ``BeatrixDetector``).

    Features: for each power ``p`` in ``powers``, the Gram features of :func:`gram_features` over
    the upper triangle (diagonal included) of ``x x^T``. On trusted data each feature gets its median
    ``m`` and median absolute deviation ``D``; with ``lo = m - mad_scale D``, ``hi = m + mad_scale D``,
    a feature's deviation is ``relu(lo - g) / |lo + 1e-6| + relu(g - hi) / |hi + 1e-6|``. The score
    is the mean deviation over features, averaged over powers. For single activation vectors only the
    parity of ``p`` matters, so the default powers 1..8 weigh the signed and absolute products equally.
    Exact medians are used (cupbearer keeps running approximations); the score is per example
    (cupbearer's averages over the batch). Settings: :class:`BeatrixConfig`.
    """

    name = "beatrix"
    Config = BeatrixConfig

    def pair_chunks(self, d: int, n: int) -> list[Tensor]:
        """The pairs ``a <= b`` of ``d`` features in blocks of at most ``chunk / n``."""
        pairs = torch.triu_indices(d, d)
        step = max(1, self.config.chunk // max(n, 1))
        return list(pairs.split(step, dim=1))

    def fit_layer(self, layer, x, paired) -> dict[int, tuple[Tensor, Tensor]]:
        """Per parity of the powers, the bounds ``(lo, hi)`` of every Gram feature."""
        x = to_float64(x)
        scale = self.config.mad_scale
        lo, hi = {}, {}
        for parity in {p % 2 for p in self.config.powers}:
            lo_c, hi_c = [], []
            for pairs in self.pair_chunks(x.shape[1], len(x)):
                g = gram_features(x, parity, pairs).numpy()
                med = np.median(g, axis=0)
                mad = np.median(np.abs(g - med), axis=0)
                lo_c.append(torch.from_numpy(med - scale * mad))
                hi_c.append(torch.from_numpy(med + scale * mad))
            lo[parity], hi[parity] = torch.cat(lo_c), torch.cat(hi_c)
        return {parity: (lo[parity], hi[parity]) for parity in lo}

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        x = to_float64(x)
        dev = {}
        for parity, (lo, hi) in self.fitted[layer].items():
            total, start = torch.zeros(len(x), dtype=torch.float64), 0
            for pairs in self.pair_chunks(x.shape[1], len(x)):
                g = gram_features(x, parity, pairs)
                lo_c, hi_c = lo[start : start + g.shape[1]], hi[start : start + g.shape[1]]
                total += ((lo_c - g).relu() / (lo_c + 1e-6).abs() + (g - hi_c).relu() / (hi_c + 1e-6).abs()).sum(1)
                start += g.shape[1]
            dev[parity] = total / start
        return torch.stack([dev[p % 2] for p in self.config.powers]).mean(0).numpy()
