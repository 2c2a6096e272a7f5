"""environment.yml describes the same environment as pyproject.toml; the pins that matter hold."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in pyproject["dependencies"] + pyproject["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_norm(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted
    assert "-e ." in pip


def test_pins_that_matter():
    deps = {_norm(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert "torch==2.13.0" in deps
    assert any(d.startswith("jupyter-book") and "<2" in d for d in deps)
    assert any(d.startswith("transformer-lens") and "<4" in d for d in deps)
    assert any(d.startswith("sae-lens") for d in deps)


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("\n\n", 3)[1] + readme.split("\n\n", 3)[2]
    assert "make test" in ci
