import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from madlib.models import lora
from madlib.models.training import final_resid


def _model(gated: bool) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=24, n_ctx=12, d_vocab=20, seed=0,
        act_fn="silu" if gated else "gelu", gated_mlp=gated, normalization_type="RMS" if gated else "LN",
        positional_embedding_type="rotary" if gated else "standard", rotary_dim=8 if gated else None,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


@pytest.mark.parametrize("gated", [False, True])
def test_adapter_starts_at_base_and_merges_exactly(gated):
    torch.manual_seed(0)
    tokens = torch.randint(20, (3, 10))
    model = _model(gated)
    before = model(tokens).detach()
    params = lora.attach(model, lora.LoraConfig(rank=4, alpha=8.0), seed=1)
    n_targets = 2 * (6 if gated else 5)  # Q, K, V, in, out (+ gate) per block
    assert len(params) == 2 * n_targets
    assert torch.allclose(model(tokens), before)  # B = 0: the adapted model is the base
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    adapted = model(tokens).detach()
    assert not torch.allclose(adapted, before, atol=1e-4)
    # the fused training forward sees the adapted weights too
    fused = final_resid(model, tokens) @ model.unembed.W_U + model.unembed.b_U
    assert torch.allclose(fused, adapted, atol=1e-4)
    # only the factors are trainable
    model(tokens).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    factors = lora.adapters(model)
    # merging the saved factors into a fresh base reproduces the adapted model
    fresh = _model(gated)
    lora.merge_factors(fresh, factors, lora.LoraConfig(rank=4, alpha=8.0))
    assert torch.allclose(fresh(tokens), adapted, atol=1e-5)
    lora.merge(model)
    assert torch.allclose(model(tokens), adapted, atol=1e-5)
    assert set(model.state_dict()) == set(fresh.state_dict())


def test_delta_is_a_low_rank_update_of_the_linear_map():
    model = _model(False)
    W = model.blocks[0].attn.W_Q.detach().clone()  # [head, d_model, d_head]
    params = lora.attach(model, lora.LoraConfig(rank=2, alpha=2.0, targets=("W_Q",)), seed=0)
    A, B = params[0], params[1]
    with torch.no_grad():
        B.normal_()
    delta = (model.blocks[0].attn.W_Q - W).detach()
    # as the [d_model, head * d_head] matrix of the query projection: exactly A @ B, rank 2
    matrix = delta.permute(1, 0, 2).reshape(16, -1)
    assert torch.allclose(matrix, (A @ B).detach(), atol=1e-6)
    assert torch.linalg.matrix_rank(matrix) == 2


def test_bad_config_names_parameter():
    with pytest.raises(ValueError, match="rank=0"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="targets="):
        lora.LoraConfig(targets=("W_X",))
