"""The real-model grid as jobs: one per (model, dataset) of a study in ``configs/real_models.yaml``.

A study's run of ``mad_auc`` or ``quirkiness`` over M models and D datasets becomes M × D jobs, each
the same notebook with one model and one dataset (a run of ``drift`` becomes one job per fine-tune,
any other run one job per model), so a cluster runs them side by side. ``workflow/grid.smk`` gives
each job ``resources: gpu=1`` and the study's memory and time; ``snakemake grid --profile
profiles/slurm`` submits them to SLURM, ``snakemake grid -j 4 --resources gpu=4`` runs them on one
machine with four GPUs (each job claims a GPU of its own, :func:`claim_gpu`). Every job writes its
executed notebook and its tidy tables under ``_build/grid/jobs/<study>/<notebook>/<model>/<item>/``;
:func:`collect` stacks each table over the study's jobs into ``_build/grid/<study>/tables/``, which
``notebooks/grid_summary.ipynb`` draws.

``python -m madlib.workflow.grid list`` prints the jobs of the grid configuration.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

from ..paths import build_dir, model_cache_dir, replace_dir

DEFAULT_RESOURCES: dict = {"gpu": 1, "mem_mb": 64000, "runtime": 240}
"""A job's resources unless its study says otherwise: one GPU, 64 GB of memory, 4 hours (minutes)."""
SUMMARY_NOTEBOOK = "grid_summary"
"""The notebook that draws a study's stacked tables (not a chapter of the default book)."""
MODEL_KEYS = ("model", "models")
"""The parameter that names a notebook's model(s)."""


@dataclass(frozen=True)
class GridJob:
    """One notebook run on one model and one dataset (or fine-tune) of a study."""

    study: str  # the study's key in the configuration ("000")
    notebook: str  # the notebook's name in notebooks/, without .ipynb
    model: str  # hub id, directory or zoo name
    item: str  # the dataset (mad_auc, quirkiness), the fine-tune's task (drift) or "all"
    parameters: dict = field(hash=False)  # the notebook's parameters for this job
    resources: dict = field(hash=False)  # gpu, mem_mb, runtime (minutes)

    @property
    def id(self) -> str:
        return f"{self.study}/{self.notebook}/{slug(self.model)}/{slug(self.item)}"


def slug(text: str) -> str:
    """``text`` as one path component: ``mistralai/Mistral-7B-v0.1`` → ``mistralai--Mistral-7B-v0.1``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", str(text).replace("/", "--")).strip("-") or "-"


def _bad(path: Path, where: str, value, accepted: str) -> ValueError:
    return ValueError(f"{path}: {where}={value!r} is not accepted; give {accepted}")


def _expand(study: str, run: dict, resources: dict, path: Path, where: str) -> list[GridJob]:
    notebook, params = run.get("notebook"), run.get("parameters") or {}
    if not isinstance(notebook, str) or not notebook:
        raise _bad(path, f"{where}.notebook", notebook, "the name of a notebook of notebooks/")
    if not isinstance(params, dict):
        raise _bad(path, f"{where}.parameters", params, "a mapping of parameter names to values")
    key = next((k for k in MODEL_KEYS if k in params), None)
    if key is None:
        raise _bad(path, f"{where}.parameters", sorted(params), f"parameters that name the model(s) ({' or '.join(MODEL_KEYS)})")
    as_list = isinstance(params[key], list)
    models = params[key] if as_list else [params[key]]
    if not models or not all(isinstance(m, str) and m for m in models):
        raise _bad(path, f"{where}.parameters.{key}", params[key], "a model or a non-empty list of models (hub ids or directories)")
    jobs = []
    for m in models:
        one = dict(params, **{key: [m] if as_list else m})
        if isinstance(params.get("datasets"), list):
            items = [(d, dict(one, datasets=[d])) for d in params["datasets"]]
        elif isinstance(params.get("finetuned"), dict) and params["finetuned"]:
            items = [(task, dict(one, finetuned={task: spec})) for task, spec in params["finetuned"].items()]
        else:
            items = [("all", one)]
        jobs += [GridJob(study, notebook, m, item, p, resources) for item, p in items]
    return jobs


def load_jobs(path: str | Path, studies: list[str] | None = None) -> list[GridJob]:
    """The jobs of the grid configuration at ``path`` (``studies``: only these studies' keys)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid configuration {path} does not exist; give a YAML file like configs/real_models.yaml")
    cfg = yaml.safe_load(path.read_text()) or {}
    all_studies = cfg.get("seeds") if isinstance(cfg, dict) else None
    if not isinstance(all_studies, dict) or not all_studies:
        raise _bad(path, "seeds", all_studies, "a mapping of study keys to studies with runs")
    for s in studies or []:
        if str(s) not in all_studies:
            raise ValueError(f"grid_studies={s!r} is not accepted; give studies of {path}: {sorted(all_studies)}")
    jobs: list[GridJob] = []
    for key, study in all_studies.items():
        if studies and str(key) not in [str(s) for s in studies]:
            continue
        extra = (study or {}).get("resources") or {}
        if not isinstance(extra, dict):
            raise _bad(path, f"seeds.{key}.resources", extra, "a mapping such as {gpu: 1, mem_mb: 64000, runtime: 240}")
        runs = (study or {}).get("runs") or []
        if not isinstance(runs, list):
            raise _bad(path, f"seeds.{key}.runs", runs, "a list of runs (notebook and parameters)")
        for i, run in enumerate(runs):
            if not isinstance(run, dict):
                raise _bad(path, f"seeds.{key}.runs[{i}]", run, "a mapping with notebook and parameters")
            jobs += _expand(str(key), run, {**DEFAULT_RESOURCES, **extra}, path, f"seeds.{key}.runs[{i}]")
    ids = [j.id for j in jobs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"{path}: jobs {dup} appear twice; give each (study, notebook, model, dataset) once")
    return jobs


def job_dir(job: GridJob, root: Path | None = None) -> Path:
    """Where a job writes its executed notebook, tables and stamp."""
    return Path(root or build_dir()) / "grid" / "jobs" / job.id


@lru_cache(maxsize=None)
def code_files(notebook: Path) -> list[str]:
    """The ``madlib`` source files a notebook can reach (a grid job's code inputs; read once a run)."""
    from ..codehash import module_file
    from .runner import notebook_package, notebook_modules

    package = notebook_package(notebook)
    return [str(module_file(m, package).relative_to(package.parent)) for m in notebook_modules(notebook, package)]


def claim_gpu(lock_dir: Path, n_devices: int) -> tuple[int, int] | None:
    """Take the first free GPU of ``n_devices`` on this machine, as an exclusive lock on
    ``lock_dir/gpu<i>.lock`` held until the process ends. Returns (device index, lock descriptor),
    or None when every device is held (Snakemake's ``--resources gpu=N`` keeps jobs within N)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_devices):
        fd = os.open(lock_dir / f"gpu{i}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return i, fd
    return None


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no usable CUDA: run on what the notebook finds
        return 0


def run_job(job: GridJob, root: Path | None = None, progress: bool = False) -> Path:
    """Execute one job (its notebook into :func:`job_dir`); returns the executed notebook.

    Models and caches are shared with the book's (``$MADLIB_MODELS`` or ``_build/models``). On a
    machine with several GPUs and no scheduler's choice (``CUDA_VISIBLE_DEVICES`` unset) the job
    claims a free one and sees only it."""
    from .runner import Runner

    out = job_dir(job)
    os.environ.setdefault("MADLIB_MODELS", str(model_cache_dir()))
    if "CUDA_VISIBLE_DEVICES" not in os.environ and (n := _visible_gpus()) > 1:
        claimed = claim_gpu(build_dir() / "grid" / "gpu-locks", n)
        if claimed is None:
            raise RuntimeError(f"job {job.id}: all {n} GPUs are held by other jobs; run with --resources gpu={n} or fewer jobs")
        os.environ["CUDA_VISIBLE_DEVICES"] = str(claimed[0])
        print(f"[grid] {job.id}: GPU {claimed[0]}", flush=True)
    os.environ["MADLIB_BUILD"] = str(out)  # the job's staging, stamps and results live in its folder
    runner = Runner(root=root, parameters={job.notebook: job.parameters}, progress=progress, out=out)
    runner.execute(job.notebook)
    return out / f"{job.notebook}.ipynb"


def collect(jobs: list[GridJob], out: Path, root: Path | None = None) -> dict[str, Path]:
    """Stack every table the jobs wrote (``results/<analysis>/<table>.csv``) over the jobs, with
    the job's ``study``, ``job_model`` and ``job_item`` columns, into ``out/<analysis>/<table>.csv``
    (replacing ``out`` as a whole). Returns the tables written. A job without tables is an error."""
    frames: dict[str, list[pd.DataFrame]] = {}
    for job in jobs:
        results = job_dir(job, root) / "results"
        tables = sorted(results.glob("*/*.csv"))
        if not tables:
            raise FileNotFoundError(f"job {job.id} wrote no tables under {results}; run it first (snakemake grid)")
        for t in tables:
            try:
                df = pd.read_csv(t)
            except pd.errors.EmptyDataError:
                continue
            key = f"{t.parent.name}/{t.name}"
            frames.setdefault(key, []).append(df.assign(study=job.study, job_model=job.model, job_item=job.item))
    staging = out.with_name(f".{out.name}-{os.getpid()}")
    written = {}
    for key, dfs in sorted(frames.items()):
        dest = staging / key  # the staging folder replaces ``out`` as a whole, once every table is written
        dest.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(dfs, ignore_index=True).to_csv(dest, index=False)
        written[key] = out / key
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "jobs.json").write_text(json.dumps([j.id for j in jobs], indent=1))
    replace_dir(staging, out)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m madlib.workflow.grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/real_models.yaml"), help="grid configuration (YAML)")
    ap.add_argument("--studies", nargs="*", help="only these studies (keys under seeds:)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the jobs, a line each")
    r = sub.add_parser("run", help="execute one job")
    r.add_argument("job", help="the job's id, as `list` prints it")
    c = sub.add_parser("collect", help="stack the tables of a study's jobs")
    c.add_argument("study")
    c.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    try:
        jobs = load_jobs(args.config, args.studies)
        if args.command == "list":
            for j in jobs:
                print(f"{j.id}\tgpu={j.resources.get('gpu', 0)}\tmem_mb={j.resources.get('mem_mb')}")
        elif args.command == "run":
            by_id = {j.id: j for j in jobs}
            if args.job not in by_id:
                raise ValueError(f"job={args.job!r} is not accepted; give a job of {args.config} (python -m madlib.workflow.grid list)")
            run_job(by_id[args.job])
        else:
            chosen = [j for j in jobs if j.study == args.study]
            if not chosen:
                raise ValueError(f"study={args.study!r} is not accepted; give a study with jobs in {args.config}")
            collect(chosen, args.out)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # a failing notebook (NotebookFailed) names itself and its cell
        print(f"[grid] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
