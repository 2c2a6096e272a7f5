from functools import partial

import numpy as np
import pytest
import torch

from madlib.models import zoo
from madlib.detectors import SAEDiagMahalanobis, SAENewLatents, make_detector
from madlib.mad.metrics import auroc
from madlib.models.hooks import hook_layer
from madlib.features.sae import SAEConfig, cached_sae, collect_activations, encode_latents, explained_variance, load_saved_sae, reconstruction_metrics, sae_record, sample_texts, save_sae, token_counts, train_sae

CFG = SAEConfig(d_sae=64, k=4, training_tokens=256 * 150, batch_size=256, lr=1e-2, dead_feature_window=30)
HOOK = "blocks.1.hook_resid_pre"


def _planted(n=8000, d=16, m=32, s=2, atoms=None, seed=0, orthogonal=False):
    """Activations made of ``s`` of ``m`` unit dictionary atoms (orthonormal if ``orthogonal``) with
    positive coefficients."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(m, d, generator=torch.Generator().manual_seed(123))
    dictionary = torch.linalg.qr(dictionary.T)[0].T if orthogonal else dictionary / dictionary.norm(dim=1, keepdim=True)
    pool = torch.arange(m) if atoms is None else torch.as_tensor(atoms)
    idx = pool[torch.stack([torch.randperm(len(pool), generator=g)[:s] for _ in range(n)])]
    coef = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, s, generator=g) * 2 + 0.5)
    return coef @ dictionary + 0.01 * torch.randn(n, d, generator=g), dictionary


@pytest.fixture(scope="module")
def planted_sae():
    x, dictionary = _planted()
    return x, dictionary, train_sae(x, "planted", CFG, progress=False)


def test_train_sae_recovers_a_planted_dictionary(planted_sae):
    x, dictionary, sae = planted_sae
    assert explained_variance(sae, x) > 0.9
    l0 = (encode_latents(sae, x) != 0).sum(1)
    assert l0.max() <= CFG.k and (l0 == CFG.k).float().mean() > 0.99, "top-k: exactly k active latents"
    cos = torch.nn.functional.normalize(dictionary, dim=1) @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).T
    assert (cos.max(1).values > 0.9).float().mean() >= 0.8, "most planted atoms have a decoder row"
    again = train_sae(x, "planted", CFG, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sae.state_dict().items()), "deterministic for a seed"
    other = train_sae(x, "planted", SAEConfig(**{**CFG.__dict__, "seed": 1}), progress=False)
    assert not torch.equal(other.W_dec, sae.W_dec)


def test_explained_variance_matches_definition(planted_sae):
    x, _, sae = planted_sae
    x_hat = sae.decode(sae.encode(x)).detach().double()
    want = 1 - ((x.double() - x_hat) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum()
    assert explained_variance(sae, x, batch_size=999) == pytest.approx(want.item(), rel=1e-6)


def test_save_load_round_trip_is_readable_by_sae_lens(planted_sae, tmp_path):
    from sae_lens import SAE

    x, _, sae = planted_sae
    save_sae(sae, tmp_path / "sae", CFG)
    plain = SAE.load_from_disk(tmp_path / "sae")
    mine = load_saved_sae(tmp_path / "sae")
    for loaded in (plain, mine):
        assert type(loaded).__name__ == "TopKSAE" and loaded.cfg.k == CFG.k
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sae.state_dict().items())
        assert torch.equal(encode_latents(loaded, x[:100]), encode_latents(sae, x[:100]))
    assert sae_record(mine).config == CFG and sae_record(mine).seed == CFG.seed
    assert sae_record(mine).hook_name == "planted"


def test_collect_activations_every_real_token_but_bos(tiny_model):
    texts = ["Name: Alice", "Name: Bob\n\n***STATEMENT:*** 3 + 4 = 7.", "7"]
    acts = collect_activations(tiny_model, texts, HOOK, batch_size=2, progress=False)
    counts = token_counts(texts)
    assert acts.shape == (counts.sum(), tiny_model.cfg.d_model)
    start = 0
    for text, c in zip(texts, counts):
        _, cache = tiny_model.run_with_cache(torch.tensor([zoo_tokens(text)]), names_filter=HOOK)
        assert torch.allclose(acts[start : start + c], cache[HOOK][0, 1:], atol=1e-5)
        start += c
    assert torch.allclose(collect_activations(tiny_model, texts, HOOK, batch_size=3, progress=False), acts, atol=1e-5)


def test_hook_layer_names_the_block_of_a_hook():
    assert hook_layer("blocks.3.hook_resid_pre") == 3 and hook_layer("blocks.12.attn.hook_z") == 12
    assert hook_layer("hook_embed") is None and hook_layer("ln_final.hook_normalized") is None
    assert hook_layer("blocks.x.hook_resid_pre") is None


def zoo_tokens(text):
    from madlib.models.tokenizer import encode

    return encode([text])[0]


def _exact_sae(d):
    """A top-k SAE that reconstructs exactly: latents (relu(x), relu(-x)), k = d."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_reconstruction_metrics_known_answers(tiny_model):
    texts = zoo.model_records(tiny_model, "addition")["prompt"].head(12).tolist()
    d = tiny_model.cfg.d_model
    exact = reconstruction_metrics(tiny_model, _exact_sae(d), texts, HOOK, batch_size=5, progress=False)
    assert exact["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert exact["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert exact["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert exact["n_tokens"] == token_counts(texts).sum()
    zero = _exact_sae(d)
    with torch.no_grad():
        zero.W_dec.zero_()
    null = reconstruction_metrics(tiny_model, zero, texts, HOOK, batch_size=5, progress=False)
    assert null["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    assert null["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    # the ablation KL against a direct computation on one text
    toks = torch.tensor([zoo_tokens(texts[0])])
    clean = tiny_model(toks).log_softmax(-1)[0, 1:]

    def ablate(act, hook):
        act = act.clone()
        act[:, 1:] = 0
        return act

    abl = tiny_model.run_with_hooks(toks, fwd_hooks=[(HOOK, ablate)]).log_softmax(-1)[0, 1:]
    one = reconstruction_metrics(tiny_model, zero, texts[:1], HOOK, progress=False)
    assert one["kl_div_with_ablation"] == pytest.approx((clean.exp() * (clean - abl)).sum(-1).mean().item(), rel=1e-4)


def test_cached_sae_reuses_the_cache(tiny_model):
    texts = zoo.model_records(tiny_model, "hemisphere")["prompt"].head(40).tolist()
    cfg = SAEConfig(d_sae=32, k=4, training_tokens=64 * 6, batch_size=64, lr=1e-3)
    a = cached_sae(tiny_model, HOOK, texts, cfg, "tiny-sae", progress=False)
    mtime = (sae_record(a).path / "sae_weights.safetensors").stat().st_mtime_ns
    b = cached_sae(tiny_model, HOOK, texts, cfg, "tiny-sae", progress=False)
    assert sae_record(b).path == sae_record(a).path and (sae_record(b).path / "sae_weights.safetensors").stat().st_mtime_ns == mtime
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert sae_record(b).config == cfg and sae_record(b).n_tokens == token_counts(texts).sum()
    c = cached_sae(tiny_model, HOOK, texts, SAEConfig(**{**cfg.__dict__, "seed": 1}), "tiny-sae", progress=False)
    assert sae_record(c).path != sae_record(a).path


def test_sae_detectors_flag_planted_anomalies():
    # orthonormal atoms and k = s: no latent fires on trusted data unless its atom is there
    planted = partial(_planted, m=16, s=2, orthogonal=True)
    sae = train_sae(planted()[0], "planted", SAEConfig(**{**CFG.__dict__, "d_sae": 32, "k": 2}), progress=False)
    trusted = planted(n=2000, atoms=range(12), seed=1)[0]
    normal = planted(n=300, atoms=range(12), seed=2)[0]
    anomalous = planted(n=300, atoms=range(12, 16), seed=3)[0]
    y = np.r_[np.zeros(300), np.ones(300)]
    test = {1: torch.cat([normal, anomalous])}
    for det in (make_detector("sae_diag_mahalanobis", saes={1: sae}), SAENewLatents(factory=lambda layer, x: sae)):
        s = det.fit({1: trusted}).score(test)[1]
        assert s.shape == (600,) and auroc(y, s) > 0.95, det.name
    # the diag-Mahalanobis score against a direct computation
    det = SAEDiagMahalanobis(saes={1: sae}, eps=1e-3).fit({1: trusted})
    z, zt = encode_latents(sae, test[1]).double().numpy(), encode_latents(sae, trusted).double().numpy()
    var = zt.var(0)
    want = (((z - zt.mean(0)) ** 2) / (var + 1e-3 * var.mean())).mean(1)
    assert np.allclose(det.score(test)[1], want)
    new = SAENewLatents(saes={1: sae}).fit({1: trusted}).score({1: trusted})[1]
    assert (new == 0).all(), "no trusted example has a latent unseen on trusted data"


def test_sae_detector_trains_its_own_sae_without_one():
    trusted, _ = _planted(n=600, atoms=range(24), seed=1)
    cfg = SAEConfig(d_sae=32, k=2, training_tokens=128 * 20, batch_size=128, lr=1e-2)
    det = SAEDiagMahalanobis(cfg=cfg).fit({0: trusted})
    assert det.saes[0].cfg.d_sae == 32 and np.isfinite(det.score({0: trusted[:10]})[0]).all()
    with pytest.raises(ValueError, match="layer=5"):
        det.score({5: trusted})


def test_bad_inputs_are_named(tiny_model):
    for kwargs, match in [(dict(k=0), "k=0"), (dict(k=600), "k=600"), (dict(lr=0), "lr=0"),
                          (dict(training_tokens=100, batch_size=200), "training_tokens=100"),
                          (dict(normalize_activations="l2"), "normalize_activations"),
                          (dict(training_tokens=100, batch_size=50, lr_decay_steps=2), "lr_decay_steps")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            SAEConfig(**kwargs)
    with pytest.raises(ValueError, match="hook_name"):
        collect_activations(tiny_model, ["a"], "blocks.9.hook_resid_pre", progress=False)
    with pytest.raises(ValueError, match="acts of shape"):
        train_sae(torch.zeros(10, 4), "h", CFG, progress=False)
    with pytest.raises(ValueError, match="name="):
        cached_sae(tiny_model, HOOK, ["a"], CFG, "a/b", progress=False)


def test_sample_texts_holds_just_enough_tokens():
    texts = [f"Name: Sam\n\nline {i} " + "word " * (i % 7) for i in range(300)]
    counts = dict(zip(texts, token_counts(texts)))
    picked = sample_texts(texts, 500, seed=1)
    total = sum(counts[t] for t in picked)
    assert total >= 500 and total - max(counts[t] for t in picked) < 500, "no more texts than reach 500 rows"
    assert picked == [t for t in texts if t in set(picked)], "the given order is kept"
    assert sample_texts(texts, 500, seed=1) == picked and sample_texts(texts, 500, seed=2) != picked
    assert sample_texts(texts, 10**9) == texts
    with pytest.raises(ValueError, match="n_tokens=0"):
        sample_texts(texts, 0)
