"""Neighbourhood detectors (methods.md §3): the local outlier factor against the trusted set, and
TED, which follows how an example's trusted neighbours change rank from layer to layer (the one
detector that scores all layers jointly)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from sklearn.neighbors import LocalOutlierFactor
from torch import Tensor
from tqdm.auto import tqdm

from .base import Detector, DetectorConfig, Features, Scores, check_positive_int, check_rcond, to_float64
from .gaussian import Mahalanobis


@dataclass(frozen=True)
class LOFConfig(DetectorConfig):
    n_neighbors: int = 20  # trusted neighbours each LOF is computed against

    def __post_init__(self) -> None:
        check_positive_int("n_neighbors", self.n_neighbors)
        object.__setattr__(self, "n_neighbors", int(self.n_neighbors))


class LOF(Detector):
    """Local outlier factor against the trusted set only: sklearn ``LocalOutlierFactor(novelty=True)``
    fitted on trusted features, score ``-score_samples(x)`` (the LOF of ``x`` with respect to its
    ``n_neighbors`` nearest trusted points). A test point's score does not depend on the other test
    points (unlike cupbearer's LOF, which pools the test batch with the trusted set).

    Scoring the trusted points themselves is in-sample (each finds itself at distance 0).
    Settings: :class:`LOFConfig`.
    """

    name = "lof"
    Config = LOFConfig

    def fit_layer(self, layer, x, paired) -> LocalOutlierFactor:
        k = self.config.n_neighbors
        if len(x) <= k:
            raise ValueError(f"trusted set has {len(x)} examples; LOF needs more than n_neighbors={k}")
        return LocalOutlierFactor(n_neighbors=k, novelty=True).fit(to_float64(x).numpy())

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        return -self.fitted[layer].score_samples(to_float64(x).numpy())


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


TED_AGGREGATIONS = ("mean", "max")


@dataclass(frozen=True)
class TEDConfig(DetectorConfig):
    n_neighbors: int = 10  # nearest trusted points of each example at the reference layer
    aggregation: str = "mean"  # over an example's neighbours: "mean" or "max"
    rcond: float = 1e-3  # of the Mahalanobis outlier model on ranking vectors
    batch_size: int = 512  # queries per block of similarity matrices

    def __post_init__(self) -> None:
        if self.aggregation not in TED_AGGREGATIONS:
            accepted = list(TED_AGGREGATIONS)
            raise ValueError(f"aggregation={self.aggregation!r} is not accepted; choose one of {accepted}")
        check_positive_int("n_neighbors", self.n_neighbors)
        check_rcond(self.rcond)
        object.__setattr__(self, "n_neighbors", int(self.n_neighbors))


class TED(Detector):
    """Topological evolution dynamics (Mo et al. 2024), as adapted to language models by cupbearer's
    ``TEDDetector``: it scores using all layers jointly.

    For a reference layer ``r``: take the ``n_neighbors`` nearest trusted points of ``x`` at layer
    ``r`` (cosine similarity); at every other layer, rank each of those neighbours among all trusted
    points by similarity to ``x`` (:func:`neighbour_ranks`); each neighbour gives a ranking vector of
    length ``L - 1``. An outlier model fitted on the trusted points' own (leave-one-out) ranking
    vectors scores each vector: here :class:`~madlib.detectors.gaussian.Mahalanobis` on the vectors
    (the PCA outlier score with all components; cupbearer uses pyod's PCA detector). The score of
    ``x`` is the mean (or max) over its neighbours.

    **Contract.** The output key ``r`` holds the joint score computed with ``r`` as the reference
    layer, so every key uses all fitted layers and :func:`madlib.mad.metrics.aggregate_layers` averages
    over reference layers (standardised on trusted scores, or raw) exactly as over layers for other
    detectors. ``score`` therefore needs exactly the fitted layers (at least two), and TED overrides
    ``fit`` and ``score`` instead of the per-layer template. Scoring the trusted points themselves is
    in-sample (each is its own nearest neighbour). Settings: :class:`TEDConfig`.
    """

    name = "ted"
    Config = TEDConfig

    def __init__(self, *, config: TEDConfig | None = None, seed: int = 0, **settings):
        super().__init__(config=config, seed=seed, **settings)
        self.reference: dict[int, Tensor] = {}
        self.outlier = Mahalanobis(rcond=self.config.rcond)

    @staticmethod
    def normalised(feats: Features) -> dict[int, Tensor]:
        return {layer: torch.nn.functional.normalize(to_float64(x), dim=1) for layer, x in feats.items()}

    def trajectories(self, queries: dict[int, Tensor], leave_one_out: bool, desc: str) -> dict[int, Tensor]:
        """Per reference layer, :func:`neighbour_ranks` of every query against the trusted reference."""
        n, size = len(next(iter(queries.values()))), self.config.batch_size
        out: dict[int, list[Tensor]] = {r: [] for r in self.reference}
        for start in tqdm(range(0, n, size), desc=desc, disable=n <= 4 * size, mininterval=1):
            q = {layer: x[start : start + size] for layer, x in queries.items()}
            own = torch.arange(start, start + len(q[next(iter(q))])) if leave_one_out else None
            for r in self.reference:
                out[r].append(neighbour_ranks(q, self.reference, r, self.config.n_neighbors, own))
        return {r: torch.cat(v) for r, v in out.items()}

    @staticmethod
    def check_rows(param: str, feats: Features) -> None:
        sizes = {len(x) for x in feats.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"{param} has layers with different numbers of rows {sorted(sizes)}; "
                "TED needs the same examples at every layer"
            )

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "TED":
        if len(trusted) < 2:
            raise ValueError(f"trusted has layers {sorted(trusted)}; TED needs at least two layers")
        self.check_rows("trusted", trusted)
        n, k = len(next(iter(trusted.values()))), self.config.n_neighbors
        if n <= k + 1:
            raise ValueError(f"trusted set has {n} examples; TED needs more than n_neighbors + 1 = {k + 1}")
        self.reference = self.normalised(trusted)
        traj = self.trajectories(self.reference, leave_one_out=True, desc="TED fit")
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
        self.check_rows("test", test)
        traj = self.trajectories(self.normalised(test), leave_one_out=False, desc="TED score")
        scores = self.outlier.score({r: t.reshape(-1, t.shape[2]) for r, t in traj.items()})
        agg = np.mean if self.config.aggregation == "mean" else np.max
        return {r: agg(s.reshape(-1, self.config.n_neighbors), axis=1) for r, s in scores.items()}
