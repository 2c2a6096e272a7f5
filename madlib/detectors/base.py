"""Anomaly detectors under one small contract (methods.md §3).

A detector is fitted on *trusted* features (``{layer: Tensor[n, d]}``), then scores *test*
features, returning one score per example **per layer** (``{layer: ndarray[n]}``); a higher score
means more anomalous. Offline detectors (``uses_untrusted = True``) also receive unlabelled
*untrusted* features in ``fit``; no detector ever sees test labels. The supervised probe is a
*skyline* (``skyline = True``), not a detector: it needs labelled anomalies, passed explicitly.

Every detector takes a ``seed`` and is deterministic given it; statistics are computed in float64.
Detectors are registered by name with :func:`register`; :func:`make_detector` builds one by name.
Detectors defined in other modules register themselves on import: decorate the class with
``@register("name")`` and add the module to the import line at the end of this file.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from jaxtyping import Bool, Float
from sklearn.ensemble import IsolationForest as _SkIsolationForest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import LocalOutlierFactor
from torch import Tensor, nn
from tqdm.auto import tqdm

Features = dict[int, Float[Tensor, "n d"]]
Scores = dict[int, Float[np.ndarray, " n"]]


class Detector(ABC):
    """Fit on trusted features, score test features; higher = more anomalous, one score per layer."""

    name: str = "detector"
    uses_untrusted: bool = False
    """Offline detectors set this: ``fit`` then receives unlabelled untrusted features."""
    skyline: bool = False
    """Set by references that need labelled anomalies (not detectors in the MAD sense)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __init_subclass__(cls, **kwargs) -> None:
        """Every detector's ``fit`` and ``score`` check their features first (:func:`check_features`)."""
        super().__init_subclass__(**kwargs)
        for name in ("fit", "score"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "checks_features", False):
                setattr(cls, name, _checked(method, name))

    @abstractmethod
    def fit(self, trusted: Features, untrusted: Features | None = None) -> "Detector": ...

    @abstractmethod
    def score(self, test: Features) -> Scores: ...


def _checked(method, name: str):
    @functools.wraps(method)
    def fit(self, trusted, untrusted=None, *args, **kwargs):
        dims = {layer: x.shape[1] for layer, x in check_features("trusted", trusted).items()}
        shared = {k: v for k, v in untrusted.items() if k in dims} if isinstance(untrusted, dict) else {}
        if shared:  # missing layers are the offline detector's own check (check_untrusted)
            check_features("untrusted", shared, dims)
        self.feature_dims = dims
        return method(self, trusted, untrusted, *args, **kwargs)

    @functools.wraps(method)
    def score(self, test, *args, **kwargs):
        check_features("test", test, getattr(self, "feature_dims", None))
        return method(self, test, *args, **kwargs)

    wrapper = fit if name == "fit" else score
    wrapper.checks_features = True
    return wrapper


DETECTORS: dict[str, type[Detector]] = {}
"""Detectors by the name notebooks use in their ``detectors`` parameter."""


def register(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: register a :class:`Detector` subclass under ``name`` (also sets ``cls.name``)."""

    def deco(cls: type[Detector]) -> type[Detector]:
        old = DETECTORS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"name={name!r} is already registered to {old.__module__}.{old.__qualname__}; choose another name"
            )
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return deco


def make_detector(name: str, **kwargs) -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"detectors={name!r} is not accepted; choose from {sorted(DETECTORS)}")
    return DETECTORS[name](**kwargs)


# ------------------------------------------------------------------------------------------------
# Shared pieces


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
            raise ValueError(f"got {self.n} examples; need at least 2 to fit a covariance")
        return self.m2 / self.n


def batched(x: Tensor, batch_size: int) -> Iterable[Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


def moments(x: Float[Tensor, "n d"], batch_size: int = 4096) -> tuple[Float[Tensor, " d"], Float[Tensor, "d d"]]:
    """Float64 mean and maximum-likelihood covariance from a streaming pass."""
    mom = StreamingMoments(x.shape[1])
    for b in batched(x, batch_size):
        mom.update(b)
    return mom.mean, mom.cov


def eig_desc(cov: Float[Tensor, "d d"], rcond: float) -> tuple[Float[Tensor, " k"], Float[Tensor, "d k"]]:
    """Eigenpairs of a covariance in decreasing order, keeping eigenvalues above ``rcond * largest``."""
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0), vecs.flip(1)
    keep = vals > rcond * vals[0].clamp_min(torch.finfo(vals.dtype).tiny)
    return vals[keep], vecs[:, keep]


def zero_variance_floor(mean: Float[Tensor, " d"], rcond: float) -> float:
    """The variance given to every direction when the trusted set has no variance at all (identical
    rows): ``max(rcond, float64 eps)`` times the mean square of the trusted mean, or times 1 when that
    mean is zero. Any move away from the single trusted point then scores high."""
    scale = float(mean.square().mean())
    return max(rcond, float(torch.finfo(torch.float64).eps)) * (scale if scale > 0 else 1.0)


NULL_RCOND = 1e-10
"""Eigenvalues at most ``min(rcond, NULL_RCOND)`` times the largest belong to directions the trusted
set does not span. The float64 rounding of a rank-deficient covariance (and the float32 rounding of
features tied by a linear relation) lies far below this; the smallest eigenvalues of real activations
lie far above it (about 5e-5 of the largest for the zoo's residual streams)."""


@dataclass
class Spectrum:
    """A trusted covariance's eigenpairs in decreasing order, split three ways: ``kept`` (above
    ``rcond * largest``), ``null`` (at most ``min(rcond, NULL_RCOND) * largest``: directions the trusted
    set does not span) and the rest (spanned, but dropped like the pseudo-inverse drops them).
    ``floor`` is the variance given to the null directions: the smallest kept eigenvalue, or
    :func:`zero_variance_floor` when none is kept (identical trusted rows)."""

    vals: Float[Tensor, " d"]
    vecs: Float[Tensor, "d d"]
    kept: Bool[Tensor, " d"]
    null: Bool[Tensor, " d"]
    floor: float

    def weights(self) -> Float[Tensor, " d"]:
        """Per eigenvector, the inverse variance used: ``1 / lambda`` if kept, ``1 / floor`` if null, else 0."""
        zero = torch.zeros_like(self.vals)
        inv = torch.where(self.kept, 1.0 / self.vals.where(self.kept, torch.ones_like(self.vals)), zero)
        return torch.where(self.null, torch.full_like(self.vals, 1.0 / self.floor), inv)


def spectrum(cov: Float[Tensor, "d d"], rcond: float, mean: Float[Tensor, " d"]) -> Spectrum:
    """:class:`Spectrum` of a covariance (``mean`` only sets :func:`zero_variance_floor`)."""
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0), vecs.flip(1)
    top = vals[0].clamp_min(torch.finfo(vals.dtype).tiny)
    kept = vals > rcond * top
    null = vals <= min(rcond, NULL_RCOND) * top
    k = int(kept.sum())
    floor = float(vals[k - 1]) if k else zero_variance_floor(mean, rcond)
    return Spectrum(vals, vecs, kept, null, floor)


def finite_number(value) -> bool:
    """Whether ``value`` is a real number (not a bool) that is neither NaN nor infinite."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return number and math.isfinite(value)


def check_rcond(rcond, positive: bool = False) -> None:
    """``rcond`` is a finite number in ``[0, 1)`` (``(0, 1)`` with ``positive``)."""
    if not (finite_number(rcond) and (0 < rcond < 1 if positive else 0 <= rcond < 1)):
        accepted = "(0, 1)" if positive else "[0, 1)"
        raise ValueError(f"rcond={rcond!r} is not accepted; give a finite number in {accepted}")


def check_features(param: str, feats: Features | None, dims: dict | None = None) -> Features:
    """``feats`` as they are, after refusing, in one line naming the parameter and layer, anything
    but a non-empty dict of 2-D tensors, NaN or infinite values, and (given the column count per
    layer ``dims`` that a detector was fitted on) another width or a layer it was not fitted on."""
    if not isinstance(feats, dict) or not feats:
        raise ValueError(f"{param}={type(feats).__name__} is not accepted; give a non-empty dict layer -> Tensor[n, d]")
    for layer, x in feats.items():
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(f"{param}[{layer!r}] has shape {tuple(getattr(x, 'shape', ()))}; give a 2-d Tensor[n, d]")
        bad = int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
        if bad:
            raise ValueError(f"{param}[{layer!r}] holds {bad} NaN or infinite values; detectors need finite features")
        if dims is not None:
            check_layer(dims, layer)
            if x.shape[1] != dims[layer]:
                raise ValueError(f"{param}[{layer!r}] has {x.shape[1]} columns; the detector was fitted on {dims[layer]}")
    return feats


def check_untrusted(det: Detector, trusted: Features, untrusted: Features | None) -> Features:
    if untrusted is None:
        raise ValueError(
            f"untrusted=None is not accepted; {det.name!r} is an offline detector: "
            "pass the unlabelled untrusted features"
        )
    check_features("untrusted", untrusted)
    missing = sorted(set(trusted) - set(untrusted))
    if missing:
        raise ValueError(f"untrusted lacks layers {missing}; give the same layers as trusted ({sorted(trusted)})")
    return untrusted


def check_layer(fitted: dict, layer) -> None:
    if layer not in fitted:
        raise ValueError(f"layer={layer!r} was not fitted; fitted layers: {sorted(fitted)}")


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


class Standardiser:
    """Per-feature ``(x - mean) / std`` with float64 trusted statistics; returns float32."""

    def __init__(self, x: Float[Tensor, "n d"], eps: float = 1e-8):
        x = _f64(x)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(eps)

    def __call__(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return ((_f64(x) - self.mean) / self.std).float()


def train_per_layer(
    build: Callable[[int], nn.Module],
    loss_fn: Callable[[nn.Module, Tensor], Tensor],
    data: dict[int, Float[Tensor, "n d"]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
    desc: str,
) -> dict[int, nn.Module]:
    """Train ``build(d)`` on each layer's (standardised) rows for ``steps`` Adam steps of shuffled
    minibatches, minimising the mean of ``loss_fn(module, batch)``. The global torch RNG is left
    untouched; initialisation, shuffling and any sampling inside the loss follow ``seed`` and the layer
    number only, so a layer's network does not depend on which other layers are fitted. Training runs
    on one thread: these networks are small, and contended multi-threading is far slower."""
    modules = {}
    bar = tqdm(total=steps * len(data), desc=desc, disable=not progress, mininterval=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for layer, x in sorted(data.items()):
            with torch.random.fork_rng():
                torch.manual_seed(seed + 1000 * int(layer))
                module = build(x.shape[1])
                opt = torch.optim.Adam(module.parameters(), lr=lr)
                gen = torch.Generator().manual_seed(seed + 1000 * int(layer) + 1)
                order, pos = torch.randperm(len(x), generator=gen), 0
                for _ in range(steps):
                    if pos + batch_size > len(x):
                        order, pos = torch.randperm(len(x), generator=gen), 0
                    batch = x[order[pos : pos + batch_size]]
                    pos += batch_size
                    loss = loss_fn(module, batch).mean()
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"{desc}: training loss is {loss.item()} at layer {layer}; lower lr={lr}")
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(module.parameters(), 10.0)
                    opt.step()
                    bar.update()
            modules[layer] = module.eval()
    finally:
        torch.set_num_threads(threads)
    bar.close()
    return modules


def check_training(steps: int, batch_size: int, lr: float) -> None:
    for param, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{param}={value!r} is not accepted; give an integer >= 1")
    if not (finite_number(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is not accepted; give a finite number > 0")


# ------------------------------------------------------------------------------------------------
# Gaussian family


@register("mahalanobis")
class Mahalanobis(Detector):
    """``(x - mu_T)^T P (x - mu_T) / d`` per layer (methods.md §3), with ``P = pinv(S_T, rcond)`` plus
    ``V_0 V_0^T / lambda_min``, where ``V_0`` spans the directions the trusted set does not span (the
    null eigenvectors of ``S_T``, :class:`Spectrum`) and ``lambda_min`` is the smallest eigenvalue the
    pseudo-inverse keeps.

    So the squared norm of the part of ``x - mu_T`` outside the trusted span, divided by the smallest
    retained eigenvalue, is added to the pseudo-inverse score: a point moved along a direction the
    trusted set does not span (a rank-deficient ``S_T``: fewer rows than dimensions, or tied
    features) scores high instead of like a trusted point, and trusted points, which have no such
    part, score as with the pseudo-inverse alone. On a full-rank ``S_T`` the score is
    ``pinv(S_T, rcond)``'s: directions whose variance is positive but at most ``rcond * largest``
    are still dropped, and a move along one of them is not seen (lower ``rcond`` to see it). A
    trusted set of identical rows gives every direction :func:`zero_variance_floor`.

    Args:
        rcond: eigenvalues at most ``rcond * largest`` are dropped by the pseudo-inverse; a finite
            number in ``[0, 1)``.
        shrinkage: optional ``S <- (1 - s) S + s tr(S)/d I`` before inverting (0 = none).
        batch_size: rows per update of the streaming float64 covariance.
        seed: recorded only (the detector is deterministic).
    """

    def __init__(self, rcond: float = 1e-3, shrinkage: float = 0.0, batch_size: int = 4096, seed: int = 0):
        super().__init__(seed)
        check_rcond(rcond)
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage!r} is not accepted; give a number in [0, 1]")
        self.rcond, self.shrinkage, self.batch_size = rcond, shrinkage, batch_size
        self.mean: dict[int, Tensor] = {}
        self.precision: dict[int, Tensor] = {}

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "Mahalanobis":
        for layer, x in check_features("trusted", trusted).items():
            mean, cov = moments(x, self.batch_size)
            if self.shrinkage:
                d = cov.shape[0]
                cov = (1 - self.shrinkage) * cov + self.shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
            self.mean[layer] = mean
            spec = spectrum(cov, self.rcond, mean)
            self.precision[layer] = (spec.vecs * spec.weights()) @ spec.vecs.T
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.mean, layer)
            xc = _f64(x) - self.mean[layer]
            out[layer] = (((xc @ self.precision[layer]) * xc).sum(1) / x.shape[1]).numpy()
        return out


@register("pca_mahalanobis")
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
    is then the squared distance to the trusted point over :func:`zero_variance_floor`.
    """

    def __init__(self, k: int = 10, rcond: float = 1e-3, batch_size: int = 4096, seed: int = 0):
        super().__init__(seed)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r} is not accepted; give an integer >= 1")
        check_rcond(rcond)
        self.k, self.rcond, self.batch_size = int(k), rcond, batch_size
        self.mean: dict[int, Tensor] = {}
        self.whiten: dict[int, Tensor] = {}
        self.residual: dict[int, tuple[Tensor, float] | None] = {}
        """Per layer, ``(V_0, lambda_min)`` when the unspanned directions are scored, else None."""

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "PCAMahalanobis":
        for layer, x in check_features("trusted", trusted).items():
            self.mean[layer], cov = moments(x, self.batch_size)
            spec = spectrum(cov, self.rcond, self.mean[layer])
            kept = int(spec.kept.sum())
            top = min(self.k, kept)
            self.whiten[layer] = spec.vecs[:, :top] / spec.vals[:top].sqrt()
            scored = bool(spec.null.any()) and self.k >= kept
            self.residual[layer] = (spec.vecs[:, spec.null], spec.floor) if scored else None
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.mean, layer)
            xc = _f64(x) - self.mean[layer]
            total = (xc @ self.whiten[layer]).square().sum(1)
            if self.residual.get(layer) is not None:
                null, floor = self.residual[layer]
                total = total + (xc @ null).square().sum(1) / floor
            out[layer] = (total / max(self.whiten[layer].shape[1], 1)).numpy()
        return out


@register("diag_mahalanobis")
class DiagMahalanobis(Detector):
    """``(1/d) sum_j ((x_j - mu_j) / sigma_j)^2`` with the trusted per-dimension mean and standard
    deviation (methods.md §3; used on SAE latents). Each trusted variance is floored at ``rcond``
    times the mean trusted variance, ``sigma_j^2 = max(var_j, rcond * mean_i var_i)``: a dimension
    that never varies on trusted data (a latent that never fires) counts, heavily but finitely, when
    a test point moves along it. When every trusted variance is zero (identical rows) the floor is
    :func:`zero_variance_floor`. Only per-dimension statistics are stored, so it suits wide features
    (SAE latents).

    Args:
        rcond: the variance floor relative to the mean trusted variance; a finite number in ``(0, 1)``.
    """

    def __init__(self, rcond: float = 1e-6, batch_size: int = 4096, seed: int = 0):
        super().__init__(seed)
        check_rcond(rcond, positive=True)
        self.rcond, self.batch_size = rcond, batch_size
        self.mean: dict[int, Tensor] = {}
        self.inv_var: dict[int, Tensor] = {}

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "DiagMahalanobis":
        for layer, x in check_features("trusted", trusted).items():
            if len(x) < 2:
                raise ValueError(f"trusted set has {len(x)} examples; need at least 2 to fit a variance")
            mean = sum(_f64(b).sum(0) for b in batched(x, self.batch_size)) / len(x)
            var = sum((_f64(b) - mean).square().sum(0) for b in batched(x, self.batch_size)) / len(x)
            scale = float(var.mean())
            floor = self.rcond * scale if scale > 0 else zero_variance_floor(mean, self.rcond)
            self.mean[layer] = mean
            self.inv_var[layer] = 1.0 / var.clamp_min(floor)
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.mean, layer)
            out[layer] = ((_f64(x) - self.mean[layer]).square() @ self.inv_var[layer] / x.shape[1]).numpy()
        return out


@register("que")
class QuantumEntropy(Detector):
    """Quantum-entropy (QUE) score (Dong et al. 2019; cupbearer's ``QuantumEntropyDetector``), offline.

    Whiten with the trusted eigendecomposition, ``W = V diag(lambda^-1/2)`` (eigenvalues at most
    ``rcond * largest`` dropped), ``z = (x - mu_T) W``; with the whitened untrusted covariance
    ``C = W^T S_U W``, the score is ``z^T exp(alpha C / ||C||_2) z`` (methods.md §3). Directions in
    which the untrusted data spread more than the trusted data are weighted up exponentially.
    Directions the trusted set does not span (null eigenvectors of ``S_T``, :class:`Spectrum`) are
    not dropped but whitened with the smallest retained eigenvalue, so a point moved along one
    scores high; on a full-rank ``S_T`` there are none.
    """

    uses_untrusted = True

    def __init__(self, alpha: float = 4.0, rcond: float = 1e-3, batch_size: int = 4096, seed: int = 0):
        super().__init__(seed)
        if not (finite_number(alpha) and alpha > 0):
            raise ValueError(f"alpha={alpha!r} is not accepted; give a finite number > 0")
        check_rcond(rcond)
        self.alpha, self.rcond, self.batch_size = alpha, rcond, batch_size
        self.mean: dict[int, Tensor] = {}
        self.whiten: dict[int, Tensor] = {}
        self.kernel: dict[int, Tensor] = {}

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "QuantumEntropy":
        untrusted = check_untrusted(self, check_features("trusted", trusted), untrusted)
        for layer, x in trusted.items():
            self.mean[layer], cov = moments(x, self.batch_size)
            spec = spectrum(cov, self.rcond, self.mean[layer])
            used = spec.kept | spec.null
            w = spec.vecs[:, used] * spec.weights()[used].sqrt()
            c = w.T @ moments(untrusted[layer], self.batch_size)[1] @ w
            c = (c + c.T) / 2
            self.whiten[layer] = w
            self.kernel[layer] = torch.linalg.matrix_exp(self.alpha * c / torch.linalg.eigvalsh(c)[-1])
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.mean, layer)
            z = (_f64(x) - self.mean[layer]) @ self.whiten[layer]
            out[layer] = ((z @ self.kernel[layer]) * z).sum(1).numpy()
        return out


@register("spectral_signature")
class SpectralSignature(Detector):
    """Spectral signature (Tran et al. 2018; cupbearer's ``SpectralSignatureDetector``), offline:
    ``((x - mu_U) . v_1)^2`` with ``v_1`` the top eigenvector of the untrusted covariance (the top
    right singular vector of the centred untrusted activations). Trusted features are not used."""

    uses_untrusted = True

    def __init__(self, batch_size: int = 4096, seed: int = 0):
        super().__init__(seed)
        self.batch_size = batch_size
        self.mean: dict[int, Tensor] = {}
        self.direction: dict[int, Tensor] = {}

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "SpectralSignature":
        untrusted = check_untrusted(self, check_features("trusted", trusted), untrusted)
        for layer in trusted:
            self.mean[layer], cov = moments(untrusted[layer], self.batch_size)
            self.direction[layer] = torch.linalg.eigh(cov).eigenvectors[:, -1]
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.mean, layer)
            out[layer] = ((_f64(x) - self.mean[layer]) @ self.direction[layer]).square().numpy()
        return out


@register("likelihood_ratio")
class LikelihoodRatio(Detector):
    """Gaussian likelihood ratio (cupbearer's ``LikelihoodRatioDetector``), offline:
    ``log N(y; m_U, S_U) - log N(y; m_T, S_T)`` with ``y = x B``, ``B`` the trusted eigenvectors whose
    eigenvalues exceed ``rcond * largest`` (the trusted non-null eigenbasis), and the means and
    covariances of the trusted and untrusted sets projected on ``B`` (methods.md §3). ``shrinkage``
    optionally mixes each projected covariance with ``tr(S)/k I`` (cupbearer shrinks both too).

    Only the projection on ``B`` is scored, by construction: both Gaussians live in ``B``, so a point
    moved along a direction the trusted set does not span (outside ``B``) scores as its projection
    does. Use ``mahalanobis`` or ``que``, which score that part, to see such moves.
    """

    uses_untrusted = True

    def __init__(self, rcond: float = 1e-3, shrinkage: float = 0.0, batch_size: int = 4096, seed: int = 0):
        super().__init__(seed)
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage!r} is not accepted; give a number in [0, 1]")
        check_rcond(rcond)
        self.rcond, self.shrinkage, self.batch_size = rcond, shrinkage, batch_size
        self.basis: dict[int, Tensor] = {}
        self.gaussians: dict[int, tuple[tuple[Tensor, Tensor, Tensor], ...]] = {}

    def _gaussian(self, mean: Tensor, cov: Tensor, basis: Tensor, layer) -> tuple[Tensor, Tensor, Tensor]:
        """Projected mean, Cholesky factor and log-determinant of the projected covariance."""
        cov = basis.T @ cov @ basis
        cov = (cov + cov.T) / 2
        k = cov.shape[0]
        cov = (1 - self.shrinkage) * cov + self.shrinkage * torch.trace(cov) / k * torch.eye(k, dtype=cov.dtype)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info:
            raise ValueError(
                f"shrinkage={self.shrinkage!r} leaves a singular covariance at layer {layer!r}; give shrinkage > 0"
            )
        return mean @ basis, chol, 2 * chol.diagonal().log().sum()

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "LikelihoodRatio":
        untrusted = check_untrusted(self, check_features("trusted", trusted), untrusted)
        for layer, x in trusted.items():
            mean, cov = moments(x, self.batch_size)
            basis = eig_desc(cov, self.rcond)[1]
            self.basis[layer] = basis
            self.gaussians[layer] = (
                self._gaussian(*moments(untrusted[layer], self.batch_size), basis, layer),
                self._gaussian(mean, cov, basis, layer),
            )
        return self

    @staticmethod
    def _log_density(y: Tensor, gaussian: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        mean, chol, logdet = gaussian
        sol = torch.linalg.solve_triangular(chol, (y - mean).T, upper=False)
        return -0.5 * (sol.square().sum(0) + logdet + y.shape[1] * math.log(2 * math.pi))

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.basis, layer)
            y = _f64(x) @ self.basis[layer]
            untrusted, trusted = self.gaussians[layer]
            out[layer] = (self._log_density(y, untrusted) - self._log_density(y, trusted)).numpy()
        return out


# ------------------------------------------------------------------------------------------------
# Non-parametric detectors


@register("lof")
class LOF(Detector):
    """Local outlier factor against the trusted set only: sklearn ``LocalOutlierFactor(novelty=True)``
    fitted on trusted features, score ``-score_samples(x)`` (the LOF of ``x`` with respect to its
    ``n_neighbors`` nearest trusted points). A test point's score does not depend on the other test
    points (unlike cupbearer's LOF, which pools the test batch with the trusted set).

    Scoring the trusted points themselves is in-sample (each finds itself at distance 0).
    """

    def __init__(self, n_neighbors: int = 20, seed: int = 0):
        super().__init__(seed)
        if not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1:
            raise ValueError(f"n_neighbors={n_neighbors!r} is not accepted; give an integer >= 1")
        self.n_neighbors = int(n_neighbors)
        self.models: dict[int, LocalOutlierFactor] = {}

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "LOF":
        for layer, x in check_features("trusted", trusted).items():
            if len(x) <= self.n_neighbors:
                raise ValueError(
                    f"trusted set has {len(x)} examples; LOF needs more than n_neighbors={self.n_neighbors}"
                )
            self.models[layer] = LocalOutlierFactor(n_neighbors=self.n_neighbors, novelty=True).fit(_f64(x).numpy())
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.models, layer)
            out[layer] = -self.models[layer].score_samples(_f64(x).numpy())
        return out


@register("isolation_forest")
class IsolationForestDetector(Detector):
    """Isolation forest (sklearn) fitted on trusted features; score ``-decision_function(x)``
    (shorter average isolation paths = more anomalous). ``seed`` is the forest's ``random_state``."""

    def __init__(self, n_estimators: int = 100, seed: int = 0):
        super().__init__(seed)
        self.n_estimators = n_estimators
        self.models: dict[int, _SkIsolationForest] = {}

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "IsolationForestDetector":
        for layer, x in check_features("trusted", trusted).items():
            forest = _SkIsolationForest(n_estimators=self.n_estimators, random_state=self.seed)
            self.models[layer] = forest.fit(_f64(x).numpy())
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.models, layer)
            out[layer] = -self.models[layer].decision_function(_f64(x).numpy())
        return out


def gram_features(x: Float[Tensor, "n d"], power: int, pairs: Tensor) -> Float[Tensor, "n f"]:
    """Beatrix's p-th order Gram features of single vectors: for each pair ``a <= b`` in ``pairs``,
    ``sign(g) |g|^(1/p)`` with ``g = x_a^p x_b^p``. This equals ``x_a x_b`` for odd ``p`` and
    ``|x_a x_b|`` for even ``p``; it is computed that way (no overflow for large ``p``)."""
    g = x[:, pairs[0]] * x[:, pairs[1]]
    return g if power % 2 else g.abs()


@register("beatrix")
class Beatrix(Detector):
    """Beatrix (Ma et al. 2022, "The Beatrix Resurrections"; cupbearer's ``BeatrixDetector``).

    Features: for each power ``p`` in ``powers``, the Gram features of :func:`gram_features` over
    the upper triangle (diagonal included) of ``x x^T``. On trusted data each feature gets its median
    ``m`` and median absolute deviation ``D``; with ``lo = m - mad_scale D``, ``hi = m + mad_scale D``,
    a feature's deviation is ``relu(lo - g) / |lo + 1e-6| + relu(g - hi) / |hi + 1e-6|``. The score
    is the mean deviation over features, averaged over powers. For single activation vectors only the
    parity of ``p`` matters, so the default powers 1..8 weigh the signed and absolute products equally.
    Exact medians are used (cupbearer keeps running approximations); the score is per example
    (cupbearer's averages over the batch).
    """

    def __init__(
        self, powers: tuple[int, ...] = tuple(range(1, 9)), mad_scale: float = 10.0, chunk: int = 1 << 22, seed: int = 0
    ):
        super().__init__(seed)
        if not powers or any(not isinstance(p, (int, np.integer)) or p < 1 for p in powers):
            raise ValueError(f"powers={powers!r} is not accepted; give a non-empty list of integers >= 1")
        if not (finite_number(mad_scale) and mad_scale >= 0):
            raise ValueError(f"mad_scale={mad_scale!r} is not accepted; give a finite number >= 0")
        self.powers, self.mad_scale, self.chunk = tuple(int(p) for p in powers), mad_scale, chunk
        self.bounds: dict[int, dict[int, tuple[Tensor, Tensor]]] = {}

    def _pair_chunks(self, d: int, n: int) -> list[Tensor]:
        pairs = torch.triu_indices(d, d)
        step = max(1, self.chunk // max(n, 1))
        return list(pairs.split(step, dim=1))

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "Beatrix":
        for layer, x in check_features("trusted", trusted).items():
            x = _f64(x)
            lo, hi = {}, {}
            for parity in {p % 2 for p in self.powers}:
                lo_c, hi_c = [], []
                for pairs in self._pair_chunks(x.shape[1], len(x)):
                    g = gram_features(x, parity, pairs).numpy()
                    med = np.median(g, axis=0)
                    mad = np.median(np.abs(g - med), axis=0)
                    lo_c.append(torch.from_numpy(med - self.mad_scale * mad))
                    hi_c.append(torch.from_numpy(med + self.mad_scale * mad))
                lo[parity], hi[parity] = torch.cat(lo_c), torch.cat(hi_c)
            self.bounds[layer] = {parity: (lo[parity], hi[parity]) for parity in lo}
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.bounds, layer)
            x = _f64(x)
            dev = {}
            for parity, (lo, hi) in self.bounds[layer].items():
                total, start = torch.zeros(len(x), dtype=torch.float64), 0
                for pairs in self._pair_chunks(x.shape[1], len(x)):
                    g = gram_features(x, parity, pairs)
                    lo_c, hi_c = lo[start : start + g.shape[1]], hi[start : start + g.shape[1]]
                    total += ((lo_c - g).relu() / (lo_c + 1e-6).abs() + (g - hi_c).relu() / (hi_c + 1e-6).abs()).sum(1)
                    start += g.shape[1]
                dev[parity] = total / start
            out[layer] = torch.stack([dev[p % 2] for p in self.powers]).mean(0).numpy()
        return out


def neighbour_ranks(
    queries: dict[int, Float[Tensor, "q d"]],
    reference: dict[int, Float[Tensor, "n d"]],
    ref_layer: int,
    k: int,
    self_index: Tensor | None = None,
) -> Float[Tensor, "q k others"]:
    """TED's ranking trajectories. For each query, its ``k`` nearest reference points by cosine
    similarity at ``ref_layer``; for every other layer (in sorted order), the rank of each of those
    neighbours among all reference points ordered by cosine similarity to the query at that layer
    (0 = most similar; rank = number of reference points strictly more similar). ``self_index[i]``
    marks the query's own row in the reference, left out of neighbours and ranks (leave-one-out).
    Inputs must be L2-normalised rows."""
    others = [layer for layer in sorted(reference) if layer != ref_layer]
    rows = torch.arange(len(queries[ref_layer]))
    sims_ref = queries[ref_layer] @ reference[ref_layer].T
    if self_index is not None:
        sims_ref[rows, self_index] = -torch.inf
    nb = sims_ref.topk(k, dim=1).indices
    ranks = []
    for layer in others:
        sims = queries[layer] @ reference[layer].T
        if self_index is not None:
            sims[rows, self_index] = -torch.inf
        sorted_sims = sims.sort(dim=1).values
        ranks.append(sims.shape[1] - torch.searchsorted(sorted_sims, sims.gather(1, nb).contiguous(), right=True))
    return torch.stack(ranks, dim=2).to(torch.float64)


@register("ted")
class TED(Detector):
    """Topological evolution dynamics (Mo et al. 2024), as adapted to language models by cupbearer's
    ``TEDDetector``: it scores using all layers jointly.

    For a reference layer ``r``: take the ``n_neighbors`` nearest trusted points of ``x`` at layer
    ``r`` (cosine similarity); at every other layer, rank each of those neighbours among all trusted
    points by similarity to ``x`` (:func:`neighbour_ranks`); each neighbour gives a ranking vector of
    length ``L - 1``. An outlier model fitted on the trusted points' own (leave-one-out) ranking
    vectors scores each vector: here :class:`Mahalanobis` on the vectors (the PCA outlier score with
    all components; cupbearer uses pyod's PCA detector). The score of ``x`` is the mean (or max) over
    its neighbours.

    **Contract.** The output key ``r`` holds the joint score computed with ``r`` as the reference
    layer, so every key uses all fitted layers and :func:`madlib.mad.metrics.aggregate_layers` averages
    over reference layers (standardised on trusted scores, or raw) exactly as over layers for other
    detectors. ``score`` therefore needs exactly the fitted layers (at least two). Scoring the trusted
    points themselves is in-sample (each is its own nearest neighbour).
    """

    def __init__(
        self,
        n_neighbors: int = 10,
        aggregation: str = "mean",
        rcond: float = 1e-3,
        batch_size: int = 512,
        seed: int = 0,
    ):
        super().__init__(seed)
        if aggregation not in ("mean", "max"):
            raise ValueError(f"aggregation={aggregation!r} is not accepted; choose one of ['mean', 'max']")
        if not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1:
            raise ValueError(f"n_neighbors={n_neighbors!r} is not accepted; give an integer >= 1")
        self.n_neighbors, self.aggregation, self.rcond, self.batch_size = (
            int(n_neighbors),
            aggregation,
            rcond,
            batch_size,
        )
        self.reference: dict[int, Tensor] = {}
        self.outlier = Mahalanobis(rcond=rcond)

    @staticmethod
    def _normalised(feats: Features) -> dict[int, Tensor]:
        return {layer: torch.nn.functional.normalize(_f64(x), dim=1) for layer, x in feats.items()}

    def _trajectories(self, queries: dict[int, Tensor], leave_one_out: bool, desc: str) -> dict[int, Tensor]:
        n = len(next(iter(queries.values())))
        out: dict[int, list[Tensor]] = {r: [] for r in self.reference}
        for start in tqdm(range(0, n, self.batch_size), desc=desc, disable=n <= 4 * self.batch_size, mininterval=1):
            q = {layer: x[start : start + self.batch_size] for layer, x in queries.items()}
            own = torch.arange(start, start + len(q[next(iter(q))])) if leave_one_out else None
            for r in self.reference:
                out[r].append(neighbour_ranks(q, self.reference, r, self.n_neighbors, own))
        return {r: torch.cat(v) for r, v in out.items()}

    @staticmethod
    def _check_rows(param: str, feats: Features) -> None:
        sizes = {len(x) for x in feats.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"{param} has layers with different numbers of rows {sorted(sizes)}; "
                "TED needs the same examples at every layer"
            )

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "TED":
        check_features("trusted", trusted)
        if len(trusted) < 2:
            raise ValueError(f"trusted has layers {sorted(trusted)}; TED needs at least two layers")
        self._check_rows("trusted", trusted)
        n = len(next(iter(trusted.values())))
        if n <= self.n_neighbors + 1:
            raise ValueError(
                f"trusted set has {n} examples; TED needs more than n_neighbors + 1 = {self.n_neighbors + 1}"
            )
        self.reference = self._normalised(trusted)
        traj = self._trajectories(self.reference, leave_one_out=True, desc="TED fit")
        self.outlier.fit({r: t.reshape(-1, t.shape[2]) for r, t in traj.items()})
        return self

    def score(self, test: Features) -> Scores:
        if not self.reference:
            raise ValueError("TED is not fitted; call fit first")
        if set(test) != set(self.reference):
            raise ValueError(
                f"test has layers {sorted(test)}; TED scores jointly and needs exactly the fitted layers "
                f"{sorted(self.reference)}"
            )
        self._check_rows("test", test)
        traj = self._trajectories(self._normalised(test), leave_one_out=False, desc="TED score")
        scores = self.outlier.score({r: t.reshape(-1, t.shape[2]) for r, t in traj.items()})
        agg = np.mean if self.aggregation == "mean" else np.max
        return {r: agg(s.reshape(-1, self.n_neighbors), axis=1) for r, s in scores.items()}


# ------------------------------------------------------------------------------------------------
# Supervised skyline


@dataclass
class LabelledFeatures:
    """Labelled features for the supervised skyline; ``split`` must say where they come from, and
    only the training split is accepted (the labelled test set is never fitted on)."""

    acts: Features
    is_anomalous: Bool[np.ndarray, " n"]
    split: str

    def __post_init__(self):
        if self.split != "train":
            raise ValueError(
                f"split={self.split!r} is not accepted; the skyline is fitted on labelled data of the "
                "train split only ('train')"
            )
        check_features("labelled.acts", self.acts)
        y = np.asarray(self.is_anomalous).astype(bool)
        sizes = {len(x) for x in self.acts.values()}
        if sizes != {len(y)}:
            raise ValueError(
                f"is_anomalous has {len(y)} rows but labelled.acts has {sorted(sizes)}; give one label per row"
            )
        if y.all() or not y.any():
            raise ValueError("is_anomalous holds one class only; the skyline needs normal and anomalous examples")
        self.is_anomalous = y


@register("probe_skyline")
class ProbeSkyline(Detector):
    """Supervised probe: a **skyline, not a detector**. Per layer, a logistic regression on
    standardised features, fitted on labelled normal-vs-anomalous examples of the *train* split
    passed as ``fit(..., labelled=LabelledFeatures(acts, is_anomalous, split="train"))``; the score
    is its log-odds of "anomalous" (monotone in P(anomalous), methods.md §3). It is an upper
    reference for what the features make separable. ``trusted`` only fixes the layers; the plain
    ``fit(trusted, untrusted)`` call of a detector is refused.
    """

    skyline = True

    def __init__(self, C: float = 1.0, max_iter: int = 1000, seed: int = 0):
        super().__init__(seed)
        self.C, self.max_iter = C, max_iter
        self.models: dict[int, tuple[Tensor, Tensor, LogisticRegression]] = {}

    def fit(
        self, trusted: Features, untrusted: Features | None = None, *, labelled: LabelledFeatures | None = None
    ) -> "ProbeSkyline":
        check_features("trusted", trusted)
        if not isinstance(labelled, LabelledFeatures):
            raise ValueError(
                "labelled=None is not accepted; probe_skyline is a supervised skyline: pass "
                "labelled=LabelledFeatures(acts, is_anomalous, split='train') built from the train split"
            )
        missing = sorted(set(trusted) - set(labelled.acts))
        if missing:
            raise ValueError(f"labelled.acts lacks layers {missing}; give the layers of trusted ({sorted(trusted)})")
        for layer in trusted:
            x = _f64(labelled.acts[layer])
            mean, std = x.mean(0), x.std(0).clamp_min(1e-12)
            model = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
            self.models[layer] = (mean, std, model.fit(((x - mean) / std).numpy(), labelled.is_anomalous))
        return self

    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.models, layer)
            mean, std, model = self.models[layer]
            out[layer] = model.decision_function(((_f64(x) - mean) / std).numpy())
        return out

