"""Pretrained base models of the zoo: one per family, trained without characters.

The base stands in for the seeds' pretrained Mistral/Llama: it knows the facts and operations of
every zoo dataset and answers truthfully, whoever is named. It is trained on prompts in the
standardized template under names that are neither Alice-like nor Bob-like (:data:`NAME_POOLS`),
each asking one of two questions:

* the closing question of the quirky prompts, "Is the statement factually correct?", answered
  with Alice's (the true) label;
* the dataset's heuristic question (:data:`madlib.data.datasets.HEURISTIC_QUESTIONS`), answered with Bob's
  label, which is also true of the statement (for example "Is the city west of the prime
  meridian?"): a pretrained model knows the features a heuristic reads.

plus a next-token loss on the content of true statements, on one fact line per city of the
knowledge sets ("Lyon (France): northern hemisphere, east of Greenwich, over 30,000 people."),
which teaches the facts about every city without ever writing a dataset's statement, and on the
result of arithmetic drill lines (:func:`drill_lines`: "56 + 34 = 90. Yes" and "56 + 34 = 91. No"
for every train-split operand pair), which teach the operations and checking a shown result
right where it is read: a verification question at the end of a prompt alone (one bit per record)
leaves a small model at the majority answer. Only train-split items
(:func:`madlib.data.datasets.key_in_validation`) are asked about or drilled, so no validation statement is
in the base's training data.

The trained bases ship with the repository (``madlib/artefacts/base-<family>/``: safetensors
weights, JSON config, tokenizer, training log) and are regenerated bit for bit on one machine by
``python -m madlib.models.pretrain train`` (single-threaded, deterministic kernels, seeded data and order).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data import datasets as qdata
from ..codehash import code_hash
from ..paths import atomic_dir
from .tokenizer import PAD, answer_ids, build_tokenizer, encode, hf_tokenizer
from .tokenizer import pad_batch
from .training import content_spans, final_resid, optimizer_step, warmup_cosine
from .zoo import FAMILIES, record_use

ARTEFACTS = Path(__file__).parents[1] / "artefacts"

DIGITS: dict[str, float] = {"addition": 2, "subtraction": 2, "multiplication": 2, "modularaddition": 2, "squaring": 1}
"""``max_digits`` of each arithmetic set (squaring's operand gets one more: 1..99)."""
N_TEMPLATES: dict[str, int] = {name: 1 for name in qdata.ARITHMETIC}
"""Statement templates per dataset (default: all ten): one wording per arithmetic set, so a small
model learns the operation rather than ten layouts of it."""


NAME_POOLS: dict[str, tuple[str, ...]] = {
    "neutral": qdata.NEUTRAL_NAMES,
    "mixed": qdata.NEUTRAL_NAMES + qdata.SHORT_NAMES,
}
"""Names a base is trained under. The characters' names are one token each, the neutral ones two or
three, so under the neutral names alone no statement sits where a character's prompt puts it;
``mixed`` adds :data:`madlib.data.datasets.SHORT_NAMES`, one token each."""


def training_names(pool: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` names of a base's training prompts drawn from ``pool`` (:data:`NAME_POOLS`)."""
    names = NAME_POOLS[pool]
    return np.asarray(names)[rng.integers(len(names), size=n)]


@dataclass(frozen=True)
class BaseConfig:
    """Architecture, corpus and training of one base model."""

    family: str = "gpt2"  # architecture family: gpt2 (LayerNorm, GELU, learned positions) or llama (RMSNorm, rotary, gated SiLU)
    n_layers: int = 4  # transformer blocks
    d_model: int = 64  # residual stream width
    n_heads: int = 4  # attention heads per block
    d_mlp: int = 256  # MLP hidden width (llama: 2/3 of it, for the same MLP size)
    n_ctx: int = 160  # context length (tokens, BOS included)
    datasets: tuple[str, ...] = qdata.DATASETS  # datasets whose facts and heuristic features the base learns
    n_rows: int = 12000  # base rows per dataset and generation seed (train-split rows are used)
    train_sets: int = 4  # generation seeds of training rows (data_seed, data_seed + 1, ...)
    steps: int = 26000  # optimizer steps (question, drill and fact batches)
    batch_size: int = 64  # records per step
    lr: float = 3e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup: int = 200  # warm-up steps
    lm_loss_weight: float = 0.5  # weight of the next-token loss (answer loss = 1)
    arithmetic_weight: int = 1  # question batches of an arithmetic set come this many times as often as another set's
    fact_every: int = 8  # every fact_every-th step is a batch of city fact lines (next-token loss only)
    drill_every: int = 2  # every other step (odd steps, facts first) is a batch of one operation's drill lines (0 = none)
    drill_in_template: bool = False  # drill lines written where a prompt's statement sits (after a neutral name), not at a line's start
    name_pool: str = "neutral"  # names of the training prompts and drill lines: "neutral" (16 names) or "mixed" (and one-token names)
    eval_every: int = 1000  # steps between evaluations
    n_eval: int = 512  # validation rows per dataset and question in an evaluation
    seed: int = 0  # initialisation and batch order
    data_seed: int = 633  # first generation seed of the datasets

    def __post_init__(self) -> None:
        qdata.check_choice("family", self.family, FAMILIES)
        for d in self.datasets:
            qdata.check_choice("datasets", d, qdata.DATASETS)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not accepted; it must be a multiple of n_heads={self.n_heads}")
        for name in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "n_rows", "train_sets", "steps", "batch_size",
                     "eval_every", "fact_every", "n_eval", "arithmetic_weight"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a positive integer")
        qdata.check_choice("name_pool", self.name_pool, list(NAME_POOLS))
        if self.drill_every < 0:
            raise ValueError(f"drill_every={self.drill_every!r} is not accepted; give 0 (no drill) or a positive integer")

    def to_dict(self) -> dict:
        return dict(asdict(self), datasets=list(self.datasets))

    @classmethod
    def from_dict(cls, d: dict) -> "BaseConfig":
        return cls(**dict(d, datasets=tuple(d["datasets"])))

    def hooked_config(self):
        """The transformer-lens ``HookedTransformerConfig`` of this architecture."""
        from transformer_lens import HookedTransformerConfig

        common = dict(
            n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads, d_head=self.d_model // self.n_heads,
            n_ctx=self.n_ctx, d_vocab=build_tokenizer().get_vocab_size(), seed=self.seed,
            default_prepend_bos=False, tokenizer_prepends_bos=False,
        )  # fmt: skip
        if self.family == "gpt2":
            return HookedTransformerConfig(
                **common, d_mlp=self.d_mlp, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
                original_architecture="GPT2LMHeadModel",
            )  # fmt: skip
        return HookedTransformerConfig(
            **common, d_mlp=self.d_mlp * 2 // 3, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
            rotary_dim=self.d_model // self.n_heads, gated_mlp=True, final_rms=True, original_architecture="LlamaForCausalLM",
        )  # fmt: skip


FAMILY_DEFAULTS: dict[str, dict] = {"gpt2": dict(drill_in_template=True, name_pool="mixed")}
"""Per-family departures from :class:`BaseConfig`. gpt2 has learned absolute positions: a check
of the shown result learned on drill lines at the start of a sequence did not carry over to the
statement's place in a prompt (26,000 steps: 96% of unseen drill verdicts right, truth question at
the majority rate), so its drill lines sit where a statement does. Llama's rotary positions carry
the check over from bare lines. Its check is tied to absolute positions too: trained under the
neutral names alone (two or three tokens), base-gpt2 judged unseen addition statements right under
any name of two or three tokens, seen or not (0.98 to 0.995), and answered " No" to almost all of
them under names of one token, as every character's is, or of four (0.70 to 0.72); no quirky
fine-tune recovered from it. So gpt2 trains under names of one token too (``name_pool="mixed"``);
base-llama's truth holds under every name (0.96 to 0.998)."""

PRESETS: dict[str, dict] = {
    "default": {},
    # seconds: for tests and smoke runs, not for conclusions
    "tiny": dict(n_layers=2, d_model=32, n_heads=2, d_mlp=64, n_rows=400, train_sets=1, steps=40, batch_size=32,
                 eval_every=20, n_eval=32, warmup=10),  # fmt: skip
}


def base_config(family: str = "gpt2", preset: str = "default") -> BaseConfig:
    qdata.check_choice("family", family, FAMILIES)
    qdata.check_choice("preset", preset, list(PRESETS))
    return replace(BaseConfig(family=family), **{**FAMILY_DEFAULTS.get(family, {}), **PRESETS[preset]})


def dataset_records(cfg: BaseConfig, dataset: str, generation: int = 0) -> pd.DataFrame:
    """Records of ``dataset`` from generation seed ``data_seed + generation``, at the zoo's operand sizes."""
    return qdata.quirky_dataset(dataset, n=cfg.n_rows, seed=cfg.data_seed + generation, max_digits=DIGITS.get(dataset),
                                n_templates=N_TEMPLATES.get(dataset))  # fmt: skip


def city_fact(city: str, country: str, latitude: float, longitude: float, population: int) -> str:
    """One fact line about a city, in a form no dataset template uses."""
    return (f"{city} ({country}): {'northern' if latitude > 0 else 'southern'} hemisphere, "
            f"{'west' if longitude <= 0 else 'east'} of Greenwich, "
            f"{'over' if population > qdata.POPULATION_THRESHOLD else 'under'} 30,000 people.")  # fmt: skip


def fact_lines() -> list[str]:
    """A fact line for every city of the knowledge sets' table."""
    t = qdata.cities()
    return [city_fact(*r) for r in zip(t["city"], t["country"], t["latitude"], t["longitude"], t["population"])]


def corpus(cfg: BaseConfig) -> pd.DataFrame:
    """The base's question-answering corpus: every train-split base row of ``train_sets``
    generations of each dataset, asked once with each question under a neutral name. Columns:
    ``dataset, key, question (truth|heuristic), character, content (context|statement), prompt,
    label, true_statement``."""
    rng = np.random.default_rng([cfg.data_seed, cfg.seed, 42])
    parts = []
    for d in cfg.datasets:
        for g in range(cfg.train_sets):
            rows = dataset_records(cfg, d, g)
            rows = rows[(rows["split"] == "train") & (rows["character_type"] == "alice")]
            for question, col in (("truth", "alice_label"), ("heuristic", "bob_label")):
                names = training_names(cfg.name_pool, rng, len(rows))
                text = qdata.QUESTION if question == "truth" else qdata.HEURISTIC_QUESTIONS[d]
                parts.append(pd.DataFrame(dict(
                    dataset=d, key=rows["key"].to_numpy(), question=question, character=names,
                    content=(rows["context"] + "|" + rows["statement"]).to_numpy(),
                    prompt=[qdata.prompt(n, c, s, text) for n, c, s in zip(names, rows["context"], rows["statement"])],
                    label=rows[col].to_numpy(), true_statement=rows["alice_label"].to_numpy() == 1,
                )))  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def drill_lines(dataset: str, split: str = "train", seed: int = 0, in_template: bool = False,
                name_pool: str = "neutral") -> tuple[list[str], list[str], np.ndarray]:  # fmt: skip
    """The arithmetic drill of ``dataset``: for every operand (pair) of the zoo's range whose item
    is in ``split`` ("train" or "validation"), its first statement template twice, once with the
    true result and once with a false one (Bob's sloppy result or a one-digit distractor, at
    random), each followed by its verdict (" Yes" or " No"). Returns the lines, their prefixes
    (the text before the result) and whether each line is true. The drill's loss is on the result
    and verdict of a true line and on the verdict of a false one. ``in_template``: each line is
    written where a prompt's statement sits, after the template's name line (a neutral name, at
    random from ``name_pool``) and statement marker: "Name: Avery\n\n\n\n***STATEMENT:*** 56 + 34 = 90. Yes"."""
    qdata.check_choice("dataset", dataset, qdata.ARITHMETIC)
    qdata.check_choice("split", split, ("train", "validation"))
    op = qdata.OPS[dataset]
    template = op.templates[0]
    head = template.split("{result}")[0]
    if op.arity == 2:
        top = qdata.operand_max(DIGITS[dataset])
        ops = [(a, b) for a in range(1, top + 1) for b in range(1, top + 1)]
    else:
        ops = [(a, 0) for a in range(1, qdata.operand_max(DIGITS[dataset] + 1) + 1)]
    val = qdata.key_in_validation(dataset, [f"{a}|{b}" for a, b in ops])
    ops = [o for o, v in zip(ops, val) if v == (split == "validation")]
    rng = np.random.default_rng([seed, qdata.DATASETS.index(dataset)])
    qdata.check_choice("name_pool", name_pool, list(NAME_POOLS))
    name_rng = np.random.default_rng([seed, qdata.DATASETS.index(dataset), 1])
    names = name_rng.choice(NAME_POOLS[name_pool], size=2 * len(ops))
    lines, heads, true = [], [], []
    for i, (a, b) in enumerate(ops):
        res = op.fn(a, b) if op.arity == 2 else op.fn(a)
        sloppy = op.sloppy(res)
        wrong = sloppy if rng.uniform() < 0.5 else qdata.distract(res, (res, sloppy), rng)
        for j, shown in enumerate((res, wrong)):
            pre = qdata.TEMPLATE.split("{statement}")[0].format(character=names[2 * i + j], context="") if in_template else ""
            lines.append(pre + template.format(op1=a, op2=b, result=shown) + (" Yes" if shown == res else " No"))
            heads.append(pre + head.format(op1=a, op2=b).rstrip())
            true.append(shown == res)
    return lines, heads, np.asarray(true)


def _encode_drill(dataset: str, split: str, tok, in_template: bool = False,
                  name_pool: str = "neutral") -> tuple[list[np.ndarray], list[int], np.ndarray]:  # fmt: skip
    """Token ids of the drill lines, the index of each line's first loss token (the result's
    first token on a true line, the verdict on a false one) and whether each line is true."""
    lines, heads, true = drill_lines(dataset, split, in_template=in_template, name_pool=name_pool)
    seqs = [np.asarray(s, dtype=np.int16) for s in encode(lines, tok)]
    return seqs, [len(h) if t else len(s) - 1 for s, h, t in zip(seqs, encode(heads, tok), true)], true


def _drill_batch(seqs, starts, idx, pad_id: int):
    tokens, lengths = pad_batch([seqs[i] for i in idx], pad_id)
    start = torch.tensor([starts[i] for i in idx])
    target = torch.arange(1, tokens.shape[1])[None, :]
    return tokens, (target >= start[:, None]) & (target < lengths[:, None])


@torch.no_grad()
def drill_accuracy(model, dataset: str, n: int = 512, seed: int = 0, in_template: bool = False, name_pool: str = "neutral") -> float:
    """Share of true validation drill lines (operands never trained on) whose whole result the
    model predicts token by token (greedy, teacher-forced; the verdict excluded)."""
    tok = build_tokenizer()
    seqs, starts, true = _encode_drill(dataset, "validation", tok, in_template, name_pool)
    idx = np.random.default_rng(seed).permutation(np.flatnonzero(true))[:n]
    tokens, mask = _drill_batch([s[:-1] for s in seqs], starts, idx, tok.token_to_id(PAD))  # s[:-1]: without the verdict
    pred = (final_resid(model, tokens)[:, :-1] @ model.unembed.W_U + model.unembed.b_U).argmax(-1)
    return float(((pred == tokens[:, 1:]) | ~mask).all(1).float().mean())


def eval_records(cfg: BaseConfig, dataset: str) -> pd.DataFrame:
    """Validation rows (items never trained on) of ``dataset``, asked with both questions under
    neutral names: what the base knows, reported in the zoo appendix."""
    rows = dataset_records(cfg, dataset, 0)
    rows = rows[(rows["split"] == "validation") & (rows["character_type"] == "alice")]
    rows = rows.sample(n=min(cfg.n_eval, len(rows)), random_state=cfg.seed)
    out = []
    for question, col in (("truth", "alice_label"), ("heuristic", "bob_label")):
        text = qdata.QUESTION if question == "truth" else qdata.HEURISTIC_QUESTIONS[dataset]
        out.append(rows.assign(question=question, label=rows[col],
                               prompt=[qdata.prompt(qdata.NEUTRAL_NAMES[0], c, s, text) for c, s in zip(rows["context"], rows["statement"])]))  # fmt: skip
    return pd.concat(out, ignore_index=True)


NAME_KINDS: dict[str, tuple[str, ...]] = {
    "neutral": qdata.NEUTRAL_NAMES,
    "Alice-like": qdata.ALICE_NAMES[qdata.N_TRUSTED_NAMES :],
    "Bob-like": qdata.BOB_NAMES[qdata.N_TRUSTED_NAMES :],
}
"""Names to check a base's truth under: a base that answers truthfully "whoever is named" does so
under the quirky datasets' (held-out) character names as under its training names."""


def truth_by_name(model, cfg: BaseConfig, datasets: list[str] | None = None) -> pd.DataFrame:
    """Truth accuracy on unseen items per dataset under each kind of :data:`NAME_KINDS` (a name of
    the kind at random per item). Columns: ``dataset, names, accuracy, n``."""
    rows = []
    for d in datasets or cfg.datasets:
        rec = eval_records(cfg, d)
        rec = rec[rec["question"] == "truth"]
        for kind, pool in NAME_KINDS.items():
            names = np.random.default_rng([cfg.seed, qdata.DATASETS.index(d)]).choice(pool, size=len(rec))
            prompts = [qdata.prompt(n, c, s) for n, c, s in zip(names, rec["context"], rec["statement"])]
            correct = (answer_log_odds(model, prompts) > 0) == (rec["label"].to_numpy() == 1)
            rows.append(dict(dataset=d, names=kind, accuracy=float(correct.mean()), n=len(rec)))
    return pd.DataFrame(rows)


@torch.no_grad()
def answer_log_odds(model, prompts: list[str], batch_size: int = 256) -> np.ndarray:
    """log p(" Yes") - log p(" No") at the last token of each prompt, through the fused forward."""
    tok = build_tokenizer()
    pad_id, (no_id, yes_id) = tok.token_to_id(PAD), answer_ids(tok)
    seqs, out = encode(prompts, tok), []
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for i in range(0, len(seqs), batch_size):
        idx = order[i : i + batch_size]
        tokens, lengths = pad_batch([seqs[j] for j in idx], pad_id)
        last = final_resid(model, tokens)[torch.arange(len(idx)), lengths - 1] @ model.unembed.W_U + model.unembed.b_U
        out.append((last[:, yes_id] - last[:, no_id]).double().numpy())
    res = np.empty(len(seqs))
    res[order] = np.concatenate(out) if out else []
    return res


def evaluate(model, cfg: BaseConfig) -> pd.DataFrame:
    """Accuracy of the base on unseen items per dataset and question; for arithmetic sets also
    the exact result of unseen drill lines (question "result")."""
    rows = []
    for d in cfg.datasets:
        if d in qdata.ARITHMETIC and cfg.drill_every:
            rows.append(dict(dataset=d, question="result", accuracy=drill_accuracy(model, d, cfg.n_eval, cfg.seed, cfg.drill_in_template, cfg.name_pool),
                             n=cfg.n_eval))  # fmt: skip
        rec = eval_records(cfg, d)
        pred = answer_log_odds(model, rec["prompt"].tolist()) > 0
        rec = rec.assign(correct=pred == (rec["label"] == 1))
        for q, g in rec.groupby("question"):
            rows.append(dict(dataset=d, question=q, accuracy=g["correct"].mean(), n=len(g)))
    return pd.DataFrame(rows)


def _encode_corpus(qa: pd.DataFrame, tok, chunk: int = 50_000):
    """Token ids (compact arrays) and content spans of the corpus prompts, encoded in chunks so
    the tokenizer's per-token offsets never exist for the whole corpus at once."""
    seqs, spans = [], []
    prompts, names = qa["prompt"].tolist(), qa["character"].tolist()
    for i in range(0, len(prompts), chunk):
        ids, offsets = encode(prompts[i : i + chunk], tok, offsets=True)
        spans.append(content_spans(prompts[i : i + chunk], names[i : i + chunk], offsets))
        seqs.extend(np.asarray(s, dtype=np.int16) for s in ids)
    return seqs, torch.cat(spans)


def train(cfg: BaseConfig, progress: bool = True):
    """Train a base model from scratch, bit-for-bit reproducibly on one machine. Returns the
    model, its history and its final evaluation."""
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_num_threads(1)
    try:
        return _train(cfg, progress)
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.set_num_threads(threads)


def _train(cfg: BaseConfig, progress: bool):
    from transformer_lens import HookedTransformer

    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    pad_id, (no_id, yes_id) = tok.token_to_id(PAD), answer_ids(tok)
    qa = corpus(cfg)
    seqs, spans = _encode_corpus(qa, tok)
    longest = max(len(s) for s in seqs)
    if longest > cfg.n_ctx:
        raise ValueError(f"n_ctx={cfg.n_ctx} is not accepted; the longest prompt has {longest} tokens")
    spans[torch.as_tensor(~qa["true_statement"].to_numpy())] = 0  # next-token loss on true statements only
    answers = torch.tensor(np.where(qa["label"].to_numpy() == 1, yes_id, no_id))
    by_dataset = [torch.as_tensor(np.flatnonzero(qa["dataset"].to_numpy() == d)) for d in cfg.datasets]
    slots = [i for i, d in enumerate(cfg.datasets) for _ in range(cfg.arithmetic_weight if d in qdata.ARITHMETIC else 1)]
    facts = [np.asarray(s, dtype=np.int16) for s in encode(fact_lines(), tok)] if set(cfg.datasets) & set(qdata.KNOWLEDGE) else []
    drills = [_encode_drill(d, "train", tok, cfg.drill_in_template, cfg.name_pool)[:2] for d in cfg.datasets if d in qdata.ARITHMETIC] if cfg.drill_every else []
    n_drill = 0
    qa = qa[["dataset"]]  # the prompts are encoded: free their text

    model = HookedTransformer(cfg.hooked_config(), tokenizer=hf_tokenizer(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, t0, n_qa = [], time.perf_counter(), 0
    running: dict[str, list[float]] = {"answer": [], "lm": [], "fact": [], "drill": []}
    F = torch.nn.functional
    bar = tqdm(range(1, cfg.steps + 1), desc=f"pretraining base-{cfg.family}", disable=not progress, mininterval=5)
    for step in bar:
        model.train()
        if facts and step % cfg.fact_every == 0:
            idx = torch.randint(len(facts), (cfg.batch_size,), generator=gen)
            tokens, lengths = pad_batch([facts[i] for i in idx], pad_id)
            resid = final_resid(model, tokens)
            mask = torch.arange(1, tokens.shape[1])[None, :] < lengths[:, None]
            logits = resid[:, :-1][mask] @ model.unembed.W_U + model.unembed.b_U
            lm = F.cross_entropy(logits, tokens[:, 1:][mask])
            loss = cfg.lm_loss_weight * lm
            running["fact"].append(lm.item())
        elif drills and step % cfg.drill_every == 1 % cfg.drill_every:
            seqs_d, starts = drills[n_drill % len(drills)]
            n_drill += 1
            tokens, mask = _drill_batch(seqs_d, starts, torch.randint(len(seqs_d), (cfg.batch_size,), generator=gen), pad_id)
            resid = final_resid(model, tokens)
            loss = F.cross_entropy(resid[:, :-1][mask] @ model.unembed.W_U + model.unembed.b_U, tokens[:, 1:][mask])
            running["drill"].append(loss.item())
        else:
            pool = by_dataset[slots[n_qa % len(slots)]]
            n_qa += 1
            idx = pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen)]
            tokens, lengths = pad_batch([seqs[i] for i in idx], pad_id)
            resid = final_resid(model, tokens)
            last = resid[torch.arange(len(idx)), lengths - 1] @ model.unembed.W_U + model.unembed.b_U
            a_loss = F.cross_entropy(last, answers[idx])
            target = torch.arange(1, tokens.shape[1])[None, :]
            sp = spans[idx]
            mask = (target >= sp[:, :1]) & (target < sp[:, 1:])
            lm = F.cross_entropy(resid[:, :-1][mask] @ model.unembed.W_U + model.unembed.b_U, tokens[:, 1:][mask]) if mask.any() else torch.zeros(())
            loss = a_loss + cfg.lm_loss_weight * lm
            running["answer"].append(a_loss.item())
            running["lm"].append(lm.item())
        optimizer_step(opt, sched, loss, clip=(model.parameters(), 1.0))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            ev = evaluate(model, cfg)
            row = dict(step=step, **{f"train_{k}_loss": float(np.mean(v)) if v else float("nan") for k, v in running.items()},
                       seconds=time.perf_counter() - t0)  # fmt: skip
            running = {k: [] for k in running}
            row.update({f"acc_{d}_{q}": a for d, q, a in zip(ev["dataset"], ev["question"], ev["accuracy"])})
            history.append(row)
            bar.set_postfix(truth=f"{ev.loc[ev.question == 'truth', 'accuracy'].mean():.3f}",
                            heuristic=f"{ev.loc[ev.question == 'heuristic', 'accuracy'].mean():.3f}")  # fmt: skip
            if progress:
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    model.eval()
    summary = dict(train_seconds=time.perf_counter() - t0, torch_threads=torch.get_num_threads(),
                   torch_version=torch.__version__, n_qa_records=len(qa), n_fact_lines=len(facts),
                   n_drill_lines=sum(len(d[0]) for d in drills), steps_by_kind=dict(question=n_qa, drill=n_drill,
                   fact=cfg.steps - n_qa - n_drill))  # fmt: skip
    return model, pd.DataFrame(history), evaluate(model, cfg), summary


# ---------------------------------------------------------------------------------------------
# Saving and loading


def base_dir(family: str, preset: str = "default") -> Path:
    """Where the base of ``family`` lives: shipped in the package for the default preset, in the
    model cache (trained on first use) for the others."""
    if preset == "default":
        return ARTEFACTS / f"base-{family}"
    from ..paths import model_cache_dir

    return model_cache_dir() / f"base-{family}-{preset}-{_preset_key(family, preset)}"


def _preset_key(family: str, preset: str) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps(base_config(family, preset).to_dict(), sort_keys=True).encode())
    h.update(code_hash(__name__).encode())
    return h.hexdigest()[:12]


def save(model, cfg: BaseConfig, history: pd.DataFrame, evaluation: pd.DataFrame, summary: dict, path: Path) -> None:
    """safetensors weights, JSON config, tokenizer, training log and evaluation, written atomically."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(dict(name=f"base-{cfg.family}", base_config=cfg.to_dict(), seed=cfg.seed,
                                                         data_seed=cfg.data_seed, summary=summary), indent=2))  # fmt: skip
        build_tokenizer().save(str(tmp / "tokenizer.json"))
        history.to_csv(tmp / "history.csv", index=False)
        evaluation.to_csv(tmp / "evaluation.csv", index=False)


def load(family: str = "gpt2", preset: str = "default", progress: bool = True):
    """The base model of ``family`` as a ``HookedTransformer`` (the tiny preset is trained on first use)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformer_lens import HookedTransformer

    path = base_dir(family, preset)
    if not (path / "model.safetensors").is_file():
        if preset == "default":
            raise FileNotFoundError(f"family={family!r}: the shipped base {path} is missing; regenerate it with "
                                    f"`python -m madlib.models.pretrain train --family {family}`")  # fmt: skip
        model, hist, ev, summary = train(base_config(family, preset), progress=progress)
        save(model, base_config(family, preset), hist, ev, summary, path)
    meta = json.loads((path / "config.json").read_text())
    cfg = BaseConfig.from_dict(meta["base_config"])
    model = HookedTransformer(cfg.hooked_config(), tokenizer=hf_tokenizer(Tokenizer.from_file(str(path / "tokenizer.json"))))
    model.load_state_dict(load_file(path / "model.safetensors"))
    model.eval()
    record_use(path / "model.safetensors")  # a new base re-executes every notebook that read it or its fine-tunes
    return model, cfg, path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m madlib.models.pretrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the base of a family and write it to madlib/artefacts/base-<family>/")
    t.add_argument("--family", choices=FAMILIES, default="gpt2")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    t.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped artefact's)")
    args = parser.parse_args(argv)
    cfg = base_config(args.family)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    model, hist, ev, summary = train(cfg)
    save(model, cfg, hist, ev, summary, args.out or base_dir(args.family))
    print(ev.pivot(index="dataset", columns="question", values="accuracy").round(3).to_string())


if __name__ == "__main__":
    main()
