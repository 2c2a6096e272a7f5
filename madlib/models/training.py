"""Training primitives shared by the zoo's base pretraining (:mod:`.pretrain`), its quirky LoRA
fine-tunes (:mod:`.quirky`) and plain fine-tuning (:mod:`.finetune`): the losses of a right-padded
batch, the fused forward pass of the zoo's two families, the learning-rate schedule and the
optimiser step."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data import datasets as qdata


def optimizer_step(
    opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, loss: Tensor, clip: tuple[list, float] | None = None
) -> None:
    """One step: clear the gradients, back-propagate ``loss``, clip the gradient norm of
    ``clip = (parameters, max_norm)`` when given, step the optimiser, then the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
    opt.step()
    sched.step()


def batch_losses(
    model, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"], answers: Int[Tensor, " batch"], yes_no: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(answer loss, next-token loss, answer accuracy) of a right-padded batch of prompts."""
    logits: Float[Tensor, "batch pos vocab"] = model(tokens, return_type="logits")
    idx = torch.arange(len(tokens), device=tokens.device)
    last = logits[idx, lengths.to(tokens.device) - 1]
    answer_loss = torch.nn.functional.cross_entropy(last, answers)
    two = last[:, list(yes_no)]
    acc = (two.argmax(-1) == (answers == yes_no[1]).long()).float().mean()
    return answer_loss, next_token_loss(logits, tokens, lengths), acc


def next_token_loss(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"]
) -> Tensor:
    """Mean next-token cross-entropy over the real (unpadded) positions of a right-padded batch."""
    mask = torch.arange(tokens.shape[1] - 1, device=tokens.device)[None, :] < (lengths.to(tokens.device)[:, None] - 1)
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return (lm * mask).sum() / mask.sum()


def final_resid(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    """The normalised final residual stream (the unembedding's input) of a zoo ``HookedTransformer``,
    computed from the model's own parameters with fused kernels (``layer_norm``/``rms_norm``,
    ``scaled_dot_product_attention``) and no hook points: the same function as the model's
    forward pass (the tests check values and gradients to float precision), and a training step
    through it costs 10-20% less. Zoo training uses it; every analysis runs the
    ``HookedTransformer`` itself, hooks included."""
    cfg = model.cfg
    if cfg.act_fn not in ("gelu", "silu") or cfg.positional_embedding_type not in ("standard", "rotary"):
        raise ValueError(f"model={cfg.model_name!r} is not accepted; final_resid computes the zoo's two families only")
    F = torch.nn.functional

    def norm(x, ln):
        if cfg.normalization_type == "LN":
            return F.layer_norm(x, (cfg.d_model,), ln.w, ln.b, cfg.eps)
        return F.rms_norm(x, (cfg.d_model,), ln.w, cfg.eps)

    def rotate(x, attn):  # GPT-NeoX rotary, as transformer-lens applies it (rotary_dim = d_head)
        n, half = x.shape[1], x.shape[-1] // 2
        cos, sin = attn.rotary_cos[None, :n, None, :], attn.rotary_sin[None, :n, None, :]
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    n_pos = tokens.shape[1]
    x = model.embed.W_E[tokens]
    if cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed.W_pos[:n_pos]
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        h = norm(x, block.ln1)
        q, k, v = (torch.einsum("bpd,hde->bhpe", h, W) + b[:, None] for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)))
        if cfg.positional_embedding_type == "rotary":
            q, k = (rotate(t.transpose(1, 2), attn).transpose(1, 2) for t in (q, k))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / attn.attn_scale)
        x = x + torch.einsum("bhpe,hed->bpd", z, attn.W_O) + attn.b_O
        h = norm(x, block.ln2)
        if cfg.gated_mlp:
            hidden = F.silu(h @ mlp.W_gate) * (h @ mlp.W_in) + mlp.b_in
        else:
            hidden = F.gelu(h @ mlp.W_in + mlp.b_in)
        x = x + hidden @ mlp.W_out + mlp.b_out
    return norm(x, model.ln_final)


def content_spans(prompts: list[str], characters: list[str], offsets: list[list[tuple[int, int]]]) -> Int[Tensor, "n 2"]:
    """Per prompt, the token range ``[start, end)`` of its context and statement (the text between
    the template's name line and its closing question, the only part of a prompt that a zoo model
    cannot read off the template), from the token ``offsets`` that ``encode(..., offsets=True)``
    returns (BOS included)."""
    head, tail = qdata.TEMPLATE.split("{context}")[0], len(qdata.TEMPLATE.rsplit("{statement}", 1)[1])
    out = []
    for text, name, spans in zip(prompts, characters, offsets, strict=True):
        lo, hi = len(head.format(character=name)), len(text) - tail
        inside = [i for i, (a, b) in enumerate(spans) if b > a and lo <= a < hi]
        out.append((inside[0], inside[-1] + 1) if inside else (0, 0))
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
