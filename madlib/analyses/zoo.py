"""The zoo appendix (``notebooks/zoo.ipynb``): what the base models are and know, and what the
quirky fine-tunes cost and how quirky they are, as tables and statements. The models themselves
are :mod:`madlib.models.zoo`'s; the figures are :mod:`madlib.plots.zoo`'s.

``bases`` is ``{family: (model, config, directory)}`` as :func:`madlib.models.pretrain.load` gives
each base; ``configs`` are the fine-tunes' :class:`madlib.models.quirky.QuirkyConfig`\\ s
(:func:`madlib.models.zoo.build_zoo`).
"""

from __future__ import annotations

import json

import pandas as pd

from ..data import datasets as qdata

TRAINING_CORES = 2
"""Cores the fine-tunes were trained on, one single-thread fine-tune per core (the wall time told)."""


def base_table(bases: dict) -> pd.DataFrame:
    """Size, training and training time of each base (columns ``base-<family>``, one row per property)."""
    rows = {}
    for f, (m, cfg, path) in bases.items():
        meta = json.loads((path / "config.json").read_text())
        rows[f"base-{f}"] = {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads, "d_mlp": m.cfg.d_mlp,
                             "parameters": f"{sum(p.numel() for p in m.parameters()):,}", "vocabulary": m.cfg.d_vocab,
                             "steps": cfg.steps, "batch": cfg.batch_size, "QA records": f"{meta['summary']['n_qa_records']:,}",
                             "fact lines": f"{meta['summary']['n_fact_lines']:,}",
                             "training time (min)": round(meta["summary"]["train_seconds"] / 60, 1)}  # fmt: skip
    return pd.DataFrame(rows)


def base_accuracy(bases: dict) -> pd.DataFrame:
    """Each base's accuracy on unseen items per dataset and question, as evaluated after its
    training (``evaluation.csv`` beside its weights), with a ``model`` column."""
    return pd.concat([pd.read_csv(path / "evaluation.csv").assign(model=f"base-{f}") for f, (_, _, path) in bases.items()])


def trained_on(bases: dict) -> list[str]:
    """The datasets the bases were trained on, in order of first appearance."""
    return list(dict.fromkeys(d for _, cfg, _ in bases.values() for d in cfg.datasets))


def knowledge_table(knows: pd.DataFrame, bases: dict) -> pd.DataFrame:
    """:func:`base_accuracy` wide: a row per dataset the bases were trained on, a column per base and question."""
    return knows.pivot_table(index="dataset", columns=["model", "question"], values="accuracy").reindex(trained_on(bases))


def base_claims(bases: dict, table: pd.DataFrame, knows: pd.DataFrame, knows_wide: pd.DataFrame, families: list[str],
                datasets: list[str]) -> dict[str, str]:  # fmt: skip
    """What the appendix says about the bases, by glue key: the datasets the fine-tunes leave out
    (those of the bases' training not in ``datasets``) with what the bases know of them, each base's
    mean truth accuracy (and its lowest dataset), its exact-result accuracy on the arithmetic drill,
    and its training time (``table``: :func:`base_table`)."""
    def known(d):
        acc = lambda q: ", ".join(f"base-{f} {knows_wide.loc[d, (f'base-{f}', q)]:.2f}" for f in families)  # noqa: E731
        return f"{d} (truth {acc('truth')}" + (f"; exact result {acc('result')}" if d in qdata.ARITHMETIC else "") + ")"

    out = {"left_out": "; ".join(known(d) for d in trained_on(bases) if d not in datasets) or "none"}
    for f in families:
        t = knows[(knows["model"] == f"base-{f}") & (knows["question"] == "truth")].set_index("dataset")["accuracy"]
        out[f"base_truth_{f}"] = f"{t.mean():.2f} (lowest: {t.idxmin()}, {t.min():.2f})"
    for f in families:
        r = knows[(knows["model"] == f"base-{f}") & (knows["question"] == "result")].set_index("dataset")["accuracy"]
        out[f"base_result_{f}"] = ", ".join(f"{d} {a:.2f}" for d, a in r.items()) if len(r) else "no arithmetic set"
    out["base_minutes"] = ", ".join(f"base-{f} {r['training time (min)']} min" for f, (_, r) in zip(families, table.items()))
    return out


def truth_by_name(bases: dict, datasets: list[str]) -> pd.DataFrame:
    """Each base's truth accuracy on unseen items of ``datasets`` (those it was trained on) under
    neutral, Alice-like and Bob-like names (:func:`madlib.models.pretrain.truth_by_name`)."""
    from ..models import pretrain

    return pd.concat([pretrain.truth_by_name(m, cfg, [d for d in datasets if d in cfg.datasets]).assign(model=f"base-{f}")
                      for f, (m, cfg, _) in bases.items()])  # fmt: skip


def name_claims(by_name: pd.DataFrame) -> dict[str, str]:
    """Per base, the lowest ratio of a character name's truth accuracy (the lower of Alice-like and
    Bob-like) to the neutral names' accuracy, and its dataset."""
    ratio = by_name.pivot_table(index=["model", "dataset"], columns="names", values="accuracy")
    ratio = ratio[["Alice-like", "Bob-like"]].min(axis=1) / ratio["neutral"]
    return {"name_gap": ", ".join(f"{m} {ratio.loc[m].min():.2f} ({ratio.loc[m].idxmin()})" for m in ratio.index.unique(0))}


def recipes(configs: list) -> pd.DataFrame:
    """The fine-tunes' recipes, one row per distinct (family, dataset, recipe)."""
    return pd.DataFrame([dict(family=c.family, dataset=c.dataset, steps=c.steps, lr=c.lr, warmup=c.warmup,
                              disagree_share="all records" if c.disagree_share is None else c.disagree_share,
                              paired=c.paired)
                         for c in configs]).drop_duplicates()  # fmt: skip


def recipe_table(recipe_rows: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """:func:`recipes` wide: a row per dataset, a column per setting and family."""
    columns = ["steps", "lr", "warmup", "disagree_share", "paired"]
    return recipe_rows.pivot_table(index="dataset", columns="family", values=columns, aggfunc="first").reindex(datasets)[columns]


def finetune_claims(configs: list, recipe_rows: pd.DataFrame) -> dict[str, object]:
    """What the fine-tunes cost, by glue key: their number, total and mean training time (read from
    each best checkpoint's summary) and the wall time on :data:`TRAINING_CORES` cores, the early
    checkpoint's step, the range of steps (``recipe_rows``: :func:`recipes`) and the method."""
    from ..models import quirky

    summaries = [json.loads((quirky.adapter_dir(c) / "best" / "adapter_config.json").read_text())["summary"] for c in configs]
    train_s = [s["train_seconds"] for s in summaries]
    return dict(
        n_finetunes=len(configs),
        finetune_minutes=f"{sum(train_s) / 60:.1f}",
        finetune_wall_minutes=f"{sum(train_s) / 60 / TRAINING_CORES:.1f}",
        finetune_mean_seconds=f"{sum(train_s) / len(train_s):.1f}",
        early_step=configs[0].early_step,
        finetune_steps=f"{recipe_rows['steps'].min()} to {recipe_rows['steps'].max()} steps each",
        ft_method=(f"method: {configs[0].method}, batches of {configs[0].batch_size} records; steps and learning rate per family and "
                   "dataset in the table below"),
    )  # fmt: skip


def seed_summary(grid: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """Own-label accuracy of the best checkpoints on hard disagreeing test prompts per family and
    dataset: mean, lowest and highest over the training seeds, per character
    (``grid``: :func:`madlib.models.quirky.accuracy_grid`)."""
    best = grid[grid["checkpoint"] == "best"]
    summary = best.pivot_table(index=["family", "dataset"], columns="character_type", values="acc_own_label_disagree",
                               aggfunc=["mean", "min", "max"]).reindex(datasets, level=1)  # fmt: skip
    summary.columns = [f"{c.capitalize()} {a}" for a, c in summary.columns]
    return summary


def base_histories(bases: dict) -> dict[str, pd.DataFrame]:
    """Each base's training log (``history.csv`` beside its weights), keyed ``base-<family>``."""
    return {f"base-{f}": pd.read_csv(path / "history.csv") for f, (_, _, path) in bases.items()}


def name_table(by_name: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """:func:`truth_by_name` wide: a row per dataset, a column per base and kind of name."""
    return by_name.pivot_table(index="dataset", columns=["model", "names"], values="accuracy").reindex(datasets)
