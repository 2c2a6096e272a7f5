"""On-disk cache of computed features: one forward pass, many detectors.

Activations (and other per-prompt features such as attribution effects) of a model on a list of
prompts are computed once and stored under ``<build>/cache/<kind>/<key>.safetensors``, where the
key hashes everything they depend on: the model's weights, the prompts, the layers, the options of
the computation and the source of the modules that compute them. A notebook that only changes its
``detectors`` parameter therefore reruns scoring, not the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from torch import Tensor

from .activations import Extraction, extract
from ..codehash import code_hash
from ..models.info import fingerprint
from ..paths import atomic_path, build_dir



def cache_dir(kind: str) -> Path:
    """``<build>/cache/<kind>/`` (``$MADLIB_CACHE`` overrides ``<build>/cache``)."""
    return Path(os.environ.get("MADLIB_CACHE", build_dir() / "cache")) / kind


def feature_key(model, prompts: list[str], options: dict, modules: tuple[str, ...]) -> str:
    """Key over the model's weights, the prompts, the options and the code of the given madlib
    modules (their import closure, :func:`madlib.codehash.code_hash`). Name the modules by the code
    itself (``extract.__module__``), not by a typed string, so moving a module keeps the key working."""
    h = hashlib.sha256(fingerprint(model).encode())
    h.update(json.dumps(list(prompts)).encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    h.update(code_hash(*modules).encode())
    return h.hexdigest()[:24]


def cached_tensors(kind: str, key: str, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Load ``{name: tensor}`` stored under ``kind/key``, or compute, store atomically and return it."""
    from safetensors.torch import load_file, save_file

    path = cache_dir(kind) / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)
    out = compute()
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp)
    return out


def cached_extract(
    model, prompts: list[str], layers: list[int], batch_size: int = 128, progress: bool = True, desc: str = "extracting"
) -> Extraction:
    """:func:`madlib.features.activations.extract`, cached on disk (the batch size does not enter the key: padded
    batches give each prompt its own activations, up to float rounding)."""
    key = feature_key(model, prompts, dict(layers=sorted(layers)), (extract.__module__,))

    def compute() -> dict[str, Tensor]:
        ex = extract(model, prompts, layers, batch_size=batch_size, progress=progress, desc=desc)
        return {"log_odds": ex.log_odds, **{f"layer_{k}": v for k, v in ex.acts.items()}}

    t = cached_tensors("activations", key, compute)
    return Extraction({layer: t[f"layer_{layer}"] for layer in layers}, t["log_odds"])
