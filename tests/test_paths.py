"""Where artefacts go: the model cache is one per checkout, whatever the working directory."""

from pathlib import Path

import madlib
from madlib import paths


def test_run_outside_the_checkout_shares_its_model_cache(tmp_path, monkeypatch):
    checkout = Path(madlib.__file__).resolve().parent.parent
    for var in ("MADLIB_ROOT", "MADLIB_BUILD", "MADLIB_MODELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # papermill --cwd somewhere else
    assert paths.project_root() == checkout
    assert paths.model_cache_dir() == checkout / "_build" / "models"


def test_a_project_under_the_working_directory_wins(tmp_path, monkeypatch):
    for var in ("MADLIB_ROOT", "MADLIB_BUILD", "MADLIB_MODELS"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "madlib").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert paths.project_root() == tmp_path
    monkeypatch.setenv("MADLIB_MODELS", str(tmp_path / "elsewhere"))
    assert paths.model_cache_dir() == tmp_path / "elsewhere"


def test_atomic_dir_replaces_on_success_and_keeps_the_old_on_failure(tmp_path):
    import pytest

    dest = tmp_path / "model"
    with paths.atomic_dir(dest) as tmp:
        (tmp / "weights").write_text("one")
    assert (dest / "weights").read_text() == "one"
    with pytest.raises(RuntimeError):
        with paths.atomic_dir(dest) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert (dest / "weights").read_text() == "one"  # the old directory, whole
    with paths.atomic_dir(dest) as tmp:
        (tmp / "weights").write_text("two")
    assert (dest / "weights").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary or aside directory left"
