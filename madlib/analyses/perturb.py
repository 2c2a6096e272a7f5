"""Perturbation sensitivity and activation plateaus of real, random and synthetic activations (methods.md §8).

A *base* activation ``A`` is the residual stream at one hook (an early block's ``hook_resid_pre``)
at the last position of a prompt prefix. It is moved along a straight path toward a *target*, and
at every step the model is run with the last position's activation at the hook overwritten by the
path point; the final-layer residual and the next-token distribution at that position are compared
with those of step 0 (L2 distance, ``KL(P_step0 || P_step)``). The step where a curve rises
fastest is its max-slope (MS) step. Targets:

* ``real``: the activation of another prompt at the same hook (model-generated);
* ``random``: a sample of ``N(mean, cov)`` fitted to real activations;
* ``baseline``: a "bag of SAE latents": ``A``'s active latents swapped for latents of similar firing
  frequency, values kept, decoded;
* ``structured``: the same, keeping the profile of decoder cosines to ``A``'s top latent;
* ``reconstruction``: the SAE reconstruction of the ``real`` target (a control).

The plateau experiment starts at ``A`` or one of its random, synthetic or reconstructed
counterparts, moves toward a fresh Gaussian sample in fixed steps and records how many steps the
final-layer residual stays within a threshold of its start.

All paths of all experiments go through the model together (:func:`run_paths`): the keys and
values of each prompt's prefix are computed once, and every path point is a single new token run
against that cache, many points per forward pass.

The chapter's figures are in :mod:`madlib.plots.perturb`; this module computes.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..data.datasets import check_choice
from ..models.hooks import hook_layer
from ..models.info import require_zoo, zoo_info

TARGET_TYPES: tuple[str, ...] = ("real", "random", "baseline", "structured", "reconstruction")
MODES: tuple[str, ...] = ("absolute", "relative")
METRICS: tuple[str, ...] = ("l2", "kl")
_HOOK = re.compile(r"blocks\.(\d+)\.hook_\w+")


@dataclass(frozen=True)
class PerturbConfig:
    """What :func:`run_experiment` perturbs, toward what, and how far."""

    hook_name: str = "blocks.1.hook_resid_pre"  # perturbed hook (a residual stream of shape batch pos d_model)
    n_base: int = 200  # base activations (prompt prefixes), each perturbed toward one target of every type
    n_pool: int = 2000  # further real activations: mean, covariance, firing frequencies, real targets
    n_steps: int = 100  # steps per path (n_steps + 1 points, step 0 the start)
    step_size: float = 0.0  # absolute step length; 0 means the median real-to-real distance over n_steps
    min_tokens: int = 2  # shortest prompt prefix, BOS included (2 never perturbs BOS)
    n_freq_neighbours: int = 10  # baseline: latents closest in firing frequency to draw from
    n_anchor_candidates: int = 100  # structured: latents nearest the top latent in frequency, anchor candidates
    anchor_cosine: float = 0.42  # structured: target decoder cosine between the top latent and the anchor
    ms_threshold: float = 0.02  # max-slope rule: no difference above this means the last step
    plateau_frac: float = 0.2  # plateau threshold as a fraction of the median L2 at the end of real relative paths
    plateau_step: float = 0.5  # the reference rule's plateau walks: step length in absolute units
    plateau_l2: float = 20.0  # the reference rule: a plateau ends at the first step where L2 >= this
    batch_size: int = 1024  # path points per forward pass
    seed: int = 0  # prompts, targets, synthetic latents, plateau directions

    def __post_init__(self) -> None:
        if not _HOOK.fullmatch(self.hook_name):
            raise ValueError(
                f"hook_name={self.hook_name!r} is not accepted; give a block hook such as 'blocks.1.hook_resid_pre'"
            )
        for name in ("n_base", "n_pool", "n_steps", "n_freq_neighbours", "n_anchor_candidates", "batch_size"):
            if not (_integer(getattr(self, name)) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a positive integer")
        if not (_integer(self.min_tokens) and self.min_tokens >= 2):
            raise ValueError(
                f"min_tokens={self.min_tokens!r} is not accepted; give at least 2 (BOS is never perturbed)"
            )
        if not (_finite(self.step_size) and self.step_size >= 0):
            raise ValueError(
                f"step_size={self.step_size!r} is not accepted; give 0 (calibrated) or a finite positive length"
            )
        if not (_finite(self.anchor_cosine) and -1 <= self.anchor_cosine <= 1):
            raise ValueError(f"anchor_cosine={self.anchor_cosine!r} is not accepted; give a cosine in [-1, 1]")
        if not (_finite(self.ms_threshold) and self.ms_threshold > 0):
            raise ValueError(f"ms_threshold={self.ms_threshold!r} is not accepted; give a finite positive number")
        if not (_finite(self.plateau_frac) and self.plateau_frac > 0):
            raise ValueError(f"plateau_frac={self.plateau_frac!r} is not accepted; give a finite positive fraction")
        for name in ("plateau_step", "plateau_l2"):
            if not (_finite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a finite positive number")


def _integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _finite(value) -> bool:
    """Whether ``value`` is a real number (not a bool) that is neither NaN nor infinite."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return number and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Prompts and real activations


def tokens_with_bos(model, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with BOS first: the zoo's tokenizer for zoo models, else the model's.

    Not the extraction's ``encode_texts`` (the tokenization of every other analysis): for a zoo
    model both give :func:`madlib.models.tokenizer.encode`'s ids, but for any other model this one
    always prepends BOS (``to_tokens(prepend_bos=True)``, whatever the model's
    ``default_prepend_bos``: the perturbation never touches position 0, see
    :attr:`PerturbConfig.min_tokens`) and cuts a text longer than the context to it, where
    ``encode_texts`` follows the model's default and rejects such a text; the prefixes, and so the
    numbers, of a run on such a model would change with it."""
    if zoo_info(model) is not None:
        from ..models.tokenizer import encode

        return encode(list(texts))
    return [model.to_tokens(t, prepend_bos=True)[0].tolist() for t in texts]


def sample_prefixes(tokens: list[list[int]], n: int, min_tokens: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` prefixes of distinct token lists, each cut at a length drawn uniformly from
    ``min_tokens .. len`` (so the perturbed last token is a random token of a random prompt)."""
    ok = [i for i, t in enumerate(tokens) if len(t) >= min_tokens]
    if len(ok) < n:
        raise ValueError(f"n={n} is not accepted; only {len(ok)} texts have at least min_tokens={min_tokens} tokens")
    pick = rng.choice(ok, size=n, replace=False)
    return [tokens[i][: int(rng.integers(min_tokens, len(tokens[i]) + 1))] for i in pick]


@torch.no_grad()
def last_activations(
    model, prefixes: list[list[int]], hook_name: str, batch_size: int = 256
) -> Float[Tensor, "n d_model"]:
    """Activation at ``hook_name`` at the last token of each prefix (right-padded batches of similar
    lengths: causal attention makes the padding irrelevant to every real position)."""
    block = hook_layer(hook_name)
    if block is None:
        raise ValueError(f"hook_name={hook_name!r} is not accepted; give a hook inside a block, such as 'blocks.1.hook_resid_pre'")
    order = np.argsort([len(p) for p in prefixes], kind="stable")
    out = torch.zeros(len(prefixes), model.cfg.d_model)
    for start in range(0, len(prefixes), batch_size):
        idx = order[start : start + batch_size]
        lengths = torch.tensor([len(prefixes[i]) for i in idx])
        tokens = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(idx):
            tokens[row, : len(prefixes[i])] = torch.tensor(prefixes[i])
        store = {}

        def grab(act, hook, store=store, last=lengths - 1):
            store["a"] = act[torch.arange(len(last)), last].float().cpu()

        model.run_with_hooks(
            tokens.to(model.cfg.device), stop_at_layer=block + 1, fwd_hooks=[(hook_name, grab)]
        )
        out[torch.as_tensor(idx)] = store["a"]
    return out


# ---------------------------------------------------------------------------------------------
# Targets


def gaussian_samples(
    acts: Float[Tensor, "n d"], n: int, gen: torch.Generator, eps: float = 1e-6
) -> Float[Tensor, "n_samples d"]:
    """Samples of ``N(mean, cov)`` of ``acts`` (float64 moments; eigenvalues below ``eps`` times the
    largest raised to it, so the covariance is positive definite)."""
    x = acts.double()
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / len(x)
    lam, vec = torch.linalg.eigh((cov + cov.T) / 2)
    lam = lam.clamp_min(eps * lam.max())
    z = torch.randn(n, x.shape[1], generator=gen, dtype=torch.float64)
    return (mu + (z * lam.sqrt()) @ vec.T).float()


def _latents_cpu(sae, x: Tensor) -> Tensor:
    """SAE latents of ``x`` (on the SAE's device and dtype), returned as float32 on the CPU.

    Not :func:`madlib.features.sae.encode_latents`: that one encodes ``x`` as float32 on the device
    it lies on and keeps the latents there, in batches of 8192; this one moves ``x`` to the
    SAE (a pretrained SAE may sit on a GPU, in half precision), encodes it whole and brings the
    latents back to the CPU, where the synthetic activations are built."""
    return sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()


def _decode_cpu(sae, z: Tensor) -> Tensor:
    """``decode(z)`` (decoder bias included, ``z`` moved to the SAE's device and dtype), returned
    as float32 on the CPU (the counterpart of :func:`_latents_cpu`)."""
    return sae.decode(z.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()


@torch.no_grad()
def firing_frequency(sae, acts: Float[Tensor, "n d"], batch_size: int = 4096) -> Float[Tensor, " d_sae"]:
    """Fraction of ``acts`` on which each SAE latent is active."""
    counts = sum((_latents_cpu(sae, b) > 0).sum(0).double() for b in acts.split(batch_size))
    return (counts / len(acts)).float()


def _by_frequency(freq: np.ndarray, i: int, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``pool`` ordered by closeness of firing frequency to latent ``i`` (ties in random order)."""
    return pool[np.lexsort((rng.random(len(pool)), np.abs(freq[pool] - freq[i])))]


def _active(code: np.ndarray) -> np.ndarray:
    """Active latents of one code, largest value first."""
    idx = np.flatnonzero(code > 0)
    return idx[np.argsort(-code[idx], kind="stable")]


@torch.no_grad()
def synthetic_baseline(
    sae, acts: Float[Tensor, "n d"], freq: Float[Tensor, " d_sae"], n_neighbours: int, rng: np.random.Generator
) -> tuple[Float[Tensor, "n d"], Float[Tensor, "n d_sae"]]:
    """A "bag of SAE latents": each active latent of ``encode(a)`` gives its value to a latent drawn
    uniformly from the ``n_neighbours`` live latents closest to it in firing frequency, excluding
    itself and latents already used; decoded with the decoder bias. Returns activations and codes."""
    codes = _latents_cpu(sae, acts).numpy()
    f = freq.cpu().numpy()
    live = np.flatnonzero(f > 0)
    out = np.zeros_like(codes)
    for r, code in enumerate(codes):
        used: set[int] = set()
        for i in _active(code):
            near = _by_frequency(f, i, live, rng)
            cand = near[(near != i) & ~np.isin(near, list(used))][:n_neighbours]
            j = int(rng.choice(cand))
            used.add(j)
            out[r, j] = code[i]
    syn = torch.as_tensor(out)
    return _decode_cpu(sae, syn), syn


def unit_decoder(sae) -> Float[np.ndarray, "d_sae d"]:
    """SAE decoder directions scaled to unit norm (their dot products are the decoder cosines)."""
    w = sae.W_dec.detach().float().cpu()
    return (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


@torch.no_grad()
def synthetic_structured(
    sae,
    acts: Float[Tensor, "n d"],
    freq: Float[Tensor, " d_sae"],
    n_candidates: int,
    anchor_cosine: float,
    rng: np.random.Generator,
) -> tuple[Float[Tensor, "n d"], Float[Tensor, "n d_sae"], Int[np.ndarray, " n"]]:
    """Synthetic activation keeping the cosine profile of the active latents.

    With ``t*`` the top latent of ``encode(a)``: the anchor ``c`` is, among the ``n_candidates``
    live latents nearest ``t*`` in firing frequency, the one whose decoder cosine with ``t*`` is
    closest to ``anchor_cosine``; then, largest value first, each active latent ``i`` gives its
    value to the unused live latent ``j`` whose ``cos(W_dec[c], W_dec[j])`` is closest to
    ``cos(W_dec[t*], W_dec[i])`` (so ``t*`` itself maps to ``c``). Returns activations, codes and anchors.
    """
    codes = _latents_cpu(sae, acts).numpy()
    f = freq.cpu().numpy()
    live = np.flatnonzero(f > 0)
    w = unit_decoder(sae)
    out = np.zeros_like(codes)
    anchors = np.full(len(codes), -1)
    for r, code in enumerate(codes):
        active = _active(code)
        if len(active) == 0:
            continue
        top = active[0]
        cos_top = w @ w[top]
        near = _by_frequency(f, top, live, rng)
        cand = near[near != top][:n_candidates]
        c = int(cand[np.argmin(np.abs(cos_top[cand] - anchor_cosine))])
        anchors[r] = c
        cos_c = w @ w[c]
        free = np.zeros(len(f), dtype=bool)
        free[live] = True
        for i in active:
            j = int(np.argmin(np.where(free, np.abs(cos_c - cos_top[i]), np.inf)))
            free[j] = False
            out[r, j] = code[i]
    syn = torch.as_tensor(out)
    return _decode_cpu(sae, syn), syn, anchors


@torch.no_grad()
def explained_variance_unbatched(sae, acts: Float[Tensor, "n d"]) -> float:
    """``1 - E||x - x_hat||^2 / E||x - E x||^2`` over the rows of ``acts``, ``x_hat`` the
    reconstruction of :func:`reconstruct` (on the SAE's device and dtype, back as float32 on the CPU).

    The definition of :func:`madlib.features.sae.explained_variance`, which encodes ``acts`` where
    they lie (so not with an SAE on a GPU) and sums the residual in batches of 8192 rows (so its
    last digits differ from this single sum on a larger pool)."""
    x = acts.double()
    return 1.0 - float(((x - reconstruct(sae, acts).double()) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@torch.no_grad()
def reconstruct(sae, acts: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """``decode(encode(acts))``."""
    return _decode_cpu(sae, _latents_cpu(sae, acts))


# ---------------------------------------------------------------------------------------------
# Paths


def make_paths(
    start: Float[Tensor, "n d"],
    target: Float[Tensor, "n d"],
    mode: str,
    n_steps: int,
    step_size: float,
    stop_at_target: bool = True,
) -> Float[Tensor, "n points d"]:
    """Points ``0..n_steps`` from ``start`` toward ``target``.

    ``relative``: ``(1 - t) start + t target`` with ``t = n / n_steps``. ``absolute``:
    ``start + step_size * n * D`` with ``D`` the unit vector toward the target; with
    ``stop_at_target`` the points past the target are NaN (the path stops there).
    """
    check_choice("mode", mode, MODES)
    n = torch.arange(n_steps + 1, dtype=start.dtype)
    if mode == "relative":
        t = (n / n_steps)[None, :, None]
        return (1 - t) * start[:, None] + t * target[:, None]
    delta = target - start
    dist = delta.norm(dim=1, keepdim=True)
    unit = delta / dist.clamp_min(1e-12)
    pts = start[:, None] + step_size * n[None, :, None] * unit[:, None]
    if stop_at_target:
        pts[(step_size * n[None, :] > dist + 1e-6 * dist)] = float("nan")
    return pts


# ---------------------------------------------------------------------------------------------
# Running paths through the model


def prefix_cache(model, prefix: Int[Tensor, "g pos"]):
    """Keys and values of every layer for a batch of equal-length prefixes."""
    from transformer_lens import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(prefix))
    if prefix.shape[1]:
        model(prefix, return_type=None, past_kv_cache=cache, attention_mask=torch.ones_like(prefix))
    return cache


def select_cache_rows(cache, rows: Tensor):
    """A frozen copy of ``cache`` holding the given batch rows (repeated as needed)."""
    from transformer_lens import TransformerLensKeyValueCache, TransformerLensKeyValueCacheEntry

    entries = [
        TransformerLensKeyValueCacheEntry(e.past_keys[rows], e.past_values[rows], frozen=True) for e in cache.entries
    ]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask[rows], frozen=True)


@torch.no_grad()
def run_points(
    model, cache, last_tokens: Int[Tensor, " b"], points: Float[Tensor, "b d"], hook_name: str, read_hook: str
) -> tuple[Float[Tensor, "b d"], Float[Tensor, "b vocab"]]:
    """One forward pass of single new tokens against a prefix ``cache`` (batch rows aligned), the
    activation at ``hook_name`` overwritten by ``points``; returns the residual at ``read_hook``
    and the next-token log-probabilities."""
    store = {}

    def overwrite(act, hook):
        act[:, -1] = points.to(act.dtype)
        return act

    def grab(act, hook):
        store["r"] = act[:, -1].float()

    logits = model.run_with_hooks(
        last_tokens[:, None],
        return_type="logits",
        past_kv_cache=cache,
        attention_mask=torch.ones_like(last_tokens)[:, None],
        fwd_hooks=[(hook_name, overwrite), (read_hook, grab)],
    )
    return store["r"], logits[:, -1].float().log_softmax(-1)


@torch.no_grad()
def run_paths(
    model,
    prefixes: list[list[int]],
    base: Int[np.ndarray, " n_paths"],
    points: Float[Tensor, "n_paths n_points d"],
    hook_name: str,
    batch_size: int = 1024,
    progress: bool = True,
    read_hook: str | None = None,
) -> dict[str, Float[np.ndarray, "n_paths n_points"]]:
    """L2 distance of the final-layer residual and ``KL(P_0 || P_n)`` of the next-token distribution
    along each path, relative to the path's point 0 (NaN where a point is NaN).

    Path ``p`` overwrites the activation at ``hook_name`` at the last token of ``prefixes[base[p]]``.
    Prefixes are grouped by length; each group's prefix (all but the last token) runs once with a
    key-value cache, then path points go through the model ``batch_size`` at a time as single
    tokens against copies of that cache, path after path (so a path's point 0, its reference, is
    always run first).
    """
    read_hook = read_hook or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    base = np.asarray(base)
    valid = ~torch.isnan(points).any(-1).numpy()
    if not valid[:, 0].all():
        raise ValueError("points are not accepted: every path needs a finite point 0")
    n_paths, n_points = valid.shape
    l2 = np.full((n_paths, n_points), np.nan)
    kl = np.full((n_paths, n_points), np.nan)
    lengths = np.array([len(prefixes[b]) for b in base])
    dev = model.cfg.device
    row_of = np.zeros(n_paths, dtype=np.int64)  # a path's row in its group's prefix cache
    ref_of = np.zeros(n_paths, dtype=np.int64)  # a path's row in its group's reference outputs
    bar = tqdm(total=int(valid.sum()), desc="perturbed forward passes", disable=not progress, mininterval=1)
    for length in np.unique(lengths):
        paths = np.flatnonzero(lengths == length)
        bases, local = np.unique(base[paths], return_inverse=True)
        tokens = torch.tensor([prefixes[b] for b in bases], device=dev)
        cache = prefix_cache(model, tokens[:, :-1])
        row_of[paths], ref_of[paths] = local, np.arange(len(paths))
        ref_r = torch.zeros(len(paths), model.cfg.d_model, device=dev)
        ref_lp = torch.zeros(len(paths), model.cfg.d_vocab_out, device=dev)
        todo = np.argwhere(valid[paths])  # (path, step) in path order: a path's point 0 comes first
        todo[:, 0] = paths[todo[:, 0]]
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            rows = torch.as_tensor(row_of[chunk[:, 0]], device=dev)
            pts = points[chunk[:, 0], chunk[:, 1]].to(dev)
            r, lp = run_points(model, select_cache_rows(cache, rows), tokens[rows, -1], pts, hook_name, read_hook)
            start = chunk[:, 1] == 0
            ref_r[ref_of[chunk[start, 0]]], ref_lp[ref_of[chunk[start, 0]]] = r[start], lp[start]
            pid = torch.as_tensor(ref_of[chunk[:, 0]], device=dev)
            l2[chunk[:, 0], chunk[:, 1]] = (r - ref_r[pid]).norm(dim=-1).cpu().numpy()
            kl[chunk[:, 0], chunk[:, 1]] = (ref_lp[pid].exp() * (ref_lp[pid] - lp)).sum(-1).cpu().numpy()
            bar.update(len(chunk))
    bar.close()
    return dict(l2=l2, kl=kl)


# ---------------------------------------------------------------------------------------------
# Curve statistics


def ms_step(curves: Float[np.ndarray, "... points"], threshold: float = 0.02) -> Int[np.ndarray, "..."]:
    """Max-slope step: argmax of the first differences, the first difference duplicated at index 0
    (so index ``n >= 1`` is the rise from point ``n - 1`` to ``n``); when no difference exceeds
    ``threshold``, the last step. Trailing NaNs (a path stopped at its target) are ignored."""
    if not (_finite(threshold) and threshold >= 0):
        raise ValueError(f"threshold={threshold!r} is not accepted; give a finite number >= 0")
    c = np.asarray(curves, dtype=np.float64)
    d = np.diff(c, axis=-1)
    d = np.concatenate([d[..., :1], d], axis=-1)
    d = np.where(np.isnan(d), -np.inf, d)
    last = np.sum(~np.isnan(c), axis=-1) - 1
    idx = np.argmax(d, axis=-1)
    return np.where(np.max(d, axis=-1) > threshold, idx, last)


def plateau_length(curves: Float[np.ndarray, "... points"], threshold: float) -> Int[np.ndarray, "..."]:
    """First step whose value reaches ``threshold``; the last step when none does."""
    if not _finite(threshold):
        raise ValueError(f"threshold={threshold!r} is not accepted; give a finite number")
    c = np.asarray(curves, dtype=np.float64)
    hit = c >= threshold
    return np.where(hit.any(-1), np.argmax(hit, axis=-1), c.shape[-1] - 1)


def ks_table(ms: pd.DataFrame, reference: str = "real") -> pd.DataFrame:
    """Two-sample KS statistic (and p-value) of each target type's MS steps against ``reference``'s,
    per model, mode and metric, with the mean and sd of the MS step."""
    from scipy.stats import ks_2samp

    rows = []
    for (model, mode, metric), g in ms.groupby(["model", "mode", "metric"], sort=False):
        ref = g.loc[g["target_type"] == reference, "ms_step"].to_numpy()
        for t, h in g.groupby("target_type", sort=False):
            x = h["ms_step"].to_numpy()
            ks = ks_2samp(x, ref) if t != reference else None
            rows.append(
                dict(
                    model=model,
                    mode=mode,
                    metric=metric,
                    target_type=t,
                    mean=x.mean(),
                    sd=x.std(),
                    n=len(x),
                    ks=np.nan if ks is None else ks.statistic,
                    p_value=np.nan if ks is None else ks.pvalue,
                )
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The experiment


@dataclass
class PerturbResult:
    """Curves, per-path statistics and settings of one :func:`run_experiment` run.

    ``curves[(experiment, mode, type, metric)]`` is an array ``(n_base, n_steps + 1)``, experiment
    ``"perturb"`` (mode absolute or relative) or ``"plateau"`` (mode ``"absolute"``); ``built`` holds
    what :func:`build_targets` returned.
    """

    curves: dict[tuple[str, str, str, str], np.ndarray]
    ms: pd.DataFrame
    plateaus: pd.DataFrame
    ks: pd.DataFrame
    info: dict
    built: dict


def build_targets(model, sae, texts: list[str], cfg: PerturbConfig) -> dict:
    """Base prefixes and activations (``cfg.n_base`` random prefixes of distinct texts), and for each
    base a target of every type and a plateau start of every type, with the statistics they were
    built from (``cfg.n_pool`` prefixes of further texts)."""
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_base + cfg.n_pool
    if len(texts) < n:
        raise ValueError(f"texts of length {len(texts)} are not accepted; give at least n_base + n_pool = {n} texts")
    chosen = [texts[i] for i in rng.choice(len(texts), size=n, replace=False)]
    prefixes = sample_prefixes(tokens_with_bos(model, chosen), n, cfg.min_tokens, rng)
    acts = last_activations(model, prefixes, cfg.hook_name)
    prefixes, a, pool = prefixes[: cfg.n_base], acts[: cfg.n_base], acts[cfg.n_base :]
    # real targets: a pool activation at least a little away from the base (template tokens repeat)
    dist = torch.cdist(a.double(), pool.double())
    far = dist > 1e-3 * dist.median()
    pick = [int(rng.choice(np.flatnonzero(row))) for row in far.numpy()]
    real = pool[pick]
    freq = firing_frequency(sae, pool)
    base_syn, base_codes = synthetic_baseline(sae, a, freq, cfg.n_freq_neighbours, rng)
    struct_syn, struct_codes, anchors = synthetic_structured(
        sae, a, freq, cfg.n_anchor_candidates, cfg.anchor_cosine, rng
    )
    targets = dict(
        real=real,
        random=gaussian_samples(pool, cfg.n_base, gen),
        baseline=base_syn,
        structured=struct_syn,
        reconstruction=reconstruct(sae, real),
    )
    starts = dict(
        real=a,
        random=gaussian_samples(pool, cfg.n_base, gen),
        baseline=base_syn,
        structured=struct_syn,
        reconstruction=reconstruct(sae, a),
    )
    step = cfg.step_size or float((real - a).norm(dim=1).median()) / cfg.n_steps
    return dict(
        prefixes=prefixes,
        base=a,
        pool=pool,
        freq=freq,
        targets=targets,
        starts=starts,
        step_size=step,
        directions=gaussian_samples(pool, cfg.n_base * len(TARGET_TYPES), gen).view(len(TARGET_TYPES), cfg.n_base, -1),
        codes=_latents_cpu(sae, a),
        baseline_codes=base_codes,
        structured_codes=struct_codes,
        anchors=anchors,
    )


def run_experiment(
    model, sae, texts: list[str], cfg: PerturbConfig = PerturbConfig(), model_name: str = "model", progress: bool = True
) -> PerturbResult:
    """Both perturbation modes toward every target type, and the plateau experiment from every
    start type, for ``cfg.n_base`` random prefixes of ``texts`` (one batched run through the model)."""
    t0 = time.perf_counter()
    built = build_targets(model, sae, texts, cfg)
    a, n = built["base"], cfg.n_base
    blocks, keys = [], []
    for mode in MODES:
        for t in TARGET_TYPES:
            blocks.append(make_paths(a, built["targets"][t], mode, cfg.n_steps, built["step_size"]))
            keys.append(("perturb", mode, t))
    for k, t in enumerate(TARGET_TYPES):
        s = built["starts"][t]
        blocks.append(
            make_paths(s, built["directions"][k], "absolute", cfg.n_steps, built["step_size"], stop_at_target=False)
        )
        keys.append(("plateau", "absolute", t))
    for k, t in enumerate(TARGET_TYPES):  # the reference rule: the same directions in steps of plateau_step
        blocks.append(make_paths(built["starts"][t], built["directions"][k], "absolute", cfg.n_steps, cfg.plateau_step,
                                 stop_at_target=False))  # fmt: skip
        keys.append(("plateau_reference", "absolute", t))
    t1 = time.perf_counter()
    out = run_paths(
        model,
        built["prefixes"],
        np.tile(np.arange(n), len(blocks)),
        torch.cat(blocks),
        cfg.hook_name,
        cfg.batch_size,
        progress,
    )
    run_seconds = time.perf_counter() - t1
    curves = {}
    for b, key in enumerate(keys):
        for metric in METRICS:
            curves[(*key, metric)] = out[metric][b * n : (b + 1) * n]
    ms = pd.DataFrame(
        [
            dict(
                model=model_name, target_type=t, mode=mode, metric=metric, ms_step=int(s), perturbation=i, seed=cfg.seed
            )
            for (exp, mode, t, metric), c in curves.items()
            if exp == "perturb"
            for i, s in enumerate(ms_step(c, cfg.ms_threshold))
        ]
    )
    end_l2 = curves[("perturb", "relative", "real", "l2")][:, -1]
    threshold = cfg.plateau_frac * float(np.median(end_l2))
    rules = {"plateau": ("relative", threshold, built["step_size"]), "plateau_reference": ("reference", cfg.plateau_l2, cfg.plateau_step)}
    plateaus = pd.DataFrame(
        [
            dict(
                model=model_name,
                rule=rules[exp][0],
                start_type=t,
                plateau_length=int(s),
                threshold=rules[exp][1],
                step_size=rules[exp][2],
                perturbation=i,
                seed=cfg.seed,
            )
            for (exp, mode, t, metric), c in curves.items()
            if exp in rules and metric == "l2"
            for i, s in enumerate(plateau_length(c, rules[exp][1]))
        ]
    )
    info = dict(
        config=asdict(cfg),
        model=model_name,
        step_size=built["step_size"],
        plateau_threshold=threshold,
        n_paths=len(out["l2"]),
        n_points=int(np.isfinite(out["l2"]).sum()),
        run_seconds=run_seconds,
        seconds=time.perf_counter() - t0,
        l0=float((built["codes"] > 0).sum(1).float().mean()),
        live_latents=int((built["freq"] > 0).sum()),
        explained_variance=explained_variance_unbatched(sae, built["pool"]),
        d_sae=int(sae.cfg.d_sae),
    )
    return PerturbResult(curves, ms, plateaus, ks_table(ms), info, built)


def ordering(ks: pd.DataFrame, plateaus: pd.DataFrame, ms: pd.DataFrame | None = None, alpha: float = 0.05) -> dict:
    """The seed's orderings, checked per mode and metric: real MS steps earliest of the four main
    types, random latest, structured closer to real than baseline (smaller KS); real plateaus longest
    (with each start type's mean plateau length and the KS statistic of its lengths against real's),
    under each plateau rule of ``plateaus`` (keys of the ``reference`` rule end in ``_reference``);
    a tie for the longest is not "real longest".

    With the MS steps themselves (``ms``, the experiment's per-path table), "earliest" and "latest"
    are tested as :func:`extreme` does: the type must differ from the runner-up by a two-sample KS
    test at level ``alpha``, so two types a step apart on average are a tie, not an ordering (the
    table's ``earliest``/``latest`` name the type or "tie"). Without ``ms`` the means decide."""
    from scipy.stats import ks_2samp

    types = ["real", "random", "baseline", "structured"]
    rows = []
    for (model, mode, metric), g in ks.groupby(["model", "mode", "metric"], sort=False):
        m = g.set_index("target_type")
        main = m.loc[types, "mean"]
        earliest, latest = main.idxmin(), main.idxmax()
        if ms is not None:
            cell = ms[(ms["model"] == model) & (ms["mode"] == mode) & (ms["metric"] == metric)]
            samples = {t: h["ms_step"].to_numpy() for t, h in cell.groupby("target_type") if t in types}
            first, last = extreme(samples, lowest=True, alpha=alpha), extreme(samples, lowest=False, alpha=alpha)
            earliest = first["first"] if first["clear"] else "tie"
            latest = last["first"] if last["clear"] else "tie"
        rows.append(
            dict(
                model=model,
                mode=mode,
                metric=metric,
                earliest=earliest,
                latest=latest,
                real_earliest=bool(earliest == "real"),
                random_latest=bool(latest == "random"),
                structured_closer=bool(m.loc["structured", "ks"] < m.loc["baseline", "ks"]),
            )
        )
    out = dict(table=pd.DataFrame(rows))
    rules = plateaus["rule"] if "rule" in plateaus else pd.Series("relative", index=plateaus.index)
    for rule in dict.fromkeys(rules):
        by_type = plateaus[rules == rule].groupby("start_type")["plateau_length"]
        mean_plateau = by_type.mean()
        real = by_type.get_group("real").to_numpy()
        main = mean_plateau.loc[["real", "random", "baseline", "structured"]]
        suffix = "" if rule == "relative" else f"_{rule}"
        out[f"real_plateau_longest{suffix}"] = bool(main.idxmax() == "real" and (main < main["real"]).sum() == len(main) - 1)
        out[f"mean_plateau{suffix}"] = mean_plateau
        out[f"plateau_ks{suffix}"] = pd.Series({t: ks_2samp(g.to_numpy(), real).statistic for t, g in by_type if t != "real"})
    return out


def extreme(samples: dict[str, np.ndarray], lowest: bool = True, alpha: float = 0.05) -> dict:
    """Which of ``samples`` (type -> values) has the lowest (or highest) mean, and whether it differs
    from the runner-up: a two-sample KS test of the two, ``clear`` when its p-value is below
    ``alpha``. An ordering told as a finding rests on ``clear``; otherwise the two are a tie."""
    from scipy.stats import ks_2samp

    means = {t: float(np.mean(x)) for t, x in samples.items() if len(x)}
    if len(means) < 2:
        raise ValueError(f"samples={sorted(samples)!r} is not accepted; give at least two non-empty samples")
    first, second = sorted(means, key=means.get, reverse=not lowest)[:2]
    test = ks_2samp(np.asarray(samples[first]), np.asarray(samples[second]))
    return dict(first=first, second=second, mean_first=means[first], mean_second=means[second], ks=float(test.statistic),
                p_value=float(test.pvalue), clear=bool(test.pvalue < alpha))  # fmt: skip


def extreme_text(e: dict, what: str, noun: str = "targets", unit: str = "steps") -> str:
    """``e`` of :func:`extreme` in words: the first type and the runner-up with their means and the
    test, e.g. "real targets give the earliest blow-ups (...)" or, for a tie, "neither real nor
    random targets clearly give the earliest blow-ups: ... (no difference)"."""
    test = f"KS {e['ks']:.3f}, p = {e['p_value']:.2g}"
    if not e["clear"]:
        return (f"neither {e['first']} nor {e['second']} {noun} clearly give the {what}: {e['mean_first']:.1f} and "
                f"{e['mean_second']:.1f} {unit} on average ({test}; no difference)")  # fmt: skip
    return f"{e['first']} {noun} give the {what} ({e['mean_first']:.1f} {unit} on average, {e['second']} next at {e['mean_second']:.1f}; {test})"


# ---------------------------------------------------------------------------------------------
# Tables


def summary_table(ks: pd.DataFrame) -> pd.DataFrame:
    """MS step ``mean ± sd`` and KS statistic against real, per target type (rows) and mode and
    metric (columns)."""
    cell = ks.assign(
        value=[
            f"{m:.1f} ± {s:.1f}" + ("" if np.isnan(k) else f" (KS {k:.2f})")
            for m, s, k in zip(ks["mean"], ks["sd"], ks["ks"], strict=True)
        ]
    )
    out = cell.pivot_table(index="target_type", columns=["mode", "metric"], values="value", aggfunc="first")
    return out.reindex([t for t in TARGET_TYPES if t in out.index])


def plateau_table(plateaus: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and median plateau length per start type (rows, in :data:`TARGET_TYPES`' order)
    under each plateau rule (column groups)."""
    lengths = plateaus.groupby(["rule", "start_type"])["plateau_length"].agg(["mean", "std", "median"])
    return lengths.unstack("rule").swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False).reindex(TARGET_TYPES)


# ---------------------------------------------------------------------------------------------
# The chapter (notebooks/perturb.ipynb): its subject and its statements

MS_COLUMNS: list[str] = ["model", "target_type", "mode", "metric", "ms_step", "seed", "perturbation"]
"""Columns of the book's ``ms_steps.csv``."""
MAIN_TYPES: tuple[str, ...] = ("real", "random", "baseline", "structured")
"""The target (and start) types the orderings compare (the reconstruction is a control)."""
REPORTED_EARLIEST = "real"
"""Giglemiani et al.: the target type toward which the model blows up earliest ..."""
REPORTED_LATEST = "random"
"""... the one toward which it blows up latest ..."""
REPORTED_LONGEST_PLATEAU = "real"
"""... and the start type with the longest plateaus."""


@dataclass
class PerturbSubject:
    """The model a perturbation run perturbs, its name in the tables, the prompts its prefixes are
    cut from, and the SAE at the perturbed hook."""

    model: object
    label: str
    texts: list[str]
    sae: object
    hook: str


def subject(model: str, zoo_preset: str = "default", layer: int = 1, sae: str = "", sae_id: str = "", sae_texts: int = 4000,
            sae_d_sae: int = 512, sae_k: int = 8, sae_training_tokens: int = 500_000, sae_batch_size: int = 2048,
            seed: int = 0) -> PerturbSubject:  # fmt: skip
    """Load ``model`` (a zoo name, a hub id or a directory) and its SAE: the pretrained ``sae``
    (its hook becomes the perturbed hook), or a top-k SAE trained (cached) at
    ``blocks.<layer>.hook_resid_pre`` on ``sae_texts`` prompts drawn with ``seed``. The prompts are
    the zoo model's training records (zoo-gpt2's for a model outside the zoo), without repeats."""
    from ..features import sae as msae
    from ..models import zoo
    from ..models.hub import load_model, load_sae, model_label, sae_hook_name

    m = load_model(model, preset=zoo_preset)
    label = model_label(model)
    texts = zoo.training_records(require_zoo(m) if model in zoo.ZOO else require_zoo(zoo.get_model("zoo-gpt2", preset=zoo_preset)))["prompt"]
    texts = texts.drop_duplicates().tolist()
    if sae:
        sae_model = load_sae(sae, sae_id or None, device=str(m.cfg.device))
        hook = sae_hook_name(sae_model)
    else:
        hook = f"blocks.{layer}.hook_resid_pre"
        pick = np.random.default_rng(seed).choice(len(texts), size=min(sae_texts, len(texts)), replace=False)
        sae_cfg = msae.SAEConfig(d_sae=sae_d_sae, k=sae_k, training_tokens=sae_training_tokens, batch_size=sae_batch_size, seed=seed)
        sae_model = msae.cached_sae(m, hook, [texts[i] for i in pick], sae_cfg, f"perturb-sae-{label}")
    return PerturbSubject(m, label, texts, sae_model, hook)


def setup_claims(res: PerturbResult, subj: PerturbSubject, cfg: PerturbConfig) -> dict[str, object]:
    """The run's setup as the chapter tells it, by glue key: the calibrated step and plateau
    threshold, the SAE's sparsity, live latents and explained variance, the number of perturbed
    points and their run time, the subject, and the settings of ``cfg``."""
    info = res.info
    out: dict[str, object] = {key: info[key] for key in ("step_size", "plateau_threshold", "l0", "explained_variance", "n_points",
                                                          "run_seconds")}  # fmt: skip
    out.update({key: int(info[key]) for key in ("live_latents", "d_sae")})
    out.update(hook=subj.hook, label=subj.label, n_base=cfg.n_base, n_pool=cfg.n_pool, n_steps=cfg.n_steps,
               plateau_step=cfg.plateau_step, plateau_l2=cfg.plateau_l2)  # fmt: skip
    return out


def _as_reported(e: dict, reported: str, unlike: str = "unlike Giglemiani et al.", tie: str = "") -> str:
    """How an :func:`extreme` compares with what Giglemiani et al. report (``reported``): the same
    type, another (``unlike``), or a tie (``tie``)."""
    if not e["clear"]:
        return tie or f"where Giglemiani et al. report {reported} targets"
    return "as Giglemiani et al. report" if e["first"] == reported else unlike


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(text: str) -> str:
    """``text`` closed by one full stop (not a second after "et al.")."""
    return text if text.endswith(".") else text + "."


def chapter_claims(res: PerturbResult, order: dict, alpha: float = 0.05) -> dict[str, object]:
    """The chapter's statements, by glue key, against Giglemiani et al.'s findings
    (:data:`REPORTED_EARLIEST`, :data:`REPORTED_LATEST`, :data:`REPORTED_LONGEST_PLATEAU`):
    the max-slope steps' means and the earliest and latest type, each tested against the runner-up
    (:func:`extreme` at level ``alpha``; relative mode, L2); structured synthetic activations
    closer to real ones than baseline ones (smaller KS statistic against real); in how many mode x
    metric cells the three orderings hold together (``order``: :func:`ordering`'s result); and the
    plateaus under both rules, with the longest start type tested the same way."""
    ks = res.ks[(res.ks["mode"] == "relative") & (res.ks["metric"] == "l2")].set_index("target_type")
    out: dict[str, object] = {
        "ms_means": ", ".join(f"{t} {ks.loc[t, 'mean']:.1f} ± {ks.loc[t, 'sd']:.1f}" for t in TARGET_TYPES),
        "ks_random": f"{ks.loc['random', 'ks']:.3f} (p = {ks.loc['random', 'p_value']:.2g})",
    }
    ms_rel = res.ms[(res.ms["mode"] == "relative") & (res.ms["metric"] == "l2")]
    samples = {t: g["ms_step"].to_numpy() for t, g in ms_rel.groupby("target_type") if t in MAIN_TYPES}
    first, last = extreme(samples, lowest=True, alpha=alpha), extreme(samples, lowest=False, alpha=alpha)
    out["verdict_earliest"] = _sentence(f"{_capitalised(extreme_text(first, 'earliest blow-ups'))}, {_as_reported(first, REPORTED_EARLIEST)}")
    out["verdict_latest"] = _sentence(f"{_capitalised(extreme_text(last, 'latest blow-ups'))}, {_as_reported(last, REPORTED_LATEST)}")
    s_ks, b_ks = ks.loc["structured", "ks"], ks.loc["baseline", "ks"]
    closer = s_ks < b_ks
    out["verdict_structured"] = (f"Structured synthetic activations are {'closer to' if closer else 'no closer to'} real ones "
                                 f"than baseline ones (KS against real {s_ks:.3f} vs {b_ks:.3f}), {'as' if closer else 'unlike'} in "
                                 "Giglemiani et al.")  # fmt: skip
    tab = order["table"]
    out["n_held"] = f"{int(tab[['real_earliest', 'random_latest', 'structured_closer']].all(axis=1).sum())} of {len(tab)}"
    mp = order["mean_plateau"]
    out["plateau_ks_random"] = float(order["plateau_ks"]["random"])
    out["plateau_means"] = ", ".join(f"{t} {mp[t]:.1f}" for t in TARGET_TYPES)
    rel = res.plateaus[res.plateaus["rule"] == "relative"]
    lengths = {t: g["plateau_length"].to_numpy() for t, g in rel.groupby("start_type") if t in MAIN_TYPES}
    longest = extreme(lengths, lowest=False, alpha=alpha)
    out["verdict_plateau"] = (_capitalised(extreme_text(longest, "longest plateaus", noun="starting points")) + ", "
                              + _as_reported(longest, REPORTED_LONGEST_PLATEAU,
                                             unlike="unlike Giglemiani et al., who find real activations' longest",
                                             tie="where Giglemiani et al. find real activations' longest") + ".")  # fmt: skip
    mr = order["mean_plateau_reference"]
    out["plateau_means_reference"] = ", ".join(f"{t} {mr[t]:.1f}" for t in TARGET_TYPES)
    reference = res.plateaus["rule"] == "reference"
    n_full = int((res.plateaus.loc[reference, "plateau_length"] == res.info["config"]["n_steps"]).sum())
    out["reference_full"] = f"{n_full} of {int(reference.sum())}"
    out["verdict_plateau_reference"] = ("Under the reference rule too, real activations have the longest plateaus."
                                        if order["real_plateau_longest_reference"] else
                                        "Under the reference rule, real activations do not have the longest plateaus.")  # fmt: skip
    return out
