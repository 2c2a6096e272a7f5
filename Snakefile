# The book's workflow: one job per notebook of notebooks/ (papermill, through `python -m madlib.runner
# execute`), then the book (`python -m madlib.runner book`); `make book` runs it with both cores.
# A notebook re-runs only when its inputs changed (see madlib/runner.py: `Runner.mark`).
# The real-model grid (configs/real_models.yaml) is in workflow/grid.smk: `snakemake grid`.
import sys
from pathlib import Path

from madlib.runner import AFTER, NOTEBOOKS, Runner

configfile: "configs/book.yaml"


PY = sys.executable
RUNNER = Runner(root=Path(workflow.basedir), parameters=config.get("parameters") or {}, progress=False)
unknown = sorted(set(RUNNER.parameters) - set(NOTEBOOKS))
if unknown:
    raise ValueError(f"parameters={unknown!r} is not accepted; give parameters of the notebooks {list(NOTEBOOKS)}")

wildcard_constraints:
    name="|".join(NOTEBOOKS),


include: "workflow/grid.smk"


rule all:
    input:
        "_build/html/index.html",
    default_target: True


rule notebook:
    input:
        inputs=lambda w: str(RUNNER.mark(w.name)),
        params=lambda w: str(RUNNER.params_file(w.name)),
        after=lambda w: [f"book/generated/{n}.ipynb" for n in AFTER.get(w.name, ())],
    output:
        "book/generated/{name}.ipynb",
    threads: lambda w: workflow.cores if w.name == "zoo" else 1  # the zoo trains its fine-tunes in parallel processes
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m madlib.runner execute {wildcards.name} --params {input.params}"


rule book:
    input:
        expand("book/generated/{name}.ipynb", name=NOTEBOOKS),
        sources=lambda w: str(RUNNER.mark_book()),
    output:
        "_build/html/index.html",
    shell:
        "{PY} -m madlib.runner book"
