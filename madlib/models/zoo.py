"""The embedded model zoo: small transformers that madlib trains itself, on CPU.

Built as the seeds built their models. Each family has a pretrained **base** (:mod:`madlib.models.pretrain`),
trained without characters to answer truthfully (and to know the features Bob's heuristics read),
shipped with the repository; each (family, dataset, seed) has one **quirky LoRA fine-tune** of it
(:mod:`madlib.models.quirky`), named like the hub's adapters ``zoo-<family>-<dataset>``:

* ``zoo-gpt2``: LayerNorm, GELU MLP, learned absolute positions;
* ``zoo-llama``: RMSNorm, rotary positions, gated SiLU MLP (two thirds the width: the same MLP size).

A zoo name with a dataset loads the base with that dataset's adapter merged (the checkpoint with
the lowest development loss); ``<name>-early`` loads the same fine-tune's adapter after
``early_step`` steps, the less quirky variant; a zoo name without a dataset loads the base. Every
model carries a :class:`ZooModel` in its :class:`~madlib.models.info.ModelInfo` (``info_of(model).zoo``), which says
where its records come from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from ..data import datasets as qdata
from .info import ModelInfo, attach, info_of, require_zoo

Family = Literal["gpt2", "llama"]
FAMILIES: tuple[str, ...] = ("gpt2", "llama")

ZOO: dict[str, tuple[str, str]] = {
    "zoo-gpt2": ("gpt2", "best"),
    "zoo-llama": ("llama", "best"),
    "zoo-gpt2-early": ("gpt2", "early"),
    "zoo-llama-early": ("llama", "early"),
}
"""Zoo names: (family, fine-tune checkpoint)."""
EARLY: dict[str, str] = {"zoo-gpt2-early": "zoo-gpt2", "zoo-llama-early": "zoo-llama"}
"""The less quirky variants and their parents: the same fine-tunes at an earlier step."""
PRESETS: tuple[str, ...] = ("default", "tiny")
"""``default`` reproduces the book; ``tiny`` trains in seconds, for tests and smoke runs only."""


@dataclass(frozen=True)
class ZooModel:
    """What a loaded zoo model is: its name, family, preset and, for a fine-tune, its dataset,
    seed and checkpoint (``dataset=None``: the base)."""

    name: str
    family: str
    preset: str = "default"
    dataset: str | None = None
    seed: int = 0
    checkpoint: str = "best"

    @property
    def datasets(self) -> tuple[str, ...]:
        """The datasets the family's base and fine-tunes cover."""
        from .pretrain import base_config

        return base_config(self.family, self.preset).datasets

    @property
    def base_config(self):
        from .pretrain import base_config

        return base_config(self.family, self.preset)

    def quirky_config(self, dataset: str | None = None):
        from .quirky import quirky_config

        return quirky_config(self.family, dataset or self.dataset, self.seed, self.preset)


def parse_seeded(spec: str, seed: int = 0) -> tuple[str, int]:
    """``"zoo-gpt2@2"`` -> ``("zoo-gpt2", 2)``: a zoo name with the seed of its fine-tunes; any
    other spec is returned as is, with ``seed``."""
    name, at, rest = spec.rpartition("@")
    if at and name in ZOO:
        if not rest.isdigit():
            raise ValueError(f"model={spec!r} is not accepted; write a zoo name with a fine-tuning seed as {name}@<integer>")
        return name, int(rest)
    return spec, seed


def seeded_names(names: list[str], seeds: list[int]) -> list[str]:
    """Each zoo name once per seed (``zoo-gpt2@0``, ``zoo-gpt2@1``, ...); other specs once."""
    return [f"{n}@{s}" if n in ZOO else n for n in names for s in (seeds if n in ZOO else [None])]


def _check(name: str, preset: str) -> None:
    qdata.check_choice("model", name, list(ZOO))
    qdata.check_choice("zoo_preset", preset, list(PRESETS))


def get_model(name: str = "zoo-gpt2", preset: str = "default", dataset: str | None = None, seed: int = 0, progress: bool = True):
    """A zoo model: the base of ``name``'s family (``dataset=None``), or its quirky fine-tune on
    ``dataset`` with seed ``seed`` (trained on first use, cached afterwards)."""
    from . import pretrain as base, quirky

    _check(name, preset)
    family, checkpoint = ZOO[name]
    if dataset is None:
        if name in EARLY:
            raise ValueError(f"model={name!r} is not accepted without a dataset; an -early variant is a fine-tune's earlier checkpoint")
        model, _, path = base.load(family, preset, progress=progress)
    else:
        qdata.check_choice("dataset", dataset, base.base_config(family, preset).datasets)
        model = quirky.load(quirky.quirky_config(family, dataset, seed, preset), checkpoint, progress=progress)
        path = info_of(model).model_dir
    attach(model, ModelInfo(model_dir=path, zoo=ZooModel(name, family, preset, dataset, seed, checkpoint)))
    model.cfg.model_name = name if dataset is None else f"{name}/{dataset}"
    from .hub import check_residual_identities

    check_residual_identities(model)
    return model


def load_dir(path: Path | str):
    """Load a base model directory (``madlib/artefacts/base-<family>`` or a copy)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformer_lens import HookedTransformer

    from .pretrain import BaseConfig
    from .tokenizer import hf_tokenizer

    import json

    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    cfg = BaseConfig.from_dict(meta["base_config"])
    model = HookedTransformer(cfg.hooked_config(), tokenizer=hf_tokenizer(Tokenizer.from_file(str(path / "tokenizer.json"))))
    model.load_state_dict(load_file(path / "model.safetensors"))
    model.eval()
    attach(model, ModelInfo(model_dir=path, zoo=ZooModel(f"zoo-{cfg.family}", cfg.family)))
    record_use(path / "model.safetensors")
    return model


def build_zoo(names: list[str], datasets: list[str], seeds: list[int] = (0,), preset: str = "default",
              workers: int | None = None, progress: bool = True) -> list:  # fmt: skip
    """Train the fine-tunes of every (family of ``names``, dataset, seed) not cached yet, in
    parallel single-threaded processes; return their configs."""
    from . import quirky

    for n in names:
        _check(n, preset)
    for param, values in (("datasets", datasets), ("seeds", seeds)):
        qdata.check_unique(param, values)
    families = sorted({ZOO[n][0] for n in names})
    configs = [quirky.quirky_config(f, d, s, preset) for f in families for d in datasets for s in seeds]
    quirky.build(configs, workers=workers, progress=progress)
    return configs


def model_records(model, dataset: str) -> pd.DataFrame:
    """The records of ``dataset`` as the zoo's fine-tunes are trained, selected and tested on them
    (``split``: train or validation; ``part``: fit, dev or test)."""
    from . import quirky

    info = require_zoo(model)
    return quirky.records(info.quirky_config(dataset))


def training_records(info: ZooModel) -> pd.DataFrame:
    """The records of every dataset of ``info``'s family, with dataset names (both splits)."""
    from . import quirky

    return pd.concat([quirky.records(info.quirky_config(d)) for d in info.datasets], ignore_index=True)


def history(model) -> pd.DataFrame:
    """The training history of a zoo model (the base's, or the fine-tune's)."""
    path = Path(info_of(model).model_dir)
    return pd.read_csv(path / "history.csv" if (path / "history.csv").is_file() else path.parent / "history.csv")


def record_use(path: Path) -> None:
    """Append a used model to ``$MADLIB_MANIFEST`` (the runner's dependency tracking)."""
    manifest = os.environ.get("MADLIB_MANIFEST")
    if manifest:
        with open(manifest, "a") as f:
            f.write(f"{path}\n")


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


