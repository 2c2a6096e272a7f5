import torch

from madlib.features import cache
from madlib.features.activations import extract
from madlib.models.info import attach, fingerprint, info_of


def test_cached_extract_equals_extract_and_reuses_the_file(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MADLIB_CACHE", str(tmp_path))
    prompts = ["Name: Alice\n\n***STATEMENT:*** 1 + 2 = 3.", "Name: Bob\n\n***STATEMENT:*** 12 + 7 = 29."]
    direct = extract(tiny_model, prompts, [0, 2], progress=False)
    first = cache.cached_extract(tiny_model, prompts, [0, 2], progress=False)
    files = list((tmp_path / "activations").glob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = cache.cached_extract(tiny_model, prompts, [0, 2], batch_size=1, progress=False)
    assert files[0].stat().st_mtime_ns == mtime, "second call reads the cache"
    for ex in (first, again):
        assert torch.allclose(ex.log_odds, direct.log_odds)
        assert all(torch.allclose(ex.acts[k], direct.acts[k]) for k in (0, 2))
    cache.cached_extract(tiny_model, prompts[:1], [0, 2], progress=False)
    cache.cached_extract(tiny_model, prompts, [1], progress=False)
    assert len(list((tmp_path / "activations").glob("*.safetensors"))) == 3, "prompts and layers enter the key"


def test_fingerprint_follows_the_weights(tiny_model):
    import copy

    other = attach(copy.deepcopy(tiny_model), info_of(tiny_model).replace(model_dir=None))
    assert fingerprint(other) == fingerprint(copy.deepcopy(other))
    with torch.no_grad():
        other.unembed.W_U[0, 0] += 1.0
    assert fingerprint(other) != fingerprint(tiny_model)


def test_cached_tensors_are_written_with_the_umask_mode(tmp_path, monkeypatch):
    import os
    import stat

    monkeypatch.setenv("MADLIB_CACHE", str(tmp_path))
    old = os.umask(0o022)
    try:
        out = cache.cached_tensors("kind", "key", lambda: {"a": torch.arange(3.0)})
    finally:
        os.umask(old)
    path = tmp_path / "kind" / "key.safetensors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and torch.equal(out["a"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["key.safetensors"], "no temporary file left"
