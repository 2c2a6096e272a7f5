"""Detectors on the latents of a sparse autoencoder per layer (methods.md §3).

The SAEs themselves are trained, cached and loaded by :mod:`madlib.features.sae`; a detector
encodes features with :func:`madlib.features.sae.encode_latents` and scores the latents. Give it
the SAE of each layer (``saes={layer: sae}``, as :func:`madlib.mad.suite.run_suite` does with the
SAEs of :func:`madlib.features.sae.cached_sae`), or a ``factory``; without either, it trains an SAE
on the trusted features themselves (a fallback: few examples train a poor dictionary).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from jaxtyping import Float
from torch import Tensor

from ..features.sae import SAEConfig, encode_latents, train_sae
from .base import Detector, DetectorConfig

SAEFactory = Callable[[int, Tensor], object]
"""``factory(layer, trusted_features) -> SAE``: the SAE of a layer, built when the detector is fitted."""

DETECTOR_SAE_CONFIG = SAEConfig(
    d_sae=256, k=8, training_tokens=200_000, batch_size=256, lr=1e-3, dead_feature_window=50
)
"""What a detector trains on its trusted features when it was given no SAE for a layer."""


@dataclass(frozen=True)
class SAELatentConfig(DetectorConfig):
    """Settings every SAE-latent detector shares."""

    cfg: SAEConfig = DETECTOR_SAE_CONFIG  # fallback SAE trained on a layer's trusted features (seed: the detector's)


class SAELatentDetector(Detector):
    """Scores on the latents of an SAE per layer (module doc).

    Args:
        saes: SAE per layer (e.g. trained on the base model's activations with
            :func:`madlib.features.sae.cached_sae`).
        factory: ``factory(layer, trusted_features) -> SAE`` for layers missing from ``saes``.
        seed: the seed of a fallback SAE (the scores are otherwise deterministic).

    ``saes`` and ``factory`` are inputs, not settings; the settings are the class's ``Config``.
    """

    Config = SAELatentConfig

    def __init__(
        self, saes: dict | None = None, factory: SAEFactory | None = None, *, config: SAELatentConfig | None = None,
        seed: int = 0, **settings,
    ):  # fmt: skip
        super().__init__(config=config, seed=seed, **settings)
        self.saes: dict = dict(saes or {})
        self.factory = factory

    def sae_for(self, layer: int, x: Float[Tensor, "n d"]):
        """The SAE of ``layer``: given, built by the factory, or trained on ``x`` (then kept in ``saes``)."""
        if layer not in self.saes:
            if self.factory is not None:
                self.saes[layer] = self.factory(layer, x)
            else:
                batch = min(self.config.cfg.batch_size, len(x))
                cfg = SAEConfig(**{**asdict(self.config.cfg), "seed": self.seed, "batch_size": batch})
                self.saes[layer] = train_sae(x, f"layer {layer}", cfg, progress=False)
        return self.saes[layer]


@dataclass(frozen=True)
class SAEDiagMahalanobisConfig(SAELatentConfig):
    eps: float = 1e-3  # variance floor, relative to the mean trusted variance of the latents

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps!r} is not accepted; give a positive variance floor")


class SAEDiagMahalanobis(SAELatentDetector):
    """``mean_j ((z_j - mu_j) / sigma_j)^2`` over the SAE latents ``z`` (methods.md §3), with
    ``sigma_j^2`` the trusted variance plus ``eps`` times the mean trusted variance (so a latent
    silent on trusted data counts, but finitely). Settings: :class:`SAEDiagMahalanobisConfig`."""

    name = "sae_diag_mahalanobis"
    Config = SAEDiagMahalanobisConfig

    def fit_layer(self, layer, x, paired) -> tuple[Tensor, Tensor]:
        """(trusted mean of the latents, their floored variance)."""
        z = encode_latents(self.sae_for(layer, x), x).double()
        var = z.var(0, unbiased=False)
        return z.mean(0), var + self.config.eps * var.mean().clamp_min(1e-12)

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        z = encode_latents(self.saes[layer], x).double()
        mu, var = self.fitted[layer]
        return (((z - mu) ** 2) / var).mean(1).numpy()


@dataclass(frozen=True)
class SAENewLatentsConfig(SAELatentConfig):
    threshold: float = 0.0  # activation above which a latent counts as active, >= 0

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"threshold={self.threshold!r} is not accepted; give an activation level >= 0")


class SAENewLatents(SAELatentDetector):
    """Number of latents active on an example that never fired on the trusted data (the "l0"
    score of methods.md §3). A latent is active where its activation exceeds ``threshold``: with
    0 (the definition) a top-k SAE's weak filler activations, which fill the k slots whatever the
    input, count too, and over many trusted examples nearly every latent fires once.
    Settings: :class:`SAENewLatentsConfig`."""

    name = "sae_new_latents"
    Config = SAENewLatentsConfig

    def fit_layer(self, layer, x, paired) -> Tensor:
        """Which latents fired on the trusted rows."""
        return (encode_latents(self.sae_for(layer, x), x) > self.config.threshold).any(0)

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        z = encode_latents(self.saes[layer], x)
        return ((z > self.config.threshold) & ~self.fitted[layer]).sum(1).double().numpy()
