import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from madlib import zoo
from madlib.tokenizer import answer_ids, build_tokenizer, encode


def test_tokenizer_is_deterministic_and_answers_are_single_tokens():
    tok = build_tokenizer()
    build_tokenizer.cache_clear()
    assert build_tokenizer().to_str() == tok.to_str()
    ids = encode(["Is the statement factually correct? Yes", "1234"])
    assert ids[0][-1] == answer_ids()[1]
    assert len(ids[1]) == 5  # BOS + one token per digit
    assert tok.decode(ids[0][1:]) == "Is the statement factually correct? Yes"


def test_two_families_have_their_architectures():
    gpt2, llama = zoo.zoo_config("zoo-gpt2").hooked_config(), zoo.zoo_config("zoo-llama").hooked_config()
    assert (gpt2.normalization_type, gpt2.positional_embedding_type, gpt2.act_fn, gpt2.gated_mlp) == ("LN", "standard", "gelu", False)
    assert (llama.normalization_type, llama.positional_embedding_type, llama.act_fn, llama.gated_mlp) == ("RMS", "rotary", "silu", True)
    # the same MLP size: two matrices of width d_mlp against Llama's three of two thirds the width
    assert abs(3 * llama.d_mlp / (2 * gpt2.d_mlp) - 1) < 0.01


@pytest.mark.parametrize("name", ["zoo-gpt2", "zoo-llama"])
def test_final_resid_is_the_hooked_forward_pass_values_and_gradients(name):
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    model = HookedTransformer(zoo.zoo_config(name, "tiny").hooked_config())
    with torch.no_grad():
        for p in model.parameters():  # move every parameter, biases and norm weights included, off its initial value
            p.add_(0.2 * torch.randn_like(p))
    tokens = torch.randint(3, 600, (6, 17))
    tokens[:3, 11:] = 0  # right padding
    reference = model(tokens, return_type="logits")
    fast = zoo.final_resid(model, tokens) @ model.W_U + model.b_U
    assert torch.allclose(fast, reference, atol=1e-4), (fast - reference).abs().max()
    grads = []
    for logits in (reference, fast):
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits[:3, :10].flatten(0, 1), tokens[:3, 1:11].flatten()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-4), k


def test_content_spans_cover_context_and_statement_only():
    from madlib import data

    tok = build_tokenizer()
    for ds in ("population", "addition"):
        df = data.quirky_dataset(ds, n=6, seed=3, n_templates=1)
        ids, offsets = encode(df["prompt"].tolist(), tok, offsets=True)
        assert ids == encode(df["prompt"].tolist(), tok)
        spans = zoo.content_spans(df["prompt"].tolist(), df["character"].tolist(), offsets)
        for (lo, hi), row, seq in zip(spans.tolist(), df.itertuples(), ids):
            inside, before, after = tok.decode(seq[lo:hi]), tok.decode(seq[1:lo]), tok.decode(seq[hi:])
            assert inside.endswith(f"***STATEMENT:*** {row.statement}") and row.context in inside
            assert before.startswith(f"Name: {row.character}") and len(before) <= len(f"Name: {row.character}") + 3
            assert after == "\n\nIs the statement factually correct?"


def test_config_validation_names_the_parameter():
    with pytest.raises(ValueError, match="family='gpt3'"):
        zoo.ZooConfig(family="gpt3")
    with pytest.raises(ValueError, match="model='zoo-mistral'"):
        zoo.zoo_config("zoo-mistral")
    with pytest.raises(ValueError, match="d_model=30"):
        zoo.ZooConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match=r"dataset_weights=\(1.0, 2.0\) is not accepted; give one positive weight per dataset \(7\)"):
        zoo.ZooConfig(dataset_weights=(1.0, 2.0))
    cfg = zoo.zoo_config("zoo-llama")
    assert zoo.ZooConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cache_key_changes_with_config():
    cfg = zoo.zoo_config("zoo-gpt2", "tiny")
    assert zoo.cache_key(cfg) == zoo.cache_key(replace(cfg))
    assert zoo.cache_key(cfg) != zoo.cache_key(replace(cfg, steps=cfg.steps + 1))
    assert zoo.cache_key(cfg) != zoo.cache_key(replace(cfg, family="llama"))


def test_training_is_deterministic_and_keeps_best_checkpoint(tiny_model, tmp_path):
    cfg = zoo.zoo_config("zoo-gpt2", "tiny")
    model, history, summary = zoo.train(cfg, progress=False)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    ft = history[history["phase"] == "finetune"]
    assert summary["best_step"] == int(ft.loc[ft["val_answer_loss"].idxmin(), "step"])
    assert set(history["phase"]) == {"pretrain", "finetune"}


def test_saved_model_roundtrip(tiny_model):
    path = tiny_model.model_dir
    assert (path / "model.safetensors").is_file() and (path / "base.safetensors").is_file()
    meta = json.loads((path / "config.json").read_text())
    assert meta["zoo_config"] == zoo.zoo_config("zoo-gpt2", "tiny").to_dict()
    assert meta["seed"] == 0 and meta["cache_key"] == zoo.cache_key(zoo.zoo_config("zoo-gpt2", "tiny"))
    again = zoo.get_model("zoo-gpt2", preset="tiny")  # from the cache
    tokens = torch.tensor(encode(["Name: Bob\n\n\n\n***STATEMENT:*** 1 + 1 = 2.\n\nIs the statement factually correct?"]))
    assert torch.allclose(again(tokens), tiny_model(tokens))


def test_model_records_are_the_training_records(tiny_model):
    recs = zoo.model_records(tiny_model, "addition")
    train = zoo.training_records(tiny_model.zoo_config)
    assert recs["prompt"].tolist() == train.loc[train["dataset"] == "addition", "prompt"].tolist()


def test_early_variant_is_the_snapshot_of_the_same_run(tiny_model):
    cfg = tiny_model.zoo_config
    early = zoo.get_model("zoo-gpt2-early", preset="tiny")
    assert early.model_dir == tiny_model.model_dir / "early" and early.zoo_config == cfg
    assert zoo.model_info(early)["summary"]["best_step"] == cfg.snapshot_step
    hist = zoo.history(early)
    assert (hist.loc[hist["phase"] == "finetune", "step"] <= cfg.snapshot_step).all()
    assert len(hist[hist["phase"] == "pretrain"]) == len(zoo.history(tiny_model).query("phase == 'pretrain'"))
    assert not torch.equal(early.state_dict()["unembed.W_U"], tiny_model.state_dict()["unembed.W_U"])
    with pytest.raises(ValueError, match="snapshot_step=99"):
        replace(cfg, snapshot_step=99)


def test_build_zoo_trains_in_parallel_processes_and_loads_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("MADLIB_MODELS", str(tmp_path))
    models = zoo.build_zoo(["zoo-gpt2", "zoo-llama-early"], preset="tiny", workers=2, progress=False)
    assert set(models) == {"zoo-gpt2", "zoo-llama-early"}
    assert (tmp_path / f"zoo-llama-tiny-{zoo.cache_key(zoo.zoo_config('zoo-llama', 'tiny'))}" / "early").is_dir()
    # same weights as a training run in this process (one thread everywhere)
    model, _, _ = zoo.train(zoo.zoo_config("zoo-gpt2", "tiny"), progress=False)
    assert all(torch.equal(v, models["zoo-gpt2"].state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="models='zoo-t5'"):
        zoo.build_zoo(["zoo-t5"], preset="tiny")


def test_fit_records_add_generation_seeds_and_city_facts_but_never_a_validation_prompt():
    from madlib import data as qdata

    cfg = zoo.zoo_config("zoo-gpt2", "tiny")
    one = replace(cfg, train_sets=1, fact_rows=False)
    recs = zoo.training_records(cfg)
    base = zoo.fit_records(one, recs)
    val = recs[recs["split"] == "validation"]
    train = recs[recs["split"] == "train"]
    assert (base["split"] == "train").all() and len(base) == (~train["prompt"].isin(val["prompt"])).sum()
    fit = zoo.fit_records(cfg, recs)
    assert not set(fit["prompt"]) & set(val["prompt"])
    arith = fit[fit["dataset"] == "addition"]
    assert len(arith) > 1.9 * (base["dataset"] == "addition").sum()  # a second generation seed
    for d in qdata.KNOWLEDGE:
        val_cities = set(val.loc[val["dataset"] == d, "city"])
        fitted = fit[(fit["dataset"] == d) & fit["city"].isin(val_cities)]
        assert val_cities <= set(fitted["city"])
        first = {*qdata.ALICE_NAMES[:4], *qdata.BOB_NAMES[:4]}
        facts = fitted[fitted["row_id"].isin(val.loc[val["dataset"] == d, "row_id"]) & fitted["character"].isin(first)]
        assert len(facts) >= len(val[val["dataset"] == d])
        assert (facts["label"] == np.where(facts["character_type"] == "alice", facts["alice_label"], facts["bob_label"])).all()
    assert zoo.fit_records(cfg, recs).equals(fit)  # deterministic
