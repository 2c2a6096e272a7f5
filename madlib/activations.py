"""Activation extraction at the last prompt token.

Layer ``L`` means the residual stream entering block ``L`` (``blocks.L.hook_resid_pre``); layer
``n_layers`` is the stream leaving the last block (``blocks.{n_layers-1}.hook_resid_post``). One
forward pass per batch returns the chosen layers' activations and the answer log-odds
``logit(" Yes") - logit(" No")``, both at the last prompt token. Batches are right-padded: with
causal attention nothing after a position can change it, so gathering at each prompt's own last
index is exact whatever the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .tokenizer import PAD, answer_ids, build_tokenizer, encode
from .zoo import pad_batch


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


def _zoo_only(model) -> None:
    if getattr(model, "zoo_config", None) is None:
        raise ValueError(
            f"model={type(model).__name__} is not accepted; extraction supports the zoo models of madlib.zoo "
            "(load them with madlib.zoo.get_model)"
        )


@torch.no_grad()
def extract(
    model,
    prompts: list[str],
    layers: list[int],
    batch_size: int = 128,
    progress: bool = True,
    desc: str = "extracting",
) -> Extraction:
    """Residual stream at ``layers`` and answer log-odds at each prompt's last token."""
    n_layers = model.cfg.n_layers
    hooks = {hook_name(layer, n_layers): layer for layer in layers}
    _zoo_only(model)
    if len(prompts) == 0:
        return Extraction({layer: torch.zeros(0, model.cfg.d_model) for layer in layers}, torch.zeros(0))
    tok = build_tokenizer()
    seqs = encode(prompts, tok)
    pad_id = tok.token_to_id(PAD)
    no_id, yes_id = answer_ids(tok)
    # Sort by length so batches carry little padding; restore the order at the end.
    order = np.argsort([len(s) for s in seqs], kind="stable")
    acts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    log_odds: list[Tensor] = []
    for start in tqdm(range(0, len(seqs), batch_size), desc=desc, disable=not progress, mininterval=1):
        idx = order[start : start + batch_size]
        tokens, lengths = pad_batch([seqs[i] for i in idx], pad_id)
        tokens = tokens.to(model.cfg.device)
        last = (lengths - 1).to(model.cfg.device)
        rows = torch.arange(len(idx), device=model.cfg.device)
        store: dict[int, Tensor] = {}

        def grab(act, hook):
            store[hooks[hook.name]] = act[rows, last].float().cpu()

        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(h, grab) for h in hooks])
        last_logits = logits[rows, last].float().cpu()
        log_odds.append(last_logits[:, yes_id] - last_logits[:, no_id])
        for layer in layers:
            acts[layer].append(store[layer])
    inv = torch.as_tensor(np.argsort(order, kind="stable"))
    return Extraction({k: torch.cat(v)[inv] for k, v in acts.items()}, torch.cat(log_odds)[inv])
