"""Every MAD method by name: which detector scores which features (methods.md §3).

:data:`REGISTRY` below is the one explicit list of detector classes, each with the feature sources
it runs on (:class:`FeatureSource`). A *method* is one detector on one source; its name is what the
notebooks' ``detectors``/``methods`` parameters take (:func:`names`). Nothing registers itself on
import: the list is the registry, so the methods do not depend on what was imported first.

A method's name is its detector's name on the detector's *home* source (the first it lists), else
the source's name and the detector's (``atp_mean_mahalanobis``); an SAE-latent detector, named
``sae_...`` after its home source, swaps that prefix for the control's (``sae_seed2_diag_mahalanobis``).

**Adding a detector.** Write its class in a family file (see :mod:`madlib.detectors.base`), then
add one line to :data:`REGISTRY`: ``(TheClass, (FeatureSource.ACTIVATIONS, ...))``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import StrEnum

from .autoencoders import DenseAE, VAEDetector
from .base import Configurable, Detector, PromptDetector
from .finetune_kl import FinetuningKL
from .flows import FlowMahalanobis, FlowNLL
from .gaussian import DiagMahalanobis, LikelihoodRatio, Mahalanobis, PCAMahalanobis, QuantumEntropy, SpectralSignature
from .neighbours import LOF, TED
from .outliers import Beatrix, IsolationForestDetector
from .probes import ProbeSkyline
from .sae import SAEDiagMahalanobis, SAENewLatents


class FeatureSource(StrEnum):
    """What a method's detector reads. The values are the ``feature_source`` column of the result
    tables (a member equals its value: ``FeatureSource.SAE == "sae"``)."""

    ACTIVATIONS = "activations"
    """The residual stream at the last prompt token (:mod:`madlib.features.activations`)."""
    SAE = "sae"
    """Those activations encoded by the top-k SAE of each layer (:func:`madlib.features.sae.cached_sae`)."""
    SAE_SEED2 = "sae_seed2"
    """Control: encoded by an SAE of the next training seed."""
    SAE_RANDOM = "sae_random"
    """Control: encoded by an SAE trained on a randomly initialised model of the same architecture."""
    ATP_MEAN = "atp_mean"
    """Attribution-patching effects of every attention head, patched to its trusted mean (by block)."""
    ATP_PCS = "atp_pcs"
    """AtP effects along the top principal components of each block's heads."""
    ATP_GRAD_NORM = "atp_grad_norm"
    """Norms of the answer's gradient at each head."""
    PROBE_SHIFT = "probe_shift"
    """AtP effects on a trusted probe's logit minus those on the answer (by residual layer)."""
    PROMPTS = "prompts"
    """The prompts themselves: a :class:`~madlib.detectors.base.PromptDetector`, no layers."""

    @property
    def family(self) -> str:
        """``"activations"``, ``"sae"``, ``"attribution"`` or ``"prompts"``: how the features are made."""
        return _FAMILY.get(self, self.value)

    @property
    def sae_control(self) -> str | None:
        """For an SAE source, which SAE: ``""`` (the SAE), ``"seed2"`` or ``"random"``; else None."""
        return _SAE_CONTROL.get(self)

    @property
    def ablation(self) -> str | None:
        """For an attribution source, the ablation of the attribution pass it comes from
        (:class:`madlib.features.attribution.AttributionConfig`; probe shift comes with ``"mean"``)."""
        return _ABLATION.get(self)

    @property
    def layered(self) -> bool:
        """Whether the detector scores per layer (every source but the prompts)."""
        return self is not FeatureSource.PROMPTS


_SAE_CONTROL = {FeatureSource.SAE: "", FeatureSource.SAE_SEED2: "seed2", FeatureSource.SAE_RANDOM: "random"}
_ABLATION = {FeatureSource.ATP_MEAN: "mean", FeatureSource.ATP_PCS: "pcs", FeatureSource.ATP_GRAD_NORM: "grad_norm",
             FeatureSource.PROBE_SHIFT: "mean"}  # fmt: skip
_FAMILY = {**{s: "sae" for s in _SAE_CONTROL}, **{s: "attribution" for s in _ABLATION}}

ACTIVATIONS = (FeatureSource.ACTIVATIONS,)
SAE_LATENTS = (FeatureSource.SAE, FeatureSource.SAE_SEED2, FeatureSource.SAE_RANDOM)
ATTRIBUTION = (FeatureSource.ATP_MEAN, FeatureSource.ATP_PCS, FeatureSource.ATP_GRAD_NORM, FeatureSource.PROBE_SHIFT)

REGISTRY: tuple[tuple[type[Configurable], tuple[FeatureSource, ...]], ...] = (
    (Mahalanobis, (*ACTIVATIONS, *ATTRIBUTION)),
    (PCAMahalanobis, ACTIVATIONS),
    (DiagMahalanobis, ACTIVATIONS),
    (QuantumEntropy, ACTIVATIONS),
    (SpectralSignature, ACTIVATIONS),
    (LikelihoodRatio, ACTIVATIONS),
    (LOF, (*ACTIVATIONS, *ATTRIBUTION)),
    (IsolationForestDetector, ACTIVATIONS),
    (Beatrix, ACTIVATIONS),
    (TED, ACTIVATIONS),
    (ProbeSkyline, ACTIVATIONS),
    (DenseAE, ACTIVATIONS),
    (VAEDetector, ACTIVATIONS),
    (FlowNLL, ACTIVATIONS),
    (FlowMahalanobis, ACTIVATIONS),
    (SAEDiagMahalanobis, SAE_LATENTS),
    (SAENewLatents, SAE_LATENTS),
    (FinetuningKL, (FeatureSource.PROMPTS,)),
)
"""Every detector class, with the feature sources it runs on (its home source first)."""


@dataclass(frozen=True)
class Method:
    """One detector on one feature source, under one name."""

    name: str
    features: FeatureSource
    detector_class: type[Configurable]

    @property
    def detector(self) -> str:
        """The detector's registered name."""
        return self.detector_class.name

    @property
    def skyline(self) -> bool:
        """A supervised reference, not a detector."""
        return self.detector_class.skyline

    def make(self, **kwargs) -> Detector | PromptDetector:
        """The detector, built with ``kwargs`` (its settings, ``config=``, ``seed``, inputs such as ``saes``)."""
        return self.detector_class(**kwargs)


def method_name(detector: str, home: FeatureSource, source: FeatureSource) -> str:
    """The name of ``detector`` (whose home source is ``home``) run on ``source`` (module doc)."""
    if source is home:
        return detector
    if detector.startswith(f"{home.value}_"):
        return f"{source.value}{detector[len(home.value) :]}"
    return f"{source.value}_{detector}"


def index(registry=REGISTRY) -> tuple[dict[str, type[Configurable]], dict[str, Method]]:
    """(detector classes by name, methods by name) of a registry list; refuses a repeated detector
    or method name, and a class that is no detector. Methods come grouped by feature source (the SAE
    and its controls as one group), each group in the list's order."""
    classes: dict[str, type[Configurable]] = {}
    found: list[Method] = []
    for cls, sources in registry:
        if not (isinstance(cls, type) and issubclass(cls, (Detector, PromptDetector))):
            raise ValueError(f"registry entry {cls!r} is not accepted; give a Detector or PromptDetector subclass")
        if cls.name in classes:
            old = classes[cls.name]
            raise ValueError(
                f"name={cls.name!r} is already registered to {old.__module__}.{old.__qualname__}; choose another name"
            )
        classes[cls.name] = cls
        found.extend(Method(method_name(cls.name, sources[0], s), FeatureSource(s), cls) for s in sources)
    group = {s: i for i, s in enumerate(FeatureSource)}
    group.update({s: group[FeatureSource.SAE] for s in SAE_LATENTS})
    out: dict[str, Method] = {}
    for m in sorted(found, key=lambda m: group[m.features]):
        if m.name in out:
            raise ValueError(
                f"method {m.name!r} is registered twice ({out[m.name].detector}, {m.detector}); rename one"
            )
        out[m.name] = m
    return classes, out


DETECTORS, METHODS = index()
"""Detector classes by their registered name; every method (:class:`Method`) by name."""


def names() -> list[str]:
    """Every method name the notebooks' ``detectors``/``methods`` parameters accept."""
    return list(METHODS)


def methods() -> dict[str, Method]:
    """Every method by name (a copy)."""
    return dict(METHODS)


def method(name: str, param: str = "detectors") -> Method:
    """The method ``name``; a misspelt one is refused in one line naming ``param`` and the closest name."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        choices = sorted(METHODS)
        raise ValueError(f"{param}={name!r} is not accepted{hint}; choose from madlib.detectors.names(): {choices}")
    return METHODS[name]


def make_detector(name: str, **kwargs) -> Detector | PromptDetector:
    """The detector of method ``name`` (any of :func:`names`: a detector's own name, or the detector
    of a method on another source, e.g. ``atp_mean_mahalanobis`` builds a ``Mahalanobis``), built
    with ``kwargs``: its settings (or ``config=``), ``seed``, and inputs such as ``saes`` (SAE
    detectors) or ``model`` (``finetune_kl``)."""
    return method(name, "detectors").make(**kwargs)
