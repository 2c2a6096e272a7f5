# The book's workflow: one job per notebook of notebooks/ (papermill, through `python -m madlib.workflow.runner
# execute`), then the book (`python -m madlib.workflow.runner book`); `make book` runs it with both cores.
# A notebook re-runs only when its inputs changed (see madlib/workflow/runner.py: `Runner.mark`).
# The real-model grid (configs/real_models.yaml) is in workflow/grid.smk: `snakemake grid`.
import sys
from pathlib import Path

from madlib.workflow.runner import AFTER, NOTEBOOKS, Runner

configfile: "configs/book.yaml"


PY = sys.executable
RUNNER = Runner(root=Path(workflow.basedir), parameters=config.get("parameters") or {}, progress=False)
unknown = sorted(set(RUNNER.parameters) - set(NOTEBOOKS))
if unknown:
    raise ValueError(f"parameters={unknown!r} is not accepted; give parameters of the notebooks {list(NOTEBOOKS)}")

wildcard_constraints:
    name="|".join(n for n in NOTEBOOKS if n != "zoo"),


include: "workflow/grid.smk"


rule all:
    input:
        "_build/html/index.html",
    default_target: True


def notebook_inputs(name):
    """A notebook's inputs: its mark (rewritten only when the notebook is stale), its parameters,
    and the executed notebooks it waits for."""
    return dict(
        inputs=str(RUNNER.mark(name)),
        params=str(RUNNER.params_file(name)),
        after=[f"book/generated/{n}.ipynb" for n in AFTER.get(name, ())],
    )


EXECUTE = "OMP_NUM_THREADS={threads} {PY} -m madlib.workflow.runner execute {params.name} --params {input.params}"


rule zoo:  # first, with every core: it trains the fine-tunes (in parallel processes) that mad_auc and quirkiness read
    input:
        unpack(lambda w: notebook_inputs("zoo")),
    output:
        "book/generated/zoo.ipynb",
    params:
        name="zoo",
    threads: workflow.cores
    priority: 100
    shell:
        EXECUTE


rule notebook:
    input:
        unpack(lambda w: notebook_inputs(w.name)),
    output:
        "book/generated/{name}.ipynb",
    params:
        name=lambda w: w.name,
    shell:
        EXECUTE


rule book:
    input:
        expand("book/generated/{name}.ipynb", name=NOTEBOOKS),
        sources=lambda w: str(RUNNER.mark_book()),
    output:
        "_build/html/index.html",
    shell:
        "{PY} -m madlib.workflow.runner book"
