"""Cache keys from the code itself: a module's import closure, hashed by its definitions."""

import shutil

import pytest

from madlib import codehash

QUIRKY = "madlib.models.quirky"


def test_closure_follows_module_level_imports():
    quirky = codehash.closure(QUIRKY)
    assert {QUIRKY, "madlib.models.pretrain", "madlib.models.zoo", "madlib.data.datasets", "madlib.data.reading",
            "madlib.models.tokenizer", "madlib.models.lora"} <= set(quirky)  # fmt: skip
    assert "madlib.plots.common" not in quirky and "madlib.mad.suite" not in quirky
    assert set(codehash.closure("madlib.models.pretrain")) < set(quirky)
    with pytest.raises(ValueError, match="module='numpy' is not accepted"):
        codehash.imports("numpy")


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    copy = tmp_path / "elsewhere" / "madlib"
    shutil.copytree(codehash.ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "artefacts"))
    monkeypatch.setattr(codehash, "ROOT", copy)
    return copy


def test_code_hash_survives_a_copy_and_comments_and_sees_an_edit(package_copy):
    copy = package_copy
    real = codehash.Path(codehash.__file__).parent
    before = {m: codehash.code_hash(m, root=real) for m in (QUIRKY, "madlib.features.activations")}
    assert {m: codehash.code_hash(m) for m in before} == before  # the package copied elsewhere: nothing changed
    plots = copy / "plots" / "common.py"
    plots.write_text(plots.read_text() + "\nOUTSIDE = 1\n")
    assert codehash.code_hash(QUIRKY) == before[QUIRKY]  # an edit outside the closure
    data = copy / "data" / "datasets.py"
    text = data.read_text().replace('"""', '"""A docstring edit. ', 1) + "\n# a comment\n"
    attribute_doc = '"""The first four names of each list serve trusted/untrusted data; the others are held out."""'
    assert attribute_doc in text
    data.write_text(text.replace(attribute_doc, '"""An attribute docstring, rewritten."""'))
    assert codehash.code_hash(QUIRKY) == before[QUIRKY]  # comments and docstrings are not code
    data.write_text(data.read_text() + "\nEDITED = 1\n")
    assert codehash.code_hash(QUIRKY) != before[QUIRKY]


def test_moving_a_module_and_a_function_keeps_the_zoo_key(package_copy):
    """A module moved to another subpackage (its importers' imports rewritten) and a function moved
    between modules leave the key of every cached fine-tune as it was: no retraining."""
    copy = package_copy
    before = codehash.code_hash(QUIRKY)
    (copy / "models" / "lora.py").rename(copy / "features" / "lora.py")  # a move, and its importer follows
    quirky = copy / "models" / "quirky.py"
    assert "from . import lora\n" in quirky.read_text()
    quirky.write_text(quirky.read_text().replace("from . import lora\n", "from ..features import lora\n"))
    assert "madlib.features.lora" in codehash.closure(QUIRKY)
    assert codehash.code_hash(QUIRKY) == before
    # a function moved from training.py into tokenizer.py, training importing it from there
    training, tok = copy / "models" / "training.py", copy / "models" / "tokenizer.py"
    src = training.read_text()
    start = src.index("def warmup_cosine(")
    end = src.find("\ndef ", start + 1) % (len(src) + 1)
    training.write_text(src[:start] + src[end + 1 :] + "\nfrom .tokenizer import warmup_cosine  # noqa: E402\n")
    tok.write_text(tok.read_text() + "\n\nimport math\n\n\n" + src[start:end] + "\n")
    assert "def warmup_cosine(" not in training.read_text()
    assert codehash.code_hash(QUIRKY) == before
    src = tok.read_text()
    tok.write_text(src.replace("def warmup_cosine(", "def warmup_cosine(  # moved\n", 1))
    assert codehash.code_hash(QUIRKY) == before
    lora = copy / "features" / "lora.py"
    lora.write_text(lora.read_text().replace("alpha: float = 8.0", "alpha: float = 9.0", 1))
    assert codehash.code_hash(QUIRKY) != before  # a real edit of the moved module still counts
