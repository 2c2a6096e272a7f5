"""The detector contract, its settings, the feature checks and the numeric pieces detectors share
(methods.md §3).

**Contract.** A :class:`Detector` is fitted on *trusted* features (``{layer: Tensor[n, d]}``), then
scores *test* features, returning one score per example **per layer** (``{layer: ndarray[n]}``); a
higher score means more anomalous. Offline detectors (``uses_untrusted = True``) also receive
unlabelled *untrusted* features in ``fit``; no detector ever sees test labels. The supervised probe
is a *skyline* (``skyline = True``), not a detector: it needs labelled anomalies, passed explicitly.
Every detector takes a ``seed`` and is deterministic given it; statistics are computed in float64.
A :class:`PromptDetector` (the fine-tuning KL) scores prompts instead of features: one score per
prompt, no layers.

**Per-layer template.** :meth:`Detector.fit` checks the features (:func:`check_features`; an
offline detector's untrusted ones too, :func:`check_untrusted`), then calls
``fit_layer(layer, x, paired)`` for each trusted layer and keeps what it returns (the layer's fitted
state) in ``self.fitted[layer]``; :meth:`Detector.score` checks the test features against the
fitted layers and widths and calls ``score_layer(layer, x)``. A detector thus writes only its
per-layer maths. One that needs all layers at once (TED) overrides ``fit`` and ``score``; every
override of ``fit`` or ``score`` in a subclass is wrapped by the same checks (``__init_subclass__``),
so it runs after them.

**Settings.** Each detector declares ``Config``, a frozen dataclass (a :class:`DetectorConfig`)
whose fields are its constructor's settings, with their defaults, validated in ``__post_init__``
with one-line errors (``name=value is not accepted; ...``). The constructor takes the settings as
keywords, or a whole ``config=``, and keeps the config as ``det.config``; :meth:`Configurable.settings`
is what the results record (:func:`madlib.mad.suite.run_suite`).

**Adding a detector.** Write one class in the family file it belongs to (``gaussian``,
``neighbours``, ``outliers``, ``autoencoders``, ``flows``, ``sae``, ``probes``, ``finetune_kl``, or a
new file): a ``name``, a ``Config`` dataclass, ``fit_layer`` and ``score_layer`` (or ``fit`` and
``score``) and a docstring stating the score; then add one line to the list in
:mod:`madlib.detectors.registry`, naming the class and the feature sources it runs on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from tqdm.auto import tqdm

Features = dict[int, Float[Tensor, "n d"]]
Scores = dict[int, Float[np.ndarray, " n"]]


# ------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class DetectorConfig:
    """Base of every detector's settings: a frozen dataclass whose fields are the keyword settings
    of the detector's constructor, with the same defaults. Subclasses validate in ``__post_init__``
    (one-line errors naming the setting, its value and what is accepted) and may normalise a value
    there (``int(k)``, ``tuple(powers)``) the way the detector always has.

    ``to_dict``/``to_json`` give the settings JSON-ready (nested dataclasses as dicts, tuples as
    lists); ``from_dict`` builds the config back from them (``from_dict(json.loads(c.to_json())) == c``).
    """

    def to_dict(self) -> dict:
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=_json_scalar)

    @classmethod
    def from_dict(cls, data: dict) -> "DetectorConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"settings {unknown} are not accepted; {cls.__name__} takes {sorted(known)}")
        kwargs = {}
        for name, value in data.items():
            default = known[name].default
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                value = type(default)(**value)
            kwargs[name] = value
        return cls(**kwargs)


def _json_scalar(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Configurable:
    """What :class:`Detector` and :class:`PromptDetector` share: a registered ``name`` and settings
    held as ``self.config``, an instance of the class's ``Config``.

    ``Cls(**settings)`` builds the config from keyword settings; ``Cls(config=cfg)`` takes a whole
    one (not both). An unknown setting is refused in one line naming it.
    """

    name: ClassVar[str] = "detector"
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig

    def __init__(self, *, config: DetectorConfig | None = None, **settings):
        if config is None:
            accepted = {f.name for f in dataclasses.fields(self.Config)}
            for key, value in settings.items():
                if key not in accepted:
                    raise TypeError(
                        f"{key}={value!r} is not accepted; {type(self).__name__} takes the settings {sorted(accepted)}"
                    )
            config = self.Config(**settings)
        elif settings:
            raise ValueError(
                f"config and {sorted(settings)} are not accepted together; give the config or the settings"
            )
        elif type(config) is not self.Config:
            raise ValueError(f"config={type(config).__name__} is not accepted; give a {self.Config.__name__}")
        self.config = config

    def settings(self) -> dict:
        """The detector's name and settings, JSON-ready: what a result table records."""
        return {"detector": self.name, "config": self.config.to_dict()}


# ------------------------------------------------------------------------------------------------
# The feature contract


class Detector(Configurable):
    """Fit on trusted features, score test features; higher = more anomalous, one score per layer.

    Subclasses define ``fit_layer`` and ``score_layer`` (see the module doc), or override ``fit``
    and ``score`` when they need all layers at once.
    """

    uses_untrusted: ClassVar[bool] = False
    """Offline detectors set this: ``fit`` then receives unlabelled untrusted features."""
    skyline: ClassVar[bool] = False
    """Set by references that need labelled anomalies (not detectors in the MAD sense)."""

    def __init__(self, *, config: DetectorConfig | None = None, seed: int = 0, **settings):
        super().__init__(config=config, **settings)
        self.seed = seed
        self.fitted: dict = {}
        """Per layer, what ``fit_layer`` returned."""

    def __init_subclass__(cls, **kwargs) -> None:
        """Every override of ``fit`` and ``score`` checks its features first (:func:`check_features`)."""
        super().__init_subclass__(**kwargs)
        for name in ("fit", "score"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "checks_features", False):
                setattr(cls, name, _checked(method, name))

    def settings(self) -> dict:
        return {**super().settings(), "seed": self.seed}

    def fit(self, trusted: Features, untrusted: Features | None = None) -> "Detector":
        """Fit each trusted layer (``fit_layer``); offline detectors pair it with the untrusted layer."""
        if self.uses_untrusted:
            return self.fit_layers(trusted, check_untrusted(self, trusted, untrusted))
        return self.fit_layers(trusted)

    def fit_layers(self, trusted: Features, paired: Features | None = None) -> "Detector":
        """The per-layer loop of ``fit``, on features already checked: ``self.fitted[layer] =
        fit_layer(layer, trusted[layer], paired[layer])``, in the order of ``trusted``. ``paired``
        holds the untrusted features of an offline detector (the labelled ones of the skyline)."""
        self.fitted = {}
        for layer, x in trusted.items():
            self.fitted[layer] = self.fit_layer(layer, x, None if paired is None else paired[layer])
        return self

    def score(self, test: Features) -> Scores:
        """Score each test layer (``score_layer``)."""
        out = {}
        for layer, x in test.items():
            check_layer(self.fitted, layer)
            out[layer] = self.score_layer(layer, x)
        return out

    def fit_layer(self, layer: int, x: Float[Tensor, "n d"], paired: Float[Tensor, "m d"] | None):
        """The fitted state of one layer from its trusted rows ``x`` (and ``paired`` rows, see
        :meth:`fit_layers`); kept as ``self.fitted[layer]``."""
        raise NotImplementedError(f"{type(self).__name__} defines neither fit_layer nor fit")

    def score_layer(self, layer: int, x: Float[Tensor, "n d"]) -> Float[np.ndarray, " n"]:
        """One score per row of ``x`` at a fitted layer (its state is ``self.fitted[layer]``)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither score_layer nor score")


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


Detector.fit = _checked(Detector.fit, "fit")
Detector.score = _checked(Detector.score, "score")


class PromptDetector(Configurable):
    """The prompt-level contract (the fine-tuning KL): ``fit(trusted_prompts, trusted_labels)``,
    then ``score(prompts)`` returns one score per prompt (``ndarray[n]``), higher = more anomalous.
    It has no layers, so a result table has only its ``aggregated`` rows. Its features are the
    prompts themselves (:attr:`madlib.detectors.registry.FeatureSource.PROMPTS`)."""

    uses_untrusted: ClassVar[bool] = False
    skyline: ClassVar[bool] = False

    def fit(self, prompts: list[str], labels, progress: bool = True) -> "PromptDetector":
        raise NotImplementedError(f"{type(self).__name__} does not define fit")

    def score(self, prompts: list[str], progress: bool = False) -> Float[np.ndarray, " n"]:
        raise NotImplementedError(f"{type(self).__name__} does not define score")


# ------------------------------------------------------------------------------------------------
# Checks


def finite_number(value) -> bool:
    """Whether ``value`` is a real number (not a bool) that is neither NaN nor infinite."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return number and math.isfinite(value)


def check_rcond(rcond, positive: bool = False) -> None:
    """``rcond`` is a finite number in ``[0, 1)`` (``(0, 1)`` with ``positive``)."""
    if not (finite_number(rcond) and (0 < rcond < 1 if positive else 0 <= rcond < 1)):
        accepted = "(0, 1)" if positive else "[0, 1)"
        raise ValueError(f"rcond={rcond!r} is not accepted; give a finite number in {accepted}")


def check_positive_int(param: str, value) -> None:
    """``value`` is an integer >= 1."""
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{param}={value!r} is not accepted; give an integer >= 1")


def check_training(steps: int, batch_size: int, lr: float) -> None:
    """Settings of :func:`train_per_layer`: integer ``steps`` and ``batch_size`` >= 1, finite ``lr`` > 0."""
    for param, value in (("steps", steps), ("batch_size", batch_size)):
        check_positive_int(param, value)
    if not (finite_number(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is not accepted; give a finite number > 0")


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
                raise ValueError(
                    f"{param}[{layer!r}] has {x.shape[1]} columns; the detector was fitted on {dims[layer]}"
                )
    return feats


def check_untrusted(det: Detector, trusted: Features, untrusted: Features | None) -> Features:
    """The untrusted features of an offline detector: given, valid, with every trusted layer."""
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


# ------------------------------------------------------------------------------------------------
# Shared numeric pieces


def to_float64(x: Tensor) -> Tensor:
    """``x`` detached, in float64 (where every detector computes its statistics)."""
    return x.detach().to(torch.float64)


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


class Standardiser:
    """Per-feature ``(x - mean) / std`` with float64 trusted statistics; returns float32."""

    def __init__(self, x: Float[Tensor, "n d"], eps: float = 1e-8):
        x = to_float64(x)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(eps)

    def __call__(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return ((to_float64(x) - self.mean) / self.std).float()


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
    number only, so a layer's network does not depend on which other layers are fitted (the trained
    detectors call it one layer at a time). Training runs on one thread: these networks are small,
    and contended multi-threading is far slower."""
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
