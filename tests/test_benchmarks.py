import numpy as np

from madlib.analyses import benchmarks


def test_mahalanobis_matches_sklearn():
    row = benchmarks.mahalanobis_vs_sklearn(n=600, d=16, repeats=1)
    assert row["max_rel_diff"] < 1e-6 and row["madlib_s"] > 0 and row["sklearn_s"] > 0


def test_extraction_overhead_is_measured_on_the_same_batches(tiny_model):
    prompts = ["Name: Alice\n\n***STATEMENT:*** 1 + 2 = 3.", "Name: Bob\n\n***STATEMENT:*** 12 + 7 = 29."] * 8
    row = benchmarks.extraction_overhead(tiny_model, prompts, batch_size=4, repeats=1)
    assert row["layers"] == tiny_model.cfg.n_layers + 1 and np.isfinite(row["overhead"]) and row["bare_s"] > 0


def test_paired_times_alternate_the_order_and_take_the_median_ratio():
    import time

    calls = []

    def timed(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return fn

    best_a, best_b, ratio = benchmarks.paired_times(timed("a", 0.01), timed("b", 0.03), rounds=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert 0.01 <= best_a < 0.02 and 0.03 <= best_b < 0.045
    assert 2.0 < ratio < 3.5
