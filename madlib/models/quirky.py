"""The zoo's quirky fine-tunes: one LoRA adapter per (family, dataset, seed) on the family's base.

As the seeds built their models: the pretrained base (:mod:`madlib.models.pretrain`) is fine-tuned once per
dataset, on the answer token only, on the dataset's train-split records of both characters
(Alice-like names answer with the truth, Bob-like names with the heuristic). The adapter kept is
the one with the lowest answer loss on a development part of the train split (items hashed apart,
:func:`madlib.data.datasets.key_in_validation`); the validation split, the analyses' test set, is never
seen. The weights after ``early_step`` steps are kept too, as the less quirky ``-early`` variant.

The seeds trained LoRA adapters (``method="lora"``: :mod:`madlib.models.lora`, r = 8 on the q, k, v, gate,
up and down weights). On the zoo's bases a LoRA adapter does not learn, within the zoo's training
budget, to read the name at the top of the prompt (the base never needed it): 400 steps of 32
records leave both characters near chance on hemisphere's disagreeing prompts, where fine-tuning
every weight (``method="full"``, the default) makes both follow their own label.

Adapters are named like the hub's, ``zoo-<family>-<dataset>``, and cached under a key of their
config, the base's weights and the code.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import pretrain as zbase
from ..data import datasets as qdata
from . import lora
from ..codehash import code_hash
from ..paths import atomic_dir, model_cache_dir
from .tokenizer import PAD, answer_ids, build_tokenizer, encode
from .tokenizer import pad_batch
from .training import final_resid, optimizer_step, warmup_cosine
from .info import ModelInfo, attach
from .zoo import FAMILIES, record_use

METHODS = ("full", "lora")
"""Fine-tuning methods: every weight, or a LoRA adapter."""
DEV_FRACTION = 0.1
"""Share of train-split items held out for checkpoint selection."""


@dataclass(frozen=True)
class QuirkyConfig:
    """One quirky fine-tune."""

    family: str = "gpt2"  # base family
    dataset: str = "addition"  # quirky dataset
    seed: int = 0  # adapter initialisation and batch order
    method: str = "full"  # "full" fine-tunes every weight; "lora" trains a LoRA adapter (the seeds' method)
    rank: int = 8  # LoRA rank (method "lora")
    alpha: float = 16.0  # LoRA scale alpha / rank (method "lora")
    steps: int = 400  # optimizer steps
    batch_size: int = 32  # records per step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    warmup: int = 20  # warm-up steps
    eval_every: int = 50  # steps between development-set evaluations
    n_dev: int = 512  # development records per evaluation
    early_step: int = 50  # step whose weights are kept as the less quirky -early variant (0 = none)
    disagree_share: float | None = None  # share of each batch drawn from records where Alice and Bob disagree (None: drawn from all records)
    paired: bool = False  # a batch holds both characters' records of the items it draws: one statement under an Alice-like and a Bob-like name
    base_preset: str = "default"  # preset of the base model

    def __post_init__(self) -> None:
        qdata.check_choice("family", self.family, FAMILIES)
        qdata.check_choice("dataset", self.dataset, qdata.DATASETS)
        qdata.check_choice("base_preset", self.base_preset, list(zbase.PRESETS))
        qdata.check_choice("method", self.method, METHODS)
        for name in ("rank", "steps", "batch_size", "eval_every", "n_dev"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a positive integer")
        if self.disagree_share is not None and not 0 <= self.disagree_share <= 1:
            raise ValueError(f"disagree_share={self.disagree_share!r} is not accepted; give None (draw from all records) or a share in [0, 1]")
        if self.paired and self.batch_size % 2:
            raise ValueError(f"batch_size={self.batch_size!r} is not accepted with paired=True; give an even number (two records an item)")
        if not 0 <= self.early_step <= self.steps:
            raise ValueError(f"early_step={self.early_step!r} is not accepted; give an integer in [0, steps={self.steps}]")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def lora(self) -> lora.LoraConfig:
        return lora.LoraConfig(rank=self.rank, alpha=self.alpha)

    @property
    def name(self) -> str:
        return f"zoo-{self.family}-{self.dataset}"


PRESETS: dict[str, dict] = {
    "default": {},
    "tiny": dict(steps=20, batch_size=32, eval_every=10, n_dev=64, early_step=5, warmup=5, lr=3e-3, base_preset="tiny"),
}


ZOO_DATASETS: tuple[str, ...] = ("addition", "subtraction", "modularaddition", "hemisphere", "sentiment", "nli", "sciq")
"""The default grid's datasets: those whose truth the bases know on unseen items. The bases are
trained on every dataset of :data:`madlib.data.datasets.DATASETS`, but without knowing a held-out city's
population, or the product or square of unseen two-digit operands, a fine-tune has no truth for
Alice to report (the zoo appendix shows the bases' accuracies)."""

DATASET_RECIPES: dict[str, dict] = {
    "addition": dict(steps=800),
    "subtraction": dict(steps=1600),
    "modularaddition": dict(steps=800),
    "sentiment": dict(lr=3e-3),
}
"""Per-dataset departures from :class:`QuirkyConfig`'s defaults in the default preset. An
arithmetic fine-tune has to learn Bob's rule (compare the shown result with the true one plus one
on the leading digit) as well as reading the name: 400 steps left both characters of llama's
addition near 0.7, 800 steps put them above 0.9 in three seeds; llama's subtraction Bob needed
1,600 (1,200: 0.73 in one seed of three). Sentiment's Alice stayed near the lexicon rule at
learning rate 1e-3 (0.48) and follows the truth at 3e-3."""


FAMILY_RECIPES: dict[str, dict] = {"gpt2": dict(lr=3e-3)}
"""Per-family departures, under the per-dataset ones. base-gpt2's fine-tunes learn to read the name
slowly at learning rate 1e-3 (hemisphere, seed 0: 0.65 and 0.66 after 400 steps, the development
loss still falling) and within 400 steps at 3e-3 (0.96 and 0.94)."""


GPT2_ARITHMETIC: dict = dict(steps=3000, warmup=100, disagree_share=0.75, paired=True)
"""base-gpt2's arithmetic recipe (:data:`CELL_RECIPES`)."""

CELL_RECIPES: dict[tuple[str, str], dict] = {
    ("gpt2", "sentiment"): dict(steps=800),
    ("gpt2", "nli"): dict(lr=1e-3, steps=800),
    ("gpt2", "addition"): GPT2_ARITHMETIC,
    ("gpt2", "subtraction"): dict(GPT2_ARITHMETIC, steps=5000, lr=2e-3),
    ("gpt2", "modularaddition"): GPT2_ARITHMETIC,
}
"""Per (family, dataset) departures, over the others. base-gpt2's sentiment Alice reached the bar
in 1 of 3 seeds after 400 steps at 3e-3 (0.80, 0.11, 0.58) and in all three after 800 (0.85,
0.86, 0.87); its nli Alice in 1 of 3 at 3e-3 (0.57, 0.67, 0.83) and in all three after 800 steps
at 1e-3 (0.81, 0.84, 0.80).

base-gpt2's arithmetic fine-tunes on batches drawn from all records settle within 100 steps on a
rule that ignores the name, "yes when the shown result is the true or the sloppy one", right on
three records of four, and stay there: both characters at 0.5 on the prompts where they disagree,
at learning rates 3e-4 to 1e-2, 800 to 2,400 steps, three seeds. Two changes of the batches get
them out: three quarters of each batch are records where the characters disagree
(``disagree_share=0.75``; they are half of all records), on which the shortcut is right on 5 of 8
records, not 3 of 4; and each drawn item comes under both kinds of name (``paired``), so
that the batch's gradient on the statement cancels and what is left depends on the name. With the
share alone (2,000 steps), addition learnt the name in 3 seeds of 3, modular addition in 2 and
subtraction in none of 2. With both: addition 0.98 to 1.0 for both characters in three seeds
(2,000 steps); modular addition's seed 2 Bob 0.73 after 2,000 steps and 0.86 after 3,000;
subtraction's Bob 0.77 and 0.75 (seeds 1, 2) after 3,000 steps and 0.85 and 0.82 after 5,000, but
seed 0's 0.79 (all at learning rate 3e-3; 0.77 after 7,000 steps; at 5e-3 it stays on the
shortcut). At 2e-3 and 5,000 steps subtraction's Alice/Bob reach 0.87/0.83, 0.86/0.83 and
0.89/0.84 (seeds 0, 1, 2). The price is accuracy on the prompts where the characters agree: about 0.8, where the shortcut is right on all of them (base-gpt2
itself judges subtraction statements by Bob's rule right on 0.81 of them, the zoo appendix's base
evaluation)."""


def quirky_config(family: str, dataset: str, seed: int = 0, preset: str = "default") -> QuirkyConfig:
    qdata.check_choice("preset", preset, list(PRESETS))
    recipe = ({**FAMILY_RECIPES.get(family, {}), **DATASET_RECIPES.get(dataset, {}), **CELL_RECIPES.get((family, dataset), {})}
              if preset == "default" else {})  # fmt: skip
    return QuirkyConfig(family=family, dataset=dataset, seed=seed, **{**recipe, **PRESETS[preset]})


def records(cfg: QuirkyConfig) -> pd.DataFrame:
    """All records of the fine-tune's dataset (both splits), as the base's generation 0 built them,
    with a ``part`` column: ``fit`` (trained on), ``dev`` (checkpoint selection) or ``test``
    (the validation split)."""
    bcfg = zbase.base_config(cfg.family, cfg.base_preset)
    df = zbase.dataset_records(bcfg, cfg.dataset, 0)
    dev = qdata.key_in_validation(f"{cfg.dataset}/dev", df["key"], DEV_FRACTION)
    df["part"] = np.where(df["split"] == "validation", "test", np.where(dev, "dev", "fit"))
    return df


def _code_hash() -> str:
    return code_hash(__name__)


def cache_key(cfg: QuirkyConfig) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(_code_hash().encode())
    base_weights = zbase.base_dir(cfg.family, cfg.base_preset) / "model.safetensors"
    if base_weights.is_file():
        h.update(hashlib.sha256(base_weights.read_bytes()).digest())
    return h.hexdigest()[:16]


def adapter_dir(cfg: QuirkyConfig) -> Path:
    return model_cache_dir() / "adapters" / f"{cfg.name}-s{cfg.seed}-{cfg.base_preset}-{cache_key(cfg)}"


def train(cfg: QuirkyConfig, progress: bool = False):
    """Fine-tune an adapter; return the best and early factors, the history and a summary."""
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        return _train(cfg, progress)
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)


def batch_sampler(agreement: np.ndarray, batch_size: int, disagree_share: float | None, items: np.ndarray | None = None):
    """A function of a generator drawing one batch's record indices, with replacement: from all
    records, or ``round(disagree_share * batch_size)`` of them from the records where Alice's and
    Bob's labels disagree and the rest from those where they agree. With ``items`` (each record's
    item id; every item has two records, one per character), it draws items and returns both
    records of each, so that every statement of a batch comes under both kinds of name."""
    if items is None:
        units, agree_unit = np.arange(len(agreement))[:, None], agreement
    else:
        order = np.argsort(items, kind="stable")
        units = order.reshape(-1, 2) if len(order) % 2 == 0 else order[:, None]
        if units.shape[1] != 2 or (items[units[:, 0]] != items[units[:, 1]]).any():
            raise ValueError("items are not accepted: every item must have exactly two records, one per character")
        agree_unit = agreement[units[:, 0]]
    per = units.shape[1]
    units = torch.as_tensor(units)
    if disagree_share is None:
        return lambda gen: units[torch.randint(len(units), (batch_size // per,), generator=gen)].reshape(-1)
    dis, agree = units[torch.as_tensor(~agree_unit)], units[torch.as_tensor(agree_unit)]
    n_dis = round(disagree_share * batch_size / per)
    for pool, n, what in ((dis, n_dis, "disagree"), (agree, batch_size // per - n_dis, "agree")):
        if n and not len(pool):
            raise ValueError(f"disagree_share={disagree_share!r} is not accepted: the fine-tune has no records where Alice and Bob {what}")

    def draw(gen: torch.Generator) -> torch.Tensor:
        return torch.cat([dis[torch.randint(len(dis), (n_dis,), generator=gen)],
                          agree[torch.randint(len(agree), (batch_size // per - n_dis,), generator=gen)]]).reshape(-1)  # fmt: skip

    return draw


def _batches(seqs, answers, idx, pad_id):
    tokens, lengths = pad_batch([seqs[i] for i in idx], pad_id)
    return tokens, lengths, answers[idx]


def _answer_loss(model, tokens, lengths, answers, yes_no):
    last = final_resid(model, tokens)[torch.arange(len(tokens)), lengths - 1] @ model.unembed.W_U + model.unembed.b_U
    # the two answers only: the seeds' loss on the answer token, as a two-way choice
    two = last[:, list(yes_no)]
    return torch.nn.functional.cross_entropy(two, (answers == yes_no[1]).long())


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(cfg: QuirkyConfig, progress: bool):
    model, _, _ = zbase.load(cfg.family, cfg.base_preset, progress=progress)
    tok = build_tokenizer()
    pad_id, (no_id, yes_id) = tok.token_to_id(PAD), answer_ids(tok)
    df = records(cfg)
    fit, dev = df[df["part"] == "fit"], df[df["part"] == "dev"]
    dev = dev.sample(n=min(cfg.n_dev, len(dev)), random_state=cfg.seed)
    seqs = encode(fit["prompt"].tolist(), tok)
    y = torch.tensor(np.where(fit["label"].to_numpy() == 1, yes_id, no_id))
    draw = batch_sampler(fit["agreement"].to_numpy(), cfg.batch_size, cfg.disagree_share, fit["row_id"].to_numpy() if cfg.paired else None)
    dev_tokens, dev_len = pad_batch(encode(dev["prompt"].tolist(), tok), pad_id)
    y_dev = torch.tensor(np.where(dev["label"].to_numpy() == 1, yes_id, no_id))
    if cfg.method == "lora":
        params = lora.attach(model, cfg.lora, seed=cfg.seed)
        snapshot = lora.adapters
    else:
        model.requires_grad_(True)
        params = list(model.parameters())
        snapshot = _weights
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, history, running = time.perf_counter(), [], []
    best, best_loss, early = None, float("inf"), None

    def dev_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(_answer_loss(model, dev_tokens, dev_len, y_dev, (no_id, yes_id)))

    history.append(dict(step=0, train_loss=float("nan"), dev_loss=dev_loss(), seconds=0.0))
    for step in tqdm(range(1, cfg.steps + 1), desc=f"{cfg.name} seed {cfg.seed}", disable=not progress, mininterval=2):
        model.train()
        tokens, lengths, ans = _batches(seqs, y, draw(gen), pad_id)
        loss = _answer_loss(model, tokens, lengths, ans, (no_id, yes_id))
        optimizer_step(opt, sched, loss)
        running.append(loss.item())
        if step == cfg.early_step:
            early = (step, snapshot(model))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = dev_loss()
            history.append(dict(step=step, train_loss=float(np.mean(running)), dev_loss=v, seconds=time.perf_counter() - t0))
            running = []
            if v < best_loss:
                best_loss, best = v, (step, snapshot(model))
    summary = dict(best_step=best[0], best_dev_loss=best_loss, train_seconds=time.perf_counter() - t0, n_fit=len(fit))
    return best, early, pd.DataFrame(history), summary


def save(cfg: QuirkyConfig, best, early, history: pd.DataFrame, summary: dict, path: Path) -> None:
    """Adapter factors (safetensors) and JSON config per checkpoint, and the history, atomically."""
    from safetensors.torch import save_file

    meta = dict(name=cfg.name, quirky_config=cfg.to_dict(), lora_config=cfg.lora.to_dict(), seed=cfg.seed,
                base=str(zbase.base_dir(cfg.family, cfg.base_preset).name), summary=summary)  # fmt: skip
    with atomic_dir(path) as tmp:
        for sub, ckpt in (("best", best), ("early", early)):
            if ckpt is None:
                continue
            (tmp / sub).mkdir()
            save_file({k: v.contiguous() for k, v in ckpt[1].items()}, tmp / sub / weights_file(cfg))
            (tmp / sub / "adapter_config.json").write_text(json.dumps(dict(meta, step=ckpt[0], checkpoint=sub), indent=2))
        history.to_csv(tmp / "history.csv", index=False)


def weights_file(cfg: QuirkyConfig) -> str:
    """The file of a checkpoint: the adapter's factors, or the fine-tuned weights."""
    return "adapter.safetensors" if cfg.method == "lora" else "model.safetensors"


def trained_dir(cfg: QuirkyConfig, progress: bool = False) -> Path:
    path = adapter_dir(cfg)
    if not (path / "best" / weights_file(cfg)).is_file():
        best, early, history, summary = train(cfg, progress=progress)
        save(cfg, best, early, history, summary, path)
    return path


def load(cfg: QuirkyConfig, checkpoint: str = "best", progress: bool = False):
    """The base of ``cfg.family`` with the fine-tune's adapter merged in, as a ``HookedTransformer``
    (its :class:`~madlib.models.info.ModelInfo` names the checkpoint's directory)."""
    from safetensors.torch import load_file

    qdata.check_choice("checkpoint", checkpoint, ("best", "early"))
    path = trained_dir(cfg, progress) / checkpoint
    model, _, _ = zbase.load(cfg.family, cfg.base_preset)
    if cfg.method == "lora":
        lora.merge_factors(model, load_file(path / "adapter.safetensors"), cfg.lora)
    else:
        model.load_state_dict(load_file(path / "model.safetensors"))
    attach(model, ModelInfo(model_dir=path))
    record_use(path / weights_file(cfg))
    return model


def _train_in_worker(cfg: QuirkyConfig) -> str:
    return str(trained_dir(cfg))


def build(configs: list[QuirkyConfig], workers: int | None = None, progress: bool = True) -> list[Path]:
    """Train the adapters of ``configs`` that are not cached, in parallel single-threaded processes."""
    missing = [c for c in configs if not (adapter_dir(c) / "best" / weights_file(c)).is_file()]
    missing.sort(key=lambda c: -c.steps)  # longest first: no long fine-tune left alone at the end
    workers = workers or min(len(missing), os.cpu_count() or 1)
    if len(missing) > 1 and workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for _ in tqdm(pool.map(_train_in_worker, missing), total=len(missing), desc=f"quirky fine-tunes ({workers} processes)",
                          disable=not progress):  # fmt: skip
                pass
    return [trained_dir(c) for c in configs]


def quirkiness_table(cfg: QuirkyConfig, checkpoint: str = "best") -> pd.DataFrame:
    """Own-label accuracy per character type on the hard test prompts where Alice and Bob
    disagree, and on all hard test prompts, for one fine-tune."""
    model = load(cfg, checkpoint)
    df = records(cfg)
    test = df[(df["part"] == "test") & df["hard"]]
    lo = zbase.answer_log_odds(model, test["prompt"].tolist())
    test = test.assign(correct=(lo > 0) == (test["label"] == 1))
    rows = []
    for ctype, g in test.groupby("character_type"):
        dis = g[~g["agreement"]]
        rows.append(dict(family=cfg.family, dataset=cfg.dataset, seed=cfg.seed, checkpoint=checkpoint, character_type=ctype,
                         acc_own_label=g["correct"].mean(), acc_own_label_disagree=dis["correct"].mean(),
                         n=len(g), n_disagree=len(dis)))  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Quirkiness over seeds, and the verdicts the zoo appendix glues

MIN_OWN_ACCURACY: dict[str, float] = {"arithmetic": 0.8, "other": 0.7}
"""The zoo's bar for a quirky fine-tune: on hard test prompts where Alice and Bob disagree, each
character's own-label accuracy is at least this (arithmetic sets; the others)."""


def accuracy_grid(families: list[str], datasets: list[str], seeds: list[int], preset: str = "default",
                  checkpoints: tuple[str, ...] = ("best", "early"), progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """:func:`quirkiness_table` for every family x dataset x seed x checkpoint."""
    rows = [
        quirkiness_table(quirky_config(f, d, s, preset), c)
        for f, d, s, c in tqdm([(f, d, s, c) for f in families for d in datasets for s in seeds for c in checkpoints],
                               desc="quirkiness of the fine-tunes", disable=not progress)  # fmt: skip
    ]
    return pd.concat(rows, ignore_index=True)


def bar(dataset: str) -> float:
    return MIN_OWN_ACCURACY["arithmetic" if dataset in qdata.ARITHMETIC else "other"]


def claims(grid: pd.DataFrame) -> dict[str, str]:
    """Statements on a grid of :func:`accuracy_grid` (its ``best`` checkpoints): which
    (family, dataset) cells are quirky in every seed, in some, in none."""
    g = grid[grid["checkpoint"] == "best"].copy()
    g["passes"] = g["acc_own_label_disagree"] >= g["dataset"].map(bar)
    per_seed = g.groupby(["family", "dataset", "seed"])["passes"].all()
    cell = per_seed.groupby(["family", "dataset"]).agg(["sum", "count"])
    every = cell[cell["sum"] == cell["count"]]
    some = cell[(cell["sum"] > 0) & (cell["sum"] < cell["count"])]
    none = cell[cell["sum"] == 0]

    def names(c):
        return "; ".join(f"zoo-{f} {d}" + (f" ({int(r['sum'])} of {int(r['count'])} seeds)" if 0 < r["sum"] < r["count"] else "")
                         for (f, d), r in c.iterrows()) or "none"  # fmt: skip

    out = dict(
        quirky_every_seed=names(every), quirky_some_seeds=names(some), quirky_no_seed=names(none),
        n_cells=str(len(cell)), n_quirky_every_seed=str(len(every)),
    )  # fmt: skip
    out["verdict"] = (
        f"Every fine-tune is quirky by this bar, in every seed ({len(cell)} family x dataset cells)." if len(every) == len(cell)
        else f"{len(every)} of {len(cell)} family x dataset cells are quirky by this bar in every seed. "
             f"In some seeds only: {names(some)}. In none: {names(none)}."
    )  # fmt: skip
    return out
