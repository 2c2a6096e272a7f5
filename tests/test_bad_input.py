"""Bad input fails at once with one line naming it; degenerate trusted sets do not blind the
covariance detectors; the book's runner survives interrupted and concurrent builds."""

import json
import os
import stat
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from madlib.analyses import perturb
from madlib.workflow import runner
from madlib.detectors import TED, Beatrix, DiagMahalanobis, LikelihoodRatio, Mahalanobis, PCAMahalanobis, QuantumEntropy, make_detector, moments, spectrum
from madlib.paths import atomic_path, replace_dir


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------
# Perturbation config: NaN and infinite floats


@pytest.mark.parametrize(
    "field, value",
    [("ms_threshold", float("nan")), ("ms_threshold", float("inf")), ("ms_threshold", 0.0), ("ms_threshold", -0.1),
     ("step_size", float("nan")), ("step_size", float("inf")), ("plateau_frac", float("inf")),
     ("anchor_cosine", float("nan")), ("n_steps", float("nan")), ("n_base", 2.5), ("min_tokens", float("inf"))],
)  # fmt: skip
def test_perturb_config_refuses_nan_and_inf(field, value):
    with pytest.raises(ValueError, match=rf"^{field}={value!r} is not accepted; give") as e:
        perturb.PerturbConfig(**{field: value})
    one_line(e)


def test_perturb_config_message_and_good_values():
    with pytest.raises(ValueError) as e:
        perturb.PerturbConfig(ms_threshold=float("nan"))
    assert one_line(e) == "ms_threshold=nan is not accepted; give a finite positive number"
    cfg = perturb.PerturbConfig(ms_threshold=0.5, step_size=0.0, plateau_frac=1.5, anchor_cosine=-1.0)
    assert cfg.ms_threshold == 0.5


def test_ms_step_and_plateau_refuse_nan_threshold():
    curves = np.arange(5.0)[None]
    with pytest.raises(ValueError, match=r"threshold=nan is not accepted"):
        perturb.ms_step(curves, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"threshold=nan is not accepted"):
        perturb.plateau_length(curves, threshold=float("nan"))


# ------------------------------------------------------------------------------------------------
# Detector parameters


@pytest.mark.parametrize("rcond", [float("nan"), float("inf"), -0.1, 1.0, "0.1"])
@pytest.mark.parametrize("cls", [Mahalanobis, PCAMahalanobis, QuantumEntropy, LikelihoodRatio, DiagMahalanobis, TED])
def test_rcond_is_refused_unless_finite_in_unit_interval(cls, rcond):
    with pytest.raises(ValueError, match=rf"^rcond={rcond!r} is not accepted; give a finite number in [\[(]0, 1\)$") as e:
        cls(rcond=rcond)
    one_line(e)


def test_other_detector_floats_are_refused():
    with pytest.raises(ValueError, match=r"^rcond=0 is not accepted"):
        DiagMahalanobis(rcond=0)  # no variance floor: a dead dimension would divide by zero
    with pytest.raises(ValueError, match=r"^shrinkage=nan is not accepted"):
        Mahalanobis(shrinkage=float("nan"))
    with pytest.raises(ValueError, match=r"^alpha=inf is not accepted"):
        QuantumEntropy(alpha=float("inf"))
    with pytest.raises(ValueError, match=r"^mad_scale=nan is not accepted"):
        Beatrix(mad_scale=float("nan"))
    Mahalanobis(rcond=0.0)  # keeps every positive eigenvalue
    DiagMahalanobis(rcond=0.5)


# ------------------------------------------------------------------------------------------------
# Degenerate trusted sets


def rank4_in_16(seed=0, n=200):
    """Trusted rows spanning a random 4-dim subspace of R^16, and a unit vector orthogonal to it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 16))
    x = rng.normal(size=(n, 4)) @ w + 3.0
    q = np.linalg.qr(w.T)[0]
    u = rng.normal(size=16)
    u -= q @ (q.T @ u)
    return torch.tensor(x), torch.tensor(u / np.linalg.norm(u))


@pytest.mark.parametrize(
    "name, kwargs",
    [("mahalanobis", {}), ("pca_mahalanobis", {}), ("pca_mahalanobis", dict(k=4)), ("que", {}),
     ("diag_mahalanobis", {})],
)  # fmt: skip
def test_a_move_outside_the_trusted_span_scores_far_above_trusted_points(name, kwargs):
    x, u = rank4_in_16()
    trusted, far = {0: x}, {0: x[:5] + 1e6 * u}
    det = make_detector(name, **kwargs)
    det.fit(trusted, trusted if det.uses_untrusted else None)
    s_trusted, s_far = det.score(trusted)[0], det.score(far)[0]
    assert np.isfinite(s_far).all() and np.isfinite(s_trusted).all()
    assert s_far.min() > 1e6 * s_trusted.max()


def test_mahalanobis_is_unchanged_on_full_rank_data():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    x, z = rng.normal(size=(300, 8)) @ a, rng.normal(size=(50, 8)) @ a + 0.5
    mu = x.mean(0)
    prec = torch.linalg.pinv(torch.tensor(np.cov(x, rowvar=False, bias=True)), rtol=1e-3, hermitian=True).numpy()
    want = np.einsum("ni,ij,nj->n", z - mu, prec, z - mu) / 8
    got = Mahalanobis().fit({0: torch.tensor(x)}).score({0: torch.tensor(z)})[0]
    assert np.allclose(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("cls", [Mahalanobis, QuantumEntropy, lambda: PCAMahalanobis(k=16)])
def test_ill_conditioned_full_rank_data_keep_the_pseudo_inverse_scores(cls):
    # eigenvalues down to 1e-6 of the largest: full rank, with directions below rcond that pinv drops
    rng = np.random.default_rng(3)
    q = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    x = (rng.normal(size=(400, 16)) * np.logspace(0, -3, 16)) @ q.T
    z = (rng.normal(size=(30, 16)) * np.logspace(0, -3, 16) * 3) @ q.T
    mu, cov = x.mean(0), np.cov(x, rowvar=False, bias=True)
    vals, vecs = np.linalg.eigh(cov)
    keep = vals > 1e-3 * vals.max()
    assert 0 < keep.sum() < 16
    zc = (z - mu) @ vecs[:, keep] / np.sqrt(vals[keep])
    det = cls()
    got = det.fit({0: torch.tensor(x)}, {0: torch.tensor(x)} if det.uses_untrusted else None).score({0: torch.tensor(z)})
    if isinstance(det, Mahalanobis):
        prec = torch.linalg.pinv(torch.tensor(cov), rtol=1e-3, hermitian=True).numpy()
        assert np.allclose(got[0], np.einsum("ni,ij,nj->n", z - mu, prec, z - mu) / 16, rtol=1e-10, atol=0)
    elif isinstance(det, PCAMahalanobis):
        assert np.allclose(got[0], (zc**2).mean(1), rtol=1e-8)
    else:  # untrusted = trusted: C = I on the kept directions
        assert np.allclose(got[0], np.exp(4.0) * (zc**2).sum(1), rtol=1e-8)


def test_float32_tied_features_count_as_unspanned():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[:, 7] = x[:, :7].sum(1)  # tied up to float32 rounding
    mean, cov = moments(torch.tensor(x))
    assert spectrum(cov, 1e-3, mean).null.sum() == 1
    det = Mahalanobis().fit({0: torch.tensor(x)})
    u = np.r_[-np.ones(7), 1.0] / np.sqrt(8)  # the direction the rows do not span
    s, s_off = det.score({0: torch.tensor(x)})[0], det.score({0: torch.tensor(x[:5] + 100 * u)})[0]
    assert s_off.min() > 100 * s.max()


def test_mahalanobis_rank_deficient_adds_the_residual_over_the_smallest_retained_eigenvalue():
    x, u = rank4_in_16()
    det = Mahalanobis().fit({0: x})
    vals = torch.linalg.eigvalsh(torch.cov(x.T, correction=0))
    lam_min = float(vals[vals > 1e-3 * vals.max()].min())
    base = x[:3]
    extra = det.score({0: base + 2.0 * u})[0] - det.score({0: base})[0]
    assert np.allclose(extra, 4.0 / lam_min / 16, rtol=1e-6)


@pytest.mark.parametrize("cls, rcond, norm", [(Mahalanobis, 1e-3, 4), (PCAMahalanobis, 1e-3, 1), (DiagMahalanobis, 1e-6, 4)])
def test_identical_trusted_rows_do_not_blind_the_detector(cls, rcond, norm):
    x = torch.tensor(np.tile([1.0, -2.0, 0.5, 3.0], (10, 1)))
    det = cls().fit({0: x})
    s = det.score({0: torch.cat([x[:2], x[:2] + torch.tensor([0.0, 0.0, 0.1, 0.0], dtype=torch.float64)])})[0]
    floor = rcond * float(x[0].square().mean())  # zero_variance_floor
    assert np.array_equal(s[:2], [0.0, 0.0]) and np.allclose(s[2:], 0.01 / floor / norm, rtol=1e-8)


def test_diag_mahalanobis_floors_a_dead_dimension():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4)) * np.array([1.0, 2.0, 0.5, 0.0])  # dimension 3 never moves
    det = DiagMahalanobis().fit({0: torch.tensor(x)})
    z = x[:5].copy()
    moved = z.copy()
    moved[:, 3] = 0.1
    s, s_moved = det.score({0: torch.tensor(z)})[0], det.score({0: torch.tensor(moved)})[0]
    floor = 1e-6 * x.var(0).mean()
    assert np.allclose(s_moved - s, 0.01 / floor / 4, rtol=1e-8)
    assert s_moved.min() > 100 * det.score({0: torch.tensor(x)})[0].max()


# ------------------------------------------------------------------------------------------------
# Files the build writes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_path_gives_the_umask_mode(tmp_path, umask_022):
    with atomic_path(tmp_path / "t.csv") as tmp:
        tmp.write_text("a\n1\n")
    assert mode(tmp_path / "t.csv") == umask_022
    os.umask(0o077)
    with atomic_path(tmp_path / "u.csv") as tmp:
        tmp.write_text("a\n")
    assert mode(tmp_path / "u.csv") == 0o600


def test_replace_dir_never_deletes_the_destination_first(tmp_path, monkeypatch):
    dest, new = tmp_path / "results" / "ok", tmp_path / "staging" / "ok"
    dest.mkdir(parents=True)
    (dest / "old.csv").write_text("old")
    new.mkdir(parents=True)
    (new / "t.csv").write_text("new")
    seen = []
    real_rmtree = replace_dir.__globals__["shutil"].rmtree

    def rmtree(path, *a, **k):
        seen.append((Path(path).name, sorted(p.name for p in dest.iterdir())))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(replace_dir.__globals__["shutil"], "rmtree", rmtree)
    replace_dir(new, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["t.csv"] and not new.exists()
    assert seen and all(files == ["t.csv"] for _, files in seen), "the old folder is removed only once replaced"
    assert [p.name for p in dest.parent.iterdir()] == ["ok"]


def tiny_project(root: Path, name: str = "ok") -> Path:
    (root / "notebooks").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("1")]
    nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    return root


@pytest.fixture
def fake_papermill(monkeypatch):
    """papermill.execute_notebook that copies the notebook and writes one result table, as a run would."""
    import papermill

    calls = []

    def execute_notebook(src, dst, **kwargs):
        calls.append(src)
        Path(dst).write_text(Path(src).read_text())
        with atomic_path(Path(os.environ["MADLIB_RESULTS"]) / "ok" / "t.csv") as tmp:
            tmp.write_text(f"a\n{len(calls)}\n")

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    return calls


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("MADLIB_BUILD", str(tmp_path / "_build"))
    return tiny_project(tmp_path / "project")


def test_results_and_stamps_are_readable_and_replaced(project, fake_papermill, umask_022):
    r = runner.Runner(root=project, progress=False)
    r.execute("ok")
    build = project.parent / "_build"
    table, stamp = build / "results" / "ok" / "t.csv", build / "stamps" / "ok.json"
    assert mode(table) == umask_022 and mode(stamp) == umask_022
    assert json.loads(stamp.read_text())["results"] == {str(table): runner._file_digest(table)}
    last = nbformat.read(project / "book" / "generated" / "ok.ipynb", as_version=4).cells[-1]
    assert last.cell_type == "markdown" and '<a href="../../results/ok/t.csv" download>' in last.source, "the page links its CSVs"
    r.execute("ok")
    assert table.read_text() == "a\n2\n" and r.is_fresh("ok")
    assert sorted(p.name for p in build.iterdir()) == ["results", "stamps"], "no staging or aside left"
    assert sorted(p.name for p in (build / "results").iterdir()) == ["ok"]


@pytest.mark.parametrize("content", ['{"inputs": {"notebook": "ab', "", "[]", '{"models": 3}', "\udcff"])
def test_an_unreadable_stamp_means_re_execute_with_one_warning(project, fake_papermill, capsys, content):
    r = runner.Runner(root=project, progress=False)
    r.execute("ok")
    assert r.is_fresh("ok")
    stamp = project.parent / "_build" / "stamps" / "ok.json"
    stamp.write_text(content, errors="surrogateescape")
    capsys.readouterr()
    assert not r.is_fresh("ok")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[runner] WARNING: ok: stamp") and "re-executing" in err[0]
    r.execute("ok")
    assert r.is_fresh("ok"), "the rewritten stamp is whole"


def test_the_workflow_mark_changes_only_when_a_notebook_is_stale(project, fake_papermill):
    """``Runner.mark`` is the workflow's input for a notebook: new content and a new time when the
    notebook must run, left alone when it is up to date (so a touched file re-runs nothing)."""
    r = runner.Runner(root=project, progress=False)
    first = r.mark("ok")
    text = first.read_text()
    assert json.loads(text)["notebook"] == r.inputs("ok")["notebook"]
    r.execute("ok")
    out = project / "book" / "generated" / "ok.ipynb"
    first.unlink()  # a new build folder: the mark is made older than the executed notebook
    assert r.mark("ok").stat().st_mtime < out.stat().st_mtime
    before = (first.read_text(), first.stat().st_mtime_ns)
    (project / "notebooks" / "ok.ipynb").touch()
    assert (r.mark("ok").read_text(), first.stat().st_mtime_ns) == before, "up to date: left alone"
    r.parameters = {"ok": {"x": 1}}
    assert r.mark("ok").read_text() != before[0] and first.stat().st_mtime > out.stat().st_mtime
    r.parameters = {}
    assert r.mark("ok").stat().st_mtime < out.stat().st_mtime, "back to the executed inputs: up to date again"
    (project.parent / "_build" / "results" / "ok" / "t.csv").write_text("a\n9\n")  # cut outside the build
    again = r.mark("ok").read_text()
    assert again != before[0] and r.mark("ok").read_text() != again, "stale: a new content every time"


def test_stale_staging_folders_are_cleaned_at_the_start_of_a_run(project):
    build = project.parent / "_build"
    dead = build / ".ok-999999999-abc12345"  # left by a run killed with SIGTERM (pid gone)
    old_format = build / ".zoo-x1y2z3w4"  # made before the running build started
    live = build / f".ok-{os.getpid()}-newer123"  # this process's
    beside = build / f".zoo-{os.getppid()}-older456"  # a notebook running beside this one (pid alive)
    aside = build / "results" / ".ok.old-999999999"
    other = build / ".cache-keep"
    for d in (dead, old_format, live, beside, aside, other):
        d.mkdir(parents=True)
        (d / "f").write_text("x")
    past, future = time.time() - 60, time.time() + 60
    for d in (old_format, beside):
        os.utime(d, (past, past))
    os.utime(dead, (future, future))
    removed = runner.Runner(root=project, progress=False).clean_stale_staging(started=time.time())
    assert sorted(removed) == sorted([dead, old_format, aside])
    assert live.exists() and beside.exists() and other.exists()
