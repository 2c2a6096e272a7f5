"""Low-rank adapters (LoRA) on a ``HookedTransformer``'s own weight tensors.

The seeds' quirky models are LoRA fine-tunes (peft, r = 8 on q, k, v, gate, up and down
projections). peft adapts ``nn.Linear`` modules, which a ``HookedTransformer`` does not have: its
weights are tensors such as ``W_Q[head, d_model, d_head]``. This module applies the same
adapter to them with ``torch.nn.utils.parametrize``: each target weight ``W`` reads as
``W + (alpha / r) * A @ B`` viewed as the ``[d_in, d_out]`` matrix of the corresponding linear
map (all heads together, as a q_proj), with ``A[d_in, r]`` initialised like peft's and ``B[r,
d_out] = 0``, so training starts at the base model. Every forward pass, hooked or fused, sees the
adapted weights; :func:`merge` folds them in for good.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

TARGETS: tuple[str, ...] = ("W_Q", "W_K", "W_V", "W_gate", "W_in", "W_out")
"""The seeds' targets (q, k, v, gate, up, down); ``W_gate`` exists in gated (llama) MLPs only."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8  # r
    alpha: float = 8.0  # scale alpha / r of the update
    targets: tuple[str, ...] = TARGETS  # weight names adapted in every block

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank!r} is not accepted; give a positive integer")
        bad = [t for t in self.targets if t not in TARGETS + ("W_O",)]
        if bad:
            raise ValueError(f"targets={list(self.targets)!r} is not accepted; choose from {list(TARGETS + ('W_O',))}")

    def to_dict(self) -> dict:
        return dict(asdict(self), targets=list(self.targets))


def _as_matrix(name: str, W: Tensor) -> Tensor:
    """The ``[d_in, d_out]`` matrix of the linear map a weight tensor computes."""
    if name in ("W_Q", "W_K", "W_V"):  # [head, d_model, d_head] -> [d_model, head * d_head]
        return W.permute(1, 0, 2).reshape(W.shape[1], -1)
    if name == "W_O":  # [head, d_head, d_model] -> [head * d_head, d_model]
        return W.reshape(-1, W.shape[-1])
    return W


def _from_matrix(name: str, M: Tensor, shape: torch.Size) -> Tensor:
    if name in ("W_Q", "W_K", "W_V"):
        return M.reshape(shape[1], shape[0], shape[2]).permute(1, 0, 2)
    if name == "W_O":
        return M.reshape(shape)
    return M


class LoraDelta(nn.Module):
    """The parametrization ``W -> W + scale * A @ B`` of one weight tensor."""

    def __init__(self, name: str, W: Tensor, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        d_in, d_out = _as_matrix(name, W).shape
        bound = 1 / math.sqrt(d_in)  # peft's kaiming_uniform(a=sqrt(5)) on lora_A
        self.name, self.shape, self.scale = name, W.shape, scale
        self.A: Float[Tensor, "d_in r"] = nn.Parameter((torch.rand(d_in, rank, generator=generator) * 2 - 1) * bound)
        self.B: Float[Tensor, "r d_out"] = nn.Parameter(torch.zeros(rank, d_out))

    def delta(self) -> Tensor:
        return _from_matrix(self.name, self.scale * (self.A @ self.B), self.shape)

    def forward(self, W: Tensor) -> Tensor:
        return W + self.delta()


def _targets(model, cfg: LoraConfig):
    for i, block in enumerate(model.blocks):
        for name in cfg.targets:
            module = block.mlp if name in ("W_gate", "W_in", "W_out") else block.attn
            if hasattr(module, name) and isinstance(getattr(module, name), Tensor):
                yield f"blocks.{i}.{'mlp' if module is block.mlp else 'attn'}.{name}", module, name


def attach(model, cfg: LoraConfig = LoraConfig(), seed: int = 0) -> list[nn.Parameter]:
    """Freeze ``model`` and attach fresh adapters (in place); return the trainable parameters."""
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, module, name in _targets(model, cfg):
        delta = LoraDelta(name, getattr(module, name).detach(), cfg.rank, cfg.alpha / cfg.rank, gen)
        parametrize.register_parametrization(module, name, delta, unsafe=True)
        params += [delta.A, delta.B]
    return params


def adapters(model) -> dict[str, Tensor]:
    """The attached adapters' factors, ``{"blocks.0.attn.W_Q.A": ..., ...}``, detached copies."""
    out = {}
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoraDelta):
                        out[f"{path}.{name}.A"] = p.A.detach().clone()
                        out[f"{path}.{name}.B"] = p.B.detach().clone()
    return out


def load_adapters(model, factors: dict[str, Tensor]) -> None:
    """Copy saved factors into the adapters attached to ``model``."""
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoraDelta):
                        with torch.no_grad():
                            p.A.copy_(factors[f"{path}.{name}.A"])
                            p.B.copy_(factors[f"{path}.{name}.B"])


def merge(model) -> None:
    """Fold every attached adapter into its weight and remove the parametrizations (in place)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    model.requires_grad_(False)


def merge_factors(model, factors: dict[str, Tensor], cfg: LoraConfig) -> None:
    """Add saved factors to ``model``'s weights (in place), without parametrizations."""
    scale = cfg.alpha / cfg.rank
    with torch.no_grad():
        for path, module, name in _targets(model, cfg):
            W = getattr(module, name)
            W.add_(_from_matrix(name, scale * (factors[f"{path}.A"] @ factors[f"{path}.B"]), W.shape))
