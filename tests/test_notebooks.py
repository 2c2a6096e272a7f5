"""Smoke runs of every notebook through papermill with tiny parameters, and the book build."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

import yaml

from madlib.workflow.grid import SUMMARY_NOTEBOOK
from madlib.workflow.runner import NOTEBOOKS, NotebookFailed, Runner

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {
    "zoo": dict(zoo_preset="tiny", datasets=["addition", "hemisphere", "nli"], seeds=[0, 1]),
    "mad_auc": dict(
        zoo_preset="tiny", datasets=["addition", "hemisphere"], seeds=[0, 1], n_boot=50, max_test=200, batch_size=64, backdoor_steps=20,
        sae_training_tokens=20000,
        detectors=["mahalanobis", "lof", "sae_diag_mahalanobis", "sae_seed2_diag_mahalanobis", "sae_random_diag_mahalanobis",
                   "atp_mean_mahalanobis", "probe_shift_mahalanobis", "finetune_kl", "probe_skyline"],
    ),  # fmt: skip
    "quirkiness": dict(zoo_preset="tiny", models=["zoo-gpt2", "zoo-gpt2-early"], datasets=["addition", "hemisphere"], seeds=[0],
                       n_boot=50, max_test=200, batch_size=64),
    "drift": dict(zoo_preset="tiny", layer=1, tasks=["addition", "population", "addition-large"], finetune_steps=5, n_finetune=64,
                  sae_d_sae=64, sae_k=8, sae_training_tokens=20000, sae_batch_size=512, n_sae_texts=50, n_eval=28, k_max=10),
    "benchmarks": dict(zoo_preset="tiny", n_prompts=64, batch_size=32, maha_n=400, maha_d=16, repeats=1),
    "perturb": dict(zoo_preset="tiny", n_base=6, n_pool=60, n_steps=10, sae_texts=100, sae_d_sae=32, sae_k=4,
                    sae_training_tokens=4096, sae_batch_size=256, batch_size=256),
}


def test_every_notebook_is_listed_and_has_smoke_parameters():
    on_disk = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert on_disk - {SUMMARY_NOTEBOOK} == set(NOTEBOOKS) == set(SMOKE)


@pytest.mark.parametrize("name", [*NOTEBOOKS, SUMMARY_NOTEBOOK])
def test_every_figure_cell_has_a_caption_and_alt_text(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "savefig(" in cell.source:
            opts = cell.metadata.get("mystnb", {})
            first = cell.source.splitlines()[0]
            assert len(opts.get("figure", {}).get("caption", "")) > 20, f"{name}: figure cell {first!r} has no caption"
            alt = opts.get("image", {}).get("alt", "")
            assert len(alt) > 20 and "/" not in alt, f"{name}: figure cell {first!r} has no alt text"


@pytest.mark.parametrize("name", [*NOTEBOOKS, SUMMARY_NOTEBOOK])
def test_parameters_cell_is_documented_literals(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store notebooks without outputs"
    lines = [ln for ln in tagged[0].source.splitlines() if ln.strip()]
    tree = ast.parse(tagged[0].source)
    assert all(isinstance(s, ast.AnnAssign) for s in tree.body), "one annotated assignment per parameter"
    for s in tree.body:
        ast.literal_eval(s.value)
    assert all("#" in ln for ln in lines), "every parameter has a comment"
    assert set(SMOKE.get(name, {})) <= {s.target.id for s in tree.body}
    # papermill --help-notebook must list (and explain) every parameter
    from papermill.translators import PythonTranslator

    inspected = {p.name: p for p in PythonTranslator.inspect(tagged[0])}
    assert set(inspected) == {s.target.id for s in tree.body}
    assert all(p.help for p in inspected.values())


def copy_project(dest: Path) -> Path:
    """The project's sources (notebooks, book, madlib, workflow) in ``dest``, without build outputs."""
    for item in ("notebooks", "book", "madlib", "workflow", "configs", "profiles"):
        shutil.copytree(ROOT / item, dest / item, ignore=shutil.ignore_patterns("generated", "__pycache__"))
    for item in ("_config.yml", "_toc.yml", "pyproject.toml", "Snakefile"):
        shutil.copy(ROOT / item, dest / item)
    return dest


def snakemake(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``snakemake`` in ``root`` as ``make book`` runs it (both cores), the build folder in ``root``."""
    exe = Path(sys.executable).with_name("snakemake")
    env = dict(os.environ, MADLIB_BUILD=str(root / "_build"), PYTHONPATH=str(root), TQDM_DISABLE="1")
    env.pop("MADLIB_RESULTS", None)
    res = subprocess.run([str(exe), "--cores", "2", "--rerun-incomplete", "--max-checksum-file-size", "50MB", *args],
                         cwd=root, env=env, capture_output=True, text=True)  # fmt: skip
    if check and res.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def planned(res: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """The jobs a dry run (``-n``) lists: rule -> the wildcards line of each of its jobs."""
    jobs: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", res.stdout + res.stderr):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if m:
            w = re.search(r"wildcards: (.*)", block)
            jobs.setdefault(m.group(1), []).append(w.group(1) if w else "")
    return jobs


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    """Every notebook run with the smoke parameters and the book built through the workflow
    (``snakemake``, two notebooks at a time), once for this module."""
    mp = pytest.MonkeyPatch()
    root = copy_project(tmp_path_factory.mktemp("smoke") / "project")
    (root / "configs" / "smoke.yaml").write_text(yaml.safe_dump({"parameters": SMOKE}))
    mp.setenv("MADLIB_BUILD", str(root / "_build"))
    res = snakemake(root, "--configfile", "configs/smoke.yaml")
    runner = Runner(root=root, parameters=SMOKE, progress=False)
    yield root, runner, res
    mp.undo()


def test_the_smoke_book_as_a_browser_shows_it(smoke_book):
    """Every page in headless Chromium: no console error, every image loaded, every internal link
    and anchor resolves, no raw log text or build path, formulas rendered, search works."""
    from madlib.workflow import browsercheck

    pytest.importorskip("playwright")
    if browsercheck.chromium() is None:
        pytest.skip("no Chromium on this machine (make env installs Debian's package as root)")
    root, _, _ = smoke_book
    problems = browsercheck.check_site(root / "_build" / "html", forbidden=(str(root),))
    assert not problems, "\n".join(problems)


def test_pipeline_smoke_runs_every_notebook_and_builds_the_book(smoke_book, monkeypatch):
    root, runner, res = smoke_book
    monkeypatch.setenv("MADLIB_BUILD", str(root / "_build"))
    assert sorted(re.findall(r"\[runner\] (\w+): done in", res.stdout + res.stderr)) == sorted(NOTEBOOKS)
    assert all(runner.is_fresh(n) for n in NOTEBOOKS)
    auc = pd.read_csv(root / "_build" / "results" / "mad_auc" / "auc.csv")
    assert list(auc.columns) == ["model", "task", "dataset", "method", "feature_source", "skyline", "layer", "selected_layer",
                                 "subset", "auroc", "ci_low", "ci_high", "recall_fpr1", "recall_fpr1_low", "recall_fpr1_high",
                                 "test_fpr1", "recall_fpr5", "recall_fpr5_low", "recall_fpr5_high", "test_fpr5", "n", "seed", "finetune_seed"]  # fmt: skip
    agg_all = (auc["layer"] == "aggregated") & (auc["subset"] == "all")
    assert auc.loc[agg_all & (auc["method"] == "mahalanobis"), "recall_fpr5"].between(0, 1).all()
    assert set(auc["layer"].astype(str)) >= {"1", "2", "aggregated", "mean", "best"}
    assert set(auc["subset"]) == {"all", "agree", "disagree"} and set(auc["method"]) == set(SMOKE["mad_auc"]["detectors"])
    assert set(auc["model"]) == {"zoo-gpt2", "zoo-llama"} and set(auc["task"]) == {"quirky", "backdoor"}
    assert set(auc["dataset"]) == {"addition", "hemisphere", "hemisphere-backdoor"}
    best = auc[auc["layer"] == "best"]
    assert len(best) and best["selected_layer"].notna().all() and (best["n"] < auc.loc[auc["layer"] == "aggregated", "n"].max()).all()
    assert auc.loc[auc["subset"] == "all", "auroc"].between(0, 1).all()
    assert set(auc.loc[auc["method"] == "mahalanobis", "finetune_seed"]) == {0, 1}
    assert set(auc.loc[auc["method"] == "lof", "finetune_seed"]) == {0}  # the full comparison runs on the first seed
    controls = pd.read_csv(root / "_build" / "results" / "mad_auc" / "sae_controls.csv")
    assert set(controls["model"]) == {"zoo-gpt2", "zoo-llama"} and set(controls["dataset"]) == {"all"}
    assert controls[["shared_with_seed2", "shared_with_random"]].stack().between(0, 1).all()
    for name in NOTEBOOKS:  # pages and downloads show results, not logs
        executed = nbformat.read(root / "book" / "generated" / f"{name}.ipynb", as_version=4)
        streams = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "stream"]
        assert not [o for o in streams if o["name"] == "stderr" or "it/s]" in o["text"]], name
    grid = pd.read_csv(root / "_build" / "results" / "zoo" / "finetune_accuracy.csv")
    assert set(grid["seed"]) == {0, 1} and set(grid["dataset"]) == {"addition", "hemisphere", "nli"}

    html = (root / "_build" / "html" / "book" / "generated" / "mad_auc.html").read_text()
    assert "<img" in html and "Mean aggregated AUROC" in html
    assert (root / "_build" / "html" / "index.html").is_file()
    for name in NOTEBOOKS:  # no cell prints a file path of the build (e.g. a path a cell ends on)
        page = (root / "_build" / "html" / "book" / "generated" / f"{name}.html").read_text()
        assert str(root / "_build") not in page, f"{name}.html shows a path under _build"
    for page in (root / "_build" / "html").rglob("*.html"):  # scripts once each; MathJax from the book, not a CDN
        text = page.read_text()
        assert text.count("const THEBE_JS_URL") <= 1, page.name
        assert "cdn.jsdelivr.net/npm/mathjax" not in text, page.name
    assert (root / "_build" / "html" / "_static" / "mathjax" / "tex-chtml.js").is_file()

    stamp = json.loads((root / "_build" / "stamps" / "zoo.json").read_text())
    assert stamp["models"] and all(Path(p).is_file() for p in stamp["models"])

    # nothing changed: nothing re-runs, and a rebuild takes seconds; a file touched but unchanged
    # re-runs nothing; an edit of one madlib module re-runs exactly the notebooks that import it
    smoke = ("--configfile", "configs/smoke.yaml")
    again = snakemake(root, *smoke)
    assert "Nothing to be done" in again.stdout + again.stderr
    (root / "madlib" / "mad" / "metrics.py").touch()
    (root / "notebooks" / "drift.ipynb").touch()
    assert planned(snakemake(root, *smoke, "-n")) == {}
    with open(root / "madlib" / "analyses" / "perturb.py", "a") as f:
        f.write("\nCHANGED = 1\n")
    plan = planned(snakemake(root, *smoke, "-n"))
    assert plan == {"notebook": ["name=perturb"], "book": [""], "all": [""]}, plan
    smoke_params = dict(SMOKE, benchmarks=dict(SMOKE["benchmarks"], repeats=2))  # a parameter changed
    (root / "configs" / "smoke2.yaml").write_text(yaml.safe_dump({"parameters": smoke_params}))
    plan = planned(snakemake(root, "--configfile", "configs/smoke2.yaml", "-n"))
    assert sorted(plan["notebook"]) == ["name=benchmarks", "name=perturb"], plan


def test_failing_notebook_names_itself_and_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    monkeypatch.setenv("MADLIB_BUILD", str(root / "_build"))
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [
        nbformat.v4.new_code_cell("from madlib.plots import common as plots\nimport pandas as pd\nplots.write_table(pd.DataFrame({'a': [1]}), 'bad', 't')"),
        nbformat.v4.new_code_cell("1 / 0"),
    ]
    nbformat.write(nb, root / "notebooks" / "bad.ipynb")
    runner = Runner(root=root, progress=False)
    with pytest.raises(NotebookFailed, match=r"^notebook 'bad' failed in cell 2 \(`1 / 0`\): ZeroDivisionError: division by zero "
                                              r"\(the executed notebook is kept at .*_build/failed/bad\.ipynb\)$"):
        runner.execute("bad")
    kept = nbformat.read(root / "_build" / "failed" / "bad.ipynb", as_version=4)
    assert any(o.get("ename") == "ZeroDivisionError" for c in kept.cells for o in c.get("outputs", [])), "the traceback can be read"
    assert not (root / "book" / "generated" / "bad.ipynb").exists()
    assert not (root / "_build" / "results" / "bad").exists()
    assert not list((root / "_build").glob(".bad-*"))


def test_results_changed_outside_the_build_are_not_fresh_and_direct_runs_write_elsewhere(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    monkeypatch.setenv("MADLIB_BUILD", str(root / "_build"))
    monkeypatch.delenv("MADLIB_RESULTS", raising=False)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("from madlib.plots import common as plots\nimport pandas as pd\n"
                                          "plots.write_table(pd.DataFrame({'a': [1, 2, 3]}), 'ok', 't')")]  # fmt: skip
    nbformat.write(nb, root / "notebooks" / "ok.ipynb")
    runner = Runner(root=root, progress=False)
    runner.execute("ok")
    table = root / "_build" / "results" / "ok" / "t.csv"
    assert runner.is_fresh("ok") and len(table.read_text().splitlines()) == 4
    table.write_text("a\n1\n")  # a run outside the build cut the published table
    assert not runner.is_fresh("ok"), "the build notices results that do not match their stamp"
    # a direct run (no runner) writes under its working directory, never into the book's results
    monkeypatch.chdir(tmp_path)
    from madlib.plots import common as plots

    plots.write_table(pd.DataFrame({"a": [9]}), "ok", "t")
    assert (tmp_path / "results" / "ok" / "t.csv").is_file() and table.read_text() == "a\n1\n"
