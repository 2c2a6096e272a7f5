"""Model-based MAD features (methods.md §3): attribution patching (AtP), probe shift, and the
answer KL between two models that the fine-tuning KL detector scores with.

**AtP features.** For attention head ``h`` of block ``L``, ``a_h`` is the head's output
``blocks.L.attn.hook_z[last, h]`` (``d_head`` values, before the output projection) at the last
prompt token, and ``S = logit(" Yes") - logit(" No")`` at that token. The features of a prompt at
block ``L`` are, per head (``ablation``):

* ``"mean"``: ``e_h = (mu_h - a_h) . dS/da_h`` with ``mu_h`` the trusted mean of ``a_h`` (the
  first-order change of ``S`` when the head's last-token output is patched to its trusted mean);
* ``"pcs"``: for each of the top ``n_pcs`` principal components ``v`` of the trusted block output
  ``z = concat_h a_h`` (``d_model`` values), the change along ``v`` that replaces ``v . z`` by
  ``v . mu``, attributed to each head: ``e_{v,h} = (v . mu - v . z) (v_h . dS/da_h)`` with ``v_h``
  head ``h``'s slice of ``v``; ``n_pcs * n_heads`` features, component-major;
* ``"grad_norm"``: ``||dS/da_h||``.

Three details differ from the cupbearer code behind the seeds, which follows methods.md less closely:
it cut the attention module's output *after* the output projection into ``d_head``-sized chunks
(``hook_z`` holds the true per-head outputs), its ``pcs`` code built the patched activation from the
component vector instead of from the activation, and its ``grad_norm`` was the squared norm.

**Probe shift.** At each residual layer ``l`` (the stream entering block ``l``, as in
:mod:`madlib.features.activations`) a logistic probe ``p_l`` is fitted on trusted last-token activations
against the trusted labels. Its features are the AtP effects on the probe's logit minus the AtP effects
on ``S``, for every head of the blocks before ``l`` (``l * n_heads`` features for ``"mean"``).

Both kinds come from one forward and backward pass per batch and are keyed by layer, so every
activation detector of :mod:`madlib.detectors` (fit on trusted features, score test features) scores
them unchanged. AtP features are keyed by **block** ``L`` (0..n_layers-1: the heads of block ``L``);
probe features by **residual layer** ``l`` (1..n_layers).

**Answer KL.** :func:`answer_kl` is ``KL(P || Q)`` of two models' next-token distributions at each
prompt's last token (:func:`prompt_logits`), over the two answers or the vocabulary: the score of
:class:`madlib.detectors.finetune_kl.FinetuningKL`, the fine-tuning detector, which compares a model
with a copy fine-tuned on the trusted prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..data import datasets as qdata
from .activations import Extraction, resolve_layers
from ..models.hooks import hook_name
from ..models.tokenizer import encode_prompts, model_answer_ids, pad_batch

if TYPE_CHECKING:
    from ..mad.task import MadFeatures, MadTask

ABLATIONS = ("mean", "pcs", "grad_norm")
KL_OVER = ("answers", "vocab")
"""What :func:`answer_kl` compares: the two-way softmax over the answers, or the whole vocabulary."""


@dataclass(frozen=True)
class AttributionConfig:
    """How AtP and probe-shift features are computed."""

    ablation: str = "mean"  # "mean", "pcs" or "grad_norm" (see the module doc)
    n_pcs: int = 10  # principal components per block for "pcs"
    probe_c: float = 1.0  # inverse L2 strength of the logistic probes (on standardised activations)
    batch_size: int = 64  # prompts per forward and backward pass

    def __post_init__(self) -> None:
        qdata.check_choice("ablation", self.ablation, ABLATIONS)
        for name in ("n_pcs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; give a positive integer")
        if not self.probe_c > 0:
            raise ValueError(f"probe_c={self.probe_c!r} is not accepted; give a positive number")


@dataclass
class AttributionFeatures:
    """Per-prompt AtP features by block, probe-shift features by residual layer, answer log-odds."""

    effects: dict[int, Float[Tensor, "n f"]]
    probe: dict[int, Float[Tensor, "n f"]]
    log_odds: Float[Tensor, " n"]

    def __len__(self) -> int:
        return len(self.log_odds)


def _batches(model, prompts: list[str], batch_size: int, desc: str, progress: bool):
    """Right-padded batches (sorted by length) of the prompts in ``model``'s own tokenization
    (:func:`madlib.features.activations.encode_prompts`, as activation extraction reads them), with each
    prompt's index and last position."""
    seqs, pad_id, _ = encode_prompts(model, list(prompts))
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for start in tqdm(range(0, len(seqs), batch_size), desc=desc, disable=not progress, mininterval=1):
        idx = order[start : start + batch_size]
        tokens, lengths = pad_batch([seqs[i] for i in idx], pad_id)
        yield torch.as_tensor(idx), tokens, lengths - 1


class Attribution:
    """AtP and probe-shift features of one model (see the module doc).

    ``fit`` reads the trusted prompts once (trusted means, principal components and, given labels,
    the probes); ``features`` then computes the features of any prompts. Example::

        atp = Attribution(model, AttributionConfig(ablation="mean")).fit(trusted_prompts, trusted_labels)
        f = atp.features(test_prompts)          # f.effects: {block: [n, n_heads]}, f.probe: {layer: ...}

    Args:
        model: a ``HookedTransformer`` with its tokenizer (a zoo model, or a model of :func:`madlib.models.hub.load_model`).
        cfg: the ablation and batch settings.
        blocks: blocks whose heads give AtP features; ``None`` or ``[]`` means every block.
        probe_layers: residual layers with a probe (1..n_layers); ``None`` or ``[]`` means every layer.
    """

    def __init__(self, model, cfg: AttributionConfig = AttributionConfig(), blocks=None, probe_layers=None):
        n = model.cfg.n_layers
        self.model, self.cfg = model, cfg
        self.blocks = list(range(n)) if not blocks else [int(b) for b in blocks]
        for b in self.blocks:
            if not 0 <= b < n:
                raise ValueError(f"blocks={b!r} is not accepted; give blocks in 0..{n - 1} (the model has {n} blocks)")
        self.probe_layers = resolve_layers(probe_layers, n)
        if 0 in self.probe_layers:
            raise ValueError("probe_layers=0 is not accepted; no head acts before layer 0, give layers in 1..n_layers")
        self.mean: dict[int, Tensor] = {}  # block -> [n_heads, d_head]
        self.pcs: dict[int, Tensor] = {}  # block -> [n_pcs, d_model]
        self.probes: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (w [d_model], b [])
        self.n_trusted = 0

    # -- fitting ------------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, prompts: list[str], labels=None, progress: bool = True) -> "Attribution":
        """Trusted means of each head's last-token output (and principal components for ``"pcs"``);
        with ``labels`` (0/1 per prompt), one logistic probe per probe layer."""
        from ..detectors.base import StreamingMoments

        if len(prompts) < 2:
            raise ValueError(f"prompts has {len(prompts)} trusted prompts; give at least 2")
        if labels is not None:
            y = np.asarray(labels)
            if y.shape != (len(prompts),) or not np.isin(y, (0, 1)).all() or len(np.unique(y)) < 2:
                raise ValueError(
                    f"labels are not accepted; give one 0/1 label per prompt ({len(prompts)}) with both classes present"
                )
        model, nh, dh = self.model, self.model.cfg.n_heads, self.model.cfg.d_head
        z_hooks = {f"blocks.{b}.attn.hook_z": b for b in self._needed_blocks(labels is not None)}
        probe_layers = self.probe_layers if labels is not None else []
        r_hooks = {hook_name(layer, model.cfg.n_layers): layer for layer in probe_layers}
        moments = {b: StreamingMoments(nh * dh) for b in z_hooks.values()}
        resid: dict[int, list[Tensor]] = {layer: [] for layer in r_hooks.values()}
        order = []
        for idx, tokens, last in _batches(self.model, prompts, self.cfg.batch_size, "trusted attribution statistics", progress):
            rows = torch.arange(len(idx))
            store = {}

            def grab(act, hook):
                store[hook.name] = act[rows, last].detach().cpu().to(torch.float64)

            hooks = [(h, grab) for h in [*z_hooks, *r_hooks]]
            model.run_with_hooks(tokens.to(model.cfg.device), return_type=None, fwd_hooks=hooks)
            for h, b in z_hooks.items():
                moments[b].update(store[h].reshape(len(idx), nh * dh))
            for h, layer in r_hooks.items():
                resid[layer].append(store[h])
            order.append(idx)
        dtype, device = model.cfg.dtype, model.cfg.device
        self.mean = {b: m.mean.reshape(nh, dh).to(device, dtype) for b, m in moments.items()}
        if self.cfg.ablation == "pcs":
            for b, m in moments.items():
                evals, evecs = torch.linalg.eigh(m.cov)
                top = evals.argsort(descending=True)[: self.cfg.n_pcs]
                self.pcs[b] = evecs[:, top].T.contiguous().to(device, dtype)
        if labels is not None:
            inv = np.argsort(torch.cat(order).numpy(), kind="stable")
            self.probes = {layer: self._fit_probe(torch.cat(v)[inv].numpy(), y) for layer, v in resid.items()}
        self.n_trusted = len(prompts)
        return self

    def _fit_probe(self, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        """Logistic regression on standardised activations, folded back to raw coordinates."""
        from sklearn.linear_model import LogisticRegression

        mu, sd = x.mean(0), x.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        clf = LogisticRegression(C=self.cfg.probe_c, max_iter=2000).fit((x - mu) / sd, y)
        w = clf.coef_[0] / sd
        b = clf.intercept_[0] - mu @ w
        kw = dict(dtype=self.model.cfg.dtype, device=self.model.cfg.device)
        return torch.tensor(w, **kw), torch.tensor(b, **kw)

    def _needed_blocks(self, with_probes: bool) -> list[int]:
        """The analysed blocks, plus every block upstream of a probe layer."""
        upstream = range(max(self.probe_layers)) if with_probes else []
        return sorted(set(self.blocks) | set(upstream))

    def _width(self, b: int) -> int:
        return self.model.cfg.n_heads * (len(self.pcs[b]) if self.cfg.ablation == "pcs" else 1)

    # -- features -----------------------------------------------------------------------------

    def _effect(self, b: int, a: Tensor, grad: Tensor) -> Tensor:
        """Per-prompt features of block ``b`` from last-token head outputs ``a`` and the gradient
        of the output at them (both [n, n_heads, d_head])."""
        if self.cfg.ablation == "mean":
            return ((self.mean[b] - a) * grad).sum(-1)
        if self.cfg.ablation == "grad_norm":
            return grad.norm(dim=-1)
        n, nh, dh = a.shape
        v = self.pcs[b]  # [k, d]
        shift = (self.mean[b].reshape(-1) - a.reshape(n, -1)) @ v.T  # [n, k]: v.mu - v.z
        per_head = torch.einsum("khd,nhd->nkh", v.reshape(-1, nh, dh), grad)  # v_h . grad_h
        return (shift[:, :, None] * per_head).reshape(n, -1)

    def features(self, prompts: list[str], progress: bool = True, desc: str = "attribution") -> AttributionFeatures:
        """AtP features at ``blocks`` and (if fitted with labels) probe-shift features at ``probe_layers``."""
        if self.n_trusted == 0:
            raise ValueError("this Attribution is not fitted; call fit(trusted_prompts, trusted_labels) first")
        model = self.model
        no_id, yes_id = model_answer_ids(model)
        blocks = self._needed_blocks(bool(self.probes))
        z_hooks = {f"blocks.{b}.attn.hook_z": b for b in blocks}
        r_hooks = {hook_name(layer, model.cfg.n_layers): layer for layer in self.probes}
        effects: dict[int, list[Tensor]] = {b: [] for b in self.blocks}
        probe: dict[int, list[Tensor]] = {layer: [] for layer in self.probes}
        log_odds, order = [], []

        def track(act, hook):  # make the graph start here whether or not the weights require grad
            return act if act.requires_grad else act.detach().requires_grad_(True)

        for idx, tokens, last in _batches(model, prompts, self.cfg.batch_size, desc, progress):
            rows = torch.arange(len(idx))
            store = {}

            def keep(act, hook):
                store[hook.name] = act

            with torch.enable_grad():
                logits = model.run_with_hooks(
                    tokens.to(model.cfg.device), return_type="logits",
                    fwd_hooks=[("blocks.0.hook_resid_pre", track), *[(h, keep) for h in [*z_hooks, *r_hooks]]],
                )  # fmt: skip
                score = logits[rows, last, yes_id] - logits[rows, last, no_id]
                zs = [store[h] for h in z_hooks]
                grads = torch.autograd.grad(score.sum(), zs, retain_graph=bool(r_hooks))
                a = {b: z[rows, last].detach() for b, z in zip(blocks, zs)}
                s_eff = {b: self._effect(b, a[b], g[rows, last]) for b, g in zip(blocks, grads)}
                for h, layer in r_hooks.items():
                    w, bias = self.probes[layer]
                    logit = store[h][rows, last] @ w + bias
                    up = [b for b in blocks if b < layer]
                    g_p = torch.autograd.grad(logit.sum(), [zs[blocks.index(b)] for b in up], retain_graph=True)
                    shift = [self._effect(b, a[b], g[rows, last]) - s_eff[b] for b, g in zip(up, g_p)]
                    probe[layer].append(torch.cat(shift, dim=1).detach().cpu())
            for b in self.blocks:
                effects[b].append(s_eff[b].detach().cpu())
            log_odds.append(score.detach().cpu())
            order.append(idx)
        inv = torch.as_tensor(np.argsort(torch.cat(order).numpy(), kind="stable")) if order else None

        def cat(parts: list[Tensor], f: int) -> Tensor:
            return torch.cat(parts)[inv] if parts else torch.zeros(0, f, dtype=model.cfg.dtype)

        return AttributionFeatures(
            {b: cat(v, self._width(b)) for b, v in effects.items()},
            {layer: cat(v, sum(self._width(b) for b in blocks if b < layer)) for layer, v in probe.items()},
            cat([x[:, None] for x in log_odds], 1)[:, 0],
        )


def attribution_task_features(
    model,
    task: MadTask,
    cfg: AttributionConfig = AttributionConfig(),
    blocks=None,
    probe_layers=None,
    untrusted: bool = False,
    progress: bool = True,
) -> dict[str, MadFeatures]:
    """AtP and probe-shift features of a MAD task's roles, ready for :func:`madlib.mad.task.score_detectors`.

    Fitted on the trusted prompts and labels. Returns ``{"attribution": MadFeatures, "probe":
    MadFeatures}`` (the untrusted role is empty unless ``untrusted``).
    """
    from ..mad.task import MadFeatures

    atp = Attribution(model, cfg, blocks=blocks, probe_layers=probe_layers)
    atp.fit(task.trusted["prompt"].tolist(), task.trusted["label"].to_numpy(), progress=progress)
    kept = task.untrusted if untrusted else task.untrusted.iloc[:0]
    roles = dict(trusted=task.trusted, untrusted=kept, test=task.test)
    out = {
        r: atp.features(df["prompt"].tolist(), progress=progress, desc=f"{task.dataset}/{r} attribution")
        for r, df in roles.items()
    }
    return {
        "attribution": MadFeatures(*(Extraction(out[r].effects, out[r].log_odds) for r in roles)),
        "probe": MadFeatures(*(Extraction(out[r].probe, out[r].log_odds) for r in roles)),
    }


# ---------------------------------------------------------------------------------------------
# Answer KL


@torch.no_grad()
def prompt_logits(model, prompts: list[str], batch_size: int = 128, progress: bool = False) -> Float[Tensor, "n vocab"]:
    """Next-token logits at each prompt's last token from a forward pass of the model over the
    prompts (float64, in the prompts' order; batched, right-padded). Compare
    :func:`madlib.features.activations.last_token_logits`, which unembeds a given residual stream."""
    out, order = [], []
    for idx, tokens, last in _batches(model, prompts, batch_size, "last-token logits", progress):
        logits = model(tokens.to(model.cfg.device), return_type="logits")
        out.append(logits[torch.arange(len(idx)), last].to(torch.float64).cpu())
        order.append(idx)
    if not out:
        return torch.zeros(0, model.cfg.d_vocab, dtype=torch.float64)
    return torch.cat(out)[torch.as_tensor(np.argsort(torch.cat(order).numpy(), kind="stable"))]


def answer_kl(
    model_p, model_q, prompts: list[str], over: str = "answers", batch_size: int = 128, progress: bool = False
) -> Float[np.ndarray, " n"]:
    """``KL(P || Q)`` per prompt of the two models' next-token distributions at the last token:
    over the two answers (softmax of the `` No``/`` Yes`` logits) or the whole vocabulary."""
    qdata.check_choice("over", over, KL_OVER)
    lp, lq = (prompt_logits(m, prompts, batch_size, progress) for m in (model_p, model_q))
    if over == "answers":
        ids = list(model_answer_ids(model_p))
        if ids != list(model_answer_ids(model_q)):
            raise ValueError("model_q is not accepted; it does not share model_p's answer tokens")
        lp, lq = lp[:, ids], lq[:, ids]
    logp, logq = lp.log_softmax(-1), lq.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).numpy()
