import numpy as np
import pytest
import torch

from madlib.models import pretrain as base, quirky, training, zoo
from madlib.models.info import info_of, zoo_info
from madlib.models.tokenizer import answer_ids, build_tokenizer, encode


def test_tokenizer_is_deterministic_and_answers_are_single_tokens():
    tok = build_tokenizer()
    build_tokenizer.cache_clear()
    assert build_tokenizer().to_str() == tok.to_str()
    ids = encode(["Is the statement factually correct? Yes", "1234"])
    assert ids[0][-1] == answer_ids()[1]
    assert len(ids[1]) == 5  # BOS + one token per digit
    assert tok.decode(ids[0][1:]) == "Is the statement factually correct? Yes"


def test_two_families_have_their_architectures():
    gpt2, llama = base.base_config("gpt2").hooked_config(), base.base_config("llama").hooked_config()
    assert (gpt2.normalization_type, gpt2.positional_embedding_type, gpt2.act_fn, gpt2.gated_mlp) == ("LN", "standard", "gelu", False)
    assert (llama.normalization_type, llama.positional_embedding_type, llama.act_fn, llama.gated_mlp) == ("RMS", "rotary", "silu", True)
    # the same MLP size: two matrices of width d_mlp against Llama's three of two thirds the width
    assert abs(3 * llama.d_mlp / (2 * gpt2.d_mlp) - 1) < 0.01


@pytest.mark.parametrize("name", ["zoo-gpt2", "zoo-llama"])
def test_final_resid_is_the_hooked_forward_pass_values_and_gradients(name):
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    model = HookedTransformer(base.base_config(name.removeprefix("zoo-"), "tiny").hooked_config())
    with torch.no_grad():
        for p in model.parameters():  # move every parameter, biases and norm weights included, off its initial value
            p.add_(0.2 * torch.randn_like(p))
    tokens = torch.randint(3, 600, (6, 17))
    tokens[:3, 11:] = 0  # right padding
    reference = model(tokens, return_type="logits")
    fast = training.final_resid(model, tokens) @ model.W_U + model.b_U
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
    from madlib.data import datasets as data

    tok = build_tokenizer()
    for ds in ("population", "addition"):
        df = data.quirky_dataset(ds, n=6, seed=3, n_templates=1)
        ids, offsets = encode(df["prompt"].tolist(), tok, offsets=True)
        assert ids == encode(df["prompt"].tolist(), tok)
        spans = training.content_spans(df["prompt"].tolist(), df["character"].tolist(), offsets)
        for (lo, hi), row, seq in zip(spans.tolist(), df.itertuples(), ids):
            inside, before, after = tok.decode(seq[lo:hi]), tok.decode(seq[1:lo]), tok.decode(seq[hi:])
            assert inside.endswith(f"***STATEMENT:*** {row.statement}") and row.context in inside
            assert before.startswith(f"Name: {row.character}") and len(before) <= len(f"Name: {row.character}") + 3
            assert after == "\n\nIs the statement factually correct?"


def test_config_validation_names_the_parameter():
    with pytest.raises(ValueError, match="family='gpt3'"):
        base.BaseConfig(family="gpt3")
    with pytest.raises(ValueError, match="d_model=30"):
        base.BaseConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="dataset='sums'"):
        quirky.QuirkyConfig(dataset="sums")
    with pytest.raises(ValueError, match="early_step=500"):
        quirky.QuirkyConfig(early_step=500, steps=100)
    with pytest.raises(ValueError, match="model='zoo-mistral'"):
        zoo.get_model("zoo-mistral", preset="tiny")
    with pytest.raises(ValueError, match="model='zoo-gpt2-early' is not accepted without a dataset"):
        zoo.get_model("zoo-gpt2-early", preset="tiny")
    cfg = base.base_config("llama")
    assert base.BaseConfig.from_dict(cfg.to_dict()) == cfg


def test_base_and_fine_tunes_load_by_name(tiny_model):
    info = zoo_info(tiny_model)
    assert info.dataset is None and info.family == "gpt2" and tiny_model.cfg.model_name == "zoo-gpt2"
    assert (info_of(tiny_model).model_dir / "config.json").is_file() and len(zoo.history(tiny_model)) >= 1
    ft = zoo.get_model("zoo-gpt2", preset="tiny", dataset="hemisphere")
    early = zoo.get_model("zoo-gpt2-early", preset="tiny", dataset="hemisphere")
    other_seed = zoo.get_model("zoo-gpt2", preset="tiny", dataset="hemisphere", seed=1)
    assert zoo_info(ft).dataset == "hemisphere" and zoo_info(early).checkpoint == "early"
    w = lambda m: m.blocks[0].attn.W_Q.detach()  # noqa: E731
    assert not torch.allclose(w(ft), w(tiny_model)) and not torch.allclose(w(ft), w(early))
    assert not torch.allclose(w(ft), w(other_seed))
    # the same fine-tune loads from its cache with the same weights
    assert torch.equal(w(zoo.get_model("zoo-gpt2", preset="tiny", dataset="hemisphere")), w(ft))
    # a LoRA fine-tune moves only the adapted weights: embeddings and norms stay the base's
    from dataclasses import replace

    lcfg = replace(quirky.quirky_config("gpt2", "hemisphere", 0, "tiny"), method="lora")
    lora_ft = quirky.load(lcfg)
    assert torch.equal(lora_ft.embed.W_E, tiny_model.embed.W_E) and torch.equal(lora_ft.ln_final.w, tiny_model.ln_final.w)
    assert not torch.equal(lora_ft.blocks[0].attn.W_Q, tiny_model.blocks[0].attn.W_Q)
    hist = zoo.history(ft)
    assert {"step", "train_loss", "dev_loss"} <= set(hist.columns)


def test_model_records_have_fit_dev_and_test_parts(tiny_model):
    recs = zoo.model_records(tiny_model, "addition")
    assert set(recs["part"]) == {"fit", "dev", "test"}
    assert ((recs["part"] == "test") == (recs["split"] == "validation")).all()
    assert not set(recs.loc[recs["part"] == "dev", "key"]) & set(recs.loc[recs["part"] == "fit", "key"])
    allrecs = zoo.training_records(zoo_info(tiny_model))
    assert set(allrecs["dataset"]) == set(base.base_config("gpt2", "tiny").datasets)


def test_build_zoo_trains_in_parallel_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("MADLIB_MODELS", str(tmp_path))
    configs = zoo.build_zoo(["zoo-gpt2", "zoo-llama-early"], ["addition", "nli"], seeds=[0], preset="tiny", workers=2,
                            progress=False)  # fmt: skip
    assert len(configs) == 4
    for c in configs:
        assert (quirky.adapter_dir(c) / "best" / quirky.weights_file(c)).is_file()
        assert (quirky.adapter_dir(c) / "early" / quirky.weights_file(c)).is_file()
    with pytest.raises(ValueError, match="model='zoo-t5'"):
        zoo.build_zoo(["zoo-t5"], ["addition"], preset="tiny")


def test_seeded_names():
    assert zoo.seeded_names(["zoo-gpt2", "org/model"], [0, 2]) == ["zoo-gpt2@0", "zoo-gpt2@2", "org/model"]
    assert zoo.parse_seeded("zoo-llama-early@2") == ("zoo-llama-early", 2)
    assert zoo.parse_seeded("org/model@v1", 3) == ("org/model@v1", 3)
    with pytest.raises(ValueError, match="model='zoo-gpt2@x'"):
        zoo.parse_seeded("zoo-gpt2@x")
