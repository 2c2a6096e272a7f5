"""Anomaly detectors under one small contract.

A detector is fitted on *trusted* features (``{layer: Tensor[n, d]}``), then scores *test*
features, returning one score per example **per layer** (``{layer: ndarray[n]}``); a higher score
means more anomalous. Offline detectors may also receive unlabelled *untrusted* features in
``fit``; no detector ever sees test labels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

Features = dict[int, Float[Tensor, "n d"]]
Scores = dict[int, Float[np.ndarray, " n"]]


class Detector(ABC):
    """Fit on trusted features, score test features; higher = more anomalous, one score per layer."""

    name: str = "detector"
    uses_untrusted: bool = False
    """Offline detectors set this: ``fit`` then receives unlabelled untrusted features."""

    @abstractmethod
    def fit(self, trusted: Features, untrusted: Features | None = None) -> "Detector": ...

    @abstractmethod
    def score(self, test: Features) -> Scores: ...


class StreamingMoments:
    """Mean and covariance accumulated batch by batch in float64 (Chan et al.'s parallel update)."""

    def __init__(self, d: int):
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.m2 = torch.zeros(d, d, dtype=torch.float64)

    def update(self, x: Float[Tensor, "b d"]) -> None:
        x = x.to(torch.float64)
        b = len(x)
        if b == 0:
            return
        mean_b = x.mean(0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        delta = mean_b - self.mean
        n = self.n + b
        self.m2 += m2_b + torch.outer(delta, delta) * (self.n * b / n)
        self.mean += delta * (b / n)
        self.n = n

    @property
    def cov(self) -> Float[Tensor, "d d"]:
        """Maximum-likelihood covariance (divides by n)."""
        if self.n < 2:
            raise ValueError(f"trusted set has {self.n} examples; need at least 2 to fit a covariance")
        return self.m2 / self.n


def batched(x: Tensor, batch_size: int) -> Iterable[Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


class Mahalanobis(Detector):
    """``(x - mu_T)^T pinv(S_T, rcond) (x - mu_T) / d`` per layer (methods.md §3).

    Args:
        rcond: singular values below ``rcond * largest`` are treated as zero by the pseudo-inverse.
        shrinkage: optional ``S <- (1 - s) S + s tr(S)/d I`` before inverting (0 = none).
        batch_size: rows per update of the streaming float64 covariance.
    """

    name = "mahalanobis"

    def __init__(self, rcond: float = 1e-3, shrinkage: float = 0.0, batch_size: int = 4096):
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage!r} is not accepted; give a number in [0, 1]")
        self.rcond, self.shrinkage, self.batch_size = rcond, shrinkage, batch_size
        self.mean: dict[int, Tensor] = {}
        self.precision: dict[int, Tensor] = {}

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "Mahalanobis":
        for layer, x in trusted.items():
            mom = StreamingMoments(x.shape[1])
            for b in batched(x, self.batch_size):
                mom.update(b)
            cov = mom.cov
            if self.shrinkage:
                d = cov.shape[0]
                cov = (1 - self.shrinkage) * cov + self.shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
            self.mean[layer] = mom.mean
            self.precision[layer] = torch.linalg.pinv(cov, rtol=self.rcond, hermitian=True)
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            if layer not in self.mean:
                raise ValueError(f"layer={layer!r} was not fitted; fitted layers: {sorted(self.mean)}")
            xc = x.to(torch.float64) - self.mean[layer]
            out[layer] = (((xc @ self.precision[layer]) * xc).sum(1) / x.shape[1]).numpy()
        return out


DETECTORS: dict[str, type[Detector]] = {"mahalanobis": Mahalanobis}
"""Detectors by the name notebooks use in their ``detectors`` parameter."""


def make_detector(name: str, **kwargs) -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"detectors={name!r} is not accepted; choose from {sorted(DETECTORS)}")
    return DETECTORS[name](**kwargs)
