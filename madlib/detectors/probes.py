"""The supervised probe (methods.md §3): a **skyline, not a detector**. It is fitted on labelled
normal-vs-anomalous examples of the train split, so it needs what no MAD detector may see; it says
how separable the anomalies are in the features at all."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from .base import Detector, DetectorConfig, Features, check_features, to_float64


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


@dataclass(frozen=True)
class ProbeSkylineConfig(DetectorConfig):
    C: float = 1.0  # inverse L2 strength of the logistic regression (on standardised features)
    max_iter: int = 1000  # iterations of its solver


class ProbeSkyline(Detector):
    """Supervised probe: a **skyline, not a detector**. Per layer, a logistic regression on
    standardised features, fitted on labelled normal-vs-anomalous examples of the *train* split
    passed as ``fit(..., labelled=LabelledFeatures(acts, is_anomalous, split="train"))``; the score
    is its log-odds of "anomalous" (monotone in P(anomalous), methods.md §3). It is an upper
    reference for what the features make separable. ``trusted`` only fixes the layers; the plain
    ``fit(trusted, untrusted)`` call of a detector is refused. Settings: :class:`ProbeSkylineConfig`.
    """

    name = "probe_skyline"
    Config = ProbeSkylineConfig
    skyline = True

    def fit(
        self, trusted: Features, untrusted: Features | None = None, *, labelled: LabelledFeatures | None = None
    ) -> "ProbeSkyline":
        if not isinstance(labelled, LabelledFeatures):
            raise ValueError(
                "labelled=None is not accepted; probe_skyline is a supervised skyline: pass "
                "labelled=LabelledFeatures(acts, is_anomalous, split='train') built from the train split"
            )
        missing = sorted(set(trusted) - set(labelled.acts))
        if missing:
            raise ValueError(f"labelled.acts lacks layers {missing}; give the layers of trusted ({sorted(trusted)})")
        self.labels = labelled.is_anomalous
        return self.fit_layers(trusted, labelled.acts)

    def fit_layer(self, layer, x, paired) -> tuple[Tensor, Tensor, LogisticRegression]:
        """(mean, standard deviation, fitted regression) of the labelled rows ``paired`` of the layer
        (the trusted rows ``x`` are not used)."""
        z = to_float64(paired)
        mean, std = z.mean(0), z.std(0).clamp_min(1e-12)
        model = LogisticRegression(C=self.config.C, max_iter=self.config.max_iter, random_state=self.seed)
        return mean, std, model.fit(((z - mean) / std).numpy(), self.labels)

    def score_layer(self, layer, x) -> Float[np.ndarray, " n"]:
        mean, std, model = self.fitted[layer]
        return model.decision_function(((to_float64(x) - mean) / std).numpy())
