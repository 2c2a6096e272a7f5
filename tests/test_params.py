"""Notebook parameters: undeclared and mistyped values are refused in one line."""

import ast
from pathlib import Path

import nbformat
import pytest

from madlib.workflow.params import check_parameters, injected_names

ROOT = Path(__file__).resolve().parents[1]


def namespace(injected: str | None = None, **overrides) -> dict:
    ns: dict = {}
    exec("datasets: list = ['addition']\nmax_test: int = 4000\nstep_size: float = 0.5\nsae: str = ''\nflag: bool = False\n", ns)
    ns.update(overrides)
    ns["In"] = ["", "import x"] + ([injected] if injected else [])
    return ns


def test_injected_names_are_read_from_papermill_s_cell():
    assert injected_names(["", "a = 1", "# Parameters\ndataset = ['x']\nseed = 1\n"]) == ["dataset", "seed"]
    assert injected_names(["", "a = 1"]) == []
    # the last injected cell counts (a kernel that ran twice)
    assert injected_names(["# Parameters\na = 1\n", "# Parameters\nb = 1\n"]) == ["b"]


def test_declared_parameters_of_the_right_type_pass():
    check_parameters(namespace())
    check_parameters(namespace("# Parameters\nmax_test = 10\nstep_size = 1\n", max_test=10, step_size=1))  # an int for a float
    check_parameters(namespace(other_variable=3))  # interactive use: later cells' variables are not parameters


def test_an_undeclared_parameter_is_refused_with_the_close_name():
    with pytest.raises(ValueError, match=r"^parameter 'dataset' is not declared by this notebook; did you mean 'datasets'\? accepted: datasets, max_test"):
        check_parameters(namespace("# Parameters\ndataset = ['addition']\n", dataset=["addition"]))
    with pytest.raises(ValueError, match="parameter 'zzz' is not declared by this notebook; accepted: "):
        check_parameters(namespace("# Parameters\nzzz = 1\n", zzz=1))


@pytest.mark.parametrize("name,value,kind", [("max_test", "big", "int"), ("max_test", 1.5, "int"), ("max_test", True, "int"),
                                             ("datasets", "addition", "list"), ("step_size", "0.5", "float"), ("flag", 1, "bool")])  # fmt: skip
def test_a_mistyped_parameter_is_refused(name, value, kind):
    with pytest.raises(ValueError, match=f"^{name}={value!r} is not accepted; give a value of type {kind}$".replace("(", r"\(").replace(")", r"\)")):
        check_parameters(namespace(f"# Parameters\n{name} = {value!r}\n", **{name: value}))


def test_without_a_parameters_cell_the_check_says_so():
    with pytest.raises(RuntimeError, match="no declared parameters"):
        check_parameters({"In": []})


def test_every_notebook_checks_its_parameters_right_after_declaring_them():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, 4)
        i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        check = nb.cells[i + 1].source
        assert "check_parameters(globals()" in check, path.name
        ns: dict = {}
        exec(nb.cells[i].source, ns)
        ns["In"] = []
        body = ast.parse(check).body
        upto = next(i for i, node in enumerate(body) if "check_parameters(globals()" in ast.unparse(node))
        exec(compile(ast.Module(body[: upto + 1], []), path.name, "exec"), ns)  # the defaults pass every rule


RULES = dict(minimum=dict(max_test=2, step_size=0), positive=("step_size",), nonempty=("datasets",), int_items=("datasets",),
             choices=dict(sae=("", "x")))  # fmt: skip


@pytest.mark.parametrize("name,value,message", [
    ("max_test", 0, "max_test=0 is not accepted; give a number >= 2"),
    ("step_size", float("nan"), "step_size=nan is not accepted; give a number >= 0"),
    ("step_size", 0.0, "step_size=0.0 is not accepted; give a number > 0"),
    ("datasets", [], "datasets=[] is not accepted; give at least one item"),
    ("datasets", [1, 1.5], "datasets=[1, 1.5] is not accepted; give a list of integers"),
    ("datasets", [True], "datasets=[True] is not accepted; give a list of integers"),
    ("sae", "y", "sae='y' is not accepted; choose from '', 'x'"),
])  # fmt: skip
def test_value_rules_refuse_in_one_line(name, value, message):
    ns = namespace(f"# Parameters\n{name} = {value!r}\n", **{"datasets": [1], name: value})
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(") + "$"):
        check_parameters(ns, **RULES)
    check_parameters(namespace(datasets=[1, 2], step_size=0.5), **RULES)


@pytest.mark.parametrize("notebook,params,message", [
    ("mad_auc", dict(n_boot=0), "n_boot=0 is not accepted; give a number >= 1"),
    ("mad_auc", dict(seeds=[]), "seeds=\\[\\] is not accepted; give at least one item"),
    ("perturb", dict(n_pool=1), "n_pool=1 is not accepted; give a number >= 2"),
    ("benchmarks", dict(repeats=0), "repeats=0 is not accepted; give a number >= 1"),
    ("quirkiness", dict(zoo_preset="tiney"), "zoo_preset='tiney' is not accepted \\(did you mean 'tiny'\\?\\)"),
    ("drift", dict(finetune_lr=0.0), "finetune_lr=0.0 is not accepted; give a number > 0"),
    ("mad_auc", dict(model=["zoo-gpt2", "madlib-tests/no-such-model"]), "model='madlib-tests/no-such-model' could not be fetched"),
    ("quirkiness", dict(models=["zoo-gtp2"]), "models='zoo-gtp2' is not accepted; .*did you mean 'zoo-gpt2'"),
])  # fmt: skip
def test_notebooks_refuse_out_of_range_values_in_their_first_cells(tmp_path, monkeypatch, notebook, params, message):
    import papermill as pm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits it: a hub id is looked up in the cache only
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    with pytest.raises(pm.PapermillExecutionError, match=message):
        pm.execute_notebook(str(ROOT / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                            cwd=str(tmp_path), progress_bar=False)  # fmt: skip


def test_papermill_run_with_a_misspelt_parameter_fails_at_once(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match="did you mean 'datasets'"):
        pm.execute_notebook(str(ROOT / "notebooks" / "zoo.ipynb"), str(tmp_path / "out.ipynb"), parameters={"dataset": ["addition"]},
                            cwd=str(tmp_path), progress_bar=False)  # fmt: skip


def test_a_union_annotation_accepts_either_type():
    ns: dict = {}
    exec('batch_size: "Union[int, str]" = 256\n', ns)
    ns["In"] = ["# Parameters\nbatch_size = 'auto'\n"]
    ns["batch_size"] = "auto"
    check_parameters(ns)
    ns["batch_size"] = 1.5
    with pytest.raises(ValueError, match=r"^batch_size=1.5 is not accepted; give a value of type int or str$"):
        check_parameters(ns)


def test_mad_auc_refuses_a_misspelt_dataset_or_a_bad_layer_before_any_model_loads(tmp_path):
    import papermill as pm

    for params, message in ((dict(datasets=["additon"]), "datasets='additon' is not accepted"),
                            (dict(layers=[1.5]), "layers=\\[1.5\\] is not accepted")):  # fmt: skip
        with pytest.raises(pm.PapermillExecutionError, match=message):
            pm.execute_notebook(str(ROOT / "notebooks" / "mad_auc.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                                cwd=str(tmp_path), progress_bar=False)  # fmt: skip
        assert not (tmp_path / "results").exists(), "nothing written"
