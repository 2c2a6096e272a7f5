"""Top-k sparse autoencoders on zoo activations, trained with sae-lens.

Activations are collected at every real token of each text except BOS (whose activation is an
outlier that every text shares), at one transformer-lens hook. An SAE is a sae-lens ``TopKSAE``
trained by sae-lens' ``SAETrainer`` from an in-memory activation iterator (no hub, no model
download), deterministic for a given seed, saved in sae-lens' own format (``SAE.load_from_disk``
reads it) with the :class:`SAEConfig` in ``madlib_sae.json`` beside it, and cached next to the
zoo under a key over the model's weights, the hook, the texts, the config and this file.

:func:`encode_latents` is the one encoder of features into latents. The detectors that score SAE
latents live in :mod:`madlib.detectors.sae`
(``madlib.detectors.make_detector("sae_diag_mahalanobis", saes={layer: sae})``).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..data import datasets as qdata
from ..models import zoo
from ..models.tokenizer import encode, encode_texts, pad_batch
from ..models.hooks import hook_layer
from ..models.info import fingerprint as model_fingerprint, info_of
from ..codehash import code_hash
from ..paths import atomic_dir, model_cache_dir

NORMALISATIONS = ("none", "expected_average_only_in")
CONFIG_FILE = "madlib_sae.json"
WEIGHTS_FILE = "sae_weights.safetensors"


@dataclass(frozen=True)
class SAEConfig:
    """Width, sparsity and training of a top-k SAE (what sae-lens' trainer and SAE need)."""

    d_sae: int = 512  # latents
    k: int = 16  # active latents per token (top-k)
    training_tokens: int = 2_000_000  # activation vectors seen in training (epochs over the data as needed)
    batch_size: int = 4096  # activation vectors per optimizer step
    lr: float = 1e-3  # Adam learning rate
    lr_warm_up_steps: int = 0  # linear warm-up steps
    lr_decay_steps: int = 0  # final steps of linear decay to zero
    aux_loss_coefficient: float = 1 / 32  # weight of the top-k auxiliary loss that revives dead latents
    dead_feature_window: int = 100  # steps without firing after which a latent counts as dead
    normalize_activations: str = "expected_average_only_in"  # or "none"; scales inputs to mean norm sqrt(d_in)
    n_batches_for_norm_estimate: int = 16  # batches used to estimate the input norm
    seed: int = 0  # initialisation and batch order

    def __post_init__(self) -> None:
        positive = ("d_sae", "k", "training_tokens", "batch_size", "dead_feature_window", "n_batches_for_norm_estimate")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a positive integer")
        if self.training_tokens < self.batch_size:
            raise ValueError(
                f"training_tokens={self.training_tokens!r} is not accepted; give at least batch_size={self.batch_size}"
            )
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k!r} is not accepted; give at most d_sae={self.d_sae} active latents")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not accepted; give a positive learning rate")
        if self.aux_loss_coefficient < 0:
            raise ValueError(f"aux_loss_coefficient={self.aux_loss_coefficient!r} is not accepted; give a number >= 0")
        warm, decay = self.lr_warm_up_steps, self.lr_decay_steps
        if warm < 0 or decay < 0 or warm + decay >= self.steps:
            raise ValueError(
                f"lr_warm_up_steps={self.lr_warm_up_steps!r}, lr_decay_steps={self.lr_decay_steps!r} are not accepted; "
                f"give non-negative step counts summing to less than the {self.steps} training steps"
            )
        qdata.check_choice("normalize_activations", self.normalize_activations, NORMALISATIONS)

    @property
    def steps(self) -> int:
        """Optimizer steps (``training_tokens // batch_size``)."""
        return self.training_tokens // self.batch_size


# ---------------------------------------------------------------------------------------------
# Activations


@torch.no_grad()
def collect_activations(
    model, texts: list[str], hook_name: str, batch_size: int = 128, progress: bool = True, max_tokens: int | None = None
) -> Float[Tensor, "n_tokens d_model"]:
    """Activations at ``hook_name`` at every real token of each text except BOS, text after text
    (the rows of text ``i`` follow those of text ``i - 1``; text ``i`` gives ``len(tokens) - 1`` rows),
    for a zoo model or any ``HookedTransformer`` (texts cut to ``max_tokens`` tokens if given)."""
    if hook_name not in model.hook_dict:
        raise ValueError(f"hook_name={hook_name!r} is not accepted; give a hook of the model (model.hook_dict)")
    seqs, pad_id = encode_texts(model, texts, max_tokens)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    rows: list[Tensor | None] = [None] * len(seqs)
    block = hook_layer(hook_name)
    stop = None if block is None else block + 1
    bar = tqdm(range(0, len(seqs), batch_size), desc=f"activations at {hook_name}", disable=not progress, mininterval=1)
    for start in bar:
        idx = order[start : start + batch_size]
        tokens, lengths = pad_batch([seqs[i] for i in idx], pad_id)
        store: dict[str, Tensor] = {}

        def grab(act, hook):
            store["act"] = act.float().cpu()

        model.run_with_hooks(tokens.to(model.cfg.device), stop_at_layer=stop, fwd_hooks=[(hook_name, grab)])
        for j, i in enumerate(idx):
            rows[i] = store["act"][j, 1 : int(lengths[j])]
    if not rows:
        return torch.zeros(0, model.cfg.d_model)
    return torch.cat(rows)  # type: ignore[arg-type]


def token_counts(texts: list[str]) -> np.ndarray:
    """Rows per text in :func:`collect_activations` (its tokens, BOS excluded)."""
    return np.array([len(s) - 1 for s in encode(list(texts))])


def sample_texts(texts: list[str], n_tokens: int, seed: int = 0) -> list[str]:
    """A seeded random subset of ``texts`` holding at least ``n_tokens`` activation rows of
    :func:`collect_activations` (all of them if they hold fewer), in the order given: an SAE that
    sees ``n_tokens`` activations in training then sees each once, and the activations of texts it
    would never see are not collected (all train prompts of a zoo family: about 10 million rows,
    15 GB at peak, for 200,000 seen)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} is not accepted; give a positive integer")
    texts = list(texts)
    order = np.random.default_rng(seed).permutation(len(texts))
    keep, total = [], 0
    for start in range(0, len(order), 4096):  # encode only as far into the permutation as needed
        chunk = order[start : start + 4096]
        reached = total + np.cumsum(token_counts([texts[i] for i in chunk]))
        stop = int(np.searchsorted(reached, n_tokens)) + 1
        keep.extend(chunk[:stop])
        if stop <= len(chunk):
            break
        total = int(reached[-1])
    return [texts[i] for i in sorted(keep)]


# ---------------------------------------------------------------------------------------------
# Training


class ActivationIterator:
    """Endless shuffled batches of stored activations: epoch after epoch, a fresh permutation per
    epoch (seeded), batches running across epoch boundaries."""

    def __init__(self, acts: Float[Tensor, "n d"], batch_size: int, seed: int):
        self.acts, self.batch_size = acts, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(len(acts), generator=self.gen), 0

    def __iter__(self) -> "ActivationIterator":
        return self

    def __next__(self) -> Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.pos == len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.acts), generator=self.gen), 0
            take = self.perm[self.pos : self.pos + need]
            parts.append(take)
            self.pos += len(take)
            need -= len(take)
        return self.acts[torch.cat(parts)]


def train_sae(acts: Float[Tensor, "n d"], hook_name: str, cfg: SAEConfig = SAEConfig(), progress: bool = True):
    """A sae-lens ``TopKSAE`` (inference class) trained by ``SAETrainer`` on ``acts``.

    The same activations, hook and config give the same weights. Training uses sae-lens' defaults
    for top-k SAEs (decoder rows kept at unit norm through ``rescale_acts_by_decoder_norm``, folded
    into the weights at the end; the auxiliary loss on dead latents); the input normalisation
    factor is folded in too, so the returned SAE reads raw activations.
    """
    from sae_lens import LoggingConfig, TopKSAE, TopKSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training import activation_scaler, sae_trainer

    acts = torch.as_tensor(acts).float()
    if acts.ndim != 2 or len(acts) < cfg.batch_size:
        raise ValueError(
            f"acts of shape {tuple(acts.shape)} are not accepted; "
            f"give an (n, d) tensor with n >= batch_size={cfg.batch_size}"
        )
    t0 = time.perf_counter()
    previous = torch.are_deterministic_algorithms_enabled()
    with ExitStack() as stack:
        torch.use_deterministic_algorithms(True)
        stack.callback(torch.use_deterministic_algorithms, previous)
        stack.enter_context(torch.random.fork_rng(devices=[]))
        if not progress:
            quiet = partial(tqdm, disable=True)
            stack.enter_context(mock.patch.object(sae_trainer, "tqdm", quiet))
            stack.enter_context(mock.patch.object(activation_scaler, "tqdm", quiet))
        torch.manual_seed(cfg.seed)
        train_cfg = TopKTrainingSAEConfig(
            d_in=acts.shape[1], d_sae=cfg.d_sae, k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
            normalize_activations=cfg.normalize_activations,
        )  # fmt: skip
        train_cfg.metadata.hook_name = hook_name
        sae = TopKTrainingSAE(train_cfg)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
            lr_end=cfg.lr, lr_warm_up_steps=cfg.lr_warm_up_steps, lr_decay_steps=cfg.lr_decay_steps,
            dead_feature_window=cfg.dead_feature_window, feature_sampling_window=cfg.steps + 1,
            n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate, logger=LoggingConfig(log_to_wandb=False),
        )  # fmt: skip
        data = ActivationIterator(acts, cfg.batch_size, cfg.seed)
        sae_trainer.SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data).fit()
    state = sae.state_dict()
    sae.process_state_dict_for_saving_inference(state)
    out = TopKSAE(TopKSAEConfig.from_dict(sae.cfg.get_inference_sae_cfg_dict()))
    out.load_state_dict(state)
    out.eval()
    out.cfg.metadata.seed = cfg.seed
    out.cfg.metadata.train_seconds = time.perf_counter() - t0
    return out


@torch.no_grad()
def encode_latents(sae, acts: Float[Tensor, "n d"], batch_size: int = 8192) -> Float[Tensor, "n d_sae"]:
    """SAE latent activations of ``acts``, batched."""
    if len(acts) == 0:
        return torch.zeros(0, sae.cfg.d_sae)
    return torch.cat([sae.encode(b.float()) for b in torch.as_tensor(acts).split(batch_size)])


@torch.no_grad()
def explained_variance(sae, acts: Float[Tensor, "n d"], batch_size: int = 8192) -> float:
    """``1 - E||x - x_hat||^2 / E||x - E x||^2`` over the rows of ``acts`` (sae-lens' definition)."""
    acts = torch.as_tensor(acts).double()
    resid = sum(((b - sae.decode(sae.encode(b.float())).double()) ** 2).sum().item() for b in acts.split(batch_size))
    total = ((acts - acts.mean(0)) ** 2).sum().item()
    return 1.0 - resid / total


def shared_latents(sae_a, sae_b, threshold: float = 0.7) -> float:
    """Share of ``sae_a``'s latents whose decoder direction has cosine at least ``threshold`` with
    some decoder direction of ``sae_b`` (SAEs of two seeds share a part of their latents only)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r} is not accepted; give a cosine in (0, 1]")
    a = torch.nn.functional.normalize(sae_a.W_dec.detach().double(), dim=1)
    b = torch.nn.functional.normalize(sae_b.W_dec.detach().double(), dim=1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sae_b reads {b.shape[1]} dimensions, sae_a {a.shape[1]}; give SAEs of the same activations")
    return float(((a @ b.T).max(1).values >= threshold).double().mean())


# ---------------------------------------------------------------------------------------------
# Saving and caching


def save_sae(sae, path: Path | str, cfg: SAEConfig | None = None, **extra) -> Path:
    """sae-lens' format (weights + ``cfg.json``) plus ``madlib_sae.json`` (the SAEConfig, its seed, ``extra``)."""
    path = Path(path)
    sae.save_model(path)
    meta = dict(sae_config=None if cfg is None else asdict(cfg), seed=None if cfg is None else cfg.seed,
                hook_name=sae.cfg.metadata.hook_name, **extra)  # fmt: skip
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return path


@dataclass(frozen=True)
class SAERecord:
    """What :func:`save_sae` wrote beside an SAE (``madlib_sae.json``), as :func:`load_saved_sae`
    attaches it (read it with :func:`sae_record`)."""

    path: Path  # the SAE's directory
    config: SAEConfig | None  # its training settings, if saved
    seed: int | None
    hook_name: str | None  # the hook it reads
    explained_variance: float | None = None  # on its training activations (cached SAEs)
    n_tokens: int | None = None  # activations it trained on (cached SAEs)
    extra: dict = field(default_factory=dict)  # anything else saved (name, model, n_texts, train_seconds)


SAE_ATTRIBUTE = "madlib_record"


def sae_record(sae) -> SAERecord:
    """The :class:`SAERecord` of an SAE loaded by :func:`load_saved_sae` (a one-line error otherwise)."""
    record = getattr(sae, SAE_ATTRIBUTE, None)
    if not isinstance(record, SAERecord):
        raise ValueError("sae is not accepted; give an SAE loaded by madlib.features.sae.load_saved_sae or cached_sae")
    return record


def load_saved_sae(path: Path | str):
    """An SAE saved by :func:`save_sae`, with its :class:`SAERecord` (:func:`sae_record`)."""
    from sae_lens import SAE

    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"path={str(path)!r} is not accepted; it holds no saved SAE ({WEIGHTS_FILE})")
    sae = SAE.load_from_disk(path)
    sae.eval()
    meta = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    config = SAEConfig(**meta.pop("sae_config")) if meta.get("sae_config") else meta.pop("sae_config", None)
    known = {k: meta.pop(k, None) for k in ("seed", "hook_name", "explained_variance", "n_tokens")}
    setattr(sae, SAE_ATTRIBUTE, SAERecord(path, config, **known, extra=meta))
    return sae


def sae_key(model, hook_name: str, texts: list[str], cfg: SAEConfig) -> str:
    """Changes when the model's weights, the hook, the texts, the config or the code (:func:`madlib.codehash.code_hash`) change."""
    h = hashlib.sha256(model_fingerprint(model).encode())
    h.update(hook_name.encode())
    h.update(json.dumps(list(texts)).encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(code_hash(__name__).encode())
    return h.hexdigest()[:16]


def cached_sae(model, hook_name: str, texts: list[str], cfg: SAEConfig, name: str, progress: bool = True):
    """:func:`train_sae` on the activations of ``texts``, cached as ``<model cache>/<name>-<key>/``."""
    if not name or "/" in name:
        raise ValueError(f"name={name!r} is not accepted; give a non-empty name without '/'")
    path = model_cache_dir() / f"{name}-{sae_key(model, hook_name, texts, cfg)}"
    if not (path / CONFIG_FILE).is_file():
        acts = collect_activations(model, texts, hook_name, progress=progress)
        sae = train_sae(acts, hook_name, cfg, progress=progress)
        with atomic_dir(path) as tmp:
            save_sae(sae, tmp, cfg, name=name, model=str(info_of(model).model_dir or ""), n_texts=len(texts),
                     n_tokens=len(acts), explained_variance=explained_variance(sae, acts),
                     train_seconds=sae.cfg.metadata.train_seconds)  # fmt: skip
    zoo.record_use(path / WEIGHTS_FILE)
    return load_saved_sae(path)


# ---------------------------------------------------------------------------------------------
# Reconstruction quality


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per position from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def reconstruction_metrics(
    model, sae, texts: list[str], hook_name: str, batch_size: int = 128, progress: bool = True, max_tokens: int | None = None
) -> dict:
    """Explained variance, and KL and CE loss recovered when the reconstruction is spliced in.

    The reconstruction replaces the activation at every real position except BOS (where the SAE
    was not trained); the zero-ablation baseline zeroes the same positions. With KL and CE
    averaged over those positions (CE: the next-token predictions made there),
    ``kl_div_score = (KL_ablation - KL_sae) / KL_ablation`` and
    ``ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)``, as in sae-lens' evals.
    """
    seqs, pad_id = encode_texts(model, texts, max_tokens)
    sums = dict(kl_sae=0.0, kl_abl=0.0, ce_sae=0.0, ce_clean=0.0, ce_abl=0.0, n_kl=0, n_ce=0, l0=0.0)
    acts = []
    bar = tqdm(range(0, len(seqs), batch_size), desc="reconstruction metrics", disable=not progress, mininterval=1)
    for start in bar:
        tokens, lengths = pad_batch(seqs[start : start + batch_size], pad_id)
        tokens, lengths = tokens.to(model.cfg.device), lengths.to(model.cfg.device)
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        mask = (pos >= 1) & (pos < lengths[:, None])  # spliced positions
        store = {}

        def splice(act, hook):
            z = sae.encode(act.to(sae.W_enc.device, sae.W_enc.dtype))
            x_hat = sae.decode(z).to(act.device, act.dtype)
            store.update(x=act[mask].float().cpu(), x_hat=x_hat[mask].float().cpu(), l0=(z[mask.to(z.device)] != 0).sum().item())
            return torch.where(mask[..., None], x_hat, act)

        def ablate(act, hook):
            return torch.where(mask[..., None], torch.zeros_like(act), act)

        logp = {
            "clean": model(tokens, return_type="logits").float().log_softmax(-1),
            "sae": model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, splice)]).float().log_softmax(-1),
            "abl": model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, ablate)]).float().log_softmax(-1),
        }
        acts.append((store["x"], store["x_hat"]))
        sums["l0"] += store["l0"]
        sums["kl_sae"] += _kl(logp["clean"], logp["sae"])[mask].sum().item()
        sums["kl_abl"] += _kl(logp["clean"], logp["abl"])[mask].sum().item()
        ce_mask = mask[:, :-1] & (pos[:, 1:] < lengths[:, None])
        target = tokens[:, 1:, None]
        for key in ("clean", "sae", "abl"):
            sums[f"ce_{key}"] += -logp[key][:, :-1].gather(-1, target)[..., 0][ce_mask].sum().item()
        sums["n_kl"] += int(mask.sum())
        sums["n_ce"] += int(ce_mask.sum())
    x = torch.cat([a[0] for a in acts]).double()
    x_hat = torch.cat([a[1] for a in acts]).double()
    ev = 1.0 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()
    kl_sae, kl_abl = sums["kl_sae"] / sums["n_kl"], sums["kl_abl"] / sums["n_kl"]
    ce_clean, ce_sae, ce_abl = (sums[f"ce_{k}"] / sums["n_ce"] for k in ("clean", "sae", "abl"))
    return dict(
        explained_variance=ev, l0=sums["l0"] / sums["n_kl"], kl_div_with_sae=kl_sae, kl_div_with_ablation=kl_abl,
        kl_div_score=(kl_abl - kl_sae) / kl_abl, ce_loss_without_sae=ce_clean, ce_loss_with_sae=ce_sae,
        ce_loss_with_ablation=ce_abl, ce_loss_score=(ce_abl - ce_sae) / (ce_abl - ce_clean), n_tokens=sums["n_kl"],
    )  # fmt: skip
