"""Speed and memory benchmarks of the MAD pipeline.

1. **Extraction overhead**: :func:`madlib.features.activations.extract` (hooks at every layer, gathering the
   last token, log-odds) against a bare forward pass of the same model on the same prompts, tokenized
   and padded into the same batches.
2. **Mahalanobis**: :class:`madlib.detectors.Mahalanobis` fit + score on ``n x d`` Gaussian
   features against sklearn's ``EmpiricalCovariance`` + ``mahalanobis`` (largest absolute
   difference of the scores, after putting both on the same scale, and the speed ratio).
3. **Peak memory** of the full detector suite (:data:`madlib.mad.suite.DEFAULT_METHODS`) on one zoo
   model and dataset, in a fresh process (maximum resident set size).

The command-line script ``benchmarks/mad_speed.py`` and the book's benchmark appendix call
:func:`run`; both write ``benchmarks/mad.csv`` in the results folder (:func:`madlib.paths.results_dir`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def paired_times(baseline, candidate, rounds: int) -> tuple[float, float, float]:
    """Best wall time of each function and the median over rounds of candidate / baseline. The two
    run back to back in every round, in alternating order, so a drift of the machine's speed (a
    shared or throttled CPU) reaches both alike instead of landing on one of them."""
    times = np.zeros((rounds, 2))
    for r in range(rounds):
        for j in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (baseline if j == 0 else candidate)()
            times[r, j] = time.perf_counter() - t0
    return float(times[:, 0].min()), float(times[:, 1].min()), float(np.median(times[:, 1] / times[:, 0]))


@torch.no_grad()
def extraction_overhead(model, prompts: list[str], batch_size: int, repeats: int) -> dict:
    from ..features.activations import extract
    from ..models.tokenizer import encode_prompts
    from ..models.tokenizer import pad_batch

    layers = list(range(model.cfg.n_layers + 1))

    def bare():  # from the same strings to the same length-sorted batches, then model(tokens) alone
        seqs, pad_id, _ = encode_prompts(model, prompts)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for s in range(0, len(seqs), batch_size):
            model(pad_batch([seqs[i] for i in order[s : s + batch_size]], pad_id)[0], return_type="logits")

    t_bare, t_extract, ratio = paired_times(bare, lambda: extract(model, prompts, layers, batch_size=batch_size, progress=False), repeats)
    return dict(benchmark="extraction", n=len(prompts), layers=len(layers), bare_s=t_bare, madlib_s=t_extract,
                overhead=ratio - 1)  # fmt: skip


def mahalanobis_vs_sklearn(n: int, d: int, repeats: int, seed: int = 0) -> dict:
    from sklearn.covariance import EmpiricalCovariance

    from ..detectors import Mahalanobis

    rng = np.random.default_rng(seed)
    a = np.eye(d) + 0.5 * rng.normal(size=(d, d)) / np.sqrt(d)  # a well-conditioned covariance
    train = (rng.normal(size=(n, d)) @ a + rng.normal(size=d)).astype(np.float32).astype(np.float64)
    test = (rng.normal(size=(n, d)) @ a).astype(np.float32).astype(np.float64)
    t_train, t_test = torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32)

    def ours():
        return Mahalanobis().fit({0: t_train}).score({0: t_test})[0]

    def theirs():
        return EmpiricalCovariance().fit(train).mahalanobis(test)

    t_ours, t_theirs = best_time(ours, repeats), best_time(theirs, repeats)
    ref = theirs() / d  # sklearn's squared distance, on madlib's scale (divided by d)
    diff = float(np.max(np.abs(ours() - ref) / np.abs(ref)))
    return dict(benchmark="mahalanobis", n=n, d=d, madlib_s=t_ours, sklearn_s=t_theirs, speedup=t_theirs / t_ours,
                max_rel_diff=diff)  # fmt: skip


def suite_peak_memory(model: str, dataset: str, preset: str) -> dict:
    """Run the full method suite in a fresh process and read its maximum resident set size."""
    code = f"""
import json, resource, time
from madlib.models import zoo
from madlib.features.activations import resolve_layers
from madlib.mad.suite import run_suite
m = zoo.get_model({model!r}, preset={preset!r}, progress=False)
t0 = time.perf_counter()
auc, _, task = run_suite(m, {model!r}, zoo.model_records(m, {dataset!r}), resolve_layers([], m.cfg.n_layers), [], n_boot=200, progress=False)
print(json.dumps(dict(seconds=time.perf_counter() - t0, methods=int(auc['method'].nunique()),
                      maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return dict(benchmark="suite_peak_memory", model=model, dataset=dataset, seconds=r["seconds"], methods=r["methods"],
                peak_rss_mb=r["maxrss_mb"])  # fmt: skip


def run(model: str = "zoo-gpt2", preset: str = "default", dataset: str = "hemisphere", n_prompts: int = 2000,
        batch_size: int = 256, maha_n: int = 10_000, maha_d: int = 512, repeats: int = 7) -> pd.DataFrame:
    """All three benchmarks; one row each (columns differ per benchmark)."""
    from ..models import zoo

    m = zoo.get_model(model, preset=preset, progress=False)
    prompts = zoo.model_records(m, dataset)["prompt"].tolist()[:n_prompts]
    rows = [
        extraction_overhead(m, prompts, batch_size, repeats),
        mahalanobis_vs_sklearn(maha_n, maha_d, repeats),
        suite_peak_memory(model, dataset, preset),
    ]
    return pd.DataFrame(rows).assign(torch_threads=torch.get_num_threads())


def claims(table: pd.DataFrame) -> dict[str, object]:
    """The appendix's numbers in words, by glue key, from :func:`run`'s table: the extraction's
    overhead, its size and times; the Mahalanobis comparison's size, speed-up, times and largest
    relative difference; the suite's peak memory and run; and torch's thread count."""
    missing = {"extraction", "mahalanobis", "suite_peak_memory"} - set(table["benchmark"])
    if missing:
        raise ValueError(f"table lacks the benchmarks {sorted(missing)}; give the table of benchmarks.run")
    ex, ma, mem = (table[table["benchmark"] == b].iloc[0] for b in ("extraction", "mahalanobis", "suite_peak_memory"))
    return dict(
        ex_overhead=f"{100 * ex['overhead']:.1f}%",
        ex_n=f"{int(ex['n']):,} prompts at {int(ex['layers'])} layers",
        ex_times=f"{ex['madlib_s']:.2f} s against {ex['bare_s']:.2f} s",
        ma_size=f"{int(ma['n']):,} × {int(ma['d'])}",
        ma_speedup=f"{ma['speedup']:.2f}×",
        ma_times=f"{ma['madlib_s']:.2f} s against {ma['sklearn_s']:.2f} s",
        ma_diff=f"{ma['max_rel_diff']:.1e}",
        mem_peak=f"{mem['peak_rss_mb']:,.0f} MB",
        mem_run=f"{int(mem['methods'])} methods on {mem['model']} / {mem['dataset']}, {mem['seconds']:.0f} s",
        threads=int(table["torch_threads"].iloc[0]),
    )
