import pytest
import torch

from madlib.features.activations import extract, resolve_layers
from madlib.models.hooks import hook_name
from madlib.models.tokenizer import answer_ids, encode


def test_hook_names_and_layers():
    assert hook_name(0, 2) == "blocks.0.hook_resid_pre"
    assert hook_name(2, 2) == "blocks.1.hook_resid_post"
    assert resolve_layers("all", 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="layers=5"):
        resolve_layers([1, 5], 2)


def test_extraction_on_padded_batches_matches_single_prompts(tiny_model):
    prompts = ["Name: Bob\n\n\n\n***STATEMENT:*** 1 + 2 = 3.\n\nIs the statement factually correct?",
               "Name: Alice\n\nParis is in France.\n\n***STATEMENT:*** Paris is in the northern hemisphere.\n\nIs the statement factually correct?",
               "Name: Kara\n\n\n\n***STATEMENT:*** 12*3=36.\n\nIs the statement factually correct?"]
    layers = [0, 1, 2]
    batched = extract(tiny_model, prompts, layers, batch_size=3, progress=False)
    no, yes = answer_ids()
    for i, p in enumerate(prompts):
        toks = torch.tensor([encode([p])[0]])
        logits, cache = tiny_model.run_with_cache(toks)
        for layer in layers:
            want = cache[hook_name(layer, 2)][0, -1]
            assert torch.allclose(batched.acts[layer][i], want, atol=1e-5)
        assert batched.log_odds[i].item() == pytest.approx((logits[0, -1, yes] - logits[0, -1, no]).item(), abs=1e-4)
    # order is preserved whatever the batch size
    one = extract(tiny_model, prompts, layers, batch_size=1, progress=False)
    assert torch.allclose(one.acts[1], batched.acts[1], atol=1e-5)


def test_model_without_tokenizer_is_refused_with_a_clear_error():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    bare = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=16, d_head=4, n_heads=2, d_vocab=20, act_fn="relu"))
    with pytest.raises(ValueError, match="model=HookedTransformer is not accepted; it has no tokenizer"):
        extract(bare, ["x"], [0], progress=False)


def test_zoo_extraction_streams_to_disk_identically(tiny_model, tmp_path):
    prompts = [f"Name: Alice\n\n\n\n***STATEMENT:*** {a} + 1 = {a + 1}.\n\nIs the statement factually correct?" for a in range(7)]
    mem = extract(tiny_model, prompts, [1, 2], batch_size=3, progress=False)
    disk = extract(tiny_model, prompts, [1, 2], batch_size=3, progress=False, out_dir=tmp_path / "x")
    assert all(torch.equal(disk.acts[k], mem.acts[k]) for k in (1, 2)) and torch.equal(disk.log_odds, mem.log_odds)
    with pytest.raises(ValueError, match="batch_size=0 is not accepted"):
        extract(tiny_model, prompts, [1], batch_size=0, progress=False)


def test_last_token_logits_match_the_full_forward_pass_with_a_soft_cap(tiny_model, monkeypatch):
    from madlib.features.activations import last_token_logits

    toks = torch.tensor(encode(["Name: Bob\n\n1 + 2 = 4.", "Name: Alice\n\n1 + 2 = 3."]))
    for cap in (0.0, 2.0):
        monkeypatch.setattr(tiny_model.cfg, "output_logits_soft_cap", cap)
        with torch.no_grad():
            full = tiny_model(toks, return_type="logits")[:, -1]
            resid = tiny_model(toks, stop_at_layer=tiny_model.cfg.n_layers)[:, -1]
            assert torch.allclose(last_token_logits(tiny_model, resid), full, atol=1e-5)
    assert full.abs().max() <= 2.0
