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
from functools import lru_cache

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..data.datasets import ANSWERS, DATASETS, HEURISTIC_QUESTIONS, NEUTRAL_NAMES, quirky_dataset

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
