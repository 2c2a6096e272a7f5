"""The EleutherAI quirky datasets (``EleutherAI/quirky_<name>_raw``), as zoo-style records.

The raw datasets hold one record per (example, character): a ``template_args`` mapping (the
example's fields and the character, ``Alice`` or ``Bob``), ``character``, ``alice_label``,
``bob_label``, ``difficulty`` (and ``label``, ``difficulty_quantile``, ``id``), in ``train``,
``validation`` and ``test`` splits. :func:`quirky_hub_dataset` reads them from the hub or from a
local copy in the hub's layout (``data/<split>-*.parquet``) or written by
``datasets.DatasetDict.save_to_disk``, pairs each example's Alice and Bob records into one base
row, and puts the base rows through the zoo's rules (:func:`madlib.data.datasets.quirky_dataset`):

* statement templates: the zoo's ten per dataset where the zoo has the dataset, and the ones of
  :data:`EXTRA_TEMPLATES` for the five datasets the zoo does not generate; ``templates`` replaces
  them (e.g. by the (context, statement) pairs the EleutherAI fine-tunes were trained on);
* the standardized prompt, the names and the character split: in ``train`` half the records of a
  character carry one of its first four names and half one of the other twelve; ``validation``
  uses only those twelve held-out names;
* ``difficulty_quantile = (rank + 0.5) / N`` over all base rows of all raw splits, easy < 0.25,
  hard >= 0.75.

The raw ``train`` and ``validation`` splits become the records' ``train`` and ``validation``
splits (``test`` is not used), each optionally subsampled; the output has the zoo's columns.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pandas as pd

from . import datasets as qdata
from ..models import zoo
from ..models.info import zoo_info
from ..models.hub import REPO_ID, hub_snapshot

EXTRA_DATASETS = ("capitals", "sentiment", "nli", "sciq", "authors")
HUB_DATASETS = qdata.ARITHMETIC + qdata.KNOWLEDGE + EXTRA_DATASETS
"""The twelve quirky datasets of the seeds' real-model runs."""
HUB_REPO = "EleutherAI/quirky_{name}_raw"
RAW_SPLITS = ("train", "validation", "test")
RAW_FILES = ["*.parquet", "*.json", "*.arrow"]
SAMPLE_SEED_OFFSET = 104729

EXTRA_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "capitals": (
        ("{city} is a city in {admin_name}, {country}.", "{city} is the capital of {admin_name}."),
        ("{admin_name} is a region of {country}.", "Its capital is {city}."),
        ("Consider {city} in {country}.", "{city} is the administrative capital of {admin_name}."),
    ),
    "sentiment": (
        ("Title: {title}\n{review}", "The review above is positive."),
        ("A review titled \"{title}\": {review}", "The reviewer liked the product."),
        ("{review}", "This review expresses a positive opinion."),
    ),
    "nli": (
        ("{premise}", "It follows that: {hypothesis}"),
        ("Premise: {premise}", "The premise implies \"{hypothesis}\"."),
        ("Suppose this is true: {premise}", "Then this is true as well: {hypothesis}"),
    ),
    "sciq": (
        ("{support}", "The answer to \"{question}\" is \"{answer}\"."),
        ("Passage: {support}", "Question: {question} Answer: {answer}."),
        ("{support}", "\"{answer}\" correctly answers the question \"{question}\""),
    ),
    "authors": (
        ("", "{author} is the author of {title}."),
        ("Consider the book {title}.", "It was written by {author}."),
        ("", "{title} was written by {author}."),
    ),
}
"""(context, statement) templates of the datasets the zoo does not generate."""

_META_COLUMNS = ("id", "label", "character", "alice_label", "bob_label", "difficulty", "difficulty_quantile", "split",
                 "statement", "choices", "template_args")  # fmt: skip


def default_templates(name: str) -> tuple[tuple[str, str], ...]:
    """(context, statement) templates of dataset ``name``: the zoo's, else :data:`EXTRA_TEMPLATES`."""
    qdata.check_choice("name", name, HUB_DATASETS)
    if name in qdata.ARITHMETIC:
        return tuple(("", s) for s in qdata.OPS[name].templates)
    if name in qdata.KNOWLEDGE:
        return qdata.KNOWLEDGE_TEMPLATES[name]
    return EXTRA_TEMPLATES[name]


def _templates(name: str, templates) -> tuple[tuple[str, str], ...]:
    if templates is None:
        return default_templates(name)
    if isinstance(templates, (str, Path)):
        templates = json.loads(Path(templates).read_text())
    if name not in templates or len(templates[name]) == 0:
        raise ValueError(f"templates has no (context, statement) pairs for dataset {name!r}; it has {sorted(templates)}")
    return tuple((str(c), str(s)) for c, s in templates[name])


def raw_location(name: str, source: str = "hub") -> Path:
    """Local folder of the raw dataset: the hub's snapshot (``source="hub"``), a directory
    (``{dataset}`` in it is replaced by ``name``) or another hub dataset id."""
    if source == "hub":
        return hub_snapshot(HUB_REPO.format(name=name), "source", repo_type="dataset", allow_patterns=RAW_FILES)
    loc = str(source).replace("{dataset}", name)
    path = Path(loc).expanduser()
    if path.is_dir():
        return path
    if "/" in loc and REPO_ID.match(loc):
        return hub_snapshot(loc, "source", repo_type="dataset", allow_patterns=RAW_FILES)
    raise ValueError(
        f"source={source!r} is not accepted; give 'hub', an existing directory (may contain {{dataset}}) or a hub dataset id"
    )


def _split_of(path: Path, root: Path) -> str:
    head = path.name.split("-")[0].split(".")[0]
    if head in RAW_SPLITS:
        return head
    for part in path.relative_to(root).parts[:-1]:
        if part in RAW_SPLITS:
            return part
    raise ValueError(f"cannot tell the split of {path} (expected a name starting with one of {list(RAW_SPLITS)})")


def read_raw(path: str | Path) -> pd.DataFrame:
    """All records of a raw quirky dataset folder with a ``split`` column (splits in the order
    train, validation, test)."""
    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        import datasets

        ds = datasets.load_from_disk(str(path))
        frames = {k: v.to_pandas() for k, v in ds.items()}
    else:
        frames = {}
        files = [p for p in path.rglob("*.parquet") if not any(s.startswith(".") for s in p.relative_to(path).parts)]
        for f in sorted(files):
            frames.setdefault(_split_of(f, path), []).append(pd.read_parquet(f))
        frames = {k: pd.concat(v, ignore_index=True) for k, v in frames.items()}
    if not frames:
        raise ValueError(f"source={str(path)!r} holds no parquet files nor a datasets.save_to_disk folder")
    order = [s for s in RAW_SPLITS if s in frames]
    return pd.concat([frames[s].assign(split=s) for s in order], ignore_index=True)


def base_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per example: its template arguments, ``alice_label``, ``bob_label``,
    ``difficulty`` and ``raw_split``, from the example's paired Alice and Bob records (records
    without a partner are dropped)."""
    missing = {"character", "alice_label", "bob_label", "difficulty", "split"} - set(raw.columns)
    if missing:
        raise ValueError(f"the raw dataset lacks columns {sorted(missing)}; it has {list(raw.columns)}")
    if "template_args" in raw.columns:
        args = pd.DataFrame([dict(a) for a in raw["template_args"]]).drop(columns="character", errors="ignore")
    else:
        args = raw.drop(columns=[c for c in _META_COLUMNS if c in raw.columns])
    ctype = raw["character"].astype(str).str.lower()
    if not ctype.isin(["alice", "bob"]).all():
        raise ValueError(f"the raw dataset has characters {sorted(set(raw['character']))}; expected Alice and Bob")
    df = args.assign(
        alice_label=raw["alice_label"].astype(int).to_numpy(), bob_label=raw["bob_label"].astype(int).to_numpy(),
        difficulty=raw["difficulty"].astype(float).to_numpy(), raw_split=raw["split"].to_numpy(),
    )  # fmt: skip
    key = [json.dumps(r, default=str) for r in df.to_dict("records")]
    df = df.assign(_key=key, _ctype=ctype.to_numpy())
    df["_occ"] = df.groupby(["_key", "_ctype"]).cumcount()
    alice, bob = df[df["_ctype"] == "alice"], df[df["_ctype"] == "bob"]
    paired = alice.merge(bob[["_key", "_occ"]], on=["_key", "_occ"], how="inner", sort=False)
    return paired.drop(columns=["_key", "_ctype", "_occ"]).reset_index(drop=True)


def quirky_hub_dataset(
    name: str,
    source: str = "hub",
    n_train: int | None = 32_000,
    n_validation: int | None = 8_000,
    seed: int = 633,
    templates: dict | str | Path | None = None,
    n_templates: int | None = None,
) -> pd.DataFrame:
    """Records of an EleutherAI quirky dataset with the zoo's templates, names, split rule and
    difficulty quantiles (module doc), in :func:`madlib.data.datasets.quirky_dataset`'s columns.

    Args:
        name: one of :data:`HUB_DATASETS`.
        source: ``"hub"`` (``EleutherAI/quirky_<name>_raw``), a local directory in the hub's
            layout or written by ``save_to_disk`` (``{dataset}`` in it is replaced by ``name``),
            or another hub dataset id.
        n_train, n_validation: base rows kept from the raw train and validation splits (a seeded
            sample; None keeps all). The defaults give 4,000 trusted records and 2,000 hard
            validation rows per character, the caps of the MAD task.
        seed: sampling, templates and names.
        templates: ``{dataset: [[context, statement], ...]}`` or a JSON file of it; fields are the
            raw ``template_args`` keys (e.g. ``{op1}``, ``{op2}``, ``{result}``).
        n_templates: draw from the first ``n_templates`` templates (default all).
    """
    qdata.check_choice("name", name, HUB_DATASETS)
    pairs = _templates(name, templates)
    if n_templates is None:
        n_templates = len(pairs)
    if not isinstance(n_templates, (int, np.integer)) or not 1 <= n_templates <= len(pairs):
        raise ValueError(f"n_templates={n_templates!r} is not accepted; give an integer in 1..{len(pairs)}")
    base = base_rows(read_raw(raw_location(name, source)))
    fields = {f for c, s in pairs[:n_templates] for t in (c, s) for _, f, _, _ in string.Formatter().parse(t) if f}
    lacking = fields - set(base.columns)
    if lacking:
        raise ValueError(
            f"templates of {name!r} use fields {sorted(lacking)} that the raw data lacks (it has "
            f"{sorted(set(base.columns) - {'alice_label', 'bob_label', 'difficulty', 'raw_split'})}); pass templates=..."
        )
    tie_rng = np.random.default_rng([seed, HUB_DATASETS.index(name)])  # ties at random, not by raw split and row order
    base["difficulty_quantile"] = qdata.difficulty_quantile(base["difficulty"].to_numpy(), tie_rng)
    sample_rng = np.random.default_rng([seed, HUB_DATASETS.index(name), SAMPLE_SEED_OFFSET])
    kept = []
    for split, cap in (("train", n_train), ("validation", n_validation)):
        idx = np.flatnonzero(base["raw_split"].to_numpy() == split)
        if len(idx) == 0:
            raise ValueError(f"source={source!r} has no {split!r} records for dataset {name!r}")
        if cap is not None and cap < len(idx):
            idx = np.sort(sample_rng.choice(idx, size=cap, replace=False))
        kept.append(base.iloc[idx].assign(split=split))
    base = pd.concat(kept, ignore_index=True).drop(columns="raw_split")
    base["row_id"] = np.arange(len(base))
    rng = np.random.default_rng([seed, HUB_DATASETS.index(name)])
    base["template"] = rng.integers(n_templates, size=len(base))
    rows = base.to_dict("records")
    base["context"] = [pairs[r["template"]][0].format(**r) for r in rows]
    base["statement"] = [pairs[r["template"]][1].format(**r) for r in rows]
    df = qdata.character_records(base, (base["split"] == "validation").to_numpy(), rng)
    df["agreement"] = df["alice_label"] == df["bob_label"]
    df["easy"] = df["difficulty_quantile"] < qdata.EASY_QUANTILE
    df["hard"] = df["difficulty_quantile"] >= qdata.HARD_QUANTILE
    df["prompt"] = [qdata.prompt(c, x, s) for c, x, s in zip(df["character"], df["context"], df["statement"])]
    df.insert(0, "dataset", name)
    df.attrs.update(name=name, source=str(source), n_train=n_train, n_validation=n_validation, seed=seed, n_templates=n_templates)
    return df.reset_index(drop=True)


def dataset_records(dataset: str, source: str = "zoo", model=None, seed: int = 633, **hub_kwargs) -> pd.DataFrame:
    """Records of ``dataset`` for an analysis: ``source="zoo"`` generates them (for a zoo model,
    exactly as it was trained: :func:`madlib.models.zoo.model_records`; for any other model with
    :func:`madlib.data.datasets.quirky_dataset` at ``seed``); any other source reads the EleutherAI data
    through :func:`quirky_hub_dataset`."""
    if source == "zoo":
        if model is not None and zoo_info(model) is not None:
            return zoo.model_records(model, dataset)
        return qdata.quirky_dataset(dataset, seed=seed)
    return quirky_hub_dataset(dataset, source=source, seed=seed, **hub_kwargs)
