"""What madlib knows about a loaded model, as one typed record.

Every loader (:func:`madlib.models.zoo.get_model`, :func:`madlib.models.zoo.load_dir`,
:func:`madlib.models.hub.load_model`, :func:`madlib.models.finetune.finetune` and
:func:`~madlib.models.finetune.cached_finetune`) attaches a :class:`ModelInfo` to the
``HookedTransformer`` it returns (:func:`attach`); code that needs to know where a model comes from
reads it with :func:`info_of` and its typed fields, never with ``getattr`` on loose attributes. A
model built by hand has an empty record: no saved weights, not a zoo model, no hub spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .finetune import FinetuneConfig
    from .zoo import ZooModel

ATTRIBUTE = "madlib_info"
"""The one attribute of a model that madlib sets."""


@dataclass(frozen=True)
class ModelInfo:
    """Where a model's weights come from.

    Attributes:
        model_dir: the directory of its saved weights (a zoo base, a fine-tune's adapter or a cached
            fine-tune), or ``None`` when its weights exist only in memory.
        zoo: the zoo entry it is (or is a fine-tuned copy of): family, preset, dataset, seed,
            checkpoint; ``None`` for other models. It says where the model's records come from.
        hub: for models loaded from Hugging Face: spec, resolved path, revision or file stamps,
            adapter, dtype, transformer-lens name and loading options (what identifies the weights).
        finetune: the settings of the plain fine-tune that made it, if one did.
    """

    model_dir: Path | None = None
    zoo: "ZooModel | None" = None
    hub: dict | None = None
    finetune: "FinetuneConfig | None" = None

    def replace(self, **changes) -> "ModelInfo":
        return dataclasses.replace(self, **changes)


def attach(model, info: ModelInfo):
    """Set ``model``'s record (returns the model)."""
    setattr(model, ATTRIBUTE, info)
    return model


def info_of(model) -> ModelInfo:
    """``model``'s record (an empty one for a model no madlib loader returned)."""
    info = getattr(model, ATTRIBUTE, None)
    return info if isinstance(info, ModelInfo) else ModelInfo()


def zoo_info(model) -> "ZooModel | None":
    """The zoo entry of ``model``, or ``None`` when it is not a zoo model."""
    return info_of(model).zoo


def require_zoo(model, param: str = "model") -> "ZooModel":
    """The zoo entry of ``model``; a one-line error naming ``param`` when it has none."""
    zoo = zoo_info(model)
    if zoo is None:
        raise ValueError(f"{param}={model.cfg.model_name!r} is not accepted; give a zoo model (madlib.models.zoo.get_model)")
    return zoo


def identity(model) -> str:
    """What identifies a model's weights in file keys: its hub record, else its weights' directory,
    else its name."""
    info = info_of(model)
    if info.hub is not None:
        return json.dumps(info.hub, sort_keys=True, default=str)
    return str(info.model_dir or model.cfg.model_name)


def fingerprint(model) -> str:
    """A digest of the model's weights (read from its saved file when it has one: fast; for hub
    models, of their hub record)."""
    info = info_of(model)
    saved = Path(info.model_dir or "") / "model.safetensors"
    if info.model_dir and saved.is_file():
        return hashlib.sha256(saved.read_bytes()).hexdigest()
    if info.hub is not None:
        return hashlib.sha256(json.dumps(info.hub, sort_keys=True, default=str).encode()).hexdigest()
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
