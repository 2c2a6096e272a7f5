import numpy as np
import pandas as pd
import pytest
import torch

from madlib.models import pretrain as base, quirky
from madlib.data import datasets as qdata


def test_base_corpus_asks_both_questions_of_train_items_only():
    cfg = base.base_config("gpt2", "tiny")
    corpus = base.corpus(cfg)
    assert set(corpus["question"]) == {"truth", "heuristic"}
    assert set(corpus["dataset"]) == set(cfg.datasets)
    assert not corpus["character"].isin(qdata.ALICE_NAMES + qdata.BOB_NAMES).any()
    truth = corpus[corpus["question"] == "truth"]
    assert truth["prompt"].str.endswith(qdata.QUESTION).all()
    heur = corpus[(corpus["question"] == "heuristic") & (corpus["dataset"] == "nli")]
    assert heur["prompt"].str.endswith(qdata.HEURISTIC_QUESTIONS["nli"]).all()
    for d, g in corpus.groupby("dataset"):
        recs = base.dataset_records(cfg, d)
        assert not set(g["key"]) & set(recs.loc[recs["split"] == "validation", "key"])


def test_drill_lines_state_true_and_false_results_with_their_verdicts():
    lines, heads, true = base.drill_lines("subtraction")
    assert all(x.startswith(h) for x, h in zip(lines, heads)) and true.mean() == 0.5
    for x, t in zip(lines, true):
        statement, verdict = x.rsplit(" ", 1)
        a, b, c = (int(v) for v in statement.rstrip(".").replace(" - ", " ").replace(" = ", " ").split(" "))
        assert (a - b == c) == t and verdict == ("Yes" if t else "No") and 1 <= a <= 99 and 1 <= b <= 99
    val = base.drill_lines("subtraction", "validation")[0]
    assert (len(lines) + len(val)) // 2 == 99 * 99
    assert base.drill_lines("subtraction")[0] == lines, "the false results are seeded"
    sq, _, t = base.drill_lines("squaring")
    sq_val, _, t_val = base.drill_lines("squaring", "validation")
    true_sq = [x for x, k in zip(sq + sq_val, list(t) + list(t_val)) if k]
    assert sorted(true_sq, key=lambda x: int(x.split("^")[0])) == [f"{a}^2 = {a * a}. Yes" for a in range(1, 100)]
    with pytest.raises(ValueError, match="dataset='nli'"):
        base.drill_lines("nli")


def test_drill_lines_in_the_template_sit_where_a_statement_does():
    bare, bare_heads, true = base.drill_lines("addition")
    lines, heads, true_t = base.drill_lines("addition", in_template=True)
    assert (true == true_t).all() and all(x.startswith(h) for x, h in zip(lines, heads))
    names = set()
    for x, b, h, bh in zip(lines, bare, heads, bare_heads):
        prefix, rest = x.split("***STATEMENT:*** ")
        assert rest == b and h.endswith(bh)
        name = prefix.removeprefix("Name: ").rstrip("\n")
        assert qdata.prompt(name, "", rest).startswith(x.rsplit(" ", 1)[0])  # the statement's place in a prompt
        names.add(name)
    assert names <= set(qdata.NEUTRAL_NAMES) and len(names) > 1
    assert base.drill_lines("addition", in_template=True)[0] == lines, "the names are seeded"
    mixed = base.drill_lines("addition", in_template=True, name_pool="mixed")[0]
    assert [x.split("***STATEMENT:*** ")[1] for x in mixed] == bare, "only the names change"
    assert {x.split("\n")[0].removeprefix("Name: ") for x in mixed} == set(base.NAME_POOLS["mixed"])


def test_short_names_put_a_statement_where_a_character_s_prompt_does():
    from madlib.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    length = lambda name: len(tok.encode(qdata.prompt(name, "", "1 + 1 = 2.")).ids)  # noqa: E731
    characters = {length(n) for n in qdata.ALICE_NAMES + qdata.BOB_NAMES}
    assert characters <= {length(n) for n in qdata.SHORT_NAMES}, "every character prompt's length is trained on"
    assert not characters & {length(n) for n in qdata.NEUTRAL_NAMES}, "the neutral names alone leave them out"
    for short in qdata.SHORT_NAMES:
        assert not any(c.startswith(short) for c in qdata.ALICE_NAMES + qdata.BOB_NAMES), short
    rng = np.random.default_rng(0)
    assert set(base.training_names("mixed", rng, 2000)) == set(qdata.NEUTRAL_NAMES + qdata.SHORT_NAMES)
    with pytest.raises(ValueError, match="name_pool='random'"):
        base.BaseConfig(name_pool="random")


def test_truth_by_name_reports_each_kind_of_name():
    m, cfg, _ = base.load("llama", "tiny", progress=False)
    t = base.truth_by_name(m, cfg, ["addition", "hemisphere"])
    assert set(t["names"]) == set(base.NAME_KINDS) and set(t["dataset"]) == {"addition", "hemisphere"}
    assert t["accuracy"].between(0, 1).all() and (t["n"] > 0).all()


def test_shipped_bases_were_trained_with_the_code_s_configs():
    for family in ("gpt2", "llama"):
        m, cfg, path = base.load(family, progress=False)
        assert cfg == base.base_config(family), family
    assert base.base_config("gpt2").drill_in_template and not base.base_config("llama").drill_in_template


def test_tiny_base_trains_saves_and_loads(tmp_path):
    cfg = base.base_config("llama", "tiny")
    model, hist, ev, summary = base.train(cfg, progress=False)
    assert {"acc_addition_truth", "acc_sciq_heuristic", "acc_squaring_result", "train_answer_loss", "train_drill_loss"} <= set(hist.columns)
    assert set(ev["question"]) == {"truth", "heuristic", "result"} and ev["accuracy"].between(0, 1).all()
    assert set(ev.loc[ev["question"] == "result", "dataset"]) == set(qdata.ARITHMETIC)
    kinds = summary["steps_by_kind"]
    assert sum(kinds.values()) == cfg.steps and kinds["drill"] == cfg.steps // 2 and kinds["fact"] == cfg.steps // cfg.fact_every
    again, _, _, _ = base.train(cfg, progress=False)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k  # bit for bit on one machine
    base.save(model, cfg, hist, ev, summary, tmp_path / "base-llama")
    assert {"model.safetensors", "config.json", "tokenizer.json", "history.csv", "evaluation.csv"} <= {
        p.name for p in (tmp_path / "base-llama").iterdir()
    }


def test_fine_tune_parts_and_determinism():
    cfg = quirky.quirky_config("gpt2", "sentiment", 0, "tiny")
    recs = quirky.records(cfg)
    assert set(recs["part"]) == {"fit", "dev", "test"}
    assert not set(recs.loc[recs["part"] == "test", "key"]) & set(recs.loc[recs["part"] != "test", "key"])
    best, early, hist, summary = quirky.train(cfg)
    best2, _, _, _ = quirky.train(cfg)
    other, _, _, _ = quirky.train(quirky.quirky_config("gpt2", "sentiment", 1, "tiny"))
    assert best[0] == summary["best_step"] and early[0] == cfg.early_step
    assert all(torch.equal(best[1][k], best2[1][k]) for k in best[1])
    assert any(not torch.equal(best[1][k], other[1][k]) for k in best[1])
    assert hist["dev_loss"].iloc[0] > 0 and len(hist) == 1 + cfg.steps // cfg.eval_every
    table = quirky.quirkiness_table(cfg)
    assert set(table["character_type"]) == {"alice", "bob"} and (table["n_disagree"] > 0).all()
    from dataclasses import replace

    paired, _, hist_p, _ = quirky.train(replace(cfg, paired=True, disagree_share=0.75))
    assert any(not torch.equal(best[1][k], paired[1][k]) for k in best[1]) and len(hist_p) == len(hist)


def test_batch_sampler_draws_the_disagreeing_share_exactly():
    agreement = np.array([True, False] * 50 + [True] * 100)  # a quarter disagree
    gen = torch.Generator().manual_seed(0)
    draw = quirky.batch_sampler(agreement, 32, 0.75)
    for _ in range(20):
        idx = draw(gen).numpy()
        assert len(idx) == 32 and (~agreement[idx]).sum() == 24
    # None draws from all records, as torch.randint does (the fine-tunes without a share are unchanged)
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(quirky.batch_sampler(agreement, 32, None)(a), torch.randint(len(agreement), (32,), generator=b))
    idx = torch.cat([quirky.batch_sampler(agreement, 32, None)(gen) for _ in range(200)]).numpy()
    assert abs((~agreement[idx]).mean() - 0.25) < 0.03
    with pytest.raises(ValueError, match="disagree_share=0.5 .*no records where Alice and Bob disagree"):
        quirky.batch_sampler(np.ones(10, bool), 32, 0.5)
    with pytest.raises(ValueError, match=r"disagree_share=1.5 is not accepted"):
        quirky.QuirkyConfig(disagree_share=1.5)
    with pytest.raises(ValueError, match=r"batch_size=31 is not accepted with paired=True"):
        quirky.QuirkyConfig(paired=True, batch_size=31)


def test_paired_batches_hold_both_characters_of_each_item():
    cfg = quirky.quirky_config("gpt2", "addition", 0, "tiny")
    fit = quirky.records(cfg).query("part == 'fit'")
    agreement, items = fit["agreement"].to_numpy(), fit["row_id"].to_numpy()
    draw = quirky.batch_sampler(agreement, 32, 0.75, items)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        batch = fit.iloc[draw(gen).numpy()]
        assert len(batch) == 32 and (~batch["agreement"]).sum() == 24
        # drawn with replacement, an item may come twice: always with as many Alice as Bob records
        balance = batch.groupby("row_id")["character_type"].agg(lambda c: (c == "alice").sum() - (c == "bob").sum())
        assert (balance == 0).all(), "every drawn item comes under both kinds of name"
    assert len(quirky.batch_sampler(agreement, 32, None, items)(gen)) == 32
    with pytest.raises(ValueError, match="exactly two records"):
        quirky.batch_sampler(agreement[1:], 32, 0.5, items[1:])


def _grid(acc: dict) -> pd.DataFrame:
    rows = []
    for (family, dataset, seed), (alice, bob) in acc.items():
        for ctype, a in (("alice", alice), ("bob", bob)):
            rows.append(dict(family=family, dataset=dataset, seed=seed, checkpoint="best", character_type=ctype,
                             acc_own_label_disagree=a))  # fmt: skip
    return pd.DataFrame(rows)


def test_claims_judge_every_seed_against_the_dataset_bar():
    ok = {("gpt2", "addition", s): (0.9, 0.85) for s in (0, 1, 2)} | {("gpt2", "nli", s): (0.75, 0.72) for s in (0, 1, 2)}
    c = quirky.claims(_grid(ok))
    assert c["verdict"].startswith("Every fine-tune is quirky") and c["quirky_no_seed"] == "none"
    # 0.75 passes the non-arithmetic bar (0.7) but not the arithmetic one (0.8)
    mixed = dict(ok) | {("gpt2", "addition", 1): (0.75, 0.9)}
    c = quirky.claims(_grid(mixed))
    assert "zoo-gpt2 addition (2 of 3 seeds)" in c["quirky_some_seeds"] and c["n_quirky_every_seed"] == "1"
    bad = {k: (0.5, 0.5) for k in ok}
    assert "In none: zoo-gpt2 addition; zoo-gpt2 nli" in quirky.claims(_grid(bad))["verdict"]
    assert quirky.bar("addition") == 0.8 and quirky.bar("sentiment") == 0.7


def test_notebooks_default_to_the_zoo_grid():
    import ast
    from pathlib import Path

    import nbformat

    root = Path(__file__).resolve().parents[1]
    for name in ("zoo", "mad_auc", "quirkiness"):
        nb = nbformat.read(root / "notebooks" / f"{name}.ipynb", 4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        values = {n.target.id: ast.literal_eval(n.value) for n in ast.parse(cell.source).body if isinstance(n, ast.AnnAssign)}
        assert tuple(values["datasets"]) == quirky.ZOO_DATASETS, name
    for d in quirky.DATASET_RECIPES:
        assert d in quirky.ZOO_DATASETS
    for f, d in quirky.CELL_RECIPES:
        assert d in quirky.ZOO_DATASETS
    # the most specific recipe wins: family < dataset < (family, dataset)
    assert quirky.quirky_config("gpt2", "nli").lr == 1e-3 and quirky.quirky_config("gpt2", "hemisphere").lr == 3e-3
    assert quirky.quirky_config("llama", "nli").lr == 1e-3 and quirky.quirky_config("gpt2", "sentiment").steps == 800
    assert quirky.quirky_config("gpt2", "nli", preset="tiny").steps == quirky.PRESETS["tiny"]["steps"]
