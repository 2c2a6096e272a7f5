"""The workflow (Snakefile, workflow/grid.smk): the real-model grid as jobs, offline on tiny
hub-format models; the SLURM profile's dry run; GPU claims; the grid configuration's errors.
(The book's own workflow, with what re-runs after an edit, is tested on the smoke book in
test_notebooks.py.)"""

import os
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from madlib import codehash
from madlib.workflow import grid
from madlib.workflow.runner import notebook_modules
from test_models import _save_model
from test_notebooks import ROOT, copy_project, planned, snakemake


def test_the_import_graph_follows_imports_inside_functions():
    assert "madlib.models.quirky" not in codehash.closure("madlib.models.zoo")
    assert "madlib.models.quirky" in codehash.closure("madlib.models.zoo", nested=True)  # zoo.get_model imports quirky when it runs
    mods = notebook_modules(ROOT / "notebooks" / "perturb.ipynb")
    assert "madlib.analyses.perturb" in mods and "madlib.analyses.drift" not in mods
    others = [n for n in ("zoo", "mad_auc", "quirkiness", "drift", "benchmarks")]
    assert all("madlib.analyses.perturb" not in notebook_modules(ROOT / "notebooks" / f"{n}.ipynb") for n in others)


@pytest.fixture(scope="module")
def grid_project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("grid") / "project")
    models = [str(_save_model(kind, root.parent / f"tiny-{kind}")) for kind in ("gpt2", "llama")]
    config = {"seeds": {"tiny": {
        "title": "two tiny hub-format models, two datasets",
        "resources": {"gpu": 1, "mem_mb": 2000, "runtime": 10},
        "runs": [{"notebook": "mad_auc", "parameters": {
            "model": models, "datasets": ["addition", "hemisphere"], "detectors": ["mahalanobis"],
            "backdoor_dataset": "", "n_boot": 50, "max_test": 200, "batch_size": 64}}],
    }}}  # fmt: skip
    (root / "configs" / "tiny_grid.yaml").write_text(yaml.safe_dump(config))
    return root, models


def test_the_grid_runs_one_job_per_model_and_dataset_and_aggregates(grid_project):
    root, models = grid_project
    args = ("grid", "--config", "grid_config=configs/tiny_grid.yaml", "--resources", "gpu=2")
    plan = planned(snakemake(root, *args, "-n"))
    assert len(plan["grid_job"]) == 4 and len(plan["grid_tables"]) == 1 and len(plan["grid_summary"]) == 1
    res = snakemake(root, *args)
    jobs = root / "_build" / "grid" / "jobs" / "tiny" / "mad_auc"
    for m in models:
        for d in ("addition", "hemisphere"):
            job = jobs / grid.slug(m) / d
            assert (job / "mad_auc.ipynb").is_file(), job
            auc = pd.read_csv(job / "results" / "mad_auc" / "auc.csv")
            assert set(auc["dataset"]) == {d} and set(auc["model"]) == {Path(m).name}, "each job ran one model on one dataset"
    assert len(re.findall(r"rule grid_job:", res.stdout + res.stderr)) == 4, "four separate jobs"
    stacked = pd.read_csv(root / "_build" / "grid" / "tiny" / "tables" / "mad_auc" / "auc.csv")
    assert set(map(tuple, stacked[["model", "dataset"]].drop_duplicates().to_numpy())) == {
        (Path(m).name, d) for m in models for d in ("addition", "hemisphere")}  # fmt: skip
    assert set(stacked["job_model"]) == set(models) and stacked["auroc"].between(0, 1).all()
    summary = nbformat.read(root / "_build" / "grid" / "tiny" / "summary.ipynb", as_version=4)
    outputs = [o for c in summary.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"] and any("image/png" in o.get("data", {}) for o in outputs)
    assert planned(snakemake(root, *args, "-n")) == {}, "nothing changed: nothing re-runs"


def test_the_slurm_dry_run_lists_a_gpu_job_per_model_and_dataset(tmp_path):
    root = copy_project(tmp_path / "project")
    res = snakemake(root, "grid", "-n", "--profile", "profiles/slurm", "--config", "grid_studies=['000']")
    out = res.stdout + res.stderr
    study = yaml.safe_load((ROOT / "configs" / "real_models.yaml").read_text())["seeds"]["000"]
    blocks = [b for b in re.split(r"\n(?=(?:local)?rule \w+:)", out) if b.startswith("rule grid_job:")]
    jobs = {re.search(r"job=([^,\s]+)", b).group(1): b for b in blocks}
    expected = {f"{nb}/{grid.slug(m)}/{d}" for nb in ("mad_auc", "quirkiness") for m in study["models"] for d in study["datasets"]}
    assert set(jobs) == expected and len(blocks) == 2 * 2 * 12
    for b in blocks:
        resources = re.search(r"resources: (.*)", b).group(1)
        assert "gpu=1" in resources.split(", ") and "slurm_partition=gpu" in resources and "mem_mb=" in resources


def test_each_job_claims_a_gpu_of_its_own(tmp_path):
    a, b = grid.claim_gpu(tmp_path, 2), grid.claim_gpu(tmp_path, 2)
    assert (a[0], b[0]) == (0, 1) and grid.claim_gpu(tmp_path, 2) is None
    os.close(a[1])  # the job on GPU 0 ended
    c = grid.claim_gpu(tmp_path, 2)
    assert c[0] == 0
    for fd in (b[1], c[1]):
        os.close(fd)


@pytest.mark.parametrize("text, message", [
    ("seeds: {}", "seeds={} is not accepted; give a mapping of study keys"),
    ("seeds: {s: {runs: [{notebook: mad_auc, parameters: {datasets: [nli]}}]}}",
     "seeds.s.runs[0].parameters=['datasets'] is not accepted; give parameters that name the model(s) (model or models)"),
    ("seeds: {s: {runs: [{notebook: mad_auc, parameters: {model: []}}]}}", "seeds.s.runs[0].parameters.model=[] is not accepted"),
    ("seeds: {s: {resources: 3, runs: []}}", "seeds.s.resources=3 is not accepted"),
    ("seeds: {s: {runs: [{notebook: drift, parameters: {model: m}}, {notebook: drift, parameters: {model: m}}]}}", "appear twice"),
])  # fmt: skip
def test_a_bad_grid_configuration_fails_in_one_line(tmp_path, text, message):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        grid.load_jobs(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"grid_studies='x' is not accepted"):
        grid.load_jobs(ROOT / "configs" / "real_models.yaml", ["x"])


def test_the_real_model_grid_expands_runs_into_jobs():
    jobs = grid.load_jobs(ROOT / "configs" / "real_models.yaml")
    by_study = {s: [j for j in jobs if j.study == s] for s in ("000", "001", "004")}
    assert len(by_study["000"]) == 48 and {j.notebook for j in by_study["000"]} == {"mad_auc", "quirkiness"}
    one = next(j for j in by_study["000"] if j.notebook == "quirkiness" and j.item == "nli")
    assert one.parameters["models"] == [one.model] and one.parameters["datasets"] == ["nli"]
    assert sorted(j.item for j in by_study["001"]) == ["chinese", "math"]  # a drift job per fine-tune
    assert all(len(j.parameters["finetuned"]) == 1 for j in by_study["001"])
    assert [j.item for j in by_study["004"]] == ["all"]
