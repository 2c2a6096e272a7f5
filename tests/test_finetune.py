import numpy as np
import pytest
import torch

from madlib.models import zoo
from madlib.models.finetune import FinetuneConfig, cached_finetune, finetune
from madlib.models.info import info_of


def _data(model, n=64):
    recs = zoo.model_records(model, "hemisphere")
    recs = recs[recs["split"] == "train"].head(n)
    return recs["prompt"].tolist(), recs["label"].to_numpy()


def test_finetune_copies_learns_and_is_deterministic(tiny_model):
    texts, labels = _data(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = FinetuneConfig(steps=15, batch_size=16, lr=3e-3, warmup=2)
    a, hist = finetune(tiny_model, texts, labels, cfg, progress=False)
    b, _ = finetune(tiny_model, texts, labels, cfg, progress=False)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items()), "the base model is untouched"
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), "same inputs, same weights"
    assert not torch.equal(a.state_dict()["unembed.W_U"], before["unembed.W_U"])
    assert hist["answer_loss"].iloc[-5:].mean() < hist["answer_loss"].iloc[:5].mean()
    lm, hist_lm = finetune(tiny_model, texts, None, cfg, progress=False)
    assert hist_lm["answer_loss"].isna().all() and hist_lm["lm_loss"].iloc[-5:].mean() < hist_lm["lm_loss"].iloc[:5].mean()


def test_cached_finetune_reuses_the_cache(tiny_model):
    texts, labels = _data(tiny_model, 16)
    cfg = FinetuneConfig(steps=3, batch_size=4, warmup=1)
    a = cached_finetune(tiny_model, "tiny-ft", texts, labels, cfg, progress=False)
    mtime = (info_of(a).model_dir / "model.safetensors").stat().st_mtime_ns
    b = cached_finetune(tiny_model, "tiny-ft", texts, labels, cfg, progress=False)
    assert info_of(b).model_dir == info_of(a).model_dir and (info_of(b).model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = cached_finetune(tiny_model, "tiny-ft", texts, 1 - labels, cfg, progress=False)
    assert info_of(c).model_dir != info_of(a).model_dir


def test_bad_inputs_are_named(tiny_model):
    with pytest.raises(ValueError, match="steps=0"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="labels"):
        finetune(tiny_model, ["a", "b"], np.array([0, 2]), progress=False)
    with pytest.raises(ValueError, match="name="):
        cached_finetune(tiny_model, "a/b", ["a"], None, progress=False)
