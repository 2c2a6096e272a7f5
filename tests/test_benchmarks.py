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


def test_claims_tell_the_numbers_in_words():
    import pandas as pd
    import pytest

    table = pd.DataFrame([dict(benchmark="extraction", n=2000, layers=5, madlib_s=1.234, bare_s=1.2, overhead=0.0283),
                          dict(benchmark="mahalanobis", n=10000, d=512, madlib_s=0.51, sklearn_s=1.3, speedup=2.549, max_rel_diff=3.2e-9),
                          dict(benchmark="suite_peak_memory", model="zoo-gpt2", dataset="hemisphere", seconds=211.3, methods=24,
                               peak_rss_mb=3456.7)]).assign(torch_threads=2)  # fmt: skip
    c = benchmarks.claims(table)
    assert c == dict(ex_overhead="2.8%", ex_n="2,000 prompts at 5 layers", ex_times="1.23 s against 1.20 s", ma_size="10,000 × 512",
                     ma_speedup="2.55×", ma_times="0.51 s against 1.30 s", ma_diff="3.2e-09", mem_peak="3,457 MB",
                     mem_run="24 methods on zoo-gpt2 / hemisphere, 211 s", threads=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"table lacks the benchmarks \['mahalanobis'\]"):
        benchmarks.claims(table[table["benchmark"] != "mahalanobis"])
