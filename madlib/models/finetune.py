"""Fine-tuning a zoo model further: on answer labels (quirky-style records) or on plain text.

Used wherever an analysis needs a modified copy of a model: the backdoored model of the MAD
chapter, the fine-tuning-KL detector's copy trained on trusted data, the task fine-tunes of the
drift audit. The copy is trained deterministically (same inputs, same weights) and cached on disk
next to the zoo under a key over the base model's weights, the data, the config and this file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import zoo
from .info import attach, fingerprint, info_of
from .tokenizer import encode_prompts, pad_batch
from .training import batch_losses, next_token_loss, optimizer_step, warmup_cosine
from ..codehash import code_hash
from ..paths import atomic_dir, model_cache_dir


@dataclass(frozen=True)
class FinetuneConfig:
    """How a copy of a model is fine-tuned."""

    steps: int = 300  # optimizer steps
    batch_size: int = 64  # texts per step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup: int = 20  # warm-up steps
    lm_loss_weight: float = 0.1  # weight of next-token loss on the text when answer labels are given
    seed: int = 0  # batch order

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a positive integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not accepted; give a positive learning rate")


def finetune(
    model,
    texts: list[str],
    labels: np.ndarray | None,
    cfg: FinetuneConfig = FinetuneConfig(),
    progress: bool = True,
    desc: str = "fine-tuning",
):
    """A fine-tuned deep copy of ``model`` (the original is left untouched) and its loss history.

    With ``labels`` (0/1 per text) each text is a prompt whose answer is `` Yes`` (1) or `` No``
    (0): the loss is the answer cross-entropy plus ``lm_loss_weight`` times the next-token loss on
    the prompt, as in the zoo's training. With ``labels=None`` the loss is the next-token loss on
    the texts alone (a language-modelling fine-tune).
    """
    if len(texts) == 0:
        raise ValueError("texts=[] is not accepted; give at least one text to fine-tune on")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(texts),) or not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels of shape {labels.shape} are not accepted; give one 0/1 label per text ({len(texts)})")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _finetune(model, texts, labels, cfg, progress, desc)
    finally:
        torch.use_deterministic_algorithms(previous)


def _finetune(model, texts, labels, cfg: FinetuneConfig, progress: bool, desc: str):
    # the model's own tokenization and answer tokens, as activation extraction reads prompts
    try:
        seqs, pad_id, (no_id, yes_id) = encode_prompts(model, list(texts))
    except ValueError as e:  # a text longer than the model's context
        raise ValueError(f"texts are not accepted: {e}") from None
    device = model.cfg.device
    y = None if labels is None else torch.tensor(np.where(labels == 1, yes_id, no_id), device=device)
    ft = copy.deepcopy(model)
    ft.train()
    opt = torch.optim.AdamW(ft.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, t0 = [], time.perf_counter()
    for step in tqdm(range(1, cfg.steps + 1), desc=desc, disable=not progress, mininterval=2):
        idx = torch.randint(len(seqs), (cfg.batch_size,), generator=gen)
        tokens, lengths = pad_batch([seqs[i] for i in idx], pad_id)
        tokens, lengths = tokens.to(device), lengths.to(device)
        if y is None:
            logits = ft(tokens, return_type="logits")
            lm = next_token_loss(logits, tokens, lengths)
            loss, a_loss, acc = lm, torch.tensor(float("nan")), torch.tensor(float("nan"))
        else:
            a_loss, lm, acc = batch_losses(ft, tokens, lengths, y[idx], (no_id, yes_id))
            loss = a_loss + cfg.lm_loss_weight * lm
        optimizer_step(opt, sched, loss, clip=(ft.parameters(), 1.0))
        history.append(dict(step=step, loss=loss.item(), answer_loss=a_loss.item(), lm_loss=lm.item(), acc=acc.item(),
                            seconds=time.perf_counter() - t0))  # fmt: skip
    ft.eval()
    # the copy's weights are neither the base's saved file nor its hub checkpoint
    attach(ft, info_of(model).replace(model_dir=None, hub=None, finetune=cfg))
    return ft, pd.DataFrame(history)


def finetune_key(model, texts: list[str], labels: np.ndarray | None, cfg: FinetuneConfig) -> str:
    """Changes when the base weights, the data, the config or the code (:func:`madlib.codehash.code_hash`) change."""
    h = hashlib.sha256(fingerprint(model).encode())
    h.update(json.dumps(list(texts)).encode())
    h.update(b"none" if labels is None else np.asarray(labels, dtype=np.int64).tobytes())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(code_hash(__name__).encode())
    return h.hexdigest()[:16]


def cached_finetune(
    model,
    name: str,
    texts: list[str],
    labels: np.ndarray | None,
    cfg: FinetuneConfig = FinetuneConfig(),
    progress: bool = True,
):
    """:func:`finetune`, cached as ``<model cache>/<name>-<key>/`` (safetensors, config, history).

    ``name`` names the fine-tune for people (e.g. ``"zoo-gpt2-backdoor"``); the key makes it unique.
    The returned model's :class:`~madlib.models.info.ModelInfo` has ``finetune`` and ``model_dir`` (its own directory).
    """
    from safetensors.torch import load_file, save_file

    if not name or "/" in name:
        raise ValueError(f"name={name!r} is not accepted; give a non-empty name without '/'")
    path = model_cache_dir() / f"{name}-{finetune_key(model, texts, labels, cfg)}"
    if not (path / "model.safetensors").is_file():
        ft, hist = finetune(model, texts, labels, cfg, progress=progress, desc=f"fine-tuning {name}")
        meta = dict(name=name, base=str(info_of(model).model_dir or ""), finetune_config=asdict(cfg), seed=cfg.seed,
                    n_texts=len(texts), labelled=labels is not None)  # fmt: skip
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            hist.to_csv(tmp / "history.csv", index=False)
    ft = copy.deepcopy(model)
    ft.load_state_dict(load_file(path / "model.safetensors"))
    ft.eval()
    attach(ft, info_of(model).replace(model_dir=path, hub=None, finetune=cfg))
    zoo.record_use(path / "model.safetensors")
    return ft

