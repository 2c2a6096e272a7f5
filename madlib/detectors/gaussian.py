"""The Gaussian family (methods.md §3): Mahalanobis distance (full, top principal directions,
diagonal), and the offline QUE score, spectral signature and Gaussian likelihood ratio.

All statistics are float64 means and covariances from a streaming pass
(:func:`madlib.detectors.base.moments`); directions the trusted set does not span are handled as
:class:`madlib.detectors.base.Spectrum` describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .base import (
    Detector,
    DetectorConfig,
    batched,
    check_positive_int,
    check_rcond,
    eig_desc,
    finite_number,
    moments,
    spectrum,
    to_float64,
    zero_variance_floor,
)


def check_shrinkage(shrinkage) -> None:
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage={shrinkage!r} is not accepted; give a number in [0, 1]")


@dataclass(frozen=True)
class MahalanobisConfig(DetectorConfig):
    rcond: float = 1e-3  # eigenvalues <= rcond * largest are dropped by the pseudo-inverse; finite, in [0, 1)
    shrinkage: float = 0.0  # S <- (1 - s) S + s tr(S)/d I before inverting (0 = none)
    batch_size: int = 4096  # rows per update of the streaming float64 covariance

    def __post_init__(self) -> None:
        check_rcond(self.rcond)
        check_shrinkage(self.shrinkage)


class Mahalanobis(Detector):
    """``(x - mu_T)^T P (x - mu_T) / d`` per layer (methods.md §3), with ``P = pinv(S_T, rcond)`` plus
    ``V_0 V_0^T / lambda_min``, where ``V_0`` spans the directions the trusted set does not span (the
    null eigenvectors of ``S_T``, :class:`~madlib.detectors.base.Spectrum`) and ``lambda_min`` is the
    smallest eigenvalue the pseudo-inverse keeps.

    So the squared norm of the part of ``x - mu_T`` outside the trusted span, divided by the smallest
    retained eigenvalue, is added to the pseudo-inverse score: a point moved along a direction the
    trusted set does not span (a rank-deficient ``S_T``: fewer rows than dimensions, or tied
    features) scores high instead of like a trusted point, and trusted points, which have no such
    part, score as with the pseudo-inverse alone. On a full-rank ``S_T`` the score is
    ``pinv(S_T, rcond)``'s: directions whose variance is positive but at most ``rcond * largest``
    are still dropped, and a move along one of them is not seen (lower ``rcond`` to see it). A
    trusted set of identical rows gives every direction :func:`~madlib.detectors.base.zero_variance_floor`.

    Settings: :class:`MahalanobisConfig`. ``seed`` is recorded only (the detector is deterministic).
    """

    name = "mahalanobis"
    Config = MahalanobisConfig

    def fit_layer(self, layer, x, paired) -> tuple[Tensor, Tensor]:
        """(trusted mean, precision matrix)."""
        cfg = self.config
        mean, cov = moments(x, cfg.batch_size)
        if cfg.shrinkage:
            d = cov.shape[0]
            cov = (1 - cfg.shrinkage) * cov + cfg.shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
        spec = spectrum(cov, cfg.rcond, mean)
        return mean, (spec.vecs * spec.weights()) @ spec.vecs.T

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        mean, precision = self.fitted[layer]
        xc = to_float64(x) - mean
        return (((xc @ precision) * xc).sum(1) / x.shape[1]).numpy()


@dataclass(frozen=True)
class PCAMahalanobisConfig(DetectorConfig):
    k: int = 10  # principal directions kept (methods.md §3 [U]: a free choice of the method)
    rcond: float = 1e-3  # eigenvalues at most rcond * largest are not retained
    batch_size: int = 4096  # rows per update of the streaming float64 covariance

    def __post_init__(self) -> None:
        check_positive_int("k", self.k)
        check_rcond(self.rcond)
        object.__setattr__(self, "k", int(self.k))


class PCAMahalanobis(Detector):
    """Mahalanobis restricted to the top-``k`` principal directions of the trusted covariance:
    ``(1/k') sum_{i <= k'} ((x - mu_T) . v_i)^2 / lambda_i``, with ``(lambda_i, v_i)`` the eigenpairs of
    ``S_T`` in decreasing order and ``k' = min(k, number of eigenvalues above rcond * largest)``.

    ``k`` is a free choice of the method (methods.md §3 [U]); with ``k = d`` and a full-rank ``S_T`` this
    is :class:`Mahalanobis`.

    **Directions outside the top ``k``.** When ``k`` is at least the number of retained eigenvalues
    (the top-``k'`` directions are the whole retained eigenspace), the squared norm of the part of
    ``x - mu_T`` in the directions the trusted set does not span, divided by the smallest retained
    eigenvalue, is added to the sum, as in :class:`Mahalanobis`: a point moved along such a direction
    scores high. Every other direction outside the top ``k'`` is not seen, by construction; with
    ``k`` below the number of retained eigenvalues that includes the unspanned ones (use
    ``mahalanobis`` to see them). A trusted set of identical rows retains no eigenvalue: the score
    is then the squared distance to the trusted point over :func:`~madlib.detectors.base.zero_variance_floor`.

    Settings: :class:`PCAMahalanobisConfig`.
    """

    name = "pca_mahalanobis"
    Config = PCAMahalanobisConfig

    def fit_layer(self, layer, x, paired) -> tuple[Tensor, Tensor, tuple[Tensor, float] | None]:
        """(trusted mean, whitening matrix of the top directions, ``(V_0, lambda_min)`` when the
        unspanned directions are scored, else None)."""
        cfg = self.config
        mean, cov = moments(x, cfg.batch_size)
        spec = spectrum(cov, cfg.rcond, mean)
        kept = int(spec.kept.sum())
        top = min(cfg.k, kept)
        whiten = spec.vecs[:, :top] / spec.vals[:top].sqrt()
        scored = bool(spec.null.any()) and cfg.k >= kept
        return mean, whiten, (spec.vecs[:, spec.null], spec.floor) if scored else None

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        mean, whiten, residual = self.fitted[layer]
        xc = to_float64(x) - mean
        total = (xc @ whiten).square().sum(1)
        if residual is not None:
            null, floor = residual
            total = total + (xc @ null).square().sum(1) / floor
        return (total / max(whiten.shape[1], 1)).numpy()


@dataclass(frozen=True)
class DiagMahalanobisConfig(DetectorConfig):
    rcond: float = 1e-6  # the variance floor relative to the mean trusted variance; a finite number in (0, 1)
    batch_size: int = 4096  # rows per pass of the float64 mean and variance

    def __post_init__(self) -> None:
        check_rcond(self.rcond, positive=True)


class DiagMahalanobis(Detector):
    """``(1/d) sum_j ((x_j - mu_j) / sigma_j)^2`` with the trusted per-dimension mean and standard
    deviation (methods.md §3; used on SAE latents). Each trusted variance is floored at ``rcond``
    times the mean trusted variance, ``sigma_j^2 = max(var_j, rcond * mean_i var_i)``: a dimension
    that never varies on trusted data (a latent that never fires) counts, heavily but finitely, when
    a test point moves along it. When every trusted variance is zero (identical rows) the floor is
    :func:`~madlib.detectors.base.zero_variance_floor`. Only per-dimension statistics are stored, so
    it suits wide features (SAE latents).

    Settings: :class:`DiagMahalanobisConfig`.
    """

    name = "diag_mahalanobis"
    Config = DiagMahalanobisConfig

    def fit_layer(self, layer, x, paired) -> tuple[Tensor, Tensor]:
        """(trusted mean, floored inverse variances)."""
        cfg = self.config
        if len(x) < 2:
            raise ValueError(f"trusted set has {len(x)} examples; need at least 2 to fit a variance")
        mean = sum(to_float64(b).sum(0) for b in batched(x, cfg.batch_size)) / len(x)
        var = sum((to_float64(b) - mean).square().sum(0) for b in batched(x, cfg.batch_size)) / len(x)
        scale = float(var.mean())
        floor = cfg.rcond * scale if scale > 0 else zero_variance_floor(mean, cfg.rcond)
        return mean, 1.0 / var.clamp_min(floor)

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        mean, inv_var = self.fitted[layer]
        return ((to_float64(x) - mean).square() @ inv_var / x.shape[1]).numpy()


@dataclass(frozen=True)
class QuantumEntropyConfig(DetectorConfig):
    alpha: float = 4.0  # the exponent's scale; a finite number > 0
    rcond: float = 1e-3  # eigenvalues at most rcond * largest are dropped from the whitening
    batch_size: int = 4096  # rows per update of the streaming float64 covariances

    def __post_init__(self) -> None:
        if not (finite_number(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} is not accepted; give a finite number > 0")
        check_rcond(self.rcond)


class QuantumEntropy(Detector):
    """Quantum-entropy (QUE) score (Dong et al. 2019; cupbearer's ``QuantumEntropyDetector``), offline.

    Whiten with the trusted eigendecomposition, ``W = V diag(lambda^-1/2)`` (eigenvalues at most
    ``rcond * largest`` dropped), ``z = (x - mu_T) W``; with the whitened untrusted covariance
    ``C = W^T S_U W``, the score is ``z^T exp(alpha C / ||C||_2) z`` (methods.md §3). Directions in
    which the untrusted data spread more than the trusted data are weighted up exponentially.
    Directions the trusted set does not span (null eigenvectors of ``S_T``,
    :class:`~madlib.detectors.base.Spectrum`) are not dropped but whitened with the smallest retained
    eigenvalue, so a point moved along one scores high; on a full-rank ``S_T`` there are none.

    Settings: :class:`QuantumEntropyConfig`.
    """

    name = "que"
    Config = QuantumEntropyConfig
    uses_untrusted = True

    def fit_layer(self, layer, x, paired) -> tuple[Tensor, Tensor, Tensor]:
        """(trusted mean, whitening matrix, kernel ``exp(alpha C / ||C||_2)``); ``paired``: the untrusted rows."""
        cfg = self.config
        mean, cov = moments(x, cfg.batch_size)
        spec = spectrum(cov, cfg.rcond, mean)
        used = spec.kept | spec.null
        w = spec.vecs[:, used] * spec.weights()[used].sqrt()
        c = w.T @ moments(paired, cfg.batch_size)[1] @ w
        c = (c + c.T) / 2
        return mean, w, torch.linalg.matrix_exp(cfg.alpha * c / torch.linalg.eigvalsh(c)[-1])

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        mean, whiten, kernel = self.fitted[layer]
        z = (to_float64(x) - mean) @ whiten
        return ((z @ kernel) * z).sum(1).numpy()


@dataclass(frozen=True)
class SpectralSignatureConfig(DetectorConfig):
    batch_size: int = 4096  # rows per update of the streaming float64 covariance


class SpectralSignature(Detector):
    """Spectral signature (Tran et al. 2018; cupbearer's ``SpectralSignatureDetector``), offline:
    ``((x - mu_U) . v_1)^2`` with ``v_1`` the top eigenvector of the untrusted covariance (the top
    right singular vector of the centred untrusted activations). Trusted features are not used.

    Settings: :class:`SpectralSignatureConfig`."""

    name = "spectral_signature"
    Config = SpectralSignatureConfig
    uses_untrusted = True

    def fit_layer(self, layer, x, paired) -> tuple[Tensor, Tensor]:
        """(untrusted mean, top untrusted eigenvector); ``paired``: the untrusted rows."""
        mean, cov = moments(paired, self.config.batch_size)
        return mean, torch.linalg.eigh(cov).eigenvectors[:, -1]

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        mean, direction = self.fitted[layer]
        return ((to_float64(x) - mean) @ direction).square().numpy()


@dataclass(frozen=True)
class LikelihoodRatioConfig(DetectorConfig):
    rcond: float = 1e-3  # trusted eigenvalues at most rcond * largest leave the basis
    shrinkage: float = 0.0  # each projected covariance S <- (1 - s) S + s tr(S)/k I
    batch_size: int = 4096  # rows per update of the streaming float64 covariances

    def __post_init__(self) -> None:
        check_shrinkage(self.shrinkage)
        check_rcond(self.rcond)


Gaussian = tuple[Tensor, Tensor, Tensor]
"""A projected Gaussian: mean, Cholesky factor of the covariance, log-determinant of the covariance."""


class LikelihoodRatio(Detector):
    """Gaussian likelihood ratio (cupbearer's ``LikelihoodRatioDetector``), offline:
    ``log N(y; m_U, S_U) - log N(y; m_T, S_T)`` with ``y = x B``, ``B`` the trusted eigenvectors whose
    eigenvalues exceed ``rcond * largest`` (the trusted non-null eigenbasis), and the means and
    covariances of the trusted and untrusted sets projected on ``B`` (methods.md §3). ``shrinkage``
    optionally mixes each projected covariance with ``tr(S)/k I`` (cupbearer shrinks both too).

    Only the projection on ``B`` is scored, by construction: both Gaussians live in ``B``, so a point
    moved along a direction the trusted set does not span (outside ``B``) scores as its projection
    does. Use ``mahalanobis`` or ``que``, which score that part, to see such moves.

    Settings: :class:`LikelihoodRatioConfig`.
    """

    name = "likelihood_ratio"
    Config = LikelihoodRatioConfig
    uses_untrusted = True

    def gaussian(self, mean: Tensor, cov: Tensor, basis: Tensor, layer) -> Gaussian:
        """Projected mean, Cholesky factor and log-determinant of the projected covariance."""
        shrinkage = self.config.shrinkage
        cov = basis.T @ cov @ basis
        cov = (cov + cov.T) / 2
        k = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / k * torch.eye(k, dtype=cov.dtype)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info:
            raise ValueError(
                f"shrinkage={shrinkage!r} leaves a singular covariance at layer {layer!r}; give shrinkage > 0"
            )
        return mean @ basis, chol, 2 * chol.diagonal().log().sum()

    def fit_layer(self, layer, x, paired) -> tuple[Tensor, Gaussian, Gaussian]:
        """(basis, untrusted Gaussian, trusted Gaussian); ``paired``: the untrusted rows."""
        cfg = self.config
        mean, cov = moments(x, cfg.batch_size)
        basis = eig_desc(cov, cfg.rcond)[1]
        untrusted = self.gaussian(*moments(paired, cfg.batch_size), basis, layer)
        return basis, untrusted, self.gaussian(mean, cov, basis, layer)

    @staticmethod
    def log_density(y: Tensor, gaussian: Gaussian) -> Tensor:
        mean, chol, logdet = gaussian
        sol = torch.linalg.solve_triangular(chol, (y - mean).T, upper=False)
        return -0.5 * (sol.square().sum(0) + logdet + y.shape[1] * math.log(2 * math.pi))

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        basis, untrusted, trusted = self.fitted[layer]
        y = to_float64(x) @ basis
        return (self.log_density(y, untrusted) - self.log_density(y, trusted)).numpy()
