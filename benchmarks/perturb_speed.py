"""Speed of the batched perturbation engine (madlib.analyses.perturb.run_paths) against bare forward passes.

Every path point is one *perturbed token*: the last token of a prompt prefix with the activation at
the perturbed hook overwritten. The table gives the time per perturbed token of

* ``batched perturbed``: :func:`madlib.analyses.perturb.run_paths` (prefix key-value caches, hooks, L2 and KL);
* ``bare cached forward``: the same tokens against the same caches, no hooks, no metrics;
* ``bare full forward``: a plain forward pass of each point's whole prefix (what a perturbation
  without caching computes), batched, no hooks;
* ``one path at a time``: each path alone, its whole prefix once per point, with the hook;

and each one's time relative to the bare cached forward of the same tokens.

    python benchmarks/perturb_speed.py --model-dir _build/models/zoo-gpt2-<key> --threads 1
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from madlib.analyses import perturb
from madlib.models import zoo
from madlib.analyses.benchmarks import best_time as timed


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="", help="a saved zoo model directory (else --model from the zoo cache)")
    ap.add_argument("--model", default="zoo-gpt2", help="zoo model name, used without --model-dir")
    ap.add_argument("--preset", default="default", help="zoo preset, used without --model-dir")
    ap.add_argument("--hook", default="blocks.1.hook_resid_pre", help="perturbed hook")
    ap.add_argument("--n-base", type=int, default=32, help="prompt prefixes")
    ap.add_argument("--paths-per-base", type=int, default=15, help="paths per prefix (the experiment runs 15)")
    ap.add_argument("--n-steps", type=int, default=100, help="steps per path")
    ap.add_argument("--batch-size", type=int, default=1024, help="path points per forward pass")
    ap.add_argument("--naive-paths", type=int, default=8, help="paths timed one at a time")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 keeps torch's default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (the best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = zoo.load_dir(args.model_dir) if args.model_dir else zoo.get_model(args.model, preset=args.preset)
    texts = zoo.training_records(model.zoo_config)["prompt"].drop_duplicates().tolist()
    rng = np.random.default_rng(args.seed)
    chosen = [texts[i] for i in rng.choice(len(texts), size=2 * args.n_base, replace=False)]
    prefixes = perturb.sample_prefixes(perturb.tokens_with_bos(model, chosen), 2 * args.n_base, 2, rng)
    acts = perturb.last_activations(model, prefixes, args.hook)
    prefixes, a, pool = prefixes[: args.n_base], acts[: args.n_base], acts[args.n_base :]
    base = np.repeat(np.arange(args.n_base), args.paths_per_base)
    points = perturb.make_paths(a[base], pool[rng.integers(len(pool), size=len(base))], "relative", args.n_steps, 0.0)
    n_points = points.shape[0] * points.shape[1]
    dev = model.cfg.device

    def batched():
        perturb.run_paths(model, prefixes, base, points, args.hook, args.batch_size, progress=False)

    lengths = np.array([len(p) for p in prefixes])
    rows = [(b, s) for b in base for s in range(points.shape[1])]

    def groups():
        """The (path, step) rows of each prefix length."""
        for length in np.unique(lengths):
            yield [r for r in rows if lengths[r[0]] == length]

    def bare_cached():
        for sel in groups():
            bases = sorted({p for p, _ in sel})
            local = {b: i for i, b in enumerate(bases)}
            tokens = torch.tensor([prefixes[b] for b in bases], device=dev)
            cache = perturb.prefix_cache(model, tokens[:, :-1])
            for s in range(0, len(sel), args.batch_size):
                idx = torch.tensor([local[p] for p, _ in sel[s : s + args.batch_size]], device=dev)
                last = tokens[idx, -1][:, None]
                model(last, past_kv_cache=perturb.select_cache_rows(cache, idx), attention_mask=torch.ones_like(last))

    def bare_full():
        for sel in groups():
            tokens = torch.tensor([prefixes[p] for p, _ in sel], device=dev)
            for s in range(0, len(tokens), args.batch_size):
                model(tokens[s : s + args.batch_size])

    def one_at_a_time():
        read = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        for p in range(min(args.naive_paths, len(base))):
            tokens = torch.tensor(prefixes[base[p]], device=dev)[None].repeat(points.shape[1], 1)

            pts = points[p].to(dev)

            def overwrite(act, hook, pts=pts):
                act[:, -1] = pts
                return act

            model.run_with_hooks(tokens, fwd_hooks=[(args.hook, overwrite), (read, lambda act, hook: None)])

    n_naive = min(args.naive_paths, len(base)) * points.shape[1]
    timings = [
        ("batched perturbed", n_points, timed(batched, args.repeats)),
        ("bare cached forward", n_points, timed(bare_cached, args.repeats)),
        ("bare full forward", n_points, timed(bare_full, args.repeats)),
        ("one path at a time", n_naive, timed(one_at_a_time, args.repeats)),
    ]
    table = pd.DataFrame(timings, columns=["method", "perturbed_tokens", "seconds"])
    table["us_per_token"] = 1e6 * table["seconds"] / table["perturbed_tokens"]
    table["vs_bare_cached"] = table["us_per_token"] / table.loc[1, "us_per_token"]
    name = getattr(model, "model_dir", args.model)
    print(
        f"model {name}, hook {args.hook}, {args.n_base} prefixes x {args.paths_per_base} paths x {args.n_steps} steps"
    )
    print(f"mean prefix {lengths.mean():.1f} tokens, batch {args.batch_size}, {torch.get_num_threads()} threads, {dev}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
