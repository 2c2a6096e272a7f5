"""Trained detectors on activations: a dense autoencoder and cupbearer's VAE (methods.md §3).

Both standardise each feature with the trusted mean and standard deviation, train one small
network per layer on trusted features only (Adam, shuffled minibatches, seeded), and score in the
standardised units (:func:`madlib.detectors.base.train_per_layer`).
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from .base import Detector, Features, Scores, Standardiser, check_features, check_layer, check_training, register, train_per_layer


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class _TrainedDetector(Detector):
    """Shared fit/score of the per-layer trained detectors: subclasses define ``_build``,
    ``_loss`` (per-example training loss) and ``_score`` (per-example score, no gradients)."""

    def __init__(self, bottleneck, hidden, steps, batch_size, lr, progress, seed):
        super().__init__(seed)
        check_training(steps, batch_size, lr)
        if bottleneck is not None and (not isinstance(bottleneck, (int, np.integer)) or bottleneck < 1):
            raise ValueError(f"bottleneck={bottleneck!r} is not accepted; give an integer >= 1 (or None for d // 4)")
        self.bottleneck, self.hidden = bottleneck, hidden
        self.steps, self.batch_size, self.lr, self.progress = steps, batch_size, lr, progress
        self.standardisers: dict[int, Standardiser] = {}
        self.modules: dict[int, nn.Module] = {}

    def _width(self, d: int) -> tuple[int, int]:
        k = self.bottleneck if self.bottleneck is not None else max(1, d // 4)
        if k >= d:
            raise ValueError(f"bottleneck={k!r} is not accepted; give a bottleneck narrower than d={d}")
        return k, self.hidden if self.hidden is not None else 2 * d

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "_TrainedDetector":
        check_features("trusted", trusted)
        for x in trusted.values():
            self._width(x.shape[1])
        self.standardisers = {layer: Standardiser(x) for layer, x in trusted.items()}
        data = {layer: self.standardisers[layer](x) for layer, x in trusted.items()}
        self.modules = train_per_layer(
            self._build, self._loss, data, self.steps, self.batch_size, self.lr, self.seed, self.progress, self.name
        )
        return self

    @torch.no_grad()
    def score(self, test: Features) -> Scores:
        out = {}
        for layer, x in test.items():
            check_layer(self.modules, layer)
            out[layer] = self._score(self.modules[layer], self.standardisers[layer](x)).double().numpy()
        return out


class DenseAutoencoder(nn.Module):
    """``d -> hidden -> k -> hidden -> d`` with ReLU hidden layers; no sparsity."""

    def __init__(self, d: int, k: int, hidden: int):
        super().__init__()
        self.encoder, self.decoder = _mlp(d, hidden, k), _mlp(k, hidden, d)

    def forward(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return self.decoder(self.encoder(x))


@register("dense_ae")
class DenseAE(_TrainedDetector):
    """Dense (non-sparse) autoencoder scored by reconstruction error (methods.md §3; the question of
    seed 002: does sparsity buy anything for MAD?). Per layer, ``d -> hidden -> k -> hidden -> d``
    with ReLU and a bottleneck ``k < d`` (default ``d // 4``; ``hidden`` defaults to ``2 d``) is
    trained on standardised trusted features by mean squared error; the score is
    ``mean_j (x_hat_j - x_j)^2`` in standardised units.
    """

    def __init__(
        self,
        bottleneck: int | None = None,
        hidden: int | None = None,
        steps: int = 500,
        batch_size: int = 256,
        lr: float = 1e-3,
        progress: bool = True,
        seed: int = 0,
    ):
        super().__init__(bottleneck, hidden, steps, batch_size, lr, progress, seed)

    def _build(self, d: int) -> nn.Module:
        return DenseAutoencoder(d, *self._width(d))

    @staticmethod
    def _loss(module: nn.Module, x: Tensor) -> Tensor:
        return (module(x) - x).square().mean(1)

    _score = _loss


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


@register("vae")
class VAEDetector(_TrainedDetector):
    """cupbearer's VAE detector. Per layer, a :class:`VAE` (``hidden = 2 d``, latent ``k``, default
    ``d // 4``) is trained on standardised trusted features with the reparameterised loss of
    :meth:`VAE.loss`; the score is the same loss evaluated at the posterior mean (``z = mu``, no
    sampling), as cupbearer scores: ``mean_j (decode(mu) - x)_j^2 + kld_weight KL(q(z|x) || N(0, I))``.
    """

    def __init__(
        self,
        bottleneck: int | None = None,
        hidden: int | None = None,
        kld_weight: float = 1.0,
        steps: int = 500,
        batch_size: int = 256,
        lr: float = 1e-3,
        progress: bool = True,
        seed: int = 0,
    ):
        super().__init__(bottleneck, hidden, steps, batch_size, lr, progress, seed)
        if not kld_weight >= 0:
            raise ValueError(f"kld_weight={kld_weight!r} is not accepted; give a number >= 0")
        self.kld_weight = kld_weight

    def _build(self, d: int) -> nn.Module:
        return VAE(d, *self._width(d))

    def _loss(self, module: VAE, x: Tensor) -> Tensor:
        return module.loss(x, self.kld_weight, sample=True)

    def _score(self, module: VAE, x: Tensor) -> Tensor:
        return module.loss(x, self.kld_weight, sample=False)
