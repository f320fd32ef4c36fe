"""The ONE module of models/ that imports the parallel-RNN engine (``kernels/``).

Everything the mixers need from the engine goes through :func:`make_cell_layer`. The HF export
(scripts/export_hf.py) replaces this file with ``standalone_engine.py`` (cell step functions inlined,
pure-PyTorch layer), which is how the exported modeling code stays self-contained.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from pararnn_lm.kernels import NewtonConfig, ParaGRULayer, ParaLSTMLayer, ParaRNNLayer
# The conv layers' fast path and where it runs (kernels/conv.py).
from pararnn_lm.kernels.conv import causal_conv1d as fused_causal_conv1d  # noqa: F401
from pararnn_lm.kernels.conv import supported as fused_causal_conv1d_supported  # noqa: F401

CELL_LAYERS = {"paragru": ParaGRULayer, "paralstm": ParaLSTMLayer}
ENGINE = "kernels"


def make_cell_layer(
    kind: str, dim: int, num_heads: int, *, gain_bound: float | None, mode: str,
    newton: dict[str, Any] | None, bias: bool, name: str, gain_norm: str = "channel",
) -> nn.Module:
    """The cell layer (block-diagonal input projection + recurrence) of a ParaRNN mixer."""
    return CELL_LAYERS[kind](
        # validate=False: the value checks sync the host once per layer; the trainer catches non-finite losses.
        dim, num_heads, gain_bound=gain_bound, gain_norm=gain_norm, mode=mode, newton=NewtonConfig(**{"validate": False, **(newton or {})}),
        bias=bias, name=name,
    )


def is_cell_layer(module: nn.Module) -> bool:
    return isinstance(module, ParaRNNLayer)
