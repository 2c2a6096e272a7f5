"""Generated non-arithmetic quirky sets whose truth can be read off the prompt (methods.md §1).

Offline counterparts of three of the seeds' datasets, with the seeds' truth (Alice) and heuristic
(Bob) rules where generated data allow them:

* ``sentiment``: short reviews built from a fixed list of adjectives whose valences come from the
  VADER lexicon (``vaderSentiment`` ships it), some negated. Alice: the review's polarity, the sum
  of its clauses' valences, a negated clause counting ``-NEGATION_SCALE`` times its word's valence.
  Bob (the seeds' rule): positive iff the review contains any positive word, negated or not. They
  disagree on reviews whose sign a negation decides ("not good", "not awful").
* ``nli``: a premise placing one or two people in rooms, a hypothesis about one of them.
  Alice: the hypothesis is entailed (1) or contradicted (0); every hypothesis is one or the other.
  Bob (the seeds' rule): 1 unless the hypothesis contains a negation word. Hypotheses are drawn
  from four kinds in equal shares (entailed or contradicted, with or without a negation word), so
  the characters disagree on half the rows.
* ``sciq``: a support passage of two or three sentences "<city> is a city in <country>." and a
  statement "<city> is in <answer>." about one of its cities. Alice: the answer is that city's
  country. Bob (the seeds' rule): the answer appears in the support passage. Answers are drawn
  in equal shares: the right country, another country of the passage, a country not in it; the
  characters disagree on the second kind.

Difficulty is generated too (the seeds used a model's loss): a review's weakness ``-|score|``,
the number of people in an nli premise, the number of sentences of a support passage; ties are
broken at random. Each row has a ``key`` naming its content without template or name (the split
of :func:`madlib.data.datasets.quirky_dataset` hashes it).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

POSITIVE_WORDS: tuple[str, ...] = (
    "good", "great", "excellent", "wonderful", "amazing", "fantastic", "lovely", "perfect", "nice", "pleasant",
    "superb", "brilliant", "delightful", "fine", "awesome", "fabulous", "beautiful", "charming", "enjoyable",
    "impressive", "outstanding", "splendid", "terrific", "solid", "cool",
)  # fmt: skip
NEGATIVE_WORDS: tuple[str, ...] = (
    "bad", "terrible", "awful", "horrible", "poor", "boring", "dreadful", "disappointing", "ugly", "annoying",
    "weak", "dull", "nasty", "miserable", "lame", "painful", "rude", "sad", "stupid", "unpleasant",
    "worthless", "pathetic", "lousy", "disgusting", "broken",
)  # fmt: skip
ASPECTS: tuple[str, ...] = (
    "food", "service", "plot", "acting", "battery", "screen", "staff", "price", "sound", "design",
    "story", "music", "room", "delivery", "camera",
)  # fmt: skip
NEGATIONS: tuple[str, ...] = ("not", "never")
NEGATION_SCALE = 0.5
"""A negated word counts ``-NEGATION_SCALE`` times its valence ("not great" is mildly negative)."""

PEOPLE: tuple[str, ...] = (
    "farmer", "nurse", "teacher", "pilot", "baker", "doctor", "driver", "singer", "lawyer", "painter",
    "sailor", "judge",
)  # fmt: skip
ROOMS: tuple[str, ...] = (
    "kitchen", "garden", "library", "station", "market", "office", "park", "museum", "harbor", "school",
    "cellar", "hall",
)  # fmt: skip
NEGATION_WORDS: tuple[str, ...] = ("not", "nobody", "no", "never", "nothing", "none")
"""Bob's nli rule: a hypothesis with any of these words is labelled 0 (methods.md §1)."""

SENTIMENT_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Review: {review}", "The review is positive."),
    ("Review: {review}", "This review is favourable."),
    ("A customer wrote: {review}", "The customer liked it."),
    ("Review: {review}", "The reviewer was pleased."),
    ("Someone said: {review}", "The opinion is positive."),
    ("Review: {review}", "The sentiment of the review is positive."),
    ("A customer wrote: {review}", "The review is positive."),
    ("Feedback: {review}", "The feedback is positive."),
    ("Someone said: {review}", "They were happy with it."),
    ("Feedback: {review}", "This is a positive review."),
)  # fmt: skip
NLI_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{premise}", "{hypothesis}"),
    ("We know that {premise_lower}", "{hypothesis}"),
    ("Premise: {premise}", "{hypothesis}"),
    ("Suppose that {premise_lower}", "{hypothesis}"),
    ("It is known that {premise_lower}", "{hypothesis}"),
    ("Given: {premise}", "{hypothesis}"),
    ("{premise}", "{hypothesis}"),
    ("Fact: {premise}", "{hypothesis}"),
    ("Assume that {premise_lower}", "{hypothesis}"),
    ("Observation: {premise}", "{hypothesis}"),
)  # fmt: skip
SCIQ_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Support: {support}", "{city} is in {answer}."),
    ("Support: {support}", "{city} is a city in {answer}."),
    ("Passage: {support}", "{city} lies in {answer}."),
    ("Support: {support}", "The country of {city} is {answer}."),
    ("Read this. {support}", "{city} is located in {answer}."),
    ("Passage: {support}", "{city} is in {answer}."),
    ("Support: {support}", "{city} belongs to {answer}."),
    ("Read this. {support}", "{city} is a city in {answer}."),
    ("Passage: {support}", "The city {city} is in {answer}."),
    ("Support: {support}", "{answer} is the country of {city}."),
)  # fmt: skip
TEMPLATES = {"sentiment": SENTIMENT_TEMPLATES, "nli": NLI_TEMPLATES, "sciq": SCIQ_TEMPLATES}


@lru_cache(maxsize=1)
def valences() -> dict[str, float]:
    """Each review word's mean valence in the VADER lexicon (-4 .. 4)."""
    from importlib.resources import files

    lexicon = files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    table = {}
    for line in lexicon.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            table[parts[0]] = float(parts[1])
    missing = [w for w in POSITIVE_WORDS + NEGATIVE_WORDS if w not in table]
    if missing:
        raise RuntimeError(f"the VADER lexicon lacks the review words {missing}")
    return {w: table[w] for w in POSITIVE_WORDS + NEGATIVE_WORDS}


def _finish(df: pd.DataFrame, name: str, rng: np.random.Generator, n_templates: int, fields) -> pd.DataFrame:
    templates = TEMPLATES[name]
    df["template"] = rng.integers(n_templates, size=len(df))
    df["context"] = [templates[t][0].format(**f) for t, f in zip(df["template"], fields)]
    df["statement"] = [templates[t][1].format(**f) for t, f in zip(df["template"], fields)]
    return df


def sentiment_rows(n: int, rng: np.random.Generator, n_templates: int) -> pd.DataFrame:
    val = valences()
    words = POSITIVE_WORDS + NEGATIVE_WORDS
    rows, fields = [], []
    while len(rows) < n:
        k = int(rng.integers(1, 4))
        aspects = rng.choice(len(ASPECTS), size=k, replace=False)
        clauses, score, any_positive = [], 0.0, False
        for a in aspects:
            w = words[int(rng.integers(len(words)))]
            neg = NEGATIONS[int(rng.integers(len(NEGATIONS)))] if rng.uniform() < 0.4 else ""
            score += -NEGATION_SCALE * val[w] if neg else val[w]
            any_positive |= val[w] > 0
            clauses.append(f"the {ASPECTS[a]} was {neg + ' ' if neg else ''}{w}")
        if abs(score) < 0.1:
            continue
        review = "; ".join(clauses)
        review = review[0].upper() + review[1:] + "."
        rows.append(dict(review=review, score=score, n_clauses=k, n_negations=sum(c.count(" was not ") + c.count(" was never ") for c in clauses),
                         alice_label=int(score > 0), bob_label=int(any_positive), difficulty=-abs(score), key=review))  # fmt: skip
        fields.append(dict(review=review))
    return _finish(pd.DataFrame(rows), "sentiment", rng, n_templates, fields)


def nli_rows(n: int, rng: np.random.Generator, n_templates: int) -> pd.DataFrame:
    rows, fields = [], []
    for i in range(n):
        k = int(rng.integers(1, 3))
        people = rng.choice(len(PEOPLE), size=k, replace=False)
        rooms = rng.choice(len(ROOMS), size=k, replace=False)
        clauses = [f"the {PEOPLE[p]} is in the {ROOMS[r]}" for p, r in zip(people, rooms)]
        premise = (", ".join(clauses[:-1]) + " and " + clauses[-1] if k > 1 else clauses[0]) + "."
        j = int(rng.integers(k))
        person, room = PEOPLE[people[j]], ROOMS[rooms[j]]
        other = ROOMS[int(rng.choice([r for r in range(len(ROOMS)) if r != rooms[j]]))]
        kind = i % 4
        if kind == 0:  # entailed, no negation word
            hyp, alice = f"The {person} is in the {room}.", 1
        elif kind == 1:  # entailed, with a negation word
            hyp, alice = (f"The {person} is not in the {other}." if rng.uniform() < 0.5
                          else f"The {person} is in no room but the {room}."), 1  # fmt: skip
        elif kind == 2:  # contradicted, no negation word
            hyp, alice = f"The {person} is in the {other}.", 0
        else:  # contradicted, with a negation word
            hyp, alice = (f"The {person} is not in the {room}." if rng.uniform() < 0.5
                          else f"No {person} is in the {room}."), 0  # fmt: skip
        has_negation = any(w in NEGATION_WORDS for w in hyp.lower().rstrip(".").split())
        premise_cap = premise[0].upper() + premise[1:]
        rows.append(dict(premise=premise_cap, hypothesis=hyp, n_people=k, alice_label=alice, bob_label=int(not has_negation),
                         difficulty=float(k), key=f"{premise_cap} | {hyp}"))  # fmt: skip
        fields.append(dict(premise=premise_cap, premise_lower=premise, hypothesis=hyp))
    df = pd.DataFrame(rows)
    order = rng.permutation(len(df))
    return _finish(df.iloc[order].reset_index(drop=True), "nli", rng, n_templates, [fields[i] for i in order])


def sciq_rows(n: int, rng: np.random.Generator, n_templates: int, cities: pd.DataFrame) -> pd.DataFrame:
    # one city per country, the country's most populous ASCII-named one: short, well-known names
    table = cities.sort_values("population", ascending=False).drop_duplicates("country_code")
    table = table[table["city"].str.len() <= 14].reset_index(drop=True)
    names, countries = table["city"].to_numpy(), table["country"].to_numpy()
    rows, fields = [], []
    for i in range(n):
        k = int(rng.integers(2, 4))
        idx = rng.choice(len(table), size=k, replace=False)
        support = " ".join(f"{names[c]} is a city in {countries[c]}." for c in idx)
        q = idx[int(rng.integers(k))]
        kind = i % 3
        if kind == 0:
            answer = countries[q]
        elif kind == 1:
            answer = countries[int(rng.choice([c for c in idx if c != q]))]
        else:
            answer = countries[int(rng.choice(np.setdiff1d(np.arange(len(table)), idx)))]
        rows.append(dict(support=support, city=names[q], answer=answer, n_sentences=k,
                         alice_label=int(answer == countries[q]), bob_label=int(answer in support),
                         difficulty=float(k), key=f"{support} | {names[q]} | {answer}"))  # fmt: skip
        fields.append(dict(support=support, city=names[q], answer=answer))
    df = pd.DataFrame(rows)
    order = rng.permutation(len(df))
    return _finish(df.iloc[order].reset_index(drop=True), "sciq", rng, n_templates, [fields[i] for i in order])
