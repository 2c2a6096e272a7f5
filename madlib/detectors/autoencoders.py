"""Trained detectors on activations: a dense autoencoder and cupbearer's VAE (methods.md §3).

Both standardise each feature with the trusted mean and standard deviation, train one small
network per layer on trusted features only (Adam, shuffled minibatches, seeded by the seed and the
layer: :func:`madlib.detectors.base.train_per_layer`), and score in the standardised units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from .base import Detector, DetectorConfig, Features, Standardiser, check_training, train_per_layer


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@dataclass(frozen=True)
class TrainedConfig(DetectorConfig):
    """Settings every per-layer trained detector shares."""

    bottleneck: int | None = None  # latent width k < d; None means d // 4
    hidden: int | None = None  # hidden width; None means 2 d
    steps: int = 500  # Adam steps per layer
    batch_size: int = 256  # rows per step
    lr: float = 1e-3  # Adam learning rate

    def __post_init__(self) -> None:
        check_training(self.steps, self.batch_size, self.lr)
        b = self.bottleneck
        if b is not None and (not isinstance(b, (int, np.integer)) or b < 1):
            raise ValueError(f"bottleneck={b!r} is not accepted; give an integer >= 1 (or None for d // 4)")


class TrainedDetector(Detector):
    """Shared fit/score of the per-layer trained detectors: subclasses define ``build`` (the network
    for ``d`` features), ``loss`` (per-example training loss) and ``example_score`` (per-example
    score, no gradients). A layer's fitted state is ``(standardiser, network)``.

    ``progress`` shows a bar per layer; it is not a setting (it changes no number).
    """

    Config = TrainedConfig

    def __init__(self, *, progress: bool = True, config: TrainedConfig | None = None, seed: int = 0, **settings):
        super().__init__(config=config, seed=seed, **settings)
        self.progress = progress

    def width(self, d: int) -> tuple[int, int]:
        """(bottleneck, hidden width) for ``d`` features."""
        cfg = self.config
        k = cfg.bottleneck if cfg.bottleneck is not None else max(1, d // 4)
        if k >= d:
            raise ValueError(f"bottleneck={k!r} is not accepted; give a bottleneck narrower than d={d}")
        return k, cfg.hidden if cfg.hidden is not None else 2 * d

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "TrainedDetector":
        for x in trusted.values():  # every layer's width is checked before any training
            self.width(x.shape[1])
        return self.fit_layers(trusted)

    def fit_layer(self, layer, x, paired) -> tuple[Standardiser, nn.Module]:
        cfg = self.config
        standardiser = Standardiser(x)
        data = {layer: standardiser(x)}
        module = train_per_layer(
            self.build, self.loss, data, cfg.steps, cfg.batch_size, cfg.lr, self.seed, self.progress, self.name
        )[layer]
        return standardiser, module

    @torch.no_grad()
    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        standardiser, module = self.fitted[layer]
        return self.example_score(module, standardiser(x)).double().numpy()

    @property
    def standardisers(self) -> dict[int, Standardiser]:
        return {layer: state[0] for layer, state in self.fitted.items()}

    @property
    def modules(self) -> dict[int, nn.Module]:
        return {layer: state[1] for layer, state in self.fitted.items()}

    def build(self, d: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def example_score(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class DenseAEConfig(TrainedConfig):
    """The settings of :class:`DenseAE` (those of every trained detector)."""


class DenseAutoencoder(nn.Module):
    """``d -> hidden -> k -> hidden -> d`` with ReLU hidden layers; no sparsity."""

    def __init__(self, d: int, k: int, hidden: int):
        super().__init__()
        self.encoder, self.decoder = _mlp(d, hidden, k), _mlp(k, hidden, d)

    def forward(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return self.decoder(self.encoder(x))


class DenseAE(TrainedDetector):
    """Dense (non-sparse) autoencoder scored by reconstruction error (methods.md §3; the question of
    seed 002: does sparsity buy anything for MAD?). Per layer, ``d -> hidden -> k -> hidden -> d``
    with ReLU and a bottleneck ``k < d`` (default ``d // 4``; ``hidden`` defaults to ``2 d``) is
    trained on standardised trusted features by mean squared error; the score is
    ``mean_j (x_hat_j - x_j)^2`` in standardised units. Settings: :class:`DenseAEConfig`.
    """

    name = "dense_ae"
    Config = DenseAEConfig

    def build(self, d: int) -> nn.Module:
        return DenseAutoencoder(d, *self.width(d))

    def loss(self, module: nn.Module, x: Tensor) -> Tensor:
        return (module(x) - x).square().mean(1)

    example_score = loss


class VAE(nn.Module):
    """cupbearer's activation VAE: encoder ``d -> hidden -> 2k`` (mean and log-variance of a
    diagonal Gaussian posterior), decoder ``k -> hidden -> d``, ReLU, standard normal prior."""

    def __init__(self, d: int, k: int, hidden: int):
        super().__init__()
        self.k = k
        self.encoder, self.decoder = _mlp(d, hidden, 2 * k), _mlp(k, hidden, d)

    def encode(self, x: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n k"], Float[Tensor, "n k"]]:
        h = self.encoder(x)
        return h[:, : self.k], h[:, self.k :]

    def loss(self, x: Float[Tensor, "n d"], kld_weight: float, sample: bool) -> Float[Tensor, " n"]:
        """``mean_j (decode(z) - x)_j^2 + kld_weight KL(N(mu, exp(log_var)) || N(0, I))`` with
        ``z = mu + exp(log_var / 2) eps`` if ``sample`` else ``z = mu``."""
        mu, log_var = self.encode(x)
        z = mu + (0.5 * log_var).exp() * torch.randn_like(mu) if sample else mu
        recon = (self.decoder(z) - x).square().mean(1)
        kl = -0.5 * (1 + log_var - mu.square() - log_var.exp()).sum(1)
        return recon + kld_weight * kl


@dataclass(frozen=True)
class VAEConfig(TrainedConfig):
    kld_weight: float = 1.0  # weight of the KL term, >= 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.kld_weight >= 0:
            raise ValueError(f"kld_weight={self.kld_weight!r} is not accepted; give a number >= 0")


class VAEDetector(TrainedDetector):
    """cupbearer's VAE detector. Per layer, a :class:`VAE` (``hidden = 2 d``, latent ``k``, default
    ``d // 4``) is trained on standardised trusted features with the reparameterised loss of
    :meth:`VAE.loss`; the score is the same loss evaluated at the posterior mean (``z = mu``, no
    sampling), as cupbearer scores: ``mean_j (decode(mu) - x)_j^2 + kld_weight KL(q(z|x) || N(0, I))``.
    Settings: :class:`VAEConfig`.
    """

    name = "vae"
    Config = VAEConfig

    def build(self, d: int) -> nn.Module:
        return VAE(d, *self.width(d))

    def loss(self, module: VAE, x: Tensor) -> Tensor:
        return module.loss(x, self.config.kld_weight, sample=True)

    def example_score(self, module: VAE, x: Tensor) -> Tensor:
        return module.loss(x, self.config.kld_weight, sample=False)
