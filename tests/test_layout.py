"""The package's layout: subpackages by concept, no private names across modules, one typed record per model."""

import ast
import importlib
import pkgutil
from pathlib import Path

import madlib
from madlib import codehash

ROOT = Path(madlib.__file__).parent
SUBPACKAGES = ("data", "models", "features", "detectors", "mad", "analyses", "plots", "workflow")


def madlib_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(madlib.__path__, "madlib."))


def test_every_subpackage_exists_and_says_what_it_holds():
    for name in SUBPACKAGES:
        pkg = importlib.import_module(f"madlib.{name}")
        assert pkg.__doc__ and len(pkg.__doc__) > 40, name
        listed = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
        assert listed, name
    flat = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert flat == {"codehash", "paths"}, f"modules outside the subpackages: {flat}"


def _private_imports(path: Path, module: str) -> list[str]:
    """``from <madlib module> import _name`` and ``<madlib module alias>._name`` in one source file."""
    tree = ast.parse(path.read_text())
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module or ""
            if not base.startswith("madlib"):
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"from {base} import {a.name}")
                if codehash.module_file(f"{base}.{a.name}") is not None:  # a module: its alias
                    aliases.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    bad = {}
    for module in madlib_modules():
        spec = importlib.util.find_spec(module)
        found = _private_imports(Path(spec.origin), module)
        if found:
            bad[module] = found
    assert not bad, bad


def test_the_check_finds_a_private_import(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from ..models.zoo import _check\nfrom ..models import zoo\nzoo._check('a', 'b')\n")
    assert _private_imports(src, "madlib.analyses.x") == ["from madlib.models.zoo import _check", "zoo._check"]


def test_loaders_attach_one_typed_record(tiny_model):
    from madlib.models.info import ModelInfo, info_of, require_zoo, zoo_info

    info = info_of(tiny_model)
    assert isinstance(info, ModelInfo) and info.model_dir is not None and info.hub is None
    assert zoo_info(tiny_model).family in ("gpt2", "llama") and require_zoo(tiny_model) is info.zoo
    assert not hasattr(tiny_model, "zoo_config") and not hasattr(tiny_model, "model_dir")


def test_a_model_built_by_hand_has_an_empty_record(tiny_model):
    import copy

    import pytest

    from madlib.models.info import ATTRIBUTE, ModelInfo, info_of, require_zoo

    bare = copy.deepcopy(tiny_model)
    delattr(bare, ATTRIBUTE)
    assert info_of(bare) == ModelInfo()
    with pytest.raises(ValueError, match="model=.* is not accepted; give a zoo model"):
        require_zoo(bare)
