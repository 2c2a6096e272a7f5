"""Speed and memory of the MAD pipeline (see :mod:`madlib.analyses.benchmarks`): extraction overhead against a
bare forward pass, Mahalanobis against sklearn, peak memory of the full detector suite.

    python benchmarks/mad_speed.py --model zoo-gpt2 --dataset hemisphere

Writes ``results/benchmarks/mad.csv`` under the working directory (or ``$MADLIB_RESULTS``) and prints it.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from madlib.analyses import benchmarks
from madlib.paths import results_dir
from madlib.plots.common import write_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zoo-gpt2")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--dataset", default="hemisphere")
    ap.add_argument("--n-prompts", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--maha-n", type=int, default=10_000)
    ap.add_argument("--maha-d", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = benchmarks.run(args.model, args.preset, args.dataset, args.n_prompts, args.batch_size, args.maha_n, args.maha_d,
                           args.repeats)  # fmt: skip
    write_table(table, "benchmarks", "mad")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.T.to_string(header=False))
    print(f"written to {results_dir('benchmarks') / 'mad.csv'}")


if __name__ == "__main__":
    main()
