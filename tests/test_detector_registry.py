"""The detector registry, the settings dataclasses and the per-layer template of madlib.detectors."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from madlib import detectors
from madlib.detectors import (
    DETECTORS,
    REGISTRY,
    Beatrix,
    BeatrixConfig,
    Detector,
    DetectorConfig,
    FeatureSource,
    FinetuningKL,
    FinetuningKLConfig,
    FlowMahalanobis,
    FlowMahalanobisConfig,
    LabelledFeatures,
    Mahalanobis,
    MahalanobisConfig,
    PCAMahalanobis,
    SAEDiagMahalanobis,
    SAEDiagMahalanobisConfig,
    make_detector,
    names,
)
from madlib.detectors.registry import index, method_name
from madlib.features.sae import SAEConfig
from madlib.models.finetune import FinetuneConfig

METHODS = {
    "mahalanobis", "pca_mahalanobis", "diag_mahalanobis", "que", "spectral_signature", "likelihood_ratio", "lof",
    "isolation_forest", "beatrix", "ted", "probe_skyline", "dense_ae", "vae", "flow_nll", "flow_mahalanobis",
    "sae_diag_mahalanobis", "sae_seed2_diag_mahalanobis", "sae_random_diag_mahalanobis", "sae_new_latents",
    "sae_seed2_new_latents", "sae_random_new_latents", "atp_mean_mahalanobis", "atp_mean_lof", "atp_pcs_mahalanobis",
    "atp_pcs_lof", "atp_grad_norm_mahalanobis", "atp_grad_norm_lof", "probe_shift_mahalanobis", "probe_shift_lof",
    "finetune_kl",
}  # fmt: skip
"""Every method the notebooks accept (the keys of madlib.mad.suite.methods() before the registry)."""


def test_a_fresh_interpreter_lists_every_method_from_the_package_alone():
    code = "import json, madlib.detectors as d; print(json.dumps(sorted(d.names())))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == sorted(METHODS)


def test_the_suite_takes_its_methods_from_the_registry():
    from madlib.mad import suite

    assert list(suite.methods()) == names() and set(names()) == METHODS
    assert {m.detector for m in suite.methods().values()} == set(DETECTORS)
    assert [cls for cls, _ in REGISTRY] == list(DETECTORS.values()), "each class listed once, under its own name"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_its_detector_by_name(name):
    m = detectors.method(name)
    det = make_detector(name, **({"model": None} if m.features is FeatureSource.PROMPTS else {}))
    assert type(det) is m.detector_class and det.name == m.detector and type(det.config) is m.detector_class.Config
    assert name == m.detector or name.endswith(m.detector.removeprefix("sae_"))
    settings = json.loads(json.dumps(det.settings()))
    assert settings["detector"] == m.detector and settings["config"] == det.config.to_dict()
    assert det.config == type(det.config).from_dict(settings["config"])
    assert isinstance(det, Detector) == m.features.layered


def test_misspelt_names_are_refused_in_one_line_with_the_closest():
    closest = r"^detectors='mahalanobs' is not accepted \(did you mean 'mahalanobis'\?\); choose from madlib\.detectors"
    with pytest.raises(ValueError, match=closest) as e:
        make_detector("mahalanobs")
    assert "\n" not in str(e.value)


def test_feature_sources_keep_the_table_values_and_say_how_features_are_made():
    assert [s.value for s in FeatureSource] == ["activations", "sae", "sae_seed2", "sae_random", "atp_mean", "atp_pcs",
                                                "atp_grad_norm", "probe_shift", "prompts"]  # fmt: skip
    assert FeatureSource.SAE_SEED2 == "sae_seed2" and str(FeatureSource.PROMPTS) == "prompts"
    assert [s.sae_control for s in detectors.SAE_LATENTS] == ["", "seed2", "random"]
    assert [s.ablation for s in detectors.ATTRIBUTION] == ["mean", "pcs", "grad_norm", "mean"]
    assert {s.family for s in FeatureSource} == {"activations", "sae", "attribution", "prompts"}
    assert [s for s in FeatureSource if not s.layered] == [FeatureSource.PROMPTS]
    assert method_name("mahalanobis", FeatureSource.ACTIVATIONS, FeatureSource.PROBE_SHIFT) == "probe_shift_mahalanobis"
    assert method_name("sae_new_latents", FeatureSource.SAE, FeatureSource.SAE_RANDOM) == "sae_random_new_latents"


def test_the_registry_refuses_repeated_names_and_non_detectors():
    class Other(Detector):
        """A second detector named like the first."""

        name = "mahalanobis"

    acts = (FeatureSource.ACTIVATIONS,)
    taken = r"^name='mahalanobis' is already registered to madlib\.detectors\.gaussian\.Mahalanobis"
    with pytest.raises(ValueError, match=taken):
        index(((Mahalanobis, acts), (Other, acts)))
    with pytest.raises(ValueError, match="is not accepted; give a Detector or PromptDetector subclass"):
        index(((dict, acts),))
    classes, found = index(((Mahalanobis, (FeatureSource.ACTIVATIONS, FeatureSource.ATP_PCS)),))
    assert classes == {"mahalanobis": Mahalanobis} and list(found) == ["mahalanobis", "atp_pcs_mahalanobis"]


# ------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("cls", list(DETECTORS.values()), ids=list(DETECTORS))
def test_every_config_round_trips_through_json(cls):
    cfg = cls.Config()
    assert dataclasses.is_dataclass(cfg) and isinstance(cfg, DetectorConfig)
    assert cls.Config.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, dataclasses.fields(cfg)[0].name, None)


def test_configs_with_tuples_and_nested_settings_round_trip():
    for cfg in (
        BeatrixConfig(powers=[1, 2, 5], mad_scale=3.0, chunk=500),
        FlowMahalanobisConfig(hidden=[16, 16], transforms=2, rcond=1e-5),
        SAEDiagMahalanobisConfig(cfg=SAEConfig(d_sae=32, k=2, training_tokens=2560, batch_size=128), eps=0.1),
        FinetuningKLConfig(cfg=FinetuneConfig(steps=5, batch_size=8), over="vocab", batch_size=7),
    ):
        back = type(cfg).from_dict(json.loads(cfg.to_json()))
        assert back == cfg and json.loads(back.to_json()) == cfg.to_dict()
    assert BeatrixConfig(powers=[3, np.int64(4)]).powers == (3, 4) and FlowMahalanobisConfig(hidden=[8]).hidden == (8,)
    with pytest.raises(ValueError, match=r"^settings \['alpha'\] are not accepted; MahalanobisConfig takes"):
        MahalanobisConfig.from_dict({"rcond": 0.1, "alpha": 2})


def test_a_detector_takes_its_settings_as_keywords_or_as_a_config():
    a, b = Mahalanobis(rcond=1e-4, shrinkage=0.1), Mahalanobis(config=MahalanobisConfig(rcond=1e-4, shrinkage=0.1))
    assert a.config == b.config == MahalanobisConfig(1e-4, 0.1, 4096) and Mahalanobis().config == MahalanobisConfig()
    assert make_detector("flow_mahalanobis", rcond=1e-5, steps=3, progress=False).config.rcond == 1e-5
    det = SAEDiagMahalanobis(saes={1: "sae"}, eps=0.5)
    assert det.saes == {1: "sae"} and det.config.eps == 0.5
    kl = FinetuningKL(None, FinetuneConfig(steps=5), name="x")
    assert kl.config == FinetuningKLConfig(cfg=FinetuneConfig(steps=5)) and kl.cache_name == "x"
    assert FinetuningKL(None, config=FinetuningKLConfig(over="vocab")).config.over == "vocab"
    assert FlowMahalanobis(progress=False).settings() == {"detector": "flow_mahalanobis", "seed": 0,
                                                         "config": FlowMahalanobisConfig().to_dict()}  # fmt: skip


@pytest.mark.parametrize(
    "name, settings, message",
    [("mahalanobis", dict(rcond=1.5), r"^rcond=1\.5 is not accepted; give a finite number in \[0, 1\)$"),
     ("mahalanobis", dict(shrinkage=2.0), r"^shrinkage=2\.0 is not accepted; give a number in \[0, 1\]$"),
     ("pca_mahalanobis", dict(k=0), r"^k=0 is not accepted; give an integer >= 1$"),
     ("diag_mahalanobis", dict(rcond=0), r"^rcond=0 is not accepted; give a finite number in \(0, 1\)$"),
     ("que", dict(alpha=float("inf")), r"^alpha=inf is not accepted; give a finite number > 0$"),
     ("likelihood_ratio", dict(shrinkage=-1), r"^shrinkage=-1 is not accepted"),
     ("lof", dict(n_neighbors=2.5), r"^n_neighbors=2\.5 is not accepted; give an integer >= 1$"),
     ("beatrix", dict(powers=()), r"^powers=\(\) is not accepted; give a non-empty list of integers >= 1$"),
     ("beatrix", dict(mad_scale=float("nan")), r"^mad_scale=nan is not accepted; give a finite number >= 0$"),
     ("ted", dict(aggregation="median"), r"^aggregation='median' is not accepted; choose one of \['mean', 'max'\]$"),
     ("ted", dict(rcond=-0.1), r"^rcond=-0\.1 is not accepted"),
     ("dense_ae", dict(steps=0), r"^steps=0 is not accepted; give an integer >= 1$"),
     ("dense_ae", dict(bottleneck=0), r"^bottleneck=0 is not accepted; give an integer >= 1 \(or None for d // 4\)$"),
     ("vae", dict(kld_weight=-1.0), r"^kld_weight=-1\.0 is not accepted; give a number >= 0$"),
     ("flow_nll", dict(lr=float("nan")), r"^lr=nan is not accepted; give a finite number > 0$"),
     ("flow_nll", dict(transforms=0), r"^transforms=0 is not accepted; give an integer >= 1$"),
     ("flow_mahalanobis", dict(rcond=1.0), r"^rcond=1\.0 is not accepted"),
     ("sae_diag_mahalanobis", dict(eps=0.0), r"^eps=0\.0 is not accepted; give a positive variance floor$"),
     ("sae_new_latents", dict(threshold=-1.0), r"^threshold=-1\.0 is not accepted; give an activation level >= 0$"),
     ("finetune_kl", dict(over="logits"), r"^over='logits' is not accepted; choose one of \['answers', 'vocab'\]$")],
)  # fmt: skip
def test_bad_settings_are_refused_in_one_line_by_the_detector_and_its_config(name, settings, message):
    cls = DETECTORS[name]
    with pytest.raises(ValueError, match=message) as e:
        make_detector(name, **({"model": None} if name == "finetune_kl" else {}), **settings)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):
        cls.Config(**settings)


def test_unknown_settings_and_mixed_configs_are_refused():
    unknown = r"^rcnd=0\.1 is not accepted; Mahalanobis takes the settings \['batch_size', 'rcond', 'shrinkage'\]$"
    with pytest.raises(TypeError, match=unknown):
        Mahalanobis(rcnd=0.1)
    with pytest.raises(ValueError, match=r"^config and \['rcond'\] are not accepted together"):
        Mahalanobis(config=MahalanobisConfig(), rcond=0.1)
    with pytest.raises(ValueError, match=r"^config=BeatrixConfig is not accepted; give a MahalanobisConfig$"):
        Mahalanobis(config=BeatrixConfig())


# ------------------------------------------------------------------------------------------------
# The per-layer template


def features(rng, n, shift=0.0):
    a = rng.normal(size=(5, 5)) * np.linspace(2, 0.5, 5)
    return {1: torch.tensor(rng.normal(size=(n, 5)) @ a + shift), 4: torch.tensor(rng.normal(size=(n, 3)) * 2 + shift)}


def test_the_template_scores_each_layer_as_the_direct_computation():
    rng = np.random.default_rng(0)
    trusted, test = features(rng, 400), features(rng, 30, shift=0.5)
    det = Mahalanobis(rcond=1e-9).fit(trusted)
    got = det.score(test)
    assert list(got) == [1, 4] and list(det.fitted) == [1, 4]
    for layer in (1, 4):
        x, z = trusted[layer].numpy(), test[layer].numpy()
        prec = np.linalg.inv(np.cov(x, rowvar=False, bias=True))
        want = np.einsum("ni,ij,nj->n", z - x.mean(0), prec, z - x.mean(0)) / x.shape[1]
        assert got[layer].dtype == np.float64 and np.allclose(got[layer], want, rtol=1e-9)
        alone = Mahalanobis(rcond=1e-9).fit({layer: trusted[layer]}).score({layer: test[layer]})[layer]
        assert np.array_equal(alone, got[layer]), "a layer's score does not depend on the other layers"
    with pytest.raises(ValueError, match=r"^layer=2 was not fitted; fitted layers: \[1, 4\]$"):
        det.score({2: test[1]})


def test_a_new_detector_writes_only_its_per_layer_maths():
    class MeanShift(Detector):
        """Squared distance to the trusted mean minus that to the untrusted mean (a test-only offline detector)."""

        name = "mean_shift"
        uses_untrusted = True

        def fit_layer(self, layer, x, paired):
            return x.double().mean(0), paired.double().mean(0)

        def score_layer(self, layer, x):
            mu_t, mu_u = self.fitted[layer]
            return ((x.double() - mu_t).square().sum(1) - (x.double() - mu_u).square().sum(1)).numpy()

    rng = np.random.default_rng(1)
    trusted, untrusted, test = features(rng, 50), features(rng, 40, shift=1.0), features(rng, 10)
    det = MeanShift(seed=2).fit(trusted, untrusted)
    s = det.score(test)
    for layer in (1, 4):
        x, u, z = trusted[layer].numpy(), untrusted[layer].numpy(), test[layer].numpy()
        assert np.allclose(s[layer], ((z - x.mean(0)) ** 2).sum(1) - ((z - u.mean(0)) ** 2).sum(1))
    assert det.settings() == {"detector": "mean_shift", "config": {}, "seed": 2}
    with pytest.raises(ValueError, match=r"^untrusted=None is not accepted; 'mean_shift' is an offline detector"):
        MeanShift().fit(trusted)
    with pytest.raises(ValueError, match=r"^untrusted lacks layers \[4\]"):
        MeanShift().fit(trusted, {1: untrusted[1]})
    bad = {**test, 4: test[4].clone()}
    bad[4][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^test\[4\] holds 1 NaN or infinite values"):
        det.score(bad)
    with pytest.raises(ValueError, match=r"^test\[1\] has 3 columns; the detector was fitted on 5$"):
        det.score({1: test[4]})

    class Unfinished(Detector):
        """Defines no maths (a test-only detector)."""

    with pytest.raises(NotImplementedError, match="Unfinished defines neither fit_layer nor fit"):
        Unfinished().fit(trusted)


def test_detectors_that_need_all_layers_or_labels_keep_their_own_fit():
    rng = np.random.default_rng(2)
    trusted, labelled_x = features(rng, 60), features(rng, 60, shift=0.3)
    labelled = LabelledFeatures(labelled_x, np.arange(60) % 2 == 0, split="train")
    sky = make_detector("probe_skyline").fit(trusted, labelled=labelled)
    assert set(sky.fitted) == {1, 4} and sky.score(trusted)[1].shape == (60,)
    ted = make_detector("ted", n_neighbors=3).fit(trusted)
    assert set(ted.score(trusted)) == {1, 4}
    pca = PCAMahalanobis(k=2).fit(trusted)
    assert set(pca.fitted) == {1, 4}
    beatrix = Beatrix(powers=(1, 2)).fit(trusted)
    assert set(beatrix.fitted[1]) == {0, 1}
