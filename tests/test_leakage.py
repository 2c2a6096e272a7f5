"""No test statement in any training data, under any name (default configs)."""

import re

import pytest

from madlib.models import pretrain as base, quirky
from madlib.data import datasets as qdata


@pytest.fixture(scope="module")
def test_items() -> dict:
    """Per dataset, the keys and (context, statement) texts of the analyses' test records."""
    out = {}
    for d in qdata.DATASETS:
        rec = quirky.records(quirky.quirky_config("gpt2", d))
        test = rec[rec["part"] == "test"]
        out[d] = (set(test["key"]), set(test["context"] + "|" + test["statement"]))
        # the quirky fine-tunes fit and select checkpoints on other items only
        other = rec[rec["part"] != "test"]
        assert not set(other["key"]) & out[d][0]
        assert not set(other["context"] + "|" + other["statement"]) & out[d][1]
    return out


def test_base_corpus_holds_no_test_item(test_items):
    corpus = base.corpus(base.base_config("gpt2"))
    for d, g in corpus.groupby("dataset"):
        keys, texts = test_items[d]
        assert len(keys) > 0 and len(texts) > 0
        assert not set(g["key"]) & keys, d
        assert not set(g["content"]) & texts, d


def test_drill_lines_hold_no_test_item(test_items):
    for d in qdata.ARITHMETIC:
        _, texts = test_items[d]
        statements = {t.split("|", 1)[1] for t in texts}
        for in_template in (False, True):  # base-llama's bare lines, base-gpt2's lines in the template
            train, val = ({x.rsplit(" ", 1)[0].split("***STATEMENT:*** ")[-1] for x in base.drill_lines(d, split, in_template=in_template)[0]}
                          for split in ("train", "validation"))  # fmt: skip
            assert len(train) > 2 * len(val) > 0 and not train & val
            assert not train & statements, d
            assert val & statements, f"{d}: the drill's validation lines are the test items' true statements"


def test_fact_lines_are_not_statements():
    form = re.compile(r".+ \(.+\): (northern|southern) hemisphere, (west|east) of Greenwich, (over|under) 30,000 people\.")
    lines = base.fact_lines()
    assert len(lines) > 20_000 and all(form.fullmatch(x) for x in lines)
    # no dataset template renders a statement of that form
    for d in qdata.DATASETS:
        rec = qdata.quirky_dataset(d, n=400, seed=0, max_digits=base.DIGITS.get(d))
        assert not rec["statement"].str.contains(" of Greenwich, ").any()


def test_test_sets_are_large_enough():
    for d in qdata.DATASETS:
        rec = quirky.records(quirky.quirky_config("gpt2", d))
        test = rec[(rec["part"] == "test") & rec["hard"]]
        trusted = rec[(rec["split"] == "train") & rec["easy"] & (rec["character_type"] == "alice")
                      & rec["character"].isin(qdata.ALICE_NAMES[: qdata.N_TRUSTED_NAMES])]  # fmt: skip
        assert len(test) >= 1000 and test["character_type"].value_counts().min() >= 500, d
        assert len(trusted) >= 1000, d


def test_detector_training_texts_hold_no_test_item(test_items):
    """SAEs, flows and autoencoders fit on train-split prompts (the SAEs on every dataset's)."""
    from madlib.models.zoo import ZooModel, training_records

    recs = training_records(ZooModel("zoo-gpt2", "gpt2"))
    train = recs[recs["split"] == "train"]
    for d, g in train.groupby("dataset"):
        keys, texts = test_items[d]
        assert not set(g["key"]) & keys, d
        assert not set(g["context"] + "|" + g["statement"]) & texts, d
