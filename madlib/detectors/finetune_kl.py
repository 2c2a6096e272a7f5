"""The fine-tuning KL detector (methods.md §3), under the prompt-level contract
(:class:`madlib.detectors.base.PromptDetector`): it reads prompts, not features.

``fit(trusted_prompts, trusted_labels)`` fine-tunes a copy of the model on the trusted prompts and
labels (:func:`madlib.models.finetune.cached_finetune`); ``score(prompts)`` returns one score per
prompt, ``KL(P_model || P_finetuned)`` of the answer distributions at the last token (cupbearer's
direction; :func:`madlib.features.attribution.answer_kl`). Higher = more anomalous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from ..data import datasets as qdata
from ..features.attribution import KL_OVER, answer_kl
from ..models.finetune import FinetuneConfig, cached_finetune
from .base import DetectorConfig, PromptDetector

KL_FINETUNE = FinetuneConfig(steps=150, batch_size=32, lr=3e-4, warmup=10)
"""Default fine-tune of :class:`FinetuningKL`: a gentle one. Longer or faster fine-tunes sharpen the
answers on every trusted-like prompt, and that change swamps the one the detector looks for."""


@dataclass(frozen=True)
class FinetuningKLConfig(DetectorConfig):
    cfg: FinetuneConfig = KL_FINETUNE  # how the copy is fine-tuned
    over: str = "answers"  # "answers" (two-way softmax over " No"/" Yes") or "vocab"
    batch_size: int = 128  # prompts per forward pass when scoring

    def __post_init__(self) -> None:
        qdata.check_choice("over", self.over, KL_OVER)


class FinetuningKL(PromptDetector):
    """Fine-tuning detector (prompt-level contract, see the module doc).

    ``fit`` fine-tunes a copy of ``model`` on the trusted prompts with their labels (cached);
    ``score`` is ``KL(P_model || P_finetuned)`` of the answer distributions at the last token.

    Args:
        model: the model under scrutiny (a zoo model or a fine-tuned copy).
        cfg, over, batch_size: the settings (:class:`FinetuningKLConfig`; or pass ``config=``).
        name: cache name of the fine-tuned copy (kept as ``cache_name``; an input, not a setting).
    """

    name = "finetune_kl"
    Config = FinetuningKLConfig

    def __init__(
        self, model, cfg: FinetuneConfig = KL_FINETUNE, over: str = "answers", name: str = "finetune-kl",
        batch_size: int = 128, *, config: FinetuningKLConfig | None = None,
    ):  # fmt: skip
        if config is None:
            super().__init__(cfg=cfg, over=over, batch_size=batch_size)
        else:
            super().__init__(config=config)
        self.model, self.cache_name = model, name
        self.finetuned = None

    def fit(self, prompts: list[str], labels, progress: bool = True) -> "FinetuningKL":
        """Fine-tune the copy on the trusted prompts and their 0/1 answer labels (``labels=None``:
        next-token loss on the prompts alone)."""
        labels = None if labels is None else np.asarray(labels)
        self.finetuned = cached_finetune(
            self.model, self.cache_name, list(prompts), labels, self.config.cfg, progress=progress
        )
        return self

    def score(self, prompts: list[str], progress: bool = False) -> Float[np.ndarray, " n"]:
        """One score per prompt, higher = more anomalous."""
        if self.finetuned is None:
            raise ValueError("this FinetuningKL is not fitted; call fit(trusted_prompts, trusted_labels) first")
        cfg = self.config
        return answer_kl(self.model, self.finetuned, prompts, cfg.over, cfg.batch_size, progress)
