"""The one module of models/ that imports the parallel-RNN engine (``pararnn_lm.kernels``).

Everything the mixers need from the engine goes through :func:`make_cell_layer` and the fused causal
conv and gated RMSNorm below. With the project installed the cell layers are the engine's ``ParaGRULayer`` /
``ParaLSTMLayer`` (Newton + parallel scans, Triton kernels on GPU). Hugging Face exports
(``models/export.py``) carry copies of the engine's torch-only files next to this one - the cell base and
cells, the sequential recurrence and the layer base, verbatim with their imports rewritten to the flat
export folder; where the project is not installed the layer is :class:`ReferenceCellLayer`, which runs
the same cells with the same parameters sequentially over time.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The engine's torch-only reference files (an export holds copies of them next to this file).
from pararnn_lm.kernels.cells.paragru.cell import ParaGRU
from pararnn_lm.kernels.cells.paralstm.cell import ParaLSTM
from pararnn_lm.kernels.layer_base import CellLayerBase
from pararnn_lm.kernels.sequential import sequential_rnn

try:  # the full engine; absent where an exported model runs without the project
    from pararnn_lm.kernels import NewtonConfig, ParaGRULayer, ParaLSTMLayer, ParaRNNLayer
    from pararnn_lm.kernels.conv import causal_conv1d as fused_causal_conv1d
    from pararnn_lm.kernels.conv import supported as fused_causal_conv1d_supported
    from pararnn_lm.kernels.gated_norm import gated_rms_norm as fused_gated_rms_norm
    from pararnn_lm.kernels.gated_norm import supported as fused_gated_rms_norm_supported
except ImportError:
    ENGINE = "reference"
    fused_causal_conv1d = fused_causal_conv1d_supported = None  # the conv layers run their PyTorch code
    fused_gated_rms_norm = fused_gated_rms_norm_supported = None  # and the gated norms theirs
    CELL_LAYER_TYPES: tuple[type, ...] = (CellLayerBase,)
else:
    ENGINE = "kernels"
    # An export loaded where the project is installed holds a second CellLayerBase (its own copy).
    CELL_LAYER_TYPES = (CellLayerBase, ParaRNNLayer)

CELLS = {"paragru": ParaGRU, "paralstm": ParaLSTM}


class ReferenceCellLayer(CellLayerBase):
    """The cell layer of ``kernels.ParaRNNLayer`` (same parameters, init and ``step``) whose forward is
    the reference recurrence, a loop over time (``kernels/sequential.py``)."""

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                *, resets: torch.Tensor | None = None, y_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``kernels.ParaRNNLayer.forward``: y (B, T, dim) and the final states."""
        self._check_input(x, 3)
        return sequential_rnn(self.cell, self.project(x), self.recurrent_params(), h0, cu_seqlens, resets=resets,
                              y_dtype=y_dtype)


def make_cell_layer(
    kind: str, dim: int, num_heads: int, *, gain_bound: float | None, mode: str,
    newton: dict[str, Any] | None, bias: bool, name: str, gain_norm: str = "channel",
) -> nn.Module:
    """The cell layer (block-diagonal input projection + recurrence) of a ParaRNN mixer."""
    if ENGINE == "reference":
        return ReferenceCellLayer(CELLS[kind](), dim, num_heads, gain_bound=gain_bound, gain_norm=gain_norm,
                                  bias=bias, name=name)
    layer_cls = {"paragru": ParaGRULayer, "paralstm": ParaLSTMLayer}[kind]
    # validate=False: the value checks sync the host once per layer; the trainer catches non-finite losses.
    newton = NewtonConfig(**{"validate": False, **(newton or {})})
    return layer_cls(dim, num_heads, gain_bound=gain_bound, gain_norm=gain_norm, mode=mode, newton=newton,
                     bias=bias, name=name)


def is_cell_layer(module: nn.Module) -> bool:
    return isinstance(module, CELL_LAYER_TYPES)
