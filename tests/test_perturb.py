import numpy as np
import pandas as pd
import pytest
import torch

from madlib.analyses import perturb
from madlib.plots import perturb as perturb_plots


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: a second intra-op thread only adds synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny transformers and a tiny sae-lens SAE with random weights


def tiny_transformer(family: str, seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common = dict(n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=40, n_ctx=24, seed=seed)
    if family == "gpt2":
        cfg = HookedTransformerConfig(
            **common, act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"
        )
    else:
        cfg = HookedTransformerConfig(
            **common,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            final_rms=True,
        )
    model = HookedTransformer(cfg)
    with torch.no_grad():  # larger weights than the default init, so curves are far from linear
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    return model.eval()


def tiny_sae(d_in: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0, w_dec: torch.Tensor | None = None):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    if w_dec is not None:
        with torch.no_grad():
            sae.W_dec.copy_(w_dec)
            sae.W_enc.copy_(w_dec.T)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in, generator=torch.Generator().manual_seed(seed + 1)))
    return sae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Max-slope step and plateau length on curves with known answers


def test_ms_step_known_answers():
    x = np.arange(101, dtype=float)
    jump = np.where(x < 37, 0.01 * x, 0.01 * x + 5.0)  # rise between points 36 and 37
    smooth = 10 / (1 + np.exp(-(x - 60) / 3))  # logistic: steepest between 60 and 61 (equal rises around 60.5)
    first = np.r_[0.0, 1.0, 1.0 + 0.1 * np.arange(1, 100)]  # steepest rise is the first
    flat = 0.019 * x  # every rise below the threshold
    ties = np.r_[np.zeros(20), np.ones(20), 2 * np.ones(61)]  # two equal jumps: the first wins
    got = perturb.ms_step(np.stack([jump, smooth, first, flat, ties]), threshold=0.02)
    assert got.tolist() == [37, 60, 0, 100, 20]
    assert perturb.ms_step(0.25 * x) == 0  # equal slopes above the threshold: the duplicated first one
    stopped = np.r_[jump[:50], np.full(51, np.nan)]  # a path that stopped at its target
    assert perturb.ms_step(stopped) == 37
    assert perturb.ms_step(np.r_[flat[:50], np.full(51, np.nan)]) == 49  # no rise: the last point reached


def test_plateau_length_known_answers():
    x = np.arange(101, dtype=float)
    curves = np.stack([0.5 * x, np.minimum(x, 3.0), np.r_[np.zeros(30), 20 * np.ones(71)]])
    assert perturb.plateau_length(curves, threshold=20.0).tolist() == [40, 100, 30]
    assert perturb.plateau_length(curves, threshold=0.0).tolist() == [0, 0, 0]


def test_ks_table_and_ordering():
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for t, mu in dict(real=40, random=70, baseline=60, structured=45, reconstruction=42).items():
        rows += [
            dict(model="m", target_type=t, mode="relative", metric="l2", ms_step=int(v), seed=0)
            for v in rng.normal(mu, 5, 300)
        ]
    ks = perturb.ks_table(pd.DataFrame(rows))
    k = ks.set_index("target_type")
    assert (
        np.isnan(k.loc["real", "ks"])
        and k.loc["random", "ks"] > 0.9
        and k.loc["structured", "ks"] < k.loc["baseline", "ks"]
    )
    plateaus = pd.DataFrame(
        [
            dict(start_type=t, plateau_length=v + d)
            for t, v in dict(real=15, random=8, baseline=6, structured=7, reconstruction=9).items()
            for d in (-1, 0, 1)
        ]
    )
    o = perturb.ordering(ks, plateaus)
    assert o["table"][["real_earliest", "random_latest", "structured_closer"]].all(axis=None)
    ms = pd.DataFrame(rows)
    tested = perturb.ordering(ks, plateaus, ms)["table"].iloc[0]
    assert tested["real_earliest"] and tested["random_latest"] and (tested["earliest"], tested["latest"]) == ("real", "random")
    # real earliest by a hair (0.2 steps, far inside the noise): the means say real, the test says tie
    close = ms.assign(ms_step=np.where(ms["target_type"] == "structured", ms["ms_step"] - 5 + 0.2, ms["ms_step"]))
    ks_close = perturb.ks_table(close)
    assert perturb.ordering(ks_close, plateaus)["table"].iloc[0]["real_earliest"]
    tie = perturb.ordering(ks_close, plateaus, close)["table"].iloc[0]
    assert not tie["real_earliest"] and tie["earliest"] == "tie" and tie["random_latest"]
    assert o["real_plateau_longest"] and o["mean_plateau"]["real"] == 15
    assert o["plateau_ks"].to_dict() == {t: 1.0 for t in ("baseline", "random", "reconstruction", "structured")}
    # both plateau rules are judged, and a tie for the longest is not "real longest"
    both = pd.concat([plateaus.assign(rule="relative"), plateaus.assign(rule="reference", plateau_length=100)])
    o = perturb.ordering(ks, both)
    assert o["real_plateau_longest"] and not o["real_plateau_longest_reference"]
    assert (o["mean_plateau_reference"] == 100).all() and o["mean_plateau"]["real"] == 15


# ---------------------------------------------------------------------------------------------
# Paths and targets


def test_paths_both_modes():
    g = torch.Generator().manual_seed(0)
    a, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    rel = perturb.make_paths(a, t, "relative", 100, 0.0)
    assert rel.shape == (4, 101, 8)
    torch.testing.assert_close(rel[:, 0], a)
    torch.testing.assert_close(rel[:, -1], t)
    torch.testing.assert_close(rel[:, 30], 0.7 * a + 0.3 * t)
    step = 0.05
    ab = perturb.make_paths(a, t, "absolute", 100, step)
    ok = ~torch.isnan(ab).any(-1)
    dist = (t - a).norm(dim=1)
    assert ok.sum(1).tolist() == [min(101, int(d / step) + 1) for d in dist]
    for i in range(4):
        p = ab[i, ok[i]]
        torch.testing.assert_close(torch.diff(p, dim=0).norm(dim=1), torch.full((len(p) - 1,), step), atol=1e-5, rtol=0)
        assert (p[-1] - a[i]).norm() <= dist[i] + 1e-5  # never past the target
    free = perturb.make_paths(a, t, "absolute", 100, 1.0, stop_at_target=False)
    assert not torch.isnan(free).any() and torch.allclose((free[:, -1] - a).norm(dim=1), torch.full((4,), 100.0))
    with pytest.raises(ValueError, match="mode='sideways'"):
        perturb.make_paths(a, t, "sideways", 100, step)


def test_gaussian_samples_match_moments_and_survive_rank_deficiency():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)
    acts = torch.randn(5000, 6, generator=g) @ mix + 3.0
    s = perturb.gaussian_samples(acts, 20000, g)
    torch.testing.assert_close(s.mean(0), acts.mean(0), atol=0.15, rtol=0)
    torch.testing.assert_close(
        torch.cov(s.T), torch.cov(acts.T), atol=0.05 * torch.cov(acts.T).abs().max().item(), rtol=0
    )
    flat = torch.cat([acts[:, :3], acts[:, :3]], 1)  # rank 3 in 6 dimensions
    assert torch.isfinite(perturb.gaussian_samples(flat, 10, g)).all()


def test_synthetic_baseline_keeps_sparsity_values_and_frequency_neighbours():
    sae = tiny_sae()
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(30, 16, generator=g) * 2
    freq = torch.linspace(0.01, 0.9, 64)  # distinct frequencies: neighbourhoods are unambiguous
    freq[5] = 0.0  # a dead latent is never used
    x, syn = perturb.synthetic_baseline(sae, acts, freq, n_neighbours=10, rng=np.random.default_rng(0))
    code = sae.encode(acts)
    assert ((syn > 0).sum(1) == (code > 0).sum(1)).all()  # same L0
    for r in range(len(acts)):
        assert sorted(syn[r][syn[r] > 0].tolist()) == pytest.approx(sorted(code[r][code[r] > 0].tolist()))
        assert syn[r, 5] == 0
        # each source latent's value went to one of its n_neighbours nearest live latents (plus those used before it)
        src = perturb._active(code[r].numpy())
        for rank, i in enumerate(src):
            j = int(torch.nonzero(syn[r] == code[r, i])[0])
            assert j != i
            gap = (freq - freq[i]).abs()
            gap[i], gap[5] = np.inf, np.inf
            assert int((gap < gap[j]).sum()) < 10 + rank
    torch.testing.assert_close(x, sae.decode(syn))


def mirror_dictionary(m: int = 32, d: int = 16, seed: int = 0) -> torch.Tensor:
    """2m unit directions: m random ones and their Householder reflections, so i -> i + m (mod 2m)
    preserves every pairwise cosine."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, d, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    v = torch.randn(d, generator=g)
    v = v / v.norm()
    reflect = torch.eye(d) - 2 * torch.outer(v, v)
    return torch.cat([w, w @ reflect])


def test_synthetic_structured_keeps_cosine_profile_exactly_when_possible():
    m = 32
    w = mirror_dictionary(m)
    sae = tiny_sae(d_sae=2 * m, w_dec=w)
    acts = torch.randn(25, 16, generator=torch.Generator().manual_seed(2)) * 2
    freq = torch.cat([torch.arange(1, m + 1), torch.arange(1, m + 1)]).float() / (
        m + 1
    )  # i and its mirror share a frequency
    x, syn, anchors = perturb.synthetic_structured(
        sae, acts, freq, n_candidates=1, anchor_cosine=0.42, rng=np.random.default_rng(0)
    )
    code = sae.encode(acts)
    w_unit = torch.as_tensor(perturb.unit_decoder(sae))
    cos = w_unit @ w_unit.T
    for r in range(len(acts)):
        src = perturb._active(code[r].numpy())
        top = src[0]
        assert anchors[r] == (top + m) % (2 * m)  # the only frequency neighbour of the top latent is its mirror
        assert (syn[r] > 0).sum() == len(src)
        for i in src:
            j = int(torch.nonzero(syn[r] == code[r, i])[0])
            assert abs(cos[anchors[r], j] - cos[top, i]) < 1e-5  # the cosine profile is reproduced
    torch.testing.assert_close(x, sae.decode(syn))


def test_structured_profile_closer_than_baseline_and_anchor_rule():
    sae = tiny_sae(d_sae=128, k=6, seed=3)
    acts = torch.randn(40, 16, generator=torch.Generator().manual_seed(3)) * 2
    freq = perturb.firing_frequency(sae, torch.randn(2000, 16, generator=torch.Generator().manual_seed(4)) * 2)
    rng = np.random.default_rng(0)
    _, base = perturb.synthetic_baseline(sae, acts, freq, 10, rng)
    _, struct, anchors = perturb.synthetic_structured(sae, acts, freq, 100, 0.42, rng)
    code = sae.encode(acts)
    w_unit = torch.as_tensor(perturb.unit_decoder(sae))
    cos = w_unit @ w_unit.T

    def profile_gap(syn, anchor_of):
        gaps = []
        for r in range(len(acts)):
            src = perturb._active(code[r].numpy())
            c = anchor_of(r, syn[r], src)
            for i in src[1:]:
                j = int(torch.nonzero(syn[r] == code[r, i])[0])
                gaps.append(abs(cos[c, j] - cos[src[0], i]).item())
        return np.mean(gaps)

    def mapped_top(r, s, src):  # the latent that received the top latent's value
        return int(torch.nonzero(s == code[r, src[0]])[0])

    assert profile_gap(struct, mapped_top) < 0.2 * profile_gap(base, mapped_top)
    distinct = torch.rand(128, generator=torch.Generator().manual_seed(5)) + 0.01  # every latent live, no ties
    _, _, anchors = perturb.synthetic_structured(sae, acts, distinct, 20, 0.42, rng)
    for r in range(
        len(acts)
    ):  # the anchor: of the 20 nearest in frequency, the cosine with the top latent closest to 0.42
        top = perturb._active(code[r].numpy())[0]
        gap = (distinct - distinct[top]).abs()
        gap[top] = np.inf
        cand = torch.argsort(gap)[:20]
        assert anchors[r] == cand[(cos[top, cand] - 0.42).abs().argmin()]


# ---------------------------------------------------------------------------------------------
# The batched engine equals running each perturbation alone


def run_alone(model, prefix, pts, hook_name):
    """One path: the whole prefix repeated once per point, no cache, the hook overwriting the last position."""
    read = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    tokens = torch.tensor(prefix)[None].repeat(len(pts), 1)
    store = {}

    def overwrite(act, hook):
        act[:, -1] = pts
        return act

    def grab(act, hook):
        store["r"] = act[:, -1]

    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, overwrite), (read, grab)])
    lp = logits[:, -1].log_softmax(-1)
    return (store["r"] - store["r"][0]).norm(dim=-1), (lp[0].exp() * (lp[0] - lp)).sum(-1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@torch.no_grad()
def test_batched_paths_equal_each_path_alone(family):
    model = tiny_transformer(family)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 40, size=n).tolist() for n in (2, 5, 5, 9, 13)]
    hook = "blocks.1.hook_resid_pre"
    acts = perturb.last_activations(model, prefixes, hook, batch_size=2)
    for p, a in zip(prefixes, acts):  # right-padded extraction equals one prefix at a time
        _, cache = model.run_with_cache(torch.tensor(p)[None], names_filter=hook)
        torch.testing.assert_close(a, cache[hook][0, -1])
    g = torch.Generator().manual_seed(0)
    base = np.array([0, 1, 2, 3, 4, 1, 3, 4])
    targets = acts[base] + 4 * torch.randn(len(base), 16, generator=g)
    pts = torch.cat(
        [
            perturb.make_paths(acts[base[:4]], targets[:4], "relative", 12, 0.0),
            perturb.make_paths(acts[base[4:]], targets[4:], "absolute", 12, 2.0),
        ]
    )
    assert torch.isnan(pts).any()  # some absolute paths stop at their target
    out = perturb.run_paths(model, prefixes, base, pts, hook, batch_size=7, progress=False)
    for p in range(len(base)):
        ok = ~torch.isnan(pts[p]).any(-1)
        l2, kl = run_alone(model, prefixes[base[p]], pts[p, ok], hook)
        np.testing.assert_allclose(out["l2"][p, ok.numpy()], l2.numpy(), atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(out["kl"][p, ok.numpy()], kl.numpy(), atol=2e-5, rtol=1e-4)
        assert np.isnan(out["l2"][p, ~ok.numpy()]).all()
    assert np.nanmax(out["l2"]) > 1.0 and np.nanmax(out["kl"]) > 0.01  # the perturbations do something


# ---------------------------------------------------------------------------------------------
# The experiment end to end, and bad input


def _zoo_entry(model):
    """The zoo entry of a zoo model (its typed record where the loaders attach one)."""
    try:
        from madlib.models.info import require_zoo
    except ImportError:
        return model.zoo_config
    return require_zoo(model)


def test_run_experiment_tiny(tiny_model):
    from madlib.models import zoo

    texts = zoo.training_records(_zoo_entry(tiny_model))["prompt"].tolist()[:400]
    sae = tiny_sae(d_in=tiny_model.cfg.d_model, d_sae=64, k=4)
    cfg = perturb.PerturbConfig(n_base=6, n_pool=60, n_steps=10, batch_size=64)
    res = perturb.run_experiment(tiny_model, sae, texts, cfg, model_name="zoo-gpt2-tiny", progress=False)
    assert set(res.ms.columns) >= {"model", "target_type", "mode", "metric", "ms_step", "seed"}
    assert len(res.ms) == 6 * len(perturb.TARGET_TYPES) * len(perturb.MODES) * len(perturb.METRICS)
    assert res.ms["ms_step"].between(0, 10).all()
    assert len(res.plateaus) == 2 * 6 * len(perturb.TARGET_TYPES) and res.plateaus["plateau_length"].between(0, 10).all()
    ref = res.plateaus[res.plateaus["rule"] == "reference"]
    assert len(ref) == 6 * len(perturb.TARGET_TYPES) and (ref["threshold"] == 20.0).all() and (ref["step_size"] == 0.5).all()
    # the reference walks take the same directions in steps of 0.5: their L2 at step j is the relative walks' at a shorter distance
    for t in perturb.TARGET_TYPES:
        c = res.curves[("plateau_reference", "absolute", t, "l2")]
        assert c.shape == (6, 11) and (c[:, 0] == 0).all()
        assert (perturb.plateau_length(c, 20.0) == ref.loc[ref["start_type"] == t, "plateau_length"].to_numpy()).all()
    for c in res.curves.values():  # step 0 of every path is its start
        assert (c[:, 0] == 0).all() and c.shape == (6, 11)
    assert res.info["step_size"] > 0 and res.info["plateau_threshold"] > 0
    real = res.built["targets"]["real"]
    assert ((real - res.built["base"]).norm(dim=1) > 0).all()
    # what the chapter tells of the run, and its statements (glued by notebooks/perturb.ipynb)
    from types import SimpleNamespace

    setup = perturb.setup_claims(res, SimpleNamespace(hook=cfg.hook_name, label="zoo-gpt2-tiny"), cfg)
    assert setup["n_base"] == 6 and setup["hook"] == "blocks.1.hook_resid_pre" and type(setup["live_latents"]) is int
    assert setup["explained_variance"] == res.info["explained_variance"] and setup["n_points"] == res.info["n_points"]
    claims = perturb.chapter_claims(res, perturb.ordering(res.ks, res.plateaus, res.ms))
    assert claims["n_held"].endswith(" of 4") and claims["reference_full"].endswith(" of 30")
    assert all(claims[k].endswith(".") for k in ("verdict_earliest", "verdict_latest", "verdict_structured", "verdict_plateau"))
    table = perturb.plateau_table(res.plateaus)
    assert list(table.index) == list(perturb.TARGET_TYPES) and set(table.columns.get_level_values(0)) == {"relative", "reference"}


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="hook_name='resid'"):
        perturb.PerturbConfig(hook_name="resid")
    with pytest.raises(ValueError, match="min_tokens=1"):
        perturb.PerturbConfig(min_tokens=1)
    with pytest.raises(ValueError, match="n_base=0"):
        perturb.PerturbConfig(n_base=0)
    with pytest.raises(ValueError, match="n=5"):
        perturb.sample_prefixes([[1, 2], [1, 2, 3]], 5, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="hook_name='hook_embed' is not accepted; give a hook inside a block"):
        perturb.last_activations(tiny_transformer("gpt2"), [[1, 2]], "hook_embed")


def test_perturb_figures_are_legible_at_the_column_width():
    from types import SimpleNamespace

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from madlib.plots.common import displayed_text_px

    rng = np.random.default_rng(0)
    ms = pd.DataFrame([dict(mode=m, metric=k, target_type=t, ms_step=int(rng.integers(0, 100)))
                       for m in perturb.MODES for k in perturb.METRICS for t in perturb.TARGET_TYPES for _ in range(30)])  # fmt: skip
    curves = {(kind, mode, t, k): np.cumsum(rng.uniform(size=(12, 40)), axis=1)
              for kind in ("perturb", "plateau") for mode in perturb.MODES for t in perturb.TARGET_TYPES for k in perturb.METRICS}  # fmt: skip
    plateaus = pd.DataFrame([dict(start_type=t, rule=r, plateau_length=int(rng.integers(1, 30)))
                             for t in perturb.TARGET_TYPES for r in ("relative", "absolute") for _ in range(12)])  # fmt: skip
    res = SimpleNamespace(curves=curves, plateaus=plateaus, info=dict(config=dict(ms_threshold=0.5), plateau_threshold=5.0))
    figs = [perturb_plots.cdf_figure(ms), perturb_plots.cdf_grid(ms), perturb_plots.example_curves(res), perturb_plots.ms_histograms(ms),
            perturb_plots.plateau_figure(res)]
    try:
        assert min(displayed_text_px(f) for f in figs) >= 9
    finally:
        plt.close("all")


def test_extreme_tells_a_tie_from_an_ordering():
    rng = np.random.default_rng(0)
    same = {"real": rng.normal(47.2, 10, 400), "random": rng.normal(47.3, 10, 400), "baseline": rng.normal(60, 10, 400)}
    e = perturb.extreme(same, lowest=True)
    assert {e["first"], e["second"]} == {"real", "random"} and not e["clear"]
    text = perturb.extreme_text(e, "earliest blow-ups")
    assert text.startswith("neither r") and "targets clearly give the earliest blow-ups" in text and text.endswith("no difference)")
    apart = {"real": rng.normal(30, 10, 400), "random": rng.normal(47, 10, 400)}
    e = perturb.extreme(apart, lowest=True)
    assert e["first"] == "real" and e["clear"] and e["p_value"] < 1e-6
    assert perturb.extreme_text(e, "earliest blow-ups").startswith("real targets give the earliest blow-ups (30")
    assert perturb.extreme(apart, lowest=False)["first"] == "random"
    with pytest.raises(ValueError, match="at least two"):
        perturb.extreme({"real": np.ones(3)})


def _result(shift: dict[str, float], plateau: dict[str, float], reference_longest: str, seed: int = 0):
    """A constructed PerturbResult: max-slope steps around ``shift[type]`` in every mode and metric,
    plateau lengths around ``plateau[type]`` (relative rule) and the longest under the reference rule."""
    from dataclasses import asdict

    rng = np.random.default_rng(seed)
    cfg = perturb.PerturbConfig(n_base=60, n_steps=40)
    ms = pd.DataFrame([dict(model="m", target_type=t, mode=m, metric=k, ms_step=int(np.clip(rng.normal(shift[t], 2), 0, 40)), perturbation=i, seed=0)
                       for m in perturb.MODES for k in perturb.METRICS for t in perturb.TARGET_TYPES for i in range(60)])  # fmt: skip
    plateaus = pd.DataFrame([dict(model="m", rule=r, start_type=t, perturbation=i, seed=0,
                                  plateau_length=int(np.clip(rng.normal(plateau[t], 2), 0, 40)) if r == "relative" else (40 if t == reference_longest else 10))
                             for r in ("relative", "reference") for t in perturb.TARGET_TYPES for i in range(60)])  # fmt: skip
    return perturb.PerturbResult({}, ms, plateaus, perturb.ks_table(ms), dict(config=asdict(cfg)), {})


def test_chapter_claims_hold_or_do_not():
    res = _result(dict(real=8, random=30, baseline=16, structured=12, reconstruction=9), dict(real=30, random=10, baseline=15, structured=20,
                  reconstruction=25), reference_longest="real")  # fmt: skip
    c = perturb.chapter_claims(res, perturb.ordering(res.ks, res.plateaus, res.ms))
    assert c["verdict_earliest"].startswith("Real targets give the earliest blow-ups") and c["verdict_earliest"].endswith(", as Giglemiani et al. report.")
    assert c["verdict_latest"].startswith("Random targets give the latest blow-ups") and c["verdict_latest"].endswith(", as Giglemiani et al. report.")
    assert c["verdict_structured"].startswith("Structured synthetic activations are closer to real ones") and c["verdict_structured"].endswith("as in Giglemiani et al.")
    assert c["n_held"] == "4 of 4" and c["ms_means"].startswith("real 7.4 ± 2.0, random 29.5 ± 2.0")
    assert c["verdict_plateau"].startswith("Real starting points give the longest plateaus") and c["verdict_plateau"].endswith("as Giglemiani et al. report.")
    assert c["verdict_plateau_reference"].startswith("Under the reference rule too") and c["reference_full"] == "60 of 300"
    res = _result(dict(real=30, random=8, baseline=12, structured=20, reconstruction=9), dict(real=10, random=30, baseline=15, structured=20,
                  reconstruction=25), reference_longest="random")  # fmt: skip
    c = perturb.chapter_claims(res, perturb.ordering(res.ks, res.plateaus, res.ms))
    assert c["verdict_earliest"].startswith("Random targets give the earliest") and c["verdict_earliest"].endswith(", unlike Giglemiani et al.")
    assert c["verdict_latest"].startswith("Real targets give the latest") and ", unlike Giglemiani et al." in c["verdict_latest"]
    assert "no closer to real ones" in c["verdict_structured"] and c["verdict_structured"].endswith("unlike in Giglemiani et al.")
    assert c["n_held"] == "0 of 4" and c["verdict_plateau"].endswith("unlike Giglemiani et al., who find real activations' longest.")
    assert c["verdict_plateau_reference"] == "Under the reference rule, real activations do not have the longest plateaus."
    tie = _result(dict(real=10, random=10, baseline=10, structured=10, reconstruction=10), dict(real=20, random=20, baseline=20, structured=20,
                  reconstruction=20), reference_longest="real")  # fmt: skip
    c = perturb.chapter_claims(tie, perturb.ordering(tie.ks, tie.plateaus, tie.ms))
    assert c["verdict_earliest"].startswith("Neither ") and c["verdict_earliest"].endswith("where Giglemiani et al. report real targets.")
    assert c["verdict_plateau"].endswith("where Giglemiani et al. find real activations' longest.")


def test_tokens_with_bos_and_the_unbatched_explained_variance(tiny_model):
    from types import SimpleNamespace

    from madlib.features.sae import explained_variance
    from madlib.models.tokenizer import encode

    texts = ["Name: Alice 1 + 2 = 3.", "Is it?"]
    assert perturb.tokens_with_bos(tiny_model, texts) == encode(texts)  # a zoo model: the zoo's tokenizer, BOS first
    hub_like = SimpleNamespace(to_tokens=lambda t, prepend_bos: torch.tensor([[50256 if prepend_bos else -1, len(t)]]))
    assert perturb.tokens_with_bos(hub_like, texts) == [[50256, 22], [50256, 6]]  # BOS whatever the model's default
    sae = tiny_sae(d_in=16, d_sae=64, k=4)
    acts = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    ev = perturb.explained_variance_unbatched(sae, acts)
    assert ev == explained_variance(sae, acts)  # on the CPU, one batch: the same number as madlib.features.sae's


def test_subject_loads_the_model_and_trains_or_loads_its_sae(monkeypatch):
    from types import SimpleNamespace

    from madlib.features import sae as msae
    from madlib.models import hub, zoo

    calls = {}
    model = SimpleNamespace(cfg=SimpleNamespace(device="cpu"), zoo_config="entry")
    monkeypatch.setattr(hub, "load_model", lambda spec, preset="default": model)
    monkeypatch.setattr(hub, "load_sae", lambda spec, sae_id, device=None: calls.setdefault("load_sae", (spec, sae_id, device)) and "SAE")
    monkeypatch.setattr(hub, "sae_hook_name", lambda sae: "blocks.5.hook_resid_pre")
    monkeypatch.setattr(zoo, "training_records", lambda entry: pd.DataFrame(dict(prompt=["a", "b", "a", "c", "d"])))
    monkeypatch.setattr(zoo, "get_model", lambda name, preset="default": model)
    monkeypatch.setattr(msae, "cached_sae", lambda m, hook, texts, cfg, name: calls.setdefault("sae", (hook, sorted(texts), cfg.d_sae, name)) and "trained")
    try:  # the typed model record, where the loaders attach one
        from madlib.models.info import ModelInfo, attach

        attach(model, ModelInfo(zoo="entry"))
    except ImportError:
        pass
    s = perturb.subject("org/gpt2", layer=2, sae_texts=3, sae_d_sae=32)
    assert s.texts == ["a", "b", "c", "d"] and s.hook == "blocks.2.hook_resid_pre" and s.label == hub.model_label("org/gpt2")
    assert calls["sae"][0] == "blocks.2.hook_resid_pre" and len(calls["sae"][1]) == 3 and calls["sae"][2:] == (32, f"perturb-sae-{s.label}")
    s = perturb.subject("org/gpt2", sae="release", sae_id="L5")
    assert s.hook == "blocks.5.hook_resid_pre" and calls["load_sae"] == ("release", "L5", "cpu")
