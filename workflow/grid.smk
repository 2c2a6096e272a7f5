# The real-model grid (madlib/workflow/grid.py): one job per (model, dataset) of each study of the grid
# configuration, then the study's tables stacked and drawn by notebooks/grid_summary.ipynb.
#
#   snakemake grid -n                                   # the jobs, with their resources
#   snakemake grid -j 4 --resources gpu=4               # one machine, four GPUs, a GPU per job
#   snakemake grid --profile profiles/slurm             # one SLURM job per (model, dataset)
#
# --config grid_config=FILE picks another configuration, grid_studies=[000] some of its studies.
from madlib.workflow import grid as G

GRID_CONFIG = config.get("grid_config", "configs/real_models.yaml")
GRID_STUDIES = config.get("grid_studies")
GRID_JOBS = {j.id: j for j in G.load_jobs(GRID_CONFIG, [str(s) for s in GRID_STUDIES] if GRID_STUDIES else None)}
GRID_ONES = sorted({j.study for j in GRID_JOBS.values()})


def grid_job(w):
    """The job of a grid_job rule's wildcards."""
    return GRID_JOBS[f"{w.study}/{w.job}"]


def grid_job_files(study):
    return [f"_build/grid/jobs/{j.id}/{j.notebook}.ipynb" for j in GRID_JOBS.values() if j.study == study]


localrules: grid, grid_tables, grid_summary


rule grid:
    input:
        expand("_build/grid/{study}/summary.ipynb", study=GRID_ONES),


rule grid_job:
    input:
        notebook=lambda w: f"notebooks/{grid_job(w).notebook}.ipynb",
        code=lambda w: list(G.code_files(Path(f"notebooks/{grid_job(w).notebook}.ipynb"))),
    output:
        "_build/grid/jobs/{study}/{job}/{notebook}.ipynb",
    wildcard_constraints:
        study="[^/]+",
        job="[^/]+/[^/]+/[^/]+",
    params:
        parameters=lambda w: grid_job(w).parameters,  # a job re-runs when its parameters change
    resources:
        gpu=lambda w: grid_job(w).resources["gpu"],  # the study's resources over madlib.workflow.grid.DEFAULT_RESOURCES
        mem_mb=lambda w: grid_job(w).resources["mem_mb"],
        runtime=lambda w: grid_job(w).resources["runtime"],
    shell:
        "{PY} -m madlib.workflow.grid --config {GRID_CONFIG} run {wildcards.study}/{wildcards.job}"


rule grid_tables:
    input:
        lambda w: grid_job_files(w.study),
    output:
        directory("_build/grid/{study}/tables"),
    wildcard_constraints:
        study="[^/]+",
    shell:
        "{PY} -m madlib.workflow.grid --config {GRID_CONFIG} collect {wildcards.study} {output}"


rule grid_summary:
    input:
        tables="_build/grid/{study}/tables",
        notebook="notebooks/grid_summary.ipynb",
    output:
        "_build/grid/{study}/summary.ipynb",
    wildcard_constraints:
        study="[^/]+",
    log:
        "_build/grid/{study}/summary.log",
    shell:
        "MADLIB_RESULTS=_build/grid/{wildcards.study}/results {PY} -m papermill {input.notebook} {output} -p tables {input.tables} -p study {wildcards.study} > {log} 2>&1"
