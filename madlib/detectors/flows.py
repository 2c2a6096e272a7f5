"""Normalising-flow detectors (methods.md §3; seed 000's flow experiment).

A masked autoregressive flow (``zuko.flows.MAF``) maps standardised activations ``x`` to latents
``z = f(x)`` under a factorised Laplace(0, 1) prior, trained by maximum likelihood
(``-log p(x) = -log prior(z) - log|det df/dx|``). Two scores are registered separately:
``flow_nll`` (minus the prior log-density of ``z``) and ``flow_mahalanobis`` (Mahalanobis distance
of ``z`` from the trusted latents).

The seed's flows were trained on the *base* model's activations on generic text; no such corpus
exists for the zoo, so here each flow is fitted on the **trusted** activations of the model under
test, like every other trusted-only detector.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import zuko
from jaxtyping import Float
from torch import Tensor
from torch.distributions import Independent, Laplace

from .base import (
    Detector,
    DetectorConfig,
    Features,
    Standardiser,
    check_layer,
    check_rcond,
    check_training,
    train_per_layer,
)
from .gaussian import Mahalanobis


def _laplace(loc: Tensor, scale: Tensor) -> Independent:
    return Independent(Laplace(loc, scale), 1)


def laplace_maf(d: int, transforms: int = 3, hidden: tuple[int, ...] = (128, 128)) -> zuko.flows.Flow:
    """An affine masked autoregressive flow on ``d`` features (alternating orders) with a
    factorised Laplace(0, 1) base distribution."""
    flow = zuko.flows.MAF(d, transforms=transforms, hidden_features=hidden)
    flow.base = zuko.flows.UnconditionalDistribution(_laplace, torch.zeros(d), torch.ones(d), buffer=True)
    return flow


FLOW_CACHE: OrderedDict[tuple, tuple[Standardiser, zuko.flows.Flow]] = OrderedDict()
"""Trained flows by :meth:`FlowDetector.key` (the most recently used last); clear it to retrain."""
FLOW_CACHE_SIZE = 32


@dataclass(frozen=True)
class FlowConfig(DetectorConfig):
    transforms: int = 3  # autoregressive transforms of the MAF
    hidden: tuple[int, ...] = (128, 128)  # hidden widths of each transform's network
    steps: int = 500  # Adam steps per layer
    batch_size: int = 256  # rows per step
    lr: float = 1e-3  # Adam learning rate
    batch_score: int = 4096  # rows per pass when mapping features to latents

    def __post_init__(self) -> None:
        check_training(self.steps, self.batch_size, self.lr)
        if not isinstance(self.transforms, int) or self.transforms < 1:
            raise ValueError(f"transforms={self.transforms!r} is not accepted; give an integer >= 1")
        object.__setattr__(self, "hidden", tuple(self.hidden))


class FlowDetector(Detector):
    """Per-layer Laplace-prior MAF fitted on standardised trusted features (module docstring); a
    layer's fitted state is ``(standardiser, flow)``.

    Training is deterministic given the settings, the seed, the layer and the data, so trained flows
    are kept in a small in-memory cache on exactly that key (:data:`FLOW_CACHE`): ``flow_nll`` and
    ``flow_mahalanobis`` fitted on the same trusted features share one training run. ``progress``
    shows a bar per trained layer; it is not a setting.
    """

    Config = FlowConfig

    def __init__(self, *, progress: bool = True, config: FlowConfig | None = None, seed: int = 0, **settings):
        super().__init__(config=config, seed=seed, **settings)
        self.progress = progress

    def key(self, layer: int, x: Tensor) -> tuple:
        """What a trained flow depends on: the training settings, the seed, the layer and the data."""
        cfg = self.config
        digest = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        config = (cfg.transforms, cfg.hidden, cfg.steps, cfg.batch_size, cfg.lr, self.seed)
        return (*config, layer, tuple(x.shape), str(x.dtype), digest)

    def fit_layer(self, layer, x, paired) -> tuple[Standardiser, zuko.flows.Flow]:
        cfg = self.config
        key = self.key(layer, x)
        if key not in FLOW_CACHE:
            standardiser = Standardiser(x)
            flow = train_per_layer(
                lambda d: laplace_maf(d, cfg.transforms, cfg.hidden),
                lambda flow, b: -flow().log_prob(b),
                {layer: standardiser(x)},
                cfg.steps, cfg.batch_size, cfg.lr, self.seed, self.progress, self.name,
            )[layer]  # fmt: skip
            FLOW_CACHE[key] = (standardiser, flow)
        FLOW_CACHE.move_to_end(key)
        state = FLOW_CACHE[key]
        while len(FLOW_CACHE) > FLOW_CACHE_SIZE:
            FLOW_CACHE.popitem(last=False)
        return state

    @property
    def standardisers(self) -> dict[int, Standardiser]:
        return {layer: state[0] for layer, state in self.fitted.items()}

    @property
    def flows(self) -> dict[int, zuko.flows.Flow]:
        return {layer: state[1] for layer, state in self.fitted.items()}

    @torch.no_grad()
    def latent(self, layer: int, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """``z = f(standardised x)`` at a fitted layer, in float64."""
        check_layer(self.fitted, layer)
        standardiser, flow = self.fitted[layer]
        transform = flow().transform
        xs = standardiser(x)
        return torch.cat([transform(b) for b in xs.split(self.config.batch_score)]).double()

    def latents(self, feats: Features) -> dict[int, Float[Tensor, "n d"]]:
        """:meth:`latent` of every layer of ``feats``."""
        return {layer: self.latent(layer, x) for layer, x in feats.items()}


@dataclass(frozen=True)
class FlowNLLConfig(FlowConfig):
    """The settings of :class:`FlowNLL` (those of every flow detector)."""


class FlowNLL(FlowDetector):
    """Minus the prior log-density of the flow latent: ``-log Laplace(z; 0, 1) = sum_j |z_j| + d log 2``
    with ``z = f(x)`` (the Jacobian term is not included, as in seed 000's "prior density" score).
    Flow fitted on trusted features; see :mod:`madlib.detectors.flows`. Settings: :class:`FlowNLLConfig`."""

    name = "flow_nll"
    Config = FlowNLLConfig

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        z = self.latent(layer, x)
        return (z.abs().sum(1) + z.shape[1] * math.log(2)).numpy()


@dataclass(frozen=True)
class FlowMahalanobisConfig(FlowConfig):
    rcond: float = 1e-3  # of the Mahalanobis distance on the latents

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rcond(self.rcond)


class FlowMahalanobis(FlowDetector):
    """:class:`~madlib.detectors.gaussian.Mahalanobis` on the flow latents ``z = f(x)`` (mean and
    covariance of the trusted latents of every layer). Flow fitted on trusted features; see
    :mod:`madlib.detectors.flows`. Settings: :class:`FlowMahalanobisConfig`."""

    name = "flow_mahalanobis"
    Config = FlowMahalanobisConfig

    def __init__(
        self, *, progress: bool = True, config: FlowMahalanobisConfig | None = None, seed: int = 0, **settings
    ):
        super().__init__(progress=progress, config=config, seed=seed, **settings)
        self.mahalanobis = Mahalanobis(rcond=self.config.rcond)

    def fit_layers(self, trusted: Features, paired: Features | None = None) -> "FlowMahalanobis":
        """The flows layer by layer, then Mahalanobis on the trusted latents of every layer."""
        super().fit_layers(trusted, paired)
        self.mahalanobis.fit(self.latents(trusted))
        return self

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        return self.mahalanobis.score({layer: self.latent(layer, x)})[layer]
