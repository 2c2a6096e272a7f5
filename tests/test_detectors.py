import math

import numpy as np
import pytest
import torch
from scipy import integrate, linalg, stats

from madlib.detectors import flows
from madlib.detectors.autoencoders import VAEDetector
from madlib.detectors import DETECTORS, LOF, TED, Beatrix, Detector, DiagMahalanobis, LabelledFeatures, LikelihoodRatio, Mahalanobis, PCAMahalanobis, ProbeSkyline, QuantumEntropy, SpectralSignature, StreamingMoments, gram_features, make_detector, neighbour_ranks
from madlib.detectors.flows import FlowMahalanobis, FlowNLL
from madlib.mad.metrics import auroc

# Small, fast settings for the trained detectors (the defaults are sized for d = 64 and thousands of rows).
FAST = {
    "dense_ae": dict(bottleneck=3, hidden=32, steps=300, progress=False),
    "vae": dict(bottleneck=3, hidden=32, steps=300, progress=False),
    "flow_nll": dict(transforms=2, hidden=(32, 32), steps=300, progress=False),
    "flow_mahalanobis": dict(transforms=2, hidden=(32, 32), steps=300, progress=False),
}
EXPECTED = {
    "mahalanobis", "pca_mahalanobis", "diag_mahalanobis", "que", "spectral_signature", "likelihood_ratio", "lof",
    "isolation_forest", "flow_nll", "flow_mahalanobis", "dense_ae", "vae", "beatrix", "ted", "probe_skyline",
}  # fmt: skip
OFFLINE = {"que", "spectral_signature", "likelihood_ratio"}


def t(x):
    return torch.tensor(np.asarray(x))


def fit_any(det: Detector, trusted, untrusted=None, labelled=None) -> Detector:
    if det.skyline:
        return det.fit(trusted, labelled=labelled)
    return det.fit(trusted, untrusted if det.uses_untrusted else None)


def manifold_data(rng, n, d=8, rank=3, noise=0.3):
    """Rows near a fixed random rank-``rank`` subspace of R^d (the same subspace for every call)."""
    w = np.random.default_rng(123).normal(size=(rank, d))
    return rng.normal(size=(n, rank)) @ w + noise * rng.normal(size=(n, d))


# ------------------------------------------------------------------------------------------------
# Streaming moments and Mahalanobis


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streaming_moments_match_numpy(batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * np.array([1, 2, 3, 0.1, 5, 1]) + 10.0
    m = StreamingMoments(6)
    for i in range(0, len(x), batch):
        m.update(torch.tensor(x[i : i + batch], dtype=torch.float32))
    assert np.allclose(m.mean.numpy(), x.astype(np.float32).mean(0), atol=1e-5)
    assert np.allclose(
        m.cov.numpy(), np.cov(x.astype(np.float32).astype(np.float64), rowvar=False, bias=True), atol=1e-4
    )


def test_mahalanobis_matches_direct_computation():
    rng = np.random.default_rng(1)
    d = 8
    a = rng.normal(size=(d, d))
    trusted = rng.normal(size=(300, d)) @ a
    test = rng.normal(size=(50, d)) @ a + 0.5
    det = Mahalanobis(rcond=1e-3, batch_size=37).fit({3: torch.tensor(trusted)})
    got = det.score({3: torch.tensor(test)})[3]
    mu = trusted.mean(0)
    prec = np.linalg.pinv(np.cov(trusted, rowvar=False, bias=True), rcond=1e-3, hermitian=True)
    want = np.einsum("ni,ij,nj->n", test - mu, prec, test - mu) / d
    assert np.allclose(got, want, rtol=1e-8)


def test_mahalanobis_pinv_drops_degenerate_directions():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 3))
    x = np.hstack([x, x[:, :1] * 2.0])  # rank 3 in 4 dimensions
    det = Mahalanobis().fit({0: torch.tensor(x)})
    s = det.score({0: torch.tensor(x)})[0]
    assert np.isfinite(s).all()
    # in-sample mean of the squared distance equals the rank over d
    assert s.mean() == pytest.approx(3 / 4, rel=1e-6)


def test_mahalanobis_auroc_matches_analytic_mean_shift():
    # normal: N(0, I_d); anomalous: N(delta e_1, I_d). d * score is chi2_d vs noncentral chi2_d(delta^2).
    rng = np.random.default_rng(3)
    d, delta, n = 4, 2.0, 4000
    det = Mahalanobis().fit({0: torch.tensor(rng.normal(size=(50_000, d)))})
    normal = rng.normal(size=(n, d))
    anomalous = rng.normal(size=(n, d)) + np.eye(d)[0] * delta
    s = det.score({0: torch.tensor(np.vstack([normal, anomalous]))})[0]
    y = np.r_[np.zeros(n), np.ones(n)]
    analytic = integrate.quad(lambda t: stats.chi2.cdf(t, d) * stats.ncx2.pdf(t, d, delta**2), 0, np.inf)[0]
    assert auroc(y, s) == pytest.approx(analytic, abs=0.02)


def test_contract_and_errors():
    assert issubclass(Mahalanobis, Detector) and DETECTORS["mahalanobis"] is Mahalanobis
    with pytest.raises(ValueError, match="detectors='nope'"):
        make_detector("nope")
    det = Mahalanobis().fit({1: torch.randn(20, 3)})
    with pytest.raises(ValueError, match="layer=2"):
        det.score({2: torch.randn(5, 3)})
    with pytest.raises(ValueError, match="at least 2"):
        Mahalanobis().fit({1: torch.randn(1, 3)})


# ------------------------------------------------------------------------------------------------
# Registry and the shared contract


def test_registry_names_and_docstrings():
    assert EXPECTED <= set(DETECTORS)
    for name, cls in DETECTORS.items():
        assert cls.name == name and name.isidentifier() and name == name.lower()
        assert cls.__doc__ and len(cls.__doc__.strip()) > 40, name
    assert {n for n in EXPECTED if DETECTORS[n].uses_untrusted} == OFFLINE
    assert {n for n in EXPECTED if DETECTORS[n].skyline} == {"probe_skyline"}


def test_a_detector_overriding_fit_and_score_is_checked_like_the_template():
    class Norm(Detector):
        """Euclidean norm of x (a test-only detector, outside the registry)."""

        name = "test_only_norm"

        def fit(self, trusted, untrusted=None):
            return self

        def score(self, test):
            return {k: v.norm(dim=1).numpy() for k, v in test.items()}

    det = Norm(seed=3)
    assert det.name == "test_only_norm" and det.seed == 3 and "test_only_norm" not in DETECTORS
    assert np.allclose(det.fit({0: torch.ones(2, 4)}).score({0: torch.ones(2, 4)})[0], 2.0)
    with pytest.raises(ValueError, match=r"trusted\[0\] holds 1 NaN"):
        det.fit({0: torch.tensor([[float("nan"), 1.0]])})
    with pytest.raises(ValueError, match=r"test\[0\] has 3 columns; the detector was fitted on 4"):
        det.score({0: torch.ones(2, 3)})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_detector_follows_the_contract_and_is_seeded(name):
    rng = np.random.default_rng(4)
    trusted = {1: t(manifold_data(rng, 120)), 5: t(rng.normal(size=(120, 5)))}
    untrusted = {1: t(manifold_data(rng, 100) + 1.0), 5: t(rng.normal(size=(100, 5)))}
    test = {1: t(manifold_data(rng, 30) * 3), 5: t(rng.normal(size=(30, 5)))}
    labelled = LabelledFeatures(untrusted, np.arange(100) % 2 == 0, split="train")
    kwargs = {**FAST.get(name, {}), "seed": 7}
    if name in FAST:
        kwargs["steps"] = 30
    a = fit_any(make_detector(name, **kwargs), trusted, untrusted, labelled).score(test)
    flows.FLOW_CACHE.clear()  # refit the flows rather than reuse them
    b = fit_any(make_detector(name, **kwargs), trusted, untrusted, labelled).score(test)
    assert set(a) == {1, 5}
    for layer in a:
        assert a[layer].shape == (30,) and np.isfinite(a[layer]).all()
        assert np.array_equal(a[layer], b[layer])


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_detectors_need_untrusted_data(name):
    with pytest.raises(ValueError, match="untrusted=None"):
        make_detector(name).fit({0: torch.randn(50, 3)}, None)
    with pytest.raises(ValueError, match="lacks layers"):
        make_detector(name).fit({0: torch.randn(50, 3)}, {1: torch.randn(50, 3)})


# ------------------------------------------------------------------------------------------------
# Known anomalies: each detector reaches a high AUROC


def scaled_anomalies(rng, n_trusted=1500, n_test=300, factor=4.0):
    """Normal rows near a rank-3 subspace; anomalous rows are normal rows times ``factor``."""
    trusted = {0: t(manifold_data(rng, n_trusted))}
    test = {0: t(np.vstack([manifold_data(rng, n_test), factor * manifold_data(rng, n_test)]))}
    return trusted, test, np.r_[np.zeros(n_test), np.ones(n_test)]


@pytest.mark.parametrize(
    "name",
    ["mahalanobis", "pca_mahalanobis", "diag_mahalanobis", "lof", "isolation_forest", "beatrix", "dense_ae", "vae",
     "flow_nll", "flow_mahalanobis"],
)  # fmt: skip
def test_trusted_only_detectors_find_scaled_anomalies(name):
    trusted, test, y = scaled_anomalies(np.random.default_rng(5))
    kwargs = {"k": 3} if name == "pca_mahalanobis" else FAST.get(name, {})
    s = make_detector(name, **kwargs).fit(trusted).score(test)[0]
    assert auroc(y, s) > 0.95


def shifted_mixture(rng, d=6, n=1500, n_test=300, delta=5.0, fraction=0.2):
    """Trusted N(0, S); anomalies shifted by ``delta`` standard deviations along one direction; the
    untrusted set mixes ``fraction`` anomalies into normal rows."""
    a = np.diag(np.linspace(1.5, 0.5, d))
    v = np.ones(d) / np.sqrt(d)
    shift = delta * np.sqrt(v @ a.T @ a @ v) * v

    def sample(m, anomalous):
        return rng.normal(size=(m, d)) @ a + (shift if anomalous else 0)

    n_bad = int(fraction * n)
    trusted = {0: t(sample(n, False))}
    untrusted = {0: t(np.vstack([sample(n - n_bad, False), sample(n_bad, True)]))}
    test = {0: t(np.vstack([sample(n_test, False), sample(n_test, True)]))}
    return trusted, untrusted, test, np.r_[np.zeros(n_test), np.ones(n_test)]


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_detectors_find_the_anomalies_hidden_in_untrusted_data(name):
    trusted, untrusted, test, y = shifted_mixture(np.random.default_rng(6))
    s = make_detector(name).fit(trusted, untrusted).score(test)[0]
    assert auroc(y, s) > 0.9


def test_ted_detects_a_changed_computation_that_mahalanobis_misses():
    # Layer 0 ~ N(0, I); layer 1 = Q0 x for normal rows but Q1 x for anomalies (Q0, Q1 random rotations):
    # every layer's marginal is N(0, I), only the path from layer 0 to layer 1 differs.
    rng = np.random.default_rng(7)
    d, n, m = 6, 600, 150
    q0, q1 = (np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(2))
    x_t, x_n, x_a = rng.normal(size=(n, d)), rng.normal(size=(m, d)), rng.normal(size=(m, d))
    trusted = {0: t(x_t), 1: t(x_t @ q0)}
    test = {0: t(np.vstack([x_n, x_a])), 1: t(np.vstack([x_n @ q0, x_a @ q1]))}
    y = np.r_[np.zeros(m), np.ones(m)]
    ted = TED(n_neighbors=5).fit(trusted).score(test)
    assert set(ted) == {0, 1}
    assert min(auroc(y, s) for s in ted.values()) > 0.9
    maha = Mahalanobis().fit(trusted).score(test)
    assert max(abs(auroc(y, s) - 0.5) for s in maha.values()) < 0.1


def test_probe_skyline_needs_labelled_train_data():
    rng = np.random.default_rng(8)
    trusted, untrusted, test, y = shifted_mixture(rng, delta=2.0, fraction=0.3)
    labels = np.r_[np.zeros(1050), np.ones(450)].astype(bool)
    det = make_detector("probe_skyline")
    assert det.skyline and ProbeSkyline.skyline and "skyline" in ProbeSkyline.__doc__
    with pytest.raises(ValueError, match="labelled=None"):
        det.fit(trusted, untrusted)
    with pytest.raises(ValueError, match="split='validation'"):
        LabelledFeatures(untrusted, labels, split="validation")
    with pytest.raises(ValueError, match="one class"):
        LabelledFeatures(untrusted, np.zeros(1500, dtype=bool), split="train")
    s = det.fit(trusted, labelled=LabelledFeatures(untrusted, labels, split="train")).score(test)[0]
    assert auroc(y, s) > 0.9


# ------------------------------------------------------------------------------------------------
# The maths against direct computations


def correlated(rng, n, d, shift=0.0):
    a = rng.normal(size=(d, d)) * np.linspace(2, 0.2, d)
    return rng.normal(size=(n, d)) @ a + shift


def test_pca_mahalanobis_matches_direct_computation_and_full_rank_mahalanobis():
    rng = np.random.default_rng(9)
    d, k = 7, 3
    x, z = correlated(rng, 400, d), correlated(rng, 40, d, shift=0.3)
    got = PCAMahalanobis(k=k).fit({0: t(x)}).score({0: t(z)})[0]
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    top = np.argsort(vals)[::-1][:k]
    want = (((z - x.mean(0)) @ vecs[:, top]) ** 2 / vals[top]).mean(1)
    assert np.allclose(got, want, rtol=1e-8)
    full = PCAMahalanobis(k=d, rcond=1e-12).fit({0: t(x)}).score({0: t(z)})[0]
    assert np.allclose(full, Mahalanobis(rcond=1e-12).fit({0: t(x)}).score({0: t(z)})[0], rtol=1e-8)
    with pytest.raises(ValueError, match="k=0"):
        PCAMahalanobis(k=0)


def test_diag_mahalanobis_matches_direct_computation_and_floors_dead_dimensions():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(300, 5)) * np.array([1.0, 3.0, 0.5, 2.0, 1.0]) + 2.0
    x[:, 4] = 0.0  # a latent that never fires on trusted data
    z = rng.normal(size=(20, 5))
    got = DiagMahalanobis().fit({0: t(x)}).score({0: t(z)})[0]
    live = (((z[:, :4] - x[:, :4].mean(0)) / x[:, :4].std(0)) ** 2).sum(1)
    dead = z[:, 4] ** 2 / (1e-6 * x.var(0).mean())  # its variance is floored at rcond * the mean variance
    assert np.allclose(got, (live + dead) / 5, rtol=1e-10)
    z[:, 4] = 0.0
    assert np.allclose(DiagMahalanobis().fit({0: t(x)}).score({0: t(z)})[0], live / 5, rtol=1e-10)


def test_que_matches_direct_computation():
    rng = np.random.default_rng(11)
    d = 5
    x, u, z = correlated(rng, 500, d), correlated(rng, 300, d, shift=1.0), correlated(rng, 30, d)
    got = QuantumEntropy(alpha=4.0).fit({0: t(x)}, {0: t(u)}).score({0: t(z)})[0]
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    w = vecs / np.sqrt(vals)
    c = w.T @ np.cov(u, rowvar=False, bias=True) @ w
    kernel = linalg.expm(4.0 * c / np.linalg.norm(c, 2))
    zw = (z - x.mean(0)) @ w
    assert np.allclose(got, np.einsum("ni,ij,nj->n", zw, kernel, zw), rtol=1e-8)


def test_que_with_untrusted_equal_to_trusted_is_scaled_mahalanobis():
    # C = I on the retained subspace, so exp(alpha C / ||C||) = e^alpha I.
    rng = np.random.default_rng(12)
    x, z = correlated(rng, 400, 6), correlated(rng, 25, 6)
    que = QuantumEntropy(alpha=2.5).fit({0: t(x)}, {0: t(x)}).score({0: t(z)})[0]
    maha = Mahalanobis().fit({0: t(x)}).score({0: t(z)})[0]
    assert np.allclose(que, math.exp(2.5) * 6 * maha, rtol=1e-8)


def test_spectral_signature_matches_top_singular_vector():
    rng = np.random.default_rng(13)
    u, z = correlated(rng, 400, 6), correlated(rng, 30, 6)
    got = SpectralSignature().fit({0: t(rng.normal(size=(10, 6)))}, {0: t(u)}).score({0: t(z)})[0]
    v1 = np.linalg.svd(u - u.mean(0), full_matrices=False)[2][0]
    assert np.allclose(got, ((z - u.mean(0)) @ v1) ** 2, rtol=1e-8)


def test_likelihood_ratio_matches_scipy_in_the_trusted_eigenbasis():
    rng = np.random.default_rng(14)
    d = 5
    x = correlated(rng, 400, d)
    x = np.hstack([x, x[:, :1]])  # a null direction of the trusted covariance
    u = correlated(rng, 300, d, shift=0.5)
    u = np.hstack([u, u[:, :1] + rng.normal(size=(300, 1))])
    z = np.hstack([correlated(rng, 30, d), rng.normal(size=(30, 1))])
    got = LikelihoodRatio(rcond=1e-8).fit({0: t(x)}, {0: t(u)}).score({0: t(z)})[0]
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    b = vecs[:, vals > 1e-8 * vals.max()]
    assert b.shape[1] == d
    mvn = stats.multivariate_normal
    want = mvn.logpdf(z @ b, u.mean(0) @ b, b.T @ np.cov(u, rowvar=False, bias=True) @ b) - mvn.logpdf(
        z @ b, x.mean(0) @ b, b.T @ np.cov(x, rowvar=False, bias=True) @ b
    )
    assert np.allclose(got, want, rtol=1e-7, atol=1e-9)
    same = LikelihoodRatio().fit({0: t(x)}, {0: t(x)}).score({0: t(z)})[0]
    assert np.allclose(same, 0.0, atol=1e-9)


def test_lof_score_does_not_depend_on_the_test_batch():
    rng = np.random.default_rng(15)
    det = LOF().fit({0: t(rng.normal(size=(300, 4)))})
    point = rng.normal(size=(1, 4)) * 2
    s1 = det.score({0: t(np.vstack([point, rng.normal(size=(50, 4))]))})[0][0]
    s2 = det.score({0: t(np.vstack([rng.normal(size=(10, 4)) + 5, point, point]))})[0][10:]
    s3 = det.score({0: t(point)})[0][0]
    assert np.allclose([s1, s3], s2[0]) and s2[0] == s2[1]


def test_isolation_forest_seed():
    rng = np.random.default_rng(16)
    x, z = {0: t(rng.normal(size=(200, 3)))}, {0: t(rng.normal(size=(20, 3)))}
    a, b, c = (make_detector("isolation_forest", seed=s).fit(x).score(z)[0] for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.allclose(a, c)


@pytest.mark.parametrize("power", range(1, 9))
def test_gram_features_equal_the_literal_beatrix_formula(power):
    rng = np.random.default_rng(17)
    x = rng.normal(size=(10, 4))
    pairs = torch.triu_indices(4, 4)
    xp = x**power
    g = np.einsum("na,nb->nab", xp, xp)
    literal = (np.sign(g) * np.abs(g) ** (1 / power))[:, pairs[0], pairs[1]]
    assert np.allclose(gram_features(t(x), power, pairs).numpy(), literal, rtol=1e-10)


def test_beatrix_score_matches_direct_computation():
    rng = np.random.default_rng(18)
    x, z = rng.normal(size=(101, 3)), 3 * rng.normal(size=(15, 3))
    powers, scale = (1, 2, 3), 2.0
    got = Beatrix(powers=powers, mad_scale=scale, chunk=250).fit({0: t(x)}).score({0: t(z)})[0]
    iu = np.triu_indices(3)

    def feats(a, p):
        g = np.einsum("na,nb->nab", a**p, a**p)
        return (np.sign(g) * np.abs(g) ** (1 / p))[:, iu[0], iu[1]]

    want = []
    for p in powers:
        f, fz = feats(x, p), feats(z, p)
        med = np.median(f, 0)
        mad = np.median(np.abs(f - med), 0)
        lo, hi = med - scale * mad, med + scale * mad
        dev = np.maximum(lo - fz, 0) / np.abs(lo + 1e-6) + np.maximum(fz - hi, 0) / np.abs(hi + 1e-6)
        want.append(dev.mean(1))
    assert np.allclose(got, np.mean(want, 0), rtol=1e-10)


def test_neighbour_ranks_brute_force():
    rng = np.random.default_rng(19)
    norm = torch.nn.functional.normalize
    ref = {layer: norm(t(rng.normal(size=(40, 3))), dim=1) for layer in range(3)}
    q = {layer: norm(t(rng.normal(size=(5, 3))), dim=1) for layer in range(3)}
    got = neighbour_ranks(q, ref, ref_layer=1, k=4).numpy()
    for i in range(5):
        nb = np.argsort(-(ref[1] @ q[1][i]).numpy(), kind="stable")[:4]
        for j, layer in enumerate([0, 2]):
            sims = (ref[layer] @ q[layer][i]).numpy()
            assert np.array_equal(got[i, :, j], [(sims > sims[n]).sum() for n in nb])
    # identical layers: the k nearest neighbours keep ranks 0..k-1; leave-one-out ignores the query itself
    same = {0: ref[0], 1: ref[0]}
    assert np.array_equal(
        neighbour_ranks(same, same, 0, 4, torch.arange(40))[..., 0].numpy(), np.tile(np.arange(4), (40, 1))
    )


def test_ted_layer_checks():
    x = {0: torch.randn(50, 3), 1: torch.randn(50, 3)}
    with pytest.raises(ValueError, match="at least two layers"):
        TED().fit({0: x[0]})
    det = TED(n_neighbors=3).fit(x)
    with pytest.raises(ValueError, match="exactly the fitted layers"):
        det.score({0: x[0]})
    with pytest.raises(ValueError, match="aggregation='median'"):
        TED(aggregation="median")


def test_flow_scores_are_the_laplace_prior_and_mahalanobis_on_latents():
    rng = np.random.default_rng(20)
    x, z = {0: t(manifold_data(rng, 300))}, {0: t(manifold_data(rng, 20))}
    kw = dict(transforms=2, hidden=(16, 16), steps=40, progress=False, seed=3)
    nll = FlowNLL(**kw).fit(x)
    lat = nll.latents(z)[0]
    laplace = torch.distributions.Laplace(torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
    assert np.allclose(nll.score(z)[0], -laplace.log_prob(lat).sum(1).numpy(), rtol=1e-12)
    base = nll.flows[0]().base
    assert np.allclose(base.log_prob(lat.float()).numpy(), -(lat.abs().sum(1) + 8 * math.log(2)).numpy(), rtol=1e-5)
    fm = FlowMahalanobis(**kw).fit(x)
    assert fm.flows[0] is nll.flows[0]  # same settings, seed and data: one shared training run
    want = Mahalanobis().fit(fm.latents(x)).score({0: lat})[0]
    assert np.allclose(fm.score(z)[0], want, rtol=1e-10)


def test_vae_score_is_the_loss_at_the_posterior_mean():
    rng = np.random.default_rng(21)
    x, z = {0: t(manifold_data(rng, 300))}, {0: t(manifold_data(rng, 20))}
    det = VAEDetector(bottleneck=2, hidden=16, kld_weight=0.5, steps=40, progress=False).fit(x)
    vae, xs = det.modules[0], det.standardisers[0](z[0])
    with torch.no_grad():
        mu, log_var = vae.encode(xs)
        recon = ((vae.decoder(mu) - xs) ** 2).mean(1)
        kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(1)
    assert np.allclose(det.score(z)[0], (recon + 0.5 * kl).numpy(), rtol=1e-5)


def test_trained_layers_do_not_depend_on_the_other_layers():
    rng = np.random.default_rng(23)
    x = {1: t(manifold_data(rng, 200)), 4: t(manifold_data(rng, 200))}
    kw = {"bottleneck": 3, "hidden": 16, "steps": 20, "progress": False}
    both = make_detector("dense_ae", **kw).fit(x).score({1: x[1]})[1]
    alone = make_detector("dense_ae", **kw).fit({1: x[1]}).score({1: x[1]})[1]
    assert np.array_equal(both, alone)


def test_dense_ae_score_and_bottleneck_check():
    rng = np.random.default_rng(22)
    x, z = {0: t(manifold_data(rng, 300))}, {0: t(manifold_data(rng, 20))}
    det = make_detector("dense_ae", bottleneck=3, hidden=16, steps=40, progress=False).fit(x)
    xs = det.standardisers[0](z[0])
    with torch.no_grad():
        want = ((det.modules[0](xs) - xs) ** 2).mean(1)
    assert np.allclose(det.score(z)[0], want.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="narrower than d=8"):
        make_detector("dense_ae", bottleneck=8, progress=False).fit(x)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_detector_refuses_non_finite_or_mismatched_features_in_one_line(name):
    rng = np.random.default_rng(5)
    trusted = {1: t(rng.normal(size=(60, 4))), 2: t(rng.normal(size=(60, 4)))}
    untrusted = {k: t(rng.normal(size=(40, 4))) for k in (1, 2)}
    labelled = LabelledFeatures(untrusted, np.arange(40) % 2 == 0, split="train")
    kwargs = {**FAST.get(name, {}), **({"steps": 5} if name in FAST else {})}
    bad = trusted[1].clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"trusted\[1\] holds 1 NaN or infinite values") as e:
        fit_any(make_detector(name, **kwargs), {**trusted, 1: bad}, untrusted, labelled)
    assert "\n" not in str(e.value)
    det = fit_any(make_detector(name, **kwargs), trusted, untrusted, labelled)
    test = {k: t(rng.normal(size=(10, 4))) for k in (1, 2)}
    with pytest.raises(ValueError, match=r"test\[2\] has 5 columns; the detector was fitted on 4"):
        det.score({**test, 2: t(rng.normal(size=(10, 5)))})
    test[1][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"test\[1\] holds 1 NaN or infinite values"):
        det.score(test)
