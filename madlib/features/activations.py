"""Activation extraction at the last prompt token, for zoo models and any transformer-lens model.

Layer ``L`` means the residual stream entering block ``L`` (``blocks.L.hook_resid_pre``); layer
``n_layers`` is the stream leaving the last block (``blocks.{n_layers-1}.hook_resid_post``). One
forward pass per batch returns the chosen layers' activations and the answer log-odds
``logit(" Yes") - logit(" No")``, both at the last prompt token; the forward pass stops after the
last block, and the final norm and unembedding run at the last token only. Batches are right-padded whatever
the tokenizer's own padding side: with causal attention nothing after a position can change it, so
gathering at each prompt's own last index is exact.

Zoo models are tokenized with the zoo's tokenizer (BOS + BPE). Any other ``HookedTransformer``
(e.g. from :func:`madlib.models.hub.load_model`) is tokenized with its own Hugging Face tokenizer
exactly as ``model.to_tokens`` does (BOS prepended when the model's config asks for it), and the
answer tokens are the first tokens the tokenizer produces for `` No``/`` Yes`` after the prompt's
closing question (so ``"▁Yes"``-style sentencepiece tokens are found too).

With ``out_dir``, activations stream into per-layer memory-mapped ``.npy`` files as the batches
come (``layer_<L>.npy`` of shape ``(n, d_model)``, ``log_odds.npy``, ``meta.json``), so host
memory holds one batch at a time; a later call with the same model, prompts, layers and dtype
finds the complete files and reads them back without a forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..data import datasets as qdata
from ..models.hub import auto_batch_size
from ..models.hooks import hook_name
from ..models.info import identity
from ..models.tokenizer import encode_prompts, pad_batch, right_padding

OUT_DTYPES = ("float32", "float16")


def resolve_layers(layers, n_layers: int) -> list[int]:
    """``"all"``, ``None`` or ``[]`` -> 1..n_layers; a list is checked against the model."""
    if layers is None or layers == "all" or len(layers) == 0:
        return list(range(1, n_layers + 1))
    out = [int(layer) for layer in layers]
    for layer in out:
        hook_name(layer, n_layers)
    return out


@dataclass
class Extraction:
    """Last-token activations per layer and answer log-odds, for a list of prompts."""

    acts: dict[int, Float[Tensor, "n d_model"]]
    log_odds: Float[Tensor, " n"]

    def __len__(self) -> int:
        return len(self.log_odds)

    def subset(self, mask) -> "Extraction":
        m = torch.as_tensor(np.asarray(mask))
        return Extraction({k: v[m] for k, v in self.acts.items()}, self.log_odds[m])


class _DiskSink:
    """Per-layer ``.npy`` memory maps filled batch by batch (see the module doc)."""

    def __init__(self, out_dir, model, prompts: list[str], layers: list[int], out_dtype: str):
        qdata.check_choice("out_dtype", out_dtype, OUT_DTYPES)
        self.dir = Path(out_dir)
        self.layers = layers
        key = hashlib.sha256(json.dumps([identity(model), list(prompts)]).encode()).hexdigest()
        self.meta = dict(n=len(prompts), layers=list(layers), d_model=model.cfg.d_model, dtype=out_dtype, key=key)
        meta_path = self.dir / "meta.json"
        self.complete = meta_path.is_file() and json.loads(meta_path.read_text()) == self.meta
        if not self.complete:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta_path.unlink(missing_ok=True)
            shape = (len(prompts), model.cfg.d_model)
            self.acts = {layer: np.lib.format.open_memmap(self._path(layer), "w+", out_dtype, shape) for layer in layers}
            self.log_odds = np.lib.format.open_memmap(self.dir / "log_odds.npy", "w+", np.float32, (len(prompts),))

    def _path(self, layer: int) -> Path:
        return self.dir / f"layer_{layer}.npy"

    def write(self, idx: np.ndarray, store: dict[int, Tensor], log_odds: Tensor) -> None:
        for layer in self.layers:
            self.acts[layer][idx] = store[layer].numpy()
        self.log_odds[idx] = log_odds.numpy()

    def finish(self) -> None:
        for arr in (*self.acts.values(), self.log_odds):
            arr.flush()
        tmp = self.dir / f".meta.json.{os.getpid()}"
        tmp.write_text(json.dumps(self.meta))
        os.replace(tmp, self.dir / "meta.json")

    def result(self) -> Extraction:
        acts = {layer: torch.from_numpy(np.load(self._path(layer), mmap_mode="c")) for layer in self.layers}
        return Extraction(acts, torch.from_numpy(np.load(self.dir / "log_odds.npy", mmap_mode="c")))


def last_token_logits(model, resid: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_vocab"]:
    """The logits ``model`` computes from its final residual stream at one position per prompt:
    final norm, unembedding and logit soft-capping, as in ``HookedTransformer.forward``, but only
    where the answer is read (unembedding every position costs a model with a large vocabulary
    more than every hook)."""
    x = resid[:, None, :]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = model.unembed(x)[:, 0]
    cap = getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


@torch.no_grad()
def extract(
    model,
    prompts: list[str],
    layers: list[int],
    batch_size: int | str = 128,
    progress: bool = True,
    desc: str = "extracting",
    out_dir: str | Path | None = None,
    out_dtype: str = "float32",
) -> Extraction:
    """Residual stream at ``layers`` and answer log-odds at each prompt's last token.

    ``batch_size="auto"`` picks the largest batch the device's free memory allows
    (:func:`madlib.models.hub.auto_batch_size`). With ``out_dir`` the activations stream to disk as
    ``out_dtype`` memory maps (see the module doc) and the result's tensors are backed by them."""
    n_layers = model.cfg.n_layers
    hooks = {hook_name(layer, n_layers): layer for layer in layers}
    if len(prompts) == 0:
        return Extraction({layer: torch.zeros(0, model.cfg.d_model) for layer in layers}, torch.zeros(0))
    seqs, pad_id, (no_id, yes_id) = encode_prompts(model, prompts)
    sink = None if out_dir is None else _DiskSink(out_dir, model, prompts, list(layers), out_dtype)
    if sink is not None and sink.complete:
        return sink.result()
    if batch_size == "auto":
        batch_size = auto_batch_size(model, max(len(s) for s in seqs))
    elif not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not accepted; give a positive integer or 'auto'")
    # Sort by length so batches carry little padding; restore the order at the end.
    order = np.argsort([len(s) for s in seqs], kind="stable")
    acts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    log_odds: list[Tensor] = []
    with right_padding(model):
        for start in tqdm(range(0, len(seqs), batch_size), desc=desc, disable=not progress, mininterval=1):
            idx = order[start : start + batch_size]
            tokens, lengths = pad_batch([seqs[i] for i in idx], pad_id)
            tokens = tokens.to(model.cfg.device)
            last = (lengths - 1).to(model.cfg.device)
            rows = torch.arange(len(idx), device=model.cfg.device)
            store: dict[int, Tensor] = {}

            def grab(act, hook):
                store[hooks[hook.name]] = act[rows, last].float().cpu()

            resid = model.run_with_hooks(tokens, stop_at_layer=n_layers, fwd_hooks=[(h, grab) for h in hooks])
            last_logits = last_token_logits(model, resid[rows, last]).float().cpu()
            batch_log_odds = last_logits[:, yes_id] - last_logits[:, no_id]
            if sink is not None:
                sink.write(idx, store, batch_log_odds)
                continue
            log_odds.append(batch_log_odds)
            for layer in layers:
                acts[layer].append(store[layer])
    if sink is not None:
        sink.finish()
        return sink.result()
    inv = torch.as_tensor(np.argsort(order, kind="stable"))
    return Extraction({k: torch.cat(v)[inv] for k, v in acts.items()}, torch.cat(log_odds)[inv])
