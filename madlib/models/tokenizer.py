"""The tokenizer shared by the zoo models and madlib.

A small byte-pair-encoding tokenizer trained locally with the ``tokenizers`` library on text the
zoo generates (every zoo dataset's prompts), so prompts are real text and common words such as
``STATEMENT`` or ``factually`` are single tokens, as with the subword tokenizers of real models.
Digits are always split one per token, and the answers ``" Yes"`` and ``" No"`` are single tokens.
Training is deterministic (fixed corpus, fixed vocabulary size); the result is saved as
``tokenizer.json`` next to every zoo model and wrapped in ``transformers.PreTrainedTokenizerFast``
for transformer-lens.
"""

from __future__ import annotations

import string
from contextlib import contextmanager
from functools import lru_cache

import torch
from jaxtyping import Int
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from torch import Tensor

from ..data import datasets as qdata
from ..data.datasets import ANSWERS, DATASETS, HEURISTIC_QUESTIONS, NEUTRAL_NAMES, quirky_dataset
from .info import zoo_info

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
VOCAB_SIZE = 1024
CORPUS_ROWS = 1500
CORPUS_SEED = 12345


def _corpus() -> list[str]:
    """Prompts of every zoo dataset (a seed of its own), the base models' questions and names, plus
    each printable character."""
    texts = [ch for ch in string.printable] + list(HEURISTIC_QUESTIONS.values()) * 100 + list(NEUTRAL_NAMES) * 100
    for name in DATASETS:
        texts.extend(quirky_dataset(name, n=CORPUS_ROWS, seed=CORPUS_SEED)["prompt"].tolist())
    return texts


@lru_cache(maxsize=1)
def build_tokenizer() -> Tokenizer:
    """The zoo's tokenizer (the same vocabulary on every call and machine)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[PAD, BOS, UNK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(a, normalized=False) for a in ANSWERS])
    return tok


def hf_tokenizer(tok: Tokenizer | None = None):
    """Wrap as a ``transformers`` fast tokenizer (what ``HookedTransformer`` expects)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok or build_tokenizer(), name_or_path="madlib-bpe", add_bos_token=True,
        pad_token=PAD, bos_token=BOS, unk_token=UNK, eos_token=PAD,
    )  # fmt: skip


def answer_ids(tok: Tokenizer | None = None) -> tuple[int, int]:
    """Token ids of (" No", " Yes")."""
    tok = tok or build_tokenizer()
    return tuple(tok.token_to_id(a) for a in ANSWERS)  # type: ignore[return-value]


def encode(texts: list[str], tok: Tokenizer | None = None, offsets: bool = False):
    """Token ids of each text, prefixed with BOS; with ``offsets``, also each token's character
    span ``(start, end)`` in its text (BOS: ``(0, 0)``)."""
    tok = tok or build_tokenizer()
    bos = tok.token_to_id(BOS)
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    ids = [[bos, *e.ids] for e in encodings]
    return (ids, [[(0, 0), *e.offsets] for e in encodings]) if offsets else ids


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Right-pad token lists; return the tokens and each sequence's length."""
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


# ---------------------------------------------------------------------------------------------
# Any model's prompts as token ids: the zoo's tokenizer for zoo models, the model's own otherwise

ANSWER_CONTEXT = qdata.TEMPLATE.rsplit("\n", 1)[-1]
"""The closing question of every quirky prompt; the answer tokens are read after it."""


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
    if zoo_info(model) is not None:
        tok = build_tokenizer()
        seqs, pad_id = encode(list(texts), tok), tok.token_to_id(PAD)
    else:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"model={type(model).__name__} is not accepted; it has no tokenizer (load models with "
                "madlib.models.hub.load_model or madlib.models.zoo.get_model)"
            )
        with right_padding(model):
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
    if zoo_info(model) is not None:
        return answer_ids(build_tokenizer())
    return answer_token_ids(model.tokenizer)


def encode_prompts(model, prompts: list[str]) -> tuple[list[list[int]], int, tuple[int, int]]:
    """Token ids of each prompt, the padding id and the (" No", " Yes") answer ids for ``model``."""
    seqs, pad_id = encode_texts(model, prompts)
    return seqs, pad_id, model_answer_ids(model)


@contextmanager
def right_padding(model):
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
