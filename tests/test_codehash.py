"""Cache keys from the code itself: a module's import closure."""

import shutil

import pytest

from madlib import codehash


def test_closure_follows_module_level_imports():
    quirky = codehash.closure("madlib.quirky")
    assert {"madlib.quirky", "madlib.base", "madlib.zoo", "madlib.data", "madlib.reading", "madlib.tokenizer", "madlib.lora"} <= set(quirky)
    assert "madlib.plots" not in quirky and "madlib.suite" not in quirky
    assert set(codehash.closure("madlib.base")) < set(quirky)
    with pytest.raises(ValueError, match="module='numpy' is not accepted"):
        codehash.imports("numpy")


def test_code_hash_survives_a_move_and_sees_an_edit(tmp_path, monkeypatch):
    before = {m: codehash.code_hash(m) for m in ("madlib.quirky", "madlib.activations")}
    copy = tmp_path / "elsewhere" / "madlib"
    shutil.copytree(codehash.ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "artefacts"))
    monkeypatch.setattr(codehash, "ROOT", copy)
    assert {m: codehash.code_hash(m) for m in before} == before  # the package moved, nothing changed
    (copy / "plots.py").write_text((copy / "plots.py").read_text() + "\n# an edit outside the closure\n")
    assert codehash.code_hash("madlib.quirky") == before["madlib.quirky"]
    (copy / "data.py").write_text((copy / "data.py").read_text() + "\n# a comment inside it\n")
    assert codehash.code_hash("madlib.quirky") == before["madlib.quirky"]  # comments are not code
    (copy / "data.py").write_text((copy / "data.py").read_text() + "\nEDITED = 1\n")
    assert codehash.code_hash("madlib.quirky") != before["madlib.quirky"]
