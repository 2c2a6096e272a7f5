"""Auditing fine-tuning by SAE feature drift (methods.md §7, seed 001).

One top-k SAE, trained on the base model's activations at one hook, encodes the activations of the
base model and of a fine-tuned copy on the same texts. At every token position the top-k latents
of each model are compared; the *intersection mean* is the mean overlap ``|TopK_base ∩ TopK_ft|``
over the positions of an evaluation set. Fine-tuning on a task should move the latents of that
task's text more than those of general text: intersection mean on the task set ``S`` below that
on the general set ``G``. The write-up's *Intersection Difference Rate* has no published formula;
the three candidates are all computed, each under its own name:

* ``rate_gap_over_k`` = ``(G - S) / k``;
* ``rate_gap_over_general`` = ``(G - S) / G``;
* ``rate_nonoverlap`` = ``(N_S - N_G) / N_G`` with ``N = k - intersection mean`` (the latents that left).

Top-k is taken **over latents** at each position (the seed's sweep script took it over positions),
ranking latents by the SAE encoder's pre-activation, the order in which the top-k SAE itself picks
its active latents: for ``k`` up to the SAE's own k the sets are the active latents with the largest
activations, and larger ``k`` stay well defined.

Tasks are named ``<dataset>`` (a zoo dataset, records as the base model was trained on them) or
``<dataset>-large`` (an arithmetic dataset with operands beyond the zoo's range: a new skill).

The chapter's figures are in :mod:`madlib.plots.drift`; this module computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..data import datasets as qdata
from ..models.info import require_zoo
from ..models import zoo
from ..features.activations import extract
from ..models.finetune import FinetuneConfig, cached_finetune
from ..features.sae import collect_activations, reconstruction_metrics

LABELS = ("truth", "bob", "quirky", "none")
"""Fine-tuning targets: everyone answers with the truth (Alice's label; Bob's quirk is unlearnt on
the task), everyone with Bob's heuristic, each character with its own label, or no labels (a
next-token fine-tune on the prompts)."""

RATES = ("rate_gap_over_k", "rate_gap_over_general", "rate_nonoverlap")
GENERAL = "general"
SEED_REPORTED_RATE = 0.15
"""The write-up reports an Intersection Difference Rate above 15% in every cell."""


# ---------------------------------------------------------------------------------------------
# Top-k overlap and rates


@torch.no_grad()
def latent_preacts(sae, acts: Float[Tensor, "n d"], batch_size: int = 8192) -> Float[Tensor, "n d_sae"]:
    """The SAE encoder's pre-activations (the scores its top-k selection ranks)."""
    out = []
    for i in range(0, len(acts), batch_size):
        pre = sae.process_sae_in(acts[i : i + batch_size].float()) @ sae.W_enc + sae.b_enc
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            pre = pre * sae.W_dec.norm(dim=-1)
        out.append(pre)
    return torch.cat(out) if out else torch.zeros(0, sae.cfg.d_sae)


def topk_latents(scores: Float[Tensor, "n d_sae"], k: int) -> Int[Tensor, "n k"]:
    """Indices of the ``k`` highest-scoring latents at each position, best first."""
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k!r} is not accepted; give an integer in 1..{scores.shape[-1]} (the SAE's latents)")
    return torch.topk(scores, k, dim=-1, sorted=True).indices


def overlap_by_k(
    before: Float[Tensor, "n d_sae"], after: Float[Tensor, "n d_sae"], ks: list[int]
) -> dict[int, Int[Tensor, " n"]]:
    """``|TopK(before) ∩ TopK(after)|`` at each position, for each ``k`` in ``ks``."""
    a, b = topk_latents(before, max(ks)), topk_latents(after, max(ks))
    return {k: (a[:, :k, None] == b[:, None, :k]).any(-1).sum(-1) for k in ks}


def rates(task_mean: float, general_mean: float, k: int) -> dict[str, float]:
    """The three candidate Intersection Difference Rates of a task set against the general set."""
    s, g = task_mean, general_mean
    return dict(
        rate_gap_over_k=(g - s) / k,
        rate_gap_over_general=(g - s) / g if g else float("nan"),
        rate_nonoverlap=((k - s) - (k - g)) / (k - g) if k != g else float("nan"),
    )


def value_change(
    before_scores: Float[Tensor, "n d_sae"],
    z_before: Float[Tensor, "n d_sae"],
    z_after: Float[Tensor, "n d_sae"],
    k: int,
) -> float:
    """Relative change of the base model's top-k latent activations: ``sum |z_ft - z_base| /
    sum |z_base|`` over each position's top-k latents (ranked on the base model) and all positions."""
    idx = topk_latents(before_scores, k)
    zb, za = z_before.gather(1, idx), z_after.gather(1, idx)
    den = zb.abs().sum().item()
    return (za - zb).abs().sum().item() / den if den else float("nan")


# ---------------------------------------------------------------------------------------------
# Tasks, fine-tunes and evaluation sets


@dataclass(frozen=True)
class DriftTask:
    """A fine-tuning task: a zoo dataset, optionally with operands beyond the zoo's range."""

    name: str
    dataset: str
    max_digits: float | None = None  # None: the records the base model was trained on

    @classmethod
    def parse(cls, name: str, large_digits: float = 3.0) -> "DriftTask":
        dataset, large = (name[: -len("-large")], True) if name.endswith("-large") else (name, False)
        if dataset not in qdata.DATASETS or (large and dataset not in qdata.ARITHMETIC):
            raise ValueError(
                f"tasks={name!r} is not accepted; give a zoo dataset {list(qdata.DATASETS)} "
                f"or an arithmetic one with '-large' (e.g. 'addition-large')"
            )
        return cls(name, dataset, large_digits - (1 if dataset == "squaring" else 0) if large else None)

    def records(self, model) -> pd.DataFrame:
        """The task's records (both splits) for a zoo model."""
        if self.max_digits is None:
            return zoo.model_records(model, self.dataset)
        cfg = require_zoo(model).base_config
        return qdata.quirky_dataset(self.dataset, n=cfg.n_rows, seed=cfg.data_seed + 1, max_digits=self.max_digits)


def training_data(records: pd.DataFrame, labels: str, n: int, seed: int) -> tuple[list[str], np.ndarray | None]:
    """Up to ``n`` train-split prompts and their fine-tuning labels (``None`` for a plain-text fine-tune)."""
    qdata.check_choice("finetune_labels", labels, LABELS)
    train = records[records["split"] == "train"]
    train = train.sample(n=min(n, len(train)), random_state=seed)
    col = dict(truth="alice_label", bob="bob_label", quirky="label").get(labels)
    return train["prompt"].tolist(), None if col is None else train[col].to_numpy().astype(int)


def finetune_tasks(
    base, base_name: str, tasks: list[DriftTask], cfg: FinetuneConfig, labels: str = "truth", n_texts: int = 4000,
    progress: bool = True,
) -> dict[str, object]:  # fmt: skip
    """One cached fine-tuned copy of ``base`` per task, keyed by task name."""
    out = {}
    for task in tasks:
        texts, y = training_data(task.records(base), labels, n_texts, cfg.seed)
        out[task.name] = cached_finetune(base, f"{base_name}-{task.name}-{labels}", texts, y, cfg, progress=progress)
    return out


def eval_sets(base, tasks: list[DriftTask], n_eval: int, seed: int) -> dict[str, list[str] | dict[str, list[str]]]:
    """Validation-split prompts: ``n_eval`` per task, and the general set as equal shares of every
    dataset the base model was trained on, keyed by dataset (``{GENERAL: {dataset: prompts}}``):
    each fine-tune's general set leaves its own task's dataset out (:func:`general_texts`) and
    still holds at least ``n_eval`` prompts."""
    datasets = require_zoo(base).datasets
    if len(datasets) < 2 or n_eval < len(datasets) - 1:
        raise ValueError(f"n_eval={n_eval!r} is not accepted; give at least {len(datasets) - 1} (one prompt per other dataset)")
    out: dict = {}
    for task in tasks:
        val = task.records(base).query("split == 'validation'")
        out[task.name] = val.sample(n=min(n_eval, len(val)), random_state=seed)["prompt"].tolist()
    per = -(-n_eval // (len(datasets) - 1))
    general = {}
    for ds in datasets:
        val = zoo.model_records(base, ds).query("split == 'validation'")
        general[ds] = val.sample(n=min(per, len(val)), random_state=seed + 1)["prompt"].tolist()
    out[GENERAL] = general
    return out


def general_texts(general: list[str] | dict[str, list[str]], task: str) -> list[str]:
    """The general set of the fine-tune on ``task``: a list as given, or the parts of a
    per-dataset general set (:func:`eval_sets`) except the task's own dataset."""
    if not isinstance(general, dict):
        return list(general)
    try:
        own = DriftTask.parse(task).dataset
    except ValueError:
        own = task
    return [t for ds, texts in general.items() if ds != own for t in texts]


def read_prompts(spec, param: str = "task_prompts") -> list[str]:
    """Prompts given as a list of strings, or as a file: ``.txt`` (one prompt per line), ``.jsonl``
    (one object per line with a ``text`` or ``prompt`` field) or ``.json`` (a list of strings)."""
    import json
    from pathlib import Path

    if isinstance(spec, (list, tuple)):
        texts = [str(t) for t in spec]
    else:
        path = Path(str(spec)).expanduser()
        if not path.is_file():
            raise ValueError(f"{param}={spec!r} is not accepted; give a list of prompts or a .txt, .jsonl or .json file")
        if path.suffix == ".txt":
            texts = [line for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            field = next((f for f in ("text", "prompt") if rows and f in rows[0]), None)
            if field is None:
                raise ValueError(f"{param}={spec!r} is not accepted; its JSON lines need a 'text' or 'prompt' field")
            texts = [str(r[field]) for r in rows]
        elif path.suffix == ".json":
            texts = [str(t) for t in json.loads(path.read_text())]
        else:
            raise ValueError(f"{param}={spec!r} is not accepted; give a .txt, .jsonl or .json file")
    if not texts:
        raise ValueError(f"{param}={spec!r} is not accepted; it holds no prompts")
    return texts


def text_sets(task_prompts: dict, tasks: list[str], n_eval: int, seed: int) -> dict[str, list[str]]:
    """Evaluation sets of a model outside the zoo: ``task_prompts`` maps each set name (every task,
    and :data:`GENERAL`) to its prompts (:func:`read_prompts`); up to ``n_eval`` of each, drawn with
    ``seed``. Sets that are no fine-tune's task stay as further audit candidates."""
    missing = [name for name in [*tasks, GENERAL] if name not in task_prompts]
    if missing:
        raise ValueError(
            f"task_prompts={sorted(task_prompts)} is not accepted; it needs prompts for {missing} "
            f"(every fine-tuned task and {GENERAL!r})"
        )
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in task_prompts.items():
        texts = read_prompts(spec, f"task_prompts[{name!r}]")
        keep = np.sort(rng.choice(len(texts), size=min(n_eval, len(texts)), replace=False))
        out[name] = [texts[i] for i in keep]
    return out


def finetune_loaders(finetuned: dict, **load_kwargs) -> dict[str, Callable[[], object]]:
    """Loaders (called one at a time by :func:`drift_table`) of external fine-tunes: ``finetuned``
    maps a task name to a model spec of :func:`madlib.models.hub.load_model` (hub id or directory), or
    to ``[base spec, LoRA adapter]``."""
    from functools import partial

    from ..models.hub import load_model

    out = {}
    for task, spec in finetuned.items():
        if isinstance(spec, (list, tuple)):
            if len(spec) != 2:
                raise ValueError(f"finetuned[{task!r}]={spec!r} is not accepted; give a model spec or [model, adapter]")
            out[task] = partial(load_model, str(spec[0]), adapter=str(spec[1]), **load_kwargs)
        else:
            out[task] = partial(load_model, str(spec), **load_kwargs)
    return out


def truth_accuracy(model, records: pd.DataFrame, n: int = 500, seed: int = 0, batch_size: int = 128) -> dict:
    """Accuracy of the answer's sign against the truth (Alice's label) on up to ``n`` validation
    prompts of Alice, and of Bob where his label differs from the truth (his quirk shows there)."""
    val = records[records["split"] == "validation"]
    out = {}
    for key, rows in (("alice", val[val["character_type"] == "alice"]),
                      ("bob_disagree", val[(val["character_type"] == "bob") & ~val["agreement"]])):  # fmt: skip
        rows = rows.sample(n=min(n, len(rows)), random_state=seed)
        log_odds = extract(model, rows["prompt"].tolist(), [], batch_size=batch_size, progress=False).log_odds.numpy()
        out[f"truth_acc_{key}"] = float(((log_odds > 0) == rows["alice_label"].to_numpy().astype(bool)).mean())
    return out


# ---------------------------------------------------------------------------------------------
# The drift table and the audit


@torch.no_grad()
def drift_table(
    base,
    base_name: str,
    finetuned: dict[str, object],
    sae,
    hook_name: str,
    sets: dict[str, list[str]],
    ks: list[int],
    recon: bool = True,
    batch_size: int = 128,
    progress: bool = True,
    max_tokens: int | None = None,
) -> pd.DataFrame:
    """One row per fine-tuned model × evaluation set × k: intersection mean, value change, raw
    activation distance, the three rates against the general set, and (with ``recon``) the SAE's
    reconstruction metrics on the fine-tuned (``recon_*``) and base (``recon_base_*``) activations.

    ``finetuned`` maps each model's task name to the model, or to a loader called when its turn
    comes (:func:`finetune_loaders`: one large model in memory at a time), named
    ``<base_name>-<task>`` in the table; ``sets`` must hold :data:`GENERAL`, a list of prompts or
    prompts per dataset, of which each fine-tune's general set leaves out its task's dataset
    (:func:`general_texts`). Texts are cut to ``max_tokens`` tokens if given.
    """
    if GENERAL not in sets:
        raise ValueError(f"sets={sorted(sets)} is not accepted; include the general set {GENERAL!r}")
    ks = sorted({int(k) for k in ks})
    topk_latents(torch.zeros(1, sae.cfg.d_sae), max(ks))  # checks the k range
    rows = []
    base_cache, recon_base = {}, {}
    dev = sae.W_enc.device

    def base_side(set_name: str, texts: list[str]):
        key = (set_name, hash(tuple(texts)))
        if key not in base_cache:  # the general set differs between fine-tunes by the task it leaves out
            acts = collect_activations(base, texts, hook_name, batch_size, progress=False, max_tokens=max_tokens)
            base_cache[key] = (acts, latent_preacts(sae, acts.to(dev)).cpu(), sae.encode(acts.to(dev)).cpu())
            if recon:
                recon_base[key] = reconstruction_metrics(base, sae, texts, hook_name, batch_size, progress=False,
                                                         max_tokens=max_tokens)  # fmt: skip
        return base_cache[key], recon_base.get(key)

    bar = tqdm(finetuned.items(), desc="drift", disable=not progress)
    for task, model in bar:
        if not isinstance(model, torch.nn.Module):
            model = model()  # a loader: the fine-tune is loaded now and released after its rows
        for set_name, texts in sets.items():
            texts = general_texts(texts, task) if set_name == GENERAL else texts
            (acts_b, pre_b, z_b), recon_b = base_side(set_name, texts)
            acts_f = collect_activations(model, texts, hook_name, batch_size, progress=False, max_tokens=max_tokens)
            pre_f, z_f = latent_preacts(sae, acts_f.to(dev)).cpu(), sae.encode(acts_f.to(dev)).cpu()
            dist = ((acts_f - acts_b).norm(dim=-1).sum() / acts_b.norm(dim=-1).sum()).item()
            extra = {}
            if recon:
                rf = reconstruction_metrics(model, sae, texts, hook_name, batch_size, progress=False, max_tokens=max_tokens)
                extra = {f"recon_{k}": v for k, v in rf.items()}
                extra.update({f"recon_base_{k}": v for k, v in recon_b.items()})
            for k, ov in overlap_by_k(pre_b, pre_f, ks).items():
                ov = ov.double()
                rows.append(dict(base=base_name, finetuned=f"{base_name}-{task}", task=task, eval_set=set_name,
                                 is_task=set_name == task, k=k, intersection_mean=ov.mean().item(),
                                 intersection_sd=ov.std().item(), value_change=value_change(pre_b, z_b, z_f, k),
                                 act_distance=dist, n_tokens=len(ov), **extra))  # fmt: skip
    df = pd.DataFrame(rows)
    general = df[df["eval_set"] == GENERAL].set_index(["finetuned", "k"])["intersection_mean"]
    rate_rows = [rates(s, general[(f, k)], k) for f, k, s in zip(df["finetuned"], df["k"], df["intersection_mean"])]
    df = pd.concat([df, pd.DataFrame(rate_rows, index=df.index)], axis=1)
    first = ["base", "finetuned", "task", "eval_set", "is_task", "k", "intersection_mean", *RATES]
    return df[first + [c for c in df.columns if c not in first]]


SIGNALS = {
    "sae_intersection": ("intersection_mean", True),
    "sae_value_change": ("value_change", False),
    "activation_distance": ("act_distance", False),
}
"""Audit signals: column of the drift table, and whether a lower value means more drift."""


def audit(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """Rank the candidate tasks (every evaluation set except the general one) of each fine-tuned
    model by drift under each signal; one row per fine-tune × signal with the top candidate and the
    true task's rank (1 = ranked first).

    Each signal is also ranked *centred* (``<signal>_centred``): a candidate's value minus its mean
    over all the fine-tunes in the table, so that a candidate set that drifts under every fine-tune
    does not win every time (this uses the other fine-tunes audited together as the reference)."""
    t = table[(table["k"] == k) & (table["eval_set"] != GENERAL)].copy()
    if t.empty:
        raise ValueError(f"k={k!r} is not accepted; the drift table has k in {sorted(table['k'].unique())}")
    signals = {}
    for signal, (col, lower) in SIGNALS.items():
        t[f"{signal}_centred"] = t[col] - t.groupby("eval_set")[col].transform("mean")
        signals[signal], signals[f"{signal}_centred"] = (col, lower), (f"{signal}_centred", lower)
    rows = []
    for (ft, task), g in t.groupby(["finetuned", "task"], sort=False):
        for signal, (col, lower) in signals.items():
            order = g.sort_values(col, ascending=lower, kind="stable")["eval_set"].tolist()
            rank = order.index(task) + 1 if task in order else np.nan
            rows.append(dict(finetuned=ft, task=task, signal=signal, k=k, predicted=order[0], true_rank=rank,
                             n_candidates=len(order)))  # fmt: skip
    out = pd.DataFrame(rows)
    out["hit"] = out["true_rank"] == 1
    return out


ABLATION_FALLS_RHO = -0.5
"""Spearman correlation of the mean candidate rate with k below which the rate "falls with k"."""
RECON_KEPT = 0.9
"""Share of the KL and next-token-loss scores a spliced SAE reconstruction must keep for the drift
to count as measured with an SAE that still fits the fine-tuned models."""


def chapter_claims(table: pd.DataFrame, summary: pd.DataFrame, audit: pd.DataFrame, k: int, k_max: int) -> dict:
    """The statements and numbers the drift chapter glues, by glue key: task < general per
    fine-tune at ``k`` and over every k; the candidate rates against the report's
    (:data:`SEED_REPORTED_RATE`) and their trend in k (:data:`ABLATION_FALLS_RHO`); the audit's
    accuracies per signal (at ``k`` and averaged over k) against chance; and the SAE's fit to the
    fine-tuned models (:data:`RECON_KEPT`). ``table``: :func:`drift_table`'s rows; ``summary``
    and ``audit``: the audit's accuracy table and rankings."""
    from scipy.stats import spearmanr

    out: dict = {}
    at_k = table[table["k"] == k]
    own_s = at_k[at_k["is_task"]].set_index("task")["intersection_mean"]
    gen_g = at_k[at_k["eval_set"] == GENERAL].set_index("task")["intersection_mean"]
    holds = own_s < gen_g[own_s.index]
    cells = "; ".join(f"{t}: S = {own_s[t]:.3f}, G = {gen_g[t]:.3f}" for t in own_s.index)
    out["task_general_verdict"] = (
        (f"Task < general holds for every one of the {len(holds)} fine-tunes" if holds.all() else
         f"Task < general holds for {int(holds.sum())} of the {len(holds)} fine-tunes, not for " + ", ".join(holds.index[~holds]))
        + f" ({cells}).")  # fmt: skip
    rate = at_k[at_k["is_task"]].set_index("task")
    out["rate_nonoverlap_range"] = f"{rate['rate_nonoverlap'].min():.3f} to {rate['rate_nonoverlap'].max():.3f}"
    out["rate_gap_over_general_range"] = f"{rate['rate_gap_over_general'].min():.3f} to {rate['rate_gap_over_general'].max():.3f}"
    out["seed_rate"] = SEED_REPORTED_RATE
    out["n_over15"] = f"{int((rate['rate_nonoverlap'] > SEED_REPORTED_RATE).sum())} of {len(rate)}"
    abl = table[table["is_task"]].groupby("k")["rate_nonoverlap"].mean()
    rho = float(spearmanr(abl.index, abl.to_numpy())[0]) if len(abl) > 1 else float("nan")
    out["abl_rho"] = rho
    out["abl_verdict"] = "falls with k, as in the report" if rho < ABLATION_FALLS_RHO else "does not fall steadily with k, unlike the report's"
    every_k = table[table["is_task"]].merge(table[table["eval_set"] == GENERAL][["task", "k", "intersection_mean"]],
                                            on=["task", "k"], suffixes=("", "_general"))  # fmt: skip
    out["n_cells_hold"] = f"{int((every_k['intersection_mean'] < every_k['intersection_mean_general']).sum())} of {len(every_k)}"
    out["abl_first"], out["abl_mid"], out["abl_last"] = float(abl.iloc[0]), float(abl.loc[min(10, k_max)]), float(abl.iloc[-1])
    acc = summary[summary["k"] == k].set_index("signal")
    for sig in acc.index:
        out[f"acc_{sig}"] = float(acc.loc[sig, "accuracy"])
    for key, sig in (("acc_all_k_sae", "sae_intersection"), ("acc_all_k_dist", "activation_distance"),
                     ("acc_all_k_sae_centred", "sae_intersection_centred")):  # fmt: skip
        out[key] = float(summary.loc[summary["signal"] == sig, "accuracy"].mean())
    n_cand = int(audit["n_candidates"].iloc[0])
    out["chance"], out["n_candidates"] = 1 / n_cand, n_cand
    ev = table.drop_duplicates(["task", "eval_set"])
    out["ev_base"] = f"{ev['recon_base_explained_variance'].min():.3f} to {ev['recon_base_explained_variance'].max():.3f}"
    out["ev_ft"] = f"{ev['recon_explained_variance'].min():.3f} to {ev['recon_explained_variance'].max():.3f}"
    out["kl_ft_min"], out["ce_ft_min"] = float(ev["recon_kl_div_score"].min()), float(ev["recon_ce_loss_score"].min())
    drop = float((ev["recon_base_explained_variance"] - ev["recon_explained_variance"]).max())
    kept = min(out["kl_ft_min"], out["ce_ft_min"]) > RECON_KEPT
    out["control_verdict"] = (
        f"The explained variance drops by at most {drop:.3f} from base to fine-tuned activations"
        + (f", and the spliced reconstruction keeps over {RECON_KEPT:.0%} of both scores: the drift is measured with an SAE that "
           "still fits the fine-tuned models." if kept else
           f"; the spliced reconstruction loses more than {1 - RECON_KEPT:.0%} of a score somewhere, so part of the drift may be "
           "reconstruction failure rather than changed features."))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The chapter (notebooks/drift.ipynb): the run, its tables and what it says about itself


@dataclass
class DriftRun:
    """Everything the drift chapter's run builds (:func:`run_drift`): the base model and its name,
    the SAE and its hook, the fine-tunes (models or loaders) by task, the evaluation sets, the drift
    table (:func:`drift_table`, with the run's settings as columns) and the audit's rankings at every
    k (:func:`audit`), and the wall time of its steps (``t_start``: ``time.perf_counter()`` when it
    began)."""

    base: object
    base_name: str
    is_zoo: bool
    sae: object
    hook: str
    tasks: list[DriftTask]  # empty for external fine-tunes
    fine_tunes: dict[str, object]
    sets: dict
    table: pd.DataFrame
    audit: pd.DataFrame
    t_start: float
    sae_seconds: float
    ft_seconds: float
    table_seconds: float


def base_name_of(model: str, zoo_preset: str, is_zoo: bool) -> str:
    """The name the drift tables give the base model ``model`` (a zoo name, a saved zoo model's
    directory, or a hub id or directory)."""
    from pathlib import Path

    from ..models import hub

    if hub.is_zoo_dir(model):
        return Path(model).name.rsplit("-", 1)[0]
    if is_zoo:
        return model if zoo_preset == "default" else f"{model}-{zoo_preset}"
    return hub.model_label(model)


def run_drift(
    *, model: str, finetuned: dict, task_prompts: dict, sae: str, sae_id: str, max_tokens: int, zoo_preset: str, layer: int,
    tasks: list[str], large_digits: float, finetune_labels: str, finetune_steps: int, finetune_batch_size: int, finetune_lr: float,
    n_finetune: int, sae_d_sae: int, sae_k: int, sae_training_tokens: int, sae_batch_size: int, sae_lr: float, n_sae_texts: int,
    n_eval: int, k: int, k_max: int, seed: int, batch_size: int,
) -> DriftRun:  # fmt: skip
    """The drift chapter's run, from its parameters (see the notebook's parameters cell): the base
    model; the SAE (a pretrained one, or one trained on the base model's activations at ``layer``
    on the train prompts of every zoo dataset); one fine-tune per task (or the external
    ``finetuned`` ones, loaded one at a time) and the evaluation sets; the drift table at every k
    from 1 to ``k_max``, and the audit at each k."""
    import time

    from ..features.activations import hook_name as resid_hook
    from ..features.sae import SAEConfig, cached_sae
    from ..models import hub

    t_start = time.perf_counter()
    is_zoo = model in zoo.ZOO or hub.is_zoo_dir(model)
    if not is_zoo and not finetuned:
        raise ValueError(f"finetuned={finetuned!r} is not accepted for model={model!r}: a model outside the zoo needs its "
                         "fine-tunes as {task: hub id or directory}")  # fmt: skip
    base = hub.load_model(model, preset=zoo_preset)
    base_name = base_name_of(model, zoo_preset, is_zoo)
    ks = list(range(1, k_max + 1))
    if k not in ks:
        raise ValueError(f"k={k!r} is not accepted; give a k in 1..k_max={k_max}")

    # the SAE: a pretrained one, or one trained on base-model activations on the train prompts of every zoo dataset
    t0 = time.perf_counter()
    if sae:
        sae_model = hub.load_sae(sae, sae_id or None, device=str(base.cfg.device))
        hook = hub.sae_hook_name(sae_model)
    elif is_zoo:
        hook = resid_hook(layer, base.cfg.n_layers)
        recs = zoo.training_records(require_zoo(base))
        train = recs[recs["split"] == "train"].sample(frac=1.0, random_state=seed)
        sae_texts = train.groupby("dataset", sort=False).head(n_sae_texts)["prompt"].tolist()
        sae_cfg = SAEConfig(d_sae=sae_d_sae, k=sae_k, training_tokens=sae_training_tokens, batch_size=sae_batch_size, lr=sae_lr, seed=seed)
        sae_model = cached_sae(base, hook, sae_texts, sae_cfg, f"{base_name}-sae-L{layer}")
    else:
        raise ValueError(f"sae={sae!r} is not accepted for model={model!r}: give a pretrained SAE (sae-lens release or directory)")
    sae_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    if finetuned:  # external fine-tunes, loaded one at a time; evaluation sets from files
        task_list = []
        fine_tunes = finetune_loaders(finetuned)
        sets = text_sets(task_prompts, list(finetuned), n_eval, seed)
    else:  # one fine-tuned copy of the zoo model per task
        qdata.check_unique("tasks", tasks)
        task_list = [DriftTask.parse(t, large_digits) for t in tasks]
        ft_cfg = FinetuneConfig(steps=finetune_steps, batch_size=finetune_batch_size, lr=finetune_lr, seed=seed)
        fine_tunes = finetune_tasks(base, base_name, task_list, ft_cfg, finetune_labels, n_finetune)
        sets = eval_sets(base, task_list, n_eval, seed)
    ft_seconds = time.perf_counter() - t0

    # drift on every task set and on the general set, for every k
    t0 = time.perf_counter()
    table = drift_table(base, base_name, fine_tunes, sae_model, hook, sets, ks, batch_size=batch_size, max_tokens=max_tokens)
    table_seconds = time.perf_counter() - t0
    table = table.assign(layer=layer if not sae else None, hook=hook, sae_d_sae=sae_d_sae, sae_k=sae_k, finetune_steps=finetune_steps,
                         finetune_labels=finetune_labels, seed=seed)  # fmt: skip
    audits = pd.concat([audit(table, kk) for kk in ks], ignore_index=True).assign(seed=seed)
    return DriftRun(base, base_name, is_zoo, sae_model, hook, task_list, fine_tunes, sets, table, audits, t_start, sae_seconds,
                    ft_seconds, table_seconds)  # fmt: skip


def behaviour_table(run: DriftRun, n_eval: int, seed: int = 0, batch_size: int = 128) -> pd.DataFrame:
    """What each zoo fine-tune did to the answers: the mean loss of its last 20 steps, and
    :func:`truth_accuracy` of the base model and of the fine-tune on the task's held-out prompts
    (``base_*``, ``finetuned_*``). Empty for external fine-tunes (their tasks have no zoo records)."""
    rows = []
    for task in run.tasks:
        recs_t = task.records(run.base)
        before = truth_accuracy(run.base, recs_t, n=n_eval, seed=seed, batch_size=batch_size)
        after = truth_accuracy(run.fine_tunes[task.name], recs_t, n=n_eval, seed=seed, batch_size=batch_size)
        hist = zoo.history(run.fine_tunes[task.name])
        rows.append(dict(task=task.name, final_loss=hist["loss"].tail(20).mean(),
                         **{f"base_{k_}": v for k_, v in before.items()}, **{f"finetuned_{k_}": v for k_, v in after.items()}))  # fmt: skip
    return pd.DataFrame(rows)


RECON_COLUMNS = ("explained_variance", "kl_div_score", "ce_loss_score")
"""The SAE's reconstruction metrics in the drift table (``recon_<metric>`` of the fine-tune,
``recon_base_<metric>`` of the base model)."""


def reconstruction_table(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """How well the SAE fits each model on each evaluation set: the base model (once per set) and
    each fine-tune, indexed by ``model, eval_set``, one column per :data:`RECON_COLUMNS`."""
    cols = list(RECON_COLUMNS)
    t = table[table["k"] == k]
    recon = pd.concat([
        t.drop_duplicates("eval_set").assign(model="base").rename(columns={f"recon_base_{c}": c for c in cols}),
        t.assign(model=t["task"].map(lambda s: f"fine-tuned on {s}")).rename(columns={f"recon_{c}": c for c in cols}),
    ])[["model", "eval_set", *cols]]  # fmt: skip
    return recon.set_index(["model", "eval_set"])


def task_general_table(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per fine-tune (rows): the intersection mean at ``k`` on its task set (S) and on the general
    set (G), and the three candidate rates (:data:`RATES`)."""
    own = table[(table["k"] == k) & table["is_task"]].set_index("task")
    gen = table[(table["k"] == k) & (table["eval_set"] == GENERAL)].set_index("task")
    return pd.DataFrame({"S (task set)": own["intersection_mean"], "G (general set)": gen["intersection_mean"],
                         **{r: own[r] for r in RATES}})  # fmt: skip


def audit_summary(audits: pd.DataFrame) -> pd.DataFrame:
    """The audit's accuracy (share of fine-tunes whose true task is ranked first), mean rank of the
    true task and number of fine-tunes, per signal and k (rankings of :func:`audit`)."""
    return audits.groupby(["signal", "k"], sort=False).agg(accuracy=("hit", "mean"), mean_true_rank=("true_rank", "mean"),
                                                            n_finetunes=("hit", "size")).reset_index()  # fmt: skip


def run_claims(run: DriftRun, model: str, finetuned: dict, sae: str, sae_id: str) -> dict[str, object]:
    """What the chapter says about the run itself, by glue key: the fine-tunes audited and the base
    model, how many zoo datasets it knows, the wall time of its steps (``total_minutes`` up to this
    call), and two sentences on the subjects and on the SAE."""
    import time

    out: dict[str, object] = dict(n_finetunes=len(run.tasks), base_name=run.base_name,
                                  n_base_datasets=len(require_zoo(run.base).datasets) if run.is_zoo else len(qdata.DATASETS),
                                  sae_minutes=run.sae_seconds / 60, ft_minutes=run.ft_seconds / 60,
                                  total_minutes=(time.perf_counter() - run.t_start) / 60)  # fmt: skip
    if finetuned:
        specs = ", ".join(f"{t_} ({s_ if isinstance(s_, str) else ' + '.join(s_)})" for t_, s_ in finetuned.items())
        out["subjects_note"] = (f"This run audits external fine-tunes of {model}: {specs}, on the evaluation sets "
                                f"{', '.join(run.sets)} read from files. The paragraphs below on zoo fine-tunes describe the default book.")  # fmt: skip
    else:
        out["subjects_note"] = f"This run audits {len(run.tasks)} fine-tunes that madlib trains from the zoo model {run.base_name}."
    out["sae_note"] = (f"This run's SAE is the pretrained {sae}" + (f" / {sae_id}" if sae_id else "") + f" at {run.hook}." if sae
                       else f"This run's SAE was trained on the base model at {run.hook}.")  # fmt: skip
    return out
