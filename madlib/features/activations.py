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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..data import datasets as qdata
from ..models.hub import auto_batch_size
from ..models.tokenizer import PAD, answer_ids, build_tokenizer, encode
from ..models.zoo import pad_batch

OUT_DTYPES = ("float32", "float16")
ANSWER_CONTEXT = qdata.TEMPLATE.rsplit("\n", 1)[-1]
"""The closing question of every quirky prompt; the answer tokens are read after it."""


def hook_name(layer: int, n_layers: int) -> str:
    """transformer-lens hook of the residual stream entering block ``layer``."""
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layers={layer!r} is not accepted; give layers in 0..{n_layers} (the model has {n_layers} blocks)")
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


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


def answer_token_ids(tokenizer, context: str = ANSWER_CONTEXT) -> tuple[int, int]:
    """Ids of the first token of `` No`` and of `` Yes`` when they follow ``context``.

    Reading them in context (rather than tokenizing the answers alone) finds the token a model
    actually predicts there, e.g. ``"▁Yes"`` for sentencepiece tokenizers and ``"ĠYes"`` for GPT-2."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = []
    for answer in qdata.ANSWERS:
        full = tokenizer(context + answer, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise ValueError(f"tokenizer={tokenizer.name_or_path!r} does not tokenize {answer!r} as a continuation of {context!r}")
        ids.append(full[len(base)])
    if ids[0] == ids[1]:
        raise ValueError(f"tokenizer={tokenizer.name_or_path!r} gives {qdata.ANSWERS} the same first token")
    return ids[0], ids[1]


def encode_texts(model, texts: list[str], max_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each text (BOS first, as the model's tokenizer prepends it) and the padding id,
    for a zoo model or any ``HookedTransformer`` with a tokenizer. A text longer than
    ``max_tokens`` (or than the model's context) is cut to its first tokens; with ``max_tokens=None``
    a text longer than the model's context is an error."""
    if getattr(model, "zoo_config", None) is not None:
        tok = build_tokenizer()
        seqs, pad_id = encode(list(texts), tok), tok.token_to_id(PAD)
    else:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"model={type(model).__name__} is not accepted; it has no tokenizer (load models with "
                "madlib.models.hub.load_model or madlib.models.zoo.get_model)"
            )
        with _right_padding(model):
            seqs = [model.to_tokens(t, move_to_device=False, truncate=False)[0].tolist() for t in texts]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens!r} is not accepted; give an integer >= 2")
        cut = min(max_tokens, model.cfg.n_ctx)
        return [s[:cut] for s in seqs], pad_id
    too_long = [i for i, s in enumerate(seqs) if len(s) > model.cfg.n_ctx]
    if too_long:
        raise ValueError(f"prompts[{too_long[0]}] has {len(seqs[too_long[0]])} tokens; the model's context is {model.cfg.n_ctx}")
    return seqs, pad_id


def model_answer_ids(model) -> tuple[int, int]:
    """The ids of `` No`` and `` Yes`` as ``model``'s tokenizer writes them after a prompt."""
    if getattr(model, "zoo_config", None) is not None:
        return answer_ids(build_tokenizer())
    return answer_token_ids(model.tokenizer)


def encode_prompts(model, prompts: list[str]) -> tuple[list[list[int]], int, tuple[int, int]]:
    """Token ids of each prompt, the padding id and the (" No", " Yes") answer ids for ``model``."""
    seqs, pad_id = encode_texts(model, prompts)
    return seqs, pad_id, model_answer_ids(model)


@contextmanager
def _right_padding(model):
    """Let transformer-lens see a right-padding tokenizer (a left-padding one makes it infer an
    attention mask from pad ids, which can also be the BOS id)."""
    tokenizer = getattr(model, "tokenizer", None)
    side = getattr(tokenizer, "padding_side", "right")
    if tokenizer is not None:
        tokenizer.padding_side = "right"
    try:
        yield
    finally:
        if tokenizer is not None:
            tokenizer.padding_side = side


def model_identity(model) -> str:
    """What identifies a model's weights for the on-disk extraction files."""
    spec = getattr(model, "madlib_spec", None)
    if spec is not None:
        return json.dumps(spec, sort_keys=True, default=str)
    return str(getattr(model, "model_dir", None) or model.cfg.model_name)


class _DiskSink:
    """Per-layer ``.npy`` memory maps filled batch by batch (see the module doc)."""

    def __init__(self, out_dir, model, prompts: list[str], layers: list[int], out_dtype: str):
        qdata.check_choice("out_dtype", out_dtype, OUT_DTYPES)
        self.dir = Path(out_dir)
        self.layers = layers
        key = hashlib.sha256(json.dumps([model_identity(model), list(prompts)]).encode()).hexdigest()
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
    with _right_padding(model):
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
