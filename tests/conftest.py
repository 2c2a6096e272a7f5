import os

import pytest

# Tests never touch the user's caches or results: everything generated goes under a session temp dir.


@pytest.fixture(scope="session", autouse=True)
def _isolated_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    old = {k: os.environ.get(k) for k in ("MADLIB_BUILD", "MADLIB_MODELS", "MADLIB_RESULTS")}
    os.environ["MADLIB_BUILD"] = str(build)
    os.environ["MADLIB_MODELS"] = str(build / "models")
    os.environ["MADLIB_RESULTS"] = str(build / "results")
    yield build
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model():
    from madlib.models import zoo

    return zoo.get_model("zoo-gpt2", preset="tiny", progress=False)
