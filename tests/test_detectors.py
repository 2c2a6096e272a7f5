import numpy as np
import pytest
import torch
from scipy import integrate, stats

from madlib.detectors import DETECTORS, Detector, Mahalanobis, StreamingMoments, make_detector
from madlib.metrics import auroc


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streaming_moments_match_numpy(batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * np.array([1, 2, 3, 0.1, 5, 1]) + 10.0
    m = StreamingMoments(6)
    for i in range(0, len(x), batch):
        m.update(torch.tensor(x[i : i + batch], dtype=torch.float32))
    assert np.allclose(m.mean.numpy(), x.astype(np.float32).mean(0), atol=1e-5)
    assert np.allclose(m.cov.numpy(), np.cov(x.astype(np.float32).astype(np.float64), rowvar=False, bias=True), atol=1e-4)


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
