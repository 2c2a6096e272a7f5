"""Where generated artefacts go.

The project root is found from ``$MADLIB_ROOT``, else by walking up from the working directory to
the folder holding ``pyproject.toml`` with a ``madlib/`` beside it, else the working directory. So
a notebook opened from ``notebooks/`` and papermill run from the root write to the same places.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def project_root() -> Path:
    env = os.environ.get("MADLIB_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").is_file() and (p / "madlib").is_dir():
            return p
    return here


def build_dir() -> Path:
    return Path(os.environ.get("MADLIB_BUILD", project_root() / "_build"))


def results_dir(analysis: str) -> Path:
    """Where an analysis writes its figures and tables, created if missing: ``$MADLIB_RESULTS/<analysis>/``.
    The book's runner points it at a staging folder and moves the results into
    ``_build/results/`` only when the notebook succeeds; any other run (papermill by hand, an
    interactive session, a benchmark script) writes to ``results/<analysis>/`` under the working
    directory, or wherever ``$MADLIB_RESULTS`` names, and never into the book's results."""
    d = Path(os.environ.get("MADLIB_RESULTS", Path.cwd() / "results")) / analysis
    d.mkdir(parents=True, exist_ok=True)
    return d


def model_cache_dir() -> Path:
    return Path(os.environ.get("MADLIB_MODELS", build_dir() / "models"))


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
