"""The EleutherAI quirky datasets read offline from tiny copies in the hub's layouts."""

import json
import time

import numpy as np
import pandas as pd
import pytest

from madlib.data import datasets as qdata
from madlib.data import hub as hub_data
from madlib.mad.task import mad_task
from madlib.models.hub import HubUnavailableError

SPLITS = {"train": 40, "validation": 24, "test": 8}


def _raw_records(seed: int = 3) -> pd.DataFrame:
    """Raw ``quirky_addition_raw`` records: per example an Alice and a Bob record with
    ``template_args``, labels and difficulty, in train/validation/test."""
    base = qdata.quirky_dataset("addition", n=sum(SPLITS.values()), seed=seed).drop_duplicates("row_id")
    split = np.repeat(list(SPLITS), list(SPLITS.values()))
    rows = []
    for (_, r), s in zip(base.iterrows(), split):
        for character in ("Alice", "Bob"):
            rows.append(dict(
                id=f"{r.row_id}{character}", split=s, character=character,
                template_args=dict(character=character, op1=int(r.op1), op2=int(r.op2), result=int(r.result)),
                label=bool(r.alice_label if character == "Alice" else r.bob_label), alice_label=bool(r.alice_label),
                bob_label=bool(r.bob_label), difficulty=float(r.difficulty), difficulty_quantile=0.5,
            ))  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def raw():
    return _raw_records()


@pytest.fixture(scope="module")
def parquet_dir(raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("quirky_addition_raw")
    (root / "data").mkdir()
    for s, df in raw.groupby("split"):
        df.drop(columns="split").to_parquet(root / "data" / f"{s}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def saved_dir(raw, tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("saved") / "quirky_addition_raw"
    dd = datasets.DatasetDict({s: datasets.Dataset.from_pandas(df.drop(columns="split"), preserve_index=False) for s, df in raw.groupby("split")})
    dd.save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def records(parquet_dir):
    return hub_data.quirky_hub_dataset("addition", source=str(parquet_dir), n_train=None, n_validation=None, seed=5)


def test_both_hub_layouts_give_the_zoo_columns_and_rules(records, saved_dir, raw):
    from_saved = hub_data.quirky_hub_dataset("addition", source=str(saved_dir), n_train=None, n_validation=None, seed=5)
    pd.testing.assert_frame_equal(records, from_saved)
    zoo = qdata.quirky_dataset("addition", n=8)
    core = ["dataset", "row_id", "split", "character", "character_type", "alice_label", "bob_label", "label", "agreement",
            "difficulty", "difficulty_quantile", "easy", "hard", "context", "statement", "prompt", "op1", "op2", "result"]  # fmt: skip
    assert set(core) <= set(records.columns) and set(core) <= set(zoo.columns)
    assert len(records) == 2 * (SPLITS["train"] + SPLITS["validation"]) and set(records["split"]) == {"train", "validation"}
    for _, pair in records.groupby("row_id"):
        assert list(pair["character_type"]) == ["alice", "bob"]
        assert pair["statement"].nunique() == 1 and pair["template"].nunique() == 1
        assert (pair["label"] == np.where(pair["character_type"] == "alice", pair["alice_label"], pair["bob_label"])).all()
    r = records.iloc[0]
    templates = qdata.OPS["addition"].templates
    assert r.statement == templates[r.template].format(op1=r.op1, op2=r.op2, result=r.result)
    assert r.prompt == qdata.TEMPLATE.format(character=r.character, context="", statement=r.statement)
    assert r.label == int(r.result == r.op1 + r.op2 if r.character_type == "alice" else r.result == qdata.sloppy_result(r.op1 + r.op2))


def test_quantiles_names_and_splits_follow_the_zoo(records, raw):
    alice = raw[raw["character"] == "Alice"]
    tie_rng = np.random.default_rng([5, hub_data.HUB_DATASETS.index("addition")])
    want = qdata.difficulty_quantile(alice["difficulty"].to_numpy(), tie_rng)[: SPLITS["train"] + SPLITS["validation"]]
    got = records.drop_duplicates("row_id")["difficulty_quantile"].to_numpy()
    assert np.allclose(got, want)  # over all raw splits (test included), before splitting, ties at random
    kept = records.drop_duplicates("row_id")
    tied = kept[kept["difficulty"] == kept["difficulty"].mode()[0]]
    assert tied["split"].nunique() == 2 and not tied.sort_values("difficulty_quantile")["split"].is_monotonic_decreasing, \
        "tied rows are not ranked train first, validation after"
    assert (records["easy"] == (records["difficulty_quantile"] < 0.25)).all()
    assert (records["hard"] == (records["difficulty_quantile"] >= 0.75)).all()
    held_out = set(qdata.ALICE_NAMES[4:] + qdata.BOB_NAMES[4:])
    val, train = records[records["split"] == "validation"], records[records["split"] == "train"]
    assert set(val["character"]) <= held_out
    assert set(train["character"]) & held_out and set(train["character"]) - held_out
    for ctype, names in (("alice", qdata.ALICE_NAMES), ("bob", qdata.BOB_NAMES)):
        assert set(records.loc[records["character_type"] == ctype, "character"]) <= set(names)
    task = mad_task(records, max_test=8)
    assert len(task.trusted) > 0 and task.test["is_anomalous"].sum() == len(task.test) // 2


def test_subsampling_pairing_and_templates(parquet_dir, raw, tmp_path):
    small = hub_data.quirky_hub_dataset("addition", source=str(parquet_dir), n_train=10, n_validation=4, seed=5)
    assert small.groupby("split")["row_id"].nunique().to_dict() == {"train": 10, "validation": 4}
    again = hub_data.quirky_hub_dataset("addition", source=str(parquet_dir), n_train=10, n_validation=4, seed=5)
    pd.testing.assert_frame_equal(small, again)
    # records need not come in consecutive Alice/Bob pairs
    shuffled = raw.sample(frac=1.0, random_state=0)
    pairs = hub_data.base_rows(shuffled).sort_values(["op1", "op2", "result"]).reset_index(drop=True)
    ordered = hub_data.base_rows(raw).sort_values(["op1", "op2", "result"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(pairs, ordered)
    assert len(ordered) == sum(SPLITS.values())
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"addition": [["Sum check.", "{op1} and {op2} make {result}."]]}))
    custom = hub_data.quirky_hub_dataset("addition", source=str(parquet_dir), n_train=4, n_validation=4, templates=str(path))
    assert (custom["context"] == "Sum check.").all() and custom["statement"].str.contains(" make ").all()
    with pytest.raises(ValueError, match=r"use fields \['city'\] that the raw data lacks"):
        hub_data.quirky_hub_dataset("addition", source=str(parquet_dir), templates={"addition": [["", "{city}"]]})
    with pytest.raises(ValueError, match="name='bogus' is not accepted"):
        hub_data.quirky_hub_dataset("bogus", source=str(parquet_dir))
    assert hub_data.default_templates("nli") == hub_data.EXTRA_TEMPLATES["nli"] and len(hub_data.HUB_DATASETS) == 12


def test_missing_sources_fail_clearly(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    t0 = time.time()
    with pytest.raises(HubUnavailableError) as err:
        hub_data.quirky_hub_dataset("addition", source="madlib-tests/quirky_nothing_raw")
    assert time.time() - t0 < 20
    msg = str(err.value)
    assert "\n" not in msg and "hf download madlib-tests/quirky_nothing_raw --repo-type dataset --local-dir <dir>" in msg
    with pytest.raises(ValueError, match="holds no parquet files"):
        hub_data.quirky_hub_dataset("addition", source=str(tmp_path))
    with pytest.raises(ValueError, match="source='/no/such/dir' is not accepted"):
        hub_data.quirky_hub_dataset("addition", source="/no/such/dir")


def test_dataset_records_for_any_model():
    zoo_style = hub_data.dataset_records("squaring", source="zoo", model=object(), seed=2)
    pd.testing.assert_frame_equal(zoo_style, qdata.quirky_dataset("squaring", seed=2))
