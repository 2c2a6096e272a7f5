"""transformer-lens hooks of the residual stream, both ways: a layer's hook name and a hook's block."""

from __future__ import annotations

import re


def hook_name(layer: int, n_layers: int) -> str:
    """transformer-lens hook of the residual stream entering block ``layer``."""
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layers={layer!r} is not accepted; give layers in 0..{n_layers} (the model has {n_layers} blocks)")
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def hook_layer(hook_name: str) -> int | None:
    """The block ``N`` holding a transformer-lens hook ``blocks.N.<...>`` (``blocks.3.hook_resid_pre``
    -> 3), or ``None`` for a hook outside the blocks (``hook_embed``, ``ln_final.hook_normalized``).
    A forward pass that only needs the hook can stop at layer ``N + 1``."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) if match else None
