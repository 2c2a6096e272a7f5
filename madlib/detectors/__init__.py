"""Anomaly detectors (methods.md §3) under one contract (:mod:`.base`), one file per family, and
the registry of every MAD method (:mod:`.registry`).

* :mod:`.base`: the :class:`Detector` contract and its per-layer template, :class:`PromptDetector`,
  :class:`DetectorConfig`, the feature checks and the shared numeric pieces;
* :mod:`.gaussian`: Mahalanobis (full, PCA, diagonal), QUE, spectral signature, likelihood ratio;
* :mod:`.neighbours`: LOF and TED; :mod:`.outliers`: isolation forest and Beatrix;
* :mod:`.autoencoders`: dense autoencoder and VAE; :mod:`.flows`: normalising flows;
* :mod:`.sae`: detectors on SAE latents; :mod:`.probes`: the supervised skyline;
* :mod:`.finetune_kl`: the fine-tuning KL (prompt-level);
* :mod:`.registry`: :class:`FeatureSource`, :class:`Method`, :func:`names`, :func:`make_detector`.

``make_detector("mahalanobis", rcond=1e-4)`` builds a detector by name; ``names()`` lists every
method the notebooks accept. To add a detector see :mod:`.base` (one class in a family file, one
line in :data:`.registry.REGISTRY`).
"""

from .autoencoders import (
    VAE,
    DenseAE,
    DenseAEConfig,
    DenseAutoencoder,
    TrainedConfig,
    TrainedDetector,
    VAEConfig,
    VAEDetector,
)
from .base import (
    NULL_RCOND,
    Configurable,
    Detector,
    DetectorConfig,
    Features,
    PromptDetector,
    Scores,
    Spectrum,
    Standardiser,
    StreamingMoments,
    batched,
    check_features,
    check_layer,
    check_positive_int,
    check_rcond,
    check_training,
    check_untrusted,
    eig_desc,
    finite_number,
    moments,
    spectrum,
    to_float64,
    train_per_layer,
    zero_variance_floor,
)
from .finetune_kl import KL_FINETUNE, FinetuningKL, FinetuningKLConfig
from .flows import (
    FLOW_CACHE,
    FlowConfig,
    FlowDetector,
    FlowMahalanobis,
    FlowMahalanobisConfig,
    FlowNLL,
    FlowNLLConfig,
    laplace_maf,
)
from .gaussian import (
    DiagMahalanobis,
    DiagMahalanobisConfig,
    LikelihoodRatio,
    LikelihoodRatioConfig,
    Mahalanobis,
    MahalanobisConfig,
    PCAMahalanobis,
    PCAMahalanobisConfig,
    QuantumEntropy,
    QuantumEntropyConfig,
    SpectralSignature,
    SpectralSignatureConfig,
)
from .neighbours import LOF, TED, LOFConfig, TEDConfig, neighbour_ranks
from .outliers import Beatrix, BeatrixConfig, IsolationForestConfig, IsolationForestDetector, gram_features
from .probes import LabelledFeatures, ProbeSkyline, ProbeSkylineConfig
from .registry import (
    ACTIVATIONS,
    ATTRIBUTION,
    DETECTORS,
    METHODS,
    REGISTRY,
    SAE_LATENTS,
    FeatureSource,
    Method,
    make_detector,
    method,
    methods,
    names,
)
from .sae import (
    DETECTOR_SAE_CONFIG,
    SAEDiagMahalanobis,
    SAEDiagMahalanobisConfig,
    SAEFactory,
    SAELatentConfig,
    SAELatentDetector,
    SAENewLatents,
    SAENewLatentsConfig,
)

__all__ = [
    # registry
    "DETECTORS", "METHODS", "REGISTRY", "FeatureSource", "Method", "make_detector", "method", "methods", "names",
    "ACTIVATIONS", "ATTRIBUTION", "SAE_LATENTS",
    # contract and settings
    "Configurable", "Detector", "DetectorConfig", "PromptDetector", "Features", "Scores",
    # checks and shared numeric pieces
    "NULL_RCOND", "Spectrum", "Standardiser", "StreamingMoments", "batched", "check_features", "check_layer",
    "check_positive_int", "check_rcond", "check_training", "check_untrusted", "eig_desc", "finite_number", "moments",
    "spectrum", "to_float64", "train_per_layer", "zero_variance_floor",
    # detectors and their settings
    "Mahalanobis", "MahalanobisConfig", "PCAMahalanobis", "PCAMahalanobisConfig", "DiagMahalanobis",
    "DiagMahalanobisConfig", "QuantumEntropy", "QuantumEntropyConfig", "SpectralSignature", "SpectralSignatureConfig",
    "LikelihoodRatio", "LikelihoodRatioConfig", "LOF", "LOFConfig", "TED", "TEDConfig", "neighbour_ranks",
    "IsolationForestDetector", "IsolationForestConfig", "Beatrix", "BeatrixConfig", "gram_features",
    "TrainedDetector", "TrainedConfig", "DenseAE", "DenseAEConfig", "DenseAutoencoder", "VAE", "VAEDetector", "VAEConfig",
    "FlowDetector", "FlowConfig", "FlowNLL", "FlowNLLConfig", "FlowMahalanobis", "FlowMahalanobisConfig", "FLOW_CACHE",
    "laplace_maf", "SAELatentDetector", "SAELatentConfig", "SAEDiagMahalanobis", "SAEDiagMahalanobisConfig",
    "SAENewLatents", "SAENewLatentsConfig", "SAEFactory", "DETECTOR_SAE_CONFIG", "LabelledFeatures", "ProbeSkyline",
    "ProbeSkylineConfig", "FinetuningKL", "FinetuningKLConfig", "KL_FINETUNE",
]  # fmt: skip
