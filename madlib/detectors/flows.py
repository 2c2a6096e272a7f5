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

import torch
import zuko
from jaxtyping import Float
from torch import Tensor
from torch.distributions import Independent, Laplace

from .base import Detector, Features, Mahalanobis, Scores, Standardiser, check_features, check_layer, check_training, register, train_per_layer


def _laplace(loc: Tensor, scale: Tensor) -> Independent:
    return Independent(Laplace(loc, scale), 1)


def laplace_maf(d: int, transforms: int = 3, hidden: tuple[int, ...] = (128, 128)) -> zuko.flows.Flow:
    """An affine masked autoregressive flow on ``d`` features (alternating orders) with a
    factorised Laplace(0, 1) base distribution."""
    flow = zuko.flows.MAF(d, transforms=transforms, hidden_features=hidden)
    flow.base = zuko.flows.UnconditionalDistribution(_laplace, torch.zeros(d), torch.ones(d), buffer=True)
    return flow


_CACHE: OrderedDict[tuple, tuple[Standardiser, zuko.flows.Flow]] = OrderedDict()
_CACHE_SIZE = 32


class _Flow(Detector):
    """Per-layer Laplace-prior MAF fitted on standardised trusted features (module docstring).

    Training is deterministic given the settings, the seed, the layer and the data, so trained flows
    are kept in a small in-memory cache on exactly that key: ``flow_nll`` and ``flow_mahalanobis``
    fitted on the same trusted features share one training run.
    """

    def __init__(
        self,
        transforms: int = 3,
        hidden: tuple[int, ...] = (128, 128),
        steps: int = 500,
        batch_size: int = 256,
        lr: float = 1e-3,
        batch_score: int = 4096,
        progress: bool = True,
        seed: int = 0,
    ):
        super().__init__(seed)
        check_training(steps, batch_size, lr)
        if not isinstance(transforms, int) or transforms < 1:
            raise ValueError(f"transforms={transforms!r} is not accepted; give an integer >= 1")
        self.transforms, self.hidden = transforms, tuple(hidden)
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.batch_score, self.progress = batch_score, progress
        self.standardisers: dict[int, Standardiser] = {}
        self.flows: dict[int, zuko.flows.Flow] = {}

    def _key(self, layer: int, x: Tensor) -> tuple:
        digest = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        config = (self.transforms, self.hidden, self.steps, self.batch_size, self.lr, self.seed)
        return (*config, layer, tuple(x.shape), str(x.dtype), digest)

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "_Flow":
        check_features("trusted", trusted)
        keys = {layer: self._key(layer, x) for layer, x in trusted.items()}
        todo = {layer: x for layer, x in trusted.items() if keys[layer] not in _CACHE}
        standardisers = {layer: Standardiser(x) for layer, x in todo.items()}
        flows = train_per_layer(
            lambda d: laplace_maf(d, self.transforms, self.hidden),
            lambda flow, x: -flow().log_prob(x),
            {layer: standardisers[layer](x) for layer, x in todo.items()},
            self.steps, self.batch_size, self.lr, self.seed, self.progress, self.name,
        )  # fmt: skip
        for layer in todo:
            _CACHE[keys[layer]] = (standardisers[layer], flows[layer])
        for layer in trusted:
            _CACHE.move_to_end(keys[layer])
            self.standardisers[layer], self.flows[layer] = _CACHE[keys[layer]]
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return self

    @torch.no_grad()
    def latents(self, feats: Features) -> dict[int, Float[Tensor, "n d"]]:
        """``z = f(standardised x)`` per layer, in float64."""
        out = {}
        for layer, x in feats.items():
            check_layer(self.flows, layer)
            transform = self.flows[layer]().transform
            xs = self.standardisers[layer](x)
            out[layer] = torch.cat([transform(b) for b in xs.split(self.batch_score)]).double()
        return out


@register("flow_nll")
class FlowNLL(_Flow):
    """Minus the prior log-density of the flow latent: ``-log Laplace(z; 0, 1) = sum_j |z_j| + d log 2``
    with ``z = f(x)`` (the Jacobian term is not included, as in seed 000's "prior density" score).
    Flow fitted on trusted features; see :mod:`madlib.detectors.flows`."""

    def score(self, test: Features) -> Scores:
        return {layer: (z.abs().sum(1) + z.shape[1] * math.log(2)).numpy() for layer, z in self.latents(test).items()}


@register("flow_mahalanobis")
class FlowMahalanobis(_Flow):
    """:class:`~madlib.detectors.base.Mahalanobis` on the flow latents ``z = f(x)`` (mean and covariance
    of the trusted latents). Flow fitted on trusted features; see :mod:`madlib.detectors.flows`."""

    def __init__(self, rcond: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.mahalanobis = Mahalanobis(rcond=rcond)

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "FlowMahalanobis":
        super().fit(trusted)
        self.mahalanobis.fit(self.latents(trusted))
        return self

    def score(self, test: Features) -> Scores:
        return self.mahalanobis.score(self.latents(test))
