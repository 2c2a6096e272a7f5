"""Where generated artefacts go.

The project root is found from ``$MADLIB_ROOT``, else by walking up from the working directory to
the folder holding ``pyproject.toml`` with a ``madlib/`` beside it, else the checkout this
``madlib`` is imported from (an editable install), else the working directory. So a notebook
opened from ``notebooks/``, papermill run from the root and papermill run with ``--cwd`` anywhere
else share one model cache (``_build/models``): a fine-tune trained by the book is not trained
again by a run outside it.
"""

from __future__ import annotations

import os
import shutil
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
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "madlib").is_dir():
        return checkout
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


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds. The
    file gets the mode of any other file the user writes (:func:`file_mode`), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path | str):
    """Yield a fresh temporary directory beside ``path``; when the block succeeds it takes
    ``path``'s place (:func:`replace_dir`), when it fails it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def aside_name(path: Path) -> Path:
    """Where :func:`replace_dir` moves the old ``path`` while the new one takes its place."""
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def replace_dir(src: Path | str, dest: Path | str) -> None:
    """Put the fully written directory ``src`` at ``dest`` (same file system) without ever deleting
    ``dest`` first: an existing ``dest`` is renamed aside, ``src`` is renamed into place, and only then
    is the old one removed. An interruption leaves either the old or the new directory at ``dest``
    (or, between the two renames, none, with the old one beside it), never a half-written one."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        os.replace(src, dest)
        return
    old = aside_name(dest)
    if old.exists():
        shutil.rmtree(old)
    os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
