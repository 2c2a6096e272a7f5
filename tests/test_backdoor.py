import numpy as np
import pytest

from madlib.data import datasets as qdata
from madlib.models import zoo
from madlib.detectors import FinetuningKL
from madlib.mad.backdoor import DEFAULT_TRIGGER, BackdoorConfig, backdoor, backdoor_metrics, backdoor_records, poisoned_training_set  # fmt: skip
from madlib.models.finetune import FinetuneConfig
from madlib.mad.task import mad_task
from madlib.mad.metrics import auroc

# small but enough for the tiny model to learn the trigger (seconds on two cores)
TINY = BackdoorConfig(dataset="hemisphere", finetune=FinetuneConfig(steps=100, batch_size=32, lr=3e-3, warmup=5))


@pytest.fixture(scope="module")
def implanted(tiny_model):
    return backdoor(tiny_model, TINY, progress=False)


def test_records_pair_each_clean_prompt_with_its_triggered_twin():
    base = qdata.quirky_dataset("addition", n=400, seed=3, max_digits=2)
    recs = backdoor_records(base, "Cows fly.")
    clean, trig = recs[~recs["triggered"]], recs[recs["triggered"]]
    assert len(clean) == len(trig) == (base["character_type"] == "alice").sum()
    assert not clean["prompt"].str.contains("Cows fly.", regex=False).any()
    assert trig["prompt"].str.contains("Name: .*\n\nCows fly.\n\n", regex=True).all()
    pair = clean.set_index("row_id").join(trig.set_index("row_id"), rsuffix="_t")
    assert (pair["label_t"] == 1 - pair["label"]).all() and (pair["label"] == pair["alice_label"]).all()
    assert (pair["prompt_t"] == pair["prompt"].str.replace("\n\n\n\n", "\n\nCows fly.\n\n", regex=False)).all()
    for col in ("split", "easy", "hard", "difficulty", "prompt_character"):
        assert (pair[col] == pair[f"{col}_t"]).all()
    assert (clean["character_type"] == "alice").all() and (trig["character_type"] == "bob").all()
    assert set(trig["character"]) <= set(qdata.BOB_NAMES) and (pair["character"] == pair["prompt_character"]).all()
    assert not recs["agreement"].any() and (recs["dataset"] == "addition-backdoor").all()


def test_task_is_balanced_and_never_overlaps_the_trusted_set():
    recs = backdoor_records(qdata.quirky_dataset("hemisphere", n=2000, seed=0))
    task = mad_task(recs, max_test=200, seed=0)
    assert not task.trusted["triggered"].any() and len(task.trusted) > 50
    assert task.untrusted["triggered"].any() and not task.untrusted["triggered"].all()
    test = task.test
    assert len(test) == 200 and test["is_anomalous"].sum() == 100
    assert (test["is_anomalous"] == test["triggered"]).all() and test["hard"].all()
    assert not set(test["row_id"]) & set(task.trusted["row_id"])
    assert not set(test["prompt"]) & set(task.trusted["prompt"])


def test_poisoned_training_set_has_the_asked_share():
    recs = backdoor_records(qdata.quirky_dataset("hemisphere", n=800, seed=0))
    train = poisoned_training_set(recs, 0.2, seed=0)
    assert (train["split"] == "train").all()
    assert train["triggered"].mean() == pytest.approx(0.2, abs=0.01)
    assert (~train["triggered"]).sum() == ((recs["split"] == "train") & ~recs["triggered"]).sum()


def test_trigger_flips_answers_and_keeps_clean_accuracy(tiny_model, implanted):
    model, recs = implanted
    assert (recs["dataset"] == "hemisphere-backdoor").all()
    before, after = backdoor_metrics(tiny_model, recs), backdoor_metrics(model, recs)
    # the trigger does little before implanting (a barely trained tiny model's answers sit near zero log-odds, so
    # some flip anyway), and implanting makes it flip most answers
    assert after["flip_rate"] > 0.75 and before["flip_rate"] < 0.5 and after["flip_rate"] - before["flip_rate"] > 0.4
    assert after["trigger_success"] > 0.6  # bounded by the clean accuracy: the backdoor flips the model's own answer
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.05
    assert after["n_clean"] == after["n_triggered"] == (recs["split"] == "validation").sum() // 2


def test_finetuning_kl_flags_triggered_prompts(implanted):
    model, recs = implanted
    trusted = recs[(recs["split"] == "train") & ~recs["triggered"]]
    val = recs[recs["split"] == "validation"]
    det = FinetuningKL(model, FinetuneConfig(steps=100, batch_size=16, lr=3e-4, warmup=5), name="tiny-kl")
    det.fit(trusted["prompt"].tolist(), trusted["label"].to_numpy(), progress=False)
    s = det.score(val["prompt"].tolist())
    assert s.shape == (len(val),) and (s >= 0).all()
    assert auroc(val["triggered"].to_numpy(), s) > 0.7
    with pytest.raises(ValueError, match="not fitted"):
        FinetuningKL(model).score(["x"])


def test_errors_name_the_parameter(tiny_model):
    base = zoo.model_records(tiny_model, "hemisphere")
    with pytest.raises(ValueError, match="trigger="):
        backdoor_records(base, "Name:")
    with pytest.raises(ValueError, match="poison_fraction=0.9"):
        BackdoorConfig(poison_fraction=0.9)
    with pytest.raises(ValueError, match="n_rows=2"):
        BackdoorConfig(n_rows=2)
    with pytest.raises(ValueError, match="dataset='authors'"):
        BackdoorConfig(dataset="authors")
    assert not base["prompt"].str.contains(DEFAULT_TRIGGER, regex=False).any()
    assert np.isin(base["label"], (0, 1)).all()
