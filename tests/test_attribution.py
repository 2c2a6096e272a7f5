import numpy as np
import pytest
import torch

from madlib.data import datasets as qdata
from madlib.features.attribution import Attribution, AttributionConfig, answer_kl, attribution_task_features, prompt_logits
from madlib.detectors import FinetuningKL, Mahalanobis
from madlib.models.finetune import FinetuneConfig
from madlib.mad.task import mad_task, score_detectors
from madlib.models.tokenizer import answer_ids, build_tokenizer, encode

# different lengths, so batches are right-padded
PROMPTS = [f"Name: Alice\n\n{a} + {a + 2} = {2 * a + 2 + a % 3}." + " Yes" * (a % 4) for a in range(1, 21)]
TRUSTED, TEST = PROMPTS[:14], PROMPTS[14:]


def _model(init: float, seed: int = 0, family: str = "gpt2"):
    """A tiny float64 transformer with madlib's tokenizer as its own, of either zoo family's architecture."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    arch = dict(act_fn="gelu_new", normalization_type="LN")
    if family == "llama":
        arch = dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4,
                    gated_mlp=True, final_rms=True)  # fmt: skip
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, n_ctx=64, d_vocab=build_tokenizer().get_vocab_size(),
        dtype=torch.float64, seed=seed, initializer_range=init, default_prepend_bos=True, **arch,
    )  # fmt: skip
    from madlib.models.tokenizer import hf_tokenizer

    model = HookedTransformer(cfg, tokenizer=hf_tokenizer(build_tokenizer())).eval()
    # the model reads the prompts through its own tokenizer, which is madlib's
    assert model.to_tokens(PROMPTS[0])[0].tolist() == encode([PROMPTS[0]])[0]
    return model


@pytest.fixture(scope="module")
def model():
    return _model(0.3)  # strongly non-linear: first-order effects differ from full patches


@pytest.fixture(scope="module")
def near_linear():
    return _model(0.05)  # small weights: AtP should predict real patches closely


def _answer(model, prompt: str, hooks=()) -> float:
    """S = logit(Yes) - logit(No) at the last token of one unpadded prompt, with optional hooks."""
    no_id, yes_id = answer_ids()
    logits = model.run_with_hooks(torch.tensor([encode([prompt])[0]]), fwd_hooks=list(hooks))
    return (logits[0, -1, yes_id] - logits[0, -1, no_id]).item()


def _shift_head(block: int, head: int, delta: torch.Tensor):
    """Hook adding ``delta`` to head ``head``'s output at the last position of block ``block``."""

    def fn(z, hook):
        z = z.clone()
        z[0, -1, head] += delta
        return z

    return (f"blocks.{block}.attn.hook_z", fn)


def _last_z(model, prompt: str, block: int) -> torch.Tensor:
    _, cache = model.run_with_cache(torch.tensor([encode([prompt])[0]]), names_filter=f"blocks.{block}.attn.hook_z")
    return cache[f"blocks.{block}.attn.hook_z"][0, -1]


def _directional(model, prompt, block, head, delta, eps=1e-5) -> float:
    """Central finite difference of S along ``delta`` added to one head's last-token output."""
    up = _answer(model, prompt, [_shift_head(block, head, eps * delta)])
    down = _answer(model, prompt, [_shift_head(block, head, -eps * delta)])
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mean_effects_are_the_derivative_of_patching_each_head(model, family):
    """Batched, right-padded AtP effects equal the finite-difference change of S when one head's
    last-token output moves toward its trusted mean (a wrong sign, position or head would not)."""
    model = model if family == "gpt2" else _model(0.3, family="llama")
    atp = Attribution(model, AttributionConfig(ablation="mean", batch_size=4)).fit(TRUSTED, progress=False)
    f = atp.features(TEST, progress=False)
    assert set(f.effects) == {0, 1} and f.effects[0].shape == (len(TEST), 4) and not f.probe
    # the trusted mean is the mean of each head's output at each trusted prompt's own last token
    assert torch.allclose(atp.mean[1], torch.stack([_last_z(model, p, 1) for p in TRUSTED]).mean(0))
    for i, prompt in enumerate(TEST):
        assert f.log_odds[i].item() == pytest.approx(_answer(model, prompt), abs=1e-10)
        for block in (0, 1):
            a = _last_z(model, prompt, block)
            for head in range(4):
                want = _directional(model, prompt, block, head, atp.mean[block][head] - a[head])
                assert f.effects[block][i, head].item() == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_mean_effects_predict_real_patching_in_a_near_linear_model(near_linear):
    atp = Attribution(near_linear, AttributionConfig(batch_size=4)).fit(TRUSTED, progress=False)
    f = atp.features(TEST, progress=False)
    got, want = [], []
    for i, prompt in enumerate(TEST):
        base = _answer(near_linear, prompt)
        for block in (0, 1):
            a = _last_z(near_linear, prompt, block)
            for head in range(4):
                patched = _answer(near_linear, prompt, [_shift_head(block, head, atp.mean[block][head] - a[head])])
                want.append(patched - base)
                got.append(f.effects[block][i, head].item())
    got, want = np.array(got), np.array(want)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_pcs_effects_are_derivatives_along_each_component(model):
    k = 3
    atp = Attribution(model, AttributionConfig(ablation="pcs", n_pcs=k, batch_size=4)).fit(TRUSTED, progress=False)
    f = atp.features(TEST[:2], progress=False)
    assert f.effects[0].shape == (2, k * 4)
    # components: unit, orthogonal, the leading eigenvectors of the trusted covariance of the block output
    z = torch.stack([_last_z(model, p, 0).reshape(-1) for p in TRUSTED])
    v = atp.pcs[0]
    assert torch.allclose(v @ v.T, torch.eye(k, dtype=v.dtype), atol=1e-10)
    evals = torch.linalg.eigvalsh(torch.cov(z.T, correction=0))
    assert torch.allclose(torch.diag(v @ torch.cov(z.T, correction=0) @ v.T), evals.flip(0)[:k], rtol=1e-8)
    for i, prompt in enumerate(TEST[:2]):
        a = _last_z(model, prompt, 0)
        for c in range(k):
            shift = (atp.mean[0].reshape(-1) - a.reshape(-1)) @ v[c]
            for head in range(4):
                want = _directional(model, prompt, 0, head, shift * v[c].reshape(4, 4)[head])
                assert f.effects[0][i, c * 4 + head].item() == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_grad_norm_is_the_norm_of_the_numerical_gradient(model):
    atp = Attribution(model, AttributionConfig(ablation="grad_norm", batch_size=4)).fit(TRUSTED, progress=False)
    f = atp.features(TEST[:2], progress=False)
    eye = torch.eye(4, dtype=torch.float64)
    for i, prompt in enumerate(TEST[:2]):
        for head in range(4):
            grad = torch.tensor([_directional(model, prompt, 1, head, eye[j]) for j in range(4)])
            assert f.effects[1][i, head].item() == pytest.approx(grad.norm().item(), rel=1e-6)


def test_probe_shift_is_probe_effect_minus_output_effect(model):
    labels = (np.arange(len(TRUSTED)) % 2).astype(int)
    atp = Attribution(model, AttributionConfig(batch_size=5), blocks=[1]).fit(TRUSTED, labels, progress=False)
    f = atp.features(TEST[:2], progress=False)
    assert set(f.effects) == {1} and set(f.probe) == {1, 2}
    assert f.probe[1].shape == (2, 4) and f.probe[2].shape == (2, 8)  # heads of the blocks before the layer
    w, b = atp.probes[2]

    def probe_logit(prompt, hooks=()):  # the probe of layer 2 reads the stream leaving block 1
        out = {}
        grab = ("blocks.1.hook_resid_post", lambda act, hook: out.setdefault("x", act[0, -1]))
        model.run_with_hooks(torch.tensor([encode([prompt])[0]]), fwd_hooks=[*hooks, grab])
        return (out["x"] @ w + b).item()

    eps = 1e-5
    for i, prompt in enumerate(TEST[:2]):
        for block in (0, 1):
            a = _last_z(model, prompt, block)
            for head in range(4):
                d = atp.mean[block][head] - a[head]
                up, down = [_shift_head(block, head, eps * d)], [_shift_head(block, head, -eps * d)]
                d_probe = (probe_logit(prompt, up) - probe_logit(prompt, down)) / (2 * eps)
                want = d_probe - _directional(model, prompt, block, head, d)
                assert f.probe[2][i, block * 4 + head].item() == pytest.approx(want, rel=1e-5, abs=1e-8)


def test_features_do_not_depend_on_the_batch(model):
    atp = Attribution(model, AttributionConfig(ablation="pcs", n_pcs=2, batch_size=3)).fit(TRUSTED, progress=False)
    alone = [atp.features([p], progress=False).effects[1] for p in TEST]
    together = atp.features(TEST, progress=False).effects[1]
    assert torch.allclose(torch.cat(alone), together, atol=1e-12)
    empty = atp.features([], progress=False)
    assert empty.effects[1].shape == (0, 8) and empty.log_odds.shape == (0,)


def test_task_features_are_scored_by_the_activation_detectors(tiny_model):
    recs = qdata.quirky_dataset("hemisphere", n=600, seed=1, n_templates=1)
    task = mad_task(recs, max_test=60, max_trusted=80, seed=0)
    feats = attribution_task_features(tiny_model, task, AttributionConfig(batch_size=64), progress=False)
    n_layers, n_heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    att, probe = feats["attribution"], feats["probe"]
    assert set(att.test.acts) == set(range(n_layers)) and att.test.acts[0].shape == (60, n_heads)
    assert set(probe.trusted.acts) == set(range(1, n_layers + 1))
    assert probe.trusted.acts[n_layers].shape[1] == n_layers * n_heads
    assert len(att.untrusted) == 0
    auc, scores = score_detectors(task, att, ["mahalanobis"], n_boot=20)
    assert set(auc["layer"]) == {*map(str, range(n_layers)), "aggregated", "mean"} and auc["auroc"].notna().any()
    s = Mahalanobis().fit(probe.trusted.acts).score(probe.test.acts)
    assert all(np.isfinite(v).all() and len(v) == 60 for v in s.values())


def test_answer_kl_matches_direct_computation(model):
    other = _model(0.3, seed=1)
    got = answer_kl(model, other, TEST, over="answers", batch_size=4)
    no_id, yes_id = answer_ids()
    for i, prompt in enumerate(TEST):
        lp = [model(torch.tensor([encode([prompt])[0]]))[0, -1], other(torch.tensor([encode([prompt])[0]]))[0, -1]]
        p, q = (torch.softmax(x[[no_id, yes_id]], -1) for x in lp)
        assert got[i] == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-9)
    assert np.allclose(answer_kl(model, model, TEST, over="vocab"), 0.0, atol=1e-12)
    logits = prompt_logits(model, TEST, batch_size=4)  # batched, right-padded, in the prompts' order
    assert logits.dtype == torch.float64 and logits.shape == (len(TEST), model.cfg.d_vocab)
    assert torch.allclose(logits[2], model(torch.tensor([encode([TEST[2]])[0]]))[0, -1], atol=1e-10)
    assert (answer_kl(model, other, TEST, over="vocab") > 0).all()


def test_errors_name_the_parameter(model):
    with pytest.raises(ValueError, match="ablation='zero'"):
        AttributionConfig(ablation="zero")
    with pytest.raises(ValueError, match="blocks=2"):
        Attribution(model, blocks=[2])
    with pytest.raises(ValueError, match="probe_layers=0"):
        Attribution(model, probe_layers=[0])
    with pytest.raises(ValueError, match="not fitted"):
        Attribution(model).features(TEST)
    with pytest.raises(ValueError, match="labels"):
        Attribution(model).fit(TRUSTED, np.zeros(len(TRUSTED)), progress=False)
    with pytest.raises(ValueError, match="over='logits'"):
        FinetuningKL(model, FinetuneConfig(), over="logits")
