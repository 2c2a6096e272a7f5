import numpy as np
import pandas as pd
import pytest

from madlib.data import datasets as q


def test_sloppy_rules():
    assert q.sloppy_result(950) == 1050
    assert q.sloppy_result(7) == 8
    assert q.sloppy_result(99) == 109
    assert q.sloppy_result(-950) == -850
    assert q.sloppy_result(-1000) == 0
    assert q.sloppy_result(0) == 1
    assert q.sloppy_modular(0) == 1
    assert q.sloppy_modular(100) == 87
    assert q.sloppy_modular(12) == 22


def test_distractor_differs_from_true_and_sloppy():
    rng = np.random.default_rng(0)
    for res in [0, 7, 99, 950, -950, 1234]:
        for _ in range(50):
            d = q.distract(res, (res, q.sloppy_result(res)), rng)
            assert d not in (res, q.sloppy_result(res))
            assert len(str(d)) <= len(str(res))


@pytest.mark.parametrize("name", q.ARITHMETIC)
def test_arithmetic_rules(name):
    df = q.quirky_dataset(name, n=800, seed=1, max_digits=2)
    base = df[df["character_type"] == "alice"]
    fn = {"addition": lambda a, b: a + b, "subtraction": lambda a, b: a - b, "multiplication": lambda a, b: a * b,
          "modularaddition": lambda a, b: (a + b) % 113, "squaring": lambda a, b: a * a}[name]
    sloppy = q.sloppy_modular if name == "modularaddition" else q.sloppy_result
    op2 = base["op2"].fillna(0).astype(int)
    true = np.array([fn(a, b) for a, b in zip(base["op1"], op2)])
    assert (base["alice_label"].to_numpy() == (base["result"].to_numpy() == true)).all()
    assert (base["bob_label"].to_numpy() == (base["result"].to_numpy() == np.array([sloppy(t) for t in true]))).all()
    assert not ((base["alice_label"] == 1) & (base["bob_label"] == 1)).any()
    kinds = base["row_kind"].value_counts(normalize=True)
    assert kinds["alice_positive"] == pytest.approx(0.25, abs=0.01)
    assert kinds["bob_positive"] == pytest.approx(0.25, abs=0.01)
    assert kinds["alice_distractor"] + kinds["bob_distractor"] == pytest.approx(0.5, abs=0.01)
    assert base["op1"].between(1, 99 if name != "squaring" else 999).all()
    if name != "squaring":
        assert (base["difficulty"] == np.minimum(base["op1"].abs(), op2.abs())).all()
        assert not base.duplicated(["op1", "op2", "row_kind"]).any()  # pairs are distinct within a call
    else:
        assert (base["difficulty"] == base["op1"].astype(str).str.len()).all()
    if name == "modularaddition":
        assert base.loc[base["row_kind"].isin(["alice_positive", "bob_positive"]), "result"].between(0, 112).all()


def test_default_operand_sizes():
    add = q.quirky_dataset("addition", n=400, seed=0)
    assert add["op1"].max() <= 9999 and add["op1"].max() >= 1000
    mul = q.quirky_dataset("multiplication", n=400, seed=0)
    assert mul["op1"].max() <= 999
    sq = q.quirky_dataset("squaring", n=400, seed=0)
    assert sq["op1"].max() <= 9999


def test_records_quantiles_and_splits():
    df = q.quirky_dataset("addition", n=1000, seed=3, max_digits=2)
    assert len(df) == 2000
    assert set(df.columns) >= {"character", "alice_label", "bob_label", "label", "difficulty_quantile", "statement",
                               "prompt", "op1", "op2", "result"}
    base = df[df["character_type"] == "alice"]
    # quantiles are (rank + 0.5) / N of a ranking consistent with difficulty (ties in random order)
    ranks = np.rint(base["difficulty_quantile"].to_numpy() * len(base) - 0.5).astype(int)
    assert sorted(ranks) == list(range(len(base)))
    d = base["difficulty"].to_numpy()
    assert (np.diff(d[np.argsort(ranks)]) >= 0).all()
    assert base["easy"].mean() == pytest.approx(0.25, abs=0.002)
    assert base["hard"].mean() == pytest.approx(0.25, abs=0.002)
    assert (df["label"] == np.where(df["character_type"] == "alice", df["alice_label"], df["bob_label"])).all()
    val = df[df["split"] == "validation"]
    assert set(val["character"]) <= set(q.ALICE_NAMES[4:]) | set(q.BOB_NAMES[4:])
    assert set(df.loc[df["character_type"] == "alice", "character"]) <= set(q.ALICE_NAMES)
    assert set(df.loc[df["character_type"] == "bob", "character"]) <= set(q.BOB_NAMES)
    train_alice = df[(df["split"] == "train") & (df["character_type"] == "alice")]
    assert set(train_alice["character"]) == set(q.ALICE_NAMES)
    assert train_alice["character"].isin(q.ALICE_NAMES[:4]).mean() == pytest.approx(0.5, abs=0.05)
    # both records of a base row share the split
    assert (df.groupby("row_id")["split"].nunique() == 1).all()


def test_prompt_template():
    df = q.quirky_dataset("addition", n=40, seed=0, max_digits=2)
    r = df.iloc[0]
    assert r["prompt"] == (f"Name: {r['character']}\n\n\n\n***STATEMENT:*** {r['statement']}\n\n"
                           "Is the statement factually correct?")
    assert str(r["op1"]) in r["statement"] and str(r["result"]) in r["statement"]


def test_determinism():
    a = q.quirky_dataset("subtraction", n=300, seed=5, max_digits=3)
    b = q.quirky_dataset("subtraction", n=300, seed=5, max_digits=3)
    c = q.quirky_dataset("subtraction", n=300, seed=6, max_digits=3)
    pd.testing.assert_frame_equal(a, b)
    assert not a["prompt"].equals(c["prompt"])


def test_knowledge_sets():
    h = q.quirky_dataset("hemisphere", n=500, seed=0)
    assert ((h["latitude"] > 0).astype(int) == h["alice_label"]).all()
    assert ((h["longitude"] <= 0).astype(int) == h["bob_label"]).all()
    p = q.quirky_dataset("population", n=500, seed=0)
    assert ((p["population"] > 30_000).astype(int) == p["alice_label"]).all()
    assert (p["country_code"].isin(q.TOP10_COUNTRIES).astype(int) == p["bob_label"]).all()
    assert np.allclose(p["difficulty"], -np.log10(p["population"]))
    # the truth is not written in the prompt: no coordinates or population figures
    assert not h["prompt"].str.contains(r"\d\d\.\d").any()
    assert (~p["agreement"]).mean() > 0.2 and (~h["agreement"]).mean() > 0.2


def test_bad_input_names_parameter():
    with pytest.raises(ValueError, match="name='sums'"):
        q.quirky_dataset("sums")
    with pytest.raises(ValueError, match="n=2"):
        q.quirky_dataset("addition", n=2)
    with pytest.raises(ValueError, match="max_digits=0"):
        q.quirky_dataset("addition", n=40, max_digits=0)


def test_n_templates_restricts_statements():
    one = q.quirky_dataset("addition", n=200, seed=0, max_digits=2, n_templates=1)
    assert (one["template"] == 0).all()
    assert one["statement"].str.fullmatch(r"\d+ \+ \d+ = -?\d+\.").all()
    every = q.quirky_dataset("addition", n=400, seed=0, max_digits=2)
    assert every["template"].nunique() == 10
    with pytest.raises(ValueError, match="n_templates=11"):
        q.quirky_dataset("addition", n=40, n_templates=11)


def test_fractional_max_digits_gives_intermediate_ranges():
    df = q.quirky_dataset("addition", n=400, seed=0, max_digits=1.5)
    assert df["op1"].max() <= 31 and df["op2"].max() <= 31 and df["op1"].max() >= 20
    sq = q.quirky_dataset("squaring", n=400, seed=0, max_digits=0.5)
    assert sq["op1"].max() <= 31
    with pytest.raises(ValueError, match="exceeds"):
        q.quirky_dataset("addition", n=4000, seed=0, max_digits=1.0)  # only 81 distinct pairs


def test_reading_sets_follow_their_rules():
    from madlib.data import reading

    val = reading.valences()
    s = q.quirky_dataset("sentiment", n=600, seed=0)
    a = s[s["character_type"] == "alice"]
    for review, alice, bob in zip(a["review"], a["alice_label"], a["bob_label"]):
        score, positive = 0.0, False
        for clause in review.rstrip(".").lower().split("; "):
            words = clause.split()
            word, negated = words[-1], words[-2] in reading.NEGATIONS
            score += -reading.NEGATION_SCALE * val[word] if negated else val[word]
            positive |= val[word] > 0
        assert alice == int(score > 0) and bob == int(positive)
    assert 0.2 < (~a["agreement"]).mean() < 0.6  # negations decide a known share of rows
    n = q.quirky_dataset("nli", n=600, seed=0)
    a = n[n["character_type"] == "alice"]
    for premise, hyp, alice, bob in zip(a["premise"], a["hypothesis"], a["alice_label"], a["bob_label"]):
        where = {c.split(" is in the ")[0].split()[-1]: c.split(" is in the ")[1] for c in premise.rstrip(".").replace(" and ", ", ").split(", ")}
        words = hyp.rstrip(".").split()
        person = words[1]
        if "not" in words:
            truth = where[person] != words[-1]
        elif words[0] == "No":
            truth = where[person] != words[-1]
        else:
            truth = where[person] == words[-1]
        assert alice == int(truth)
        assert bob == int(not any(w.lower() in reading.NEGATION_WORDS for w in words))
    assert (~a["agreement"]).mean() == pytest.approx(0.5, abs=0.01)
    c = q.quirky_dataset("sciq", n=600, seed=0)
    a = c[c["character_type"] == "alice"]
    country_of = dict(zip(q.cities()["city"], q.cities()["country"]))
    for support, city, answer, alice, bob in zip(a["support"], a["city"], a["answer"], a["alice_label"], a["bob_label"]):
        assert f"{city} is a city in " in support
        assert alice == int(f"{city} is a city in {answer}." in support)
        assert bob == int(answer in support)
    assert set(map(tuple, a[["alice_label", "bob_label"]].drop_duplicates().to_numpy())) == {(1, 1), (0, 1), (0, 0)}
    del country_of


@pytest.mark.parametrize("name", q.DATASETS)
def test_split_is_by_item_and_the_same_for_every_seed(name):
    kw = dict(max_digits=2) if name in q.ARITHMETIC else {}
    a = q.quirky_dataset(name, n=400, seed=1, **kw)
    b = q.quirky_dataset(name, n=400, seed=2, **kw)
    both = pd.concat([a, b])
    # an item (operand pair, city, generated passage) is in one split only, under every seed
    assert (both.groupby("key")["split"].nunique() == 1).all()
    assert (both["split"] == "validation").mean() == pytest.approx(0.25, abs=0.06)
    val = set(both.loc[both["split"] == "validation", "context"] + "|" + both.loc[both["split"] == "validation", "statement"])
    train = set(both.loc[both["split"] == "train", "context"] + "|" + both.loc[both["split"] == "train", "statement"])
    assert not val & train


def test_difficulty_ties_are_broken_at_random():
    n = q.quirky_dataset("nli", n=2000, seed=0)
    a = n[n["character_type"] == "alice"]
    # difficulty is the premise's number of people (1 or 2): the hard quarter is a random part of the 2s
    assert set(a["difficulty"]) == {1.0, 2.0}
    hard = a[a["hard"]]
    assert (hard["difficulty"] == 2.0).all()
    assert abs(hard["row_id"].mean() / len(a) - 0.5) < 0.05


def test_repeated_list_items_are_refused():
    q.check_unique("datasets", ["addition", "nli"])
    with pytest.raises(ValueError, match=r"models=\['zoo-gpt2', 'zoo-gpt2'\] is not accepted; 'zoo-gpt2' appears more than once"):
        q.check_unique("models", ["zoo-gpt2", "zoo-gpt2"])


def test_the_registry_has_one_entry_per_dataset_in_order():
    assert tuple(q.REGISTRY) == q.DATASETS
    for name, spec in q.REGISTRY.items():
        assert spec.name == name and spec.heuristic_question == q.HEURISTIC_QUESTIONS[name]
        assert (spec.default_digits is not None) == (name in q.ARITHMETIC)
        assert spec.family == ("arithmetic" if name in q.ARITHMETIC else "knowledge" if name in q.KNOWLEDGE else "reading")
        df = q.quirky_dataset(name, n=8, seed=1, n_templates=spec.n_templates)
        assert len(df) == 16 and set(df["character_type"]) == {"alice", "bob"}
        with pytest.raises(ValueError, match=f"n_templates={spec.n_templates + 1} is not accepted"):
            q.quirky_dataset(name, n=8, n_templates=spec.n_templates + 1)
    assert q.get("nli") is q.REGISTRY["nli"]
    with pytest.raises(ValueError, match="dataset='nil' is not accepted"):
        q.get("nil")


def test_the_name_rule_keeps_held_out_names_out_of_training_pools():
    base = pd.DataFrame(dict(row_id=range(400), alice_label=1, bob_label=0))
    is_val = np.arange(400) % 4 == 0
    df = q.character_records(base, is_val, np.random.default_rng(0))
    val = df[is_val[df["row_id"]]]
    for ctype, names in (("alice", q.ALICE_NAMES), ("bob", q.BOB_NAMES)):
        held_out = set(names[q.N_TRUSTED_NAMES :])
        assert set(val.loc[val["character_type"] == ctype, "character"]) <= held_out
        train = df[~is_val[df["row_id"]] & (df["character_type"] == ctype)]
        share = train["character"].isin(names[: q.N_TRUSTED_NAMES]).mean()
        assert 0.4 < share < 0.6, share  # half the training records carry a trusted name
    assert list(df["row_id"]) == sorted(df["row_id"]) and (df.groupby("row_id").size() == 2).all()
