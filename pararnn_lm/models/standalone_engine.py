"""Self-contained stand-in for ``models/engine.py``: the cells and a pure-PyTorch cell layer.

Used by exported models (scripts/export_hf.py copies this file as the export's ``engine.py``, with the
block between the CELLS markers replaced by the cell classes' source from ``kernels/``), so an export
needs only torch + transformers. If the project's ``kernels`` package is importable, the export uses
it (Newton + parallel scans, Triton on GPU); otherwise this layer runs the exact sequential recurrence,
which computes the same function (to fp32 rounding) with the same parameters.
"""
from __future__ import annotations

import logging
import math  # noqa: F401 - used by the CellLayerBase source inlined in exports
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# --- CELLS BEGIN (replaced by the cell sources in an export) ---
from pararnn_lm.kernels.cell import Cell  # noqa: E402
from pararnn_lm.kernels.cells import ParaGRU, ParaLSTM  # noqa: E402
from pararnn_lm.kernels.layers import CellLayerBase  # noqa: E402
# --- CELLS END ---


class LastStats:
    """What the engine's NewtonStats reports; the sequential path does no Newton iterations."""

    iterations = 0
    residual = 0.0
    converged = True
    fell_back = False
    mode = "sequential_standalone"


class SequentialCellLayer(CellLayerBase):
    """``kernels.ParaRNNLayer``'s parameters, init and step (the same class, inlined); sequential in time."""

    def __init__(self, cell: Cell, dim: int, num_heads: int, *, gain_bound: float | None = 0.5,
                 gain_norm: str = "channel", bias: bool = True, name: str | None = None, **_: Any) -> None:
        super().__init__(cell, dim, num_heads, gain_bound=gain_bound, gain_norm=gain_norm, bias=bias, name=name)
        self.last_stats = LastStats()

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, *,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``kernels.ParaRNNLayer.forward``; ``resets`` (B, T) bool restarts a row's state from zero
        at a document start (the final states are each row's last step)."""
        if resets is not None and cu_seqlens is not None:
            raise ValueError("pass at most one of cu_seqlens and resets")
        B, T, D = x.shape
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        u = self.project(x).to(compute)
        p = self.recurrent_params().to(compute)
        K = self.state_size
        n_rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
        init = torch.zeros(n_rows, K, D, dtype=compute, device=x.device) if h0 is None else h0.to(compute).expand(n_rows, K, D)
        if cu_seqlens is None:
            h, ys = init, []
            for t in range(T):
                if resets is not None:
                    h = torch.where(resets[:, t, None, None], torch.zeros_like(h), h)
                h = self.cell.step(h, u[:, t], p)
                ys.append(self.cell.output(h))
            y = torch.stack(ys, 1) if ys else x.new_zeros(B, 0, D)
            return y.to(x.dtype), h
        bounds = cu_seqlens.tolist()
        ys, lasts = [], []
        for d in range(n_rows):
            h = init[d : d + 1]
            for t in range(bounds[d], bounds[d + 1]):
                h = self.cell.step(h, u[:, t], p)
                ys.append(self.cell.output(h))
            lasts.append(h)
        return torch.stack(ys, 1).to(x.dtype), torch.cat(lasts, 0)


def _project_engine():
    """The project's fast engine if it is importable (a ``kernels`` package with the ParaRNN layers)."""
    try:
        import pararnn_lm.kernels as project_kernels
    except Exception:
        return None
    if not all(hasattr(project_kernels, n) for n in ("ParaGRULayer", "ParaLSTMLayer", "NewtonConfig", "ParaRNNLayer")):
        return None  # some other package called "kernels"
    return project_kernels


_KERNELS = _project_engine()
ENGINE = "kernels" if _KERNELS is not None else "standalone"
# The conv layers' fused Triton path (kernels/conv.py) with the project; None: their PyTorch code.
fused_causal_conv1d = fused_causal_conv1d_supported = None
if _KERNELS is not None:
    try:
        from pararnn_lm.kernels.conv import causal_conv1d as fused_causal_conv1d  # noqa: F811
        from pararnn_lm.kernels.conv import supported as fused_causal_conv1d_supported  # noqa: F811
    except Exception:  # an older project checkout without the conv kernel
        fused_causal_conv1d = fused_causal_conv1d_supported = None
CELLS = {"paragru": ParaGRU, "paralstm": ParaLSTM}


def make_cell_layer(kind: str, dim: int, num_heads: int, *, gain_bound: float | None, mode: str,
                    newton: dict[str, Any] | None, bias: bool, name: str, gain_norm: str = "channel") -> nn.Module:
    if _KERNELS is not None:
        layer_cls = {"paragru": _KERNELS.ParaGRULayer, "paralstm": _KERNELS.ParaLSTMLayer}[kind]
        return layer_cls(dim, num_heads, gain_bound=gain_bound, gain_norm=gain_norm, mode=mode,
                         newton=_KERNELS.NewtonConfig(**(newton or {})), bias=bias, name=name)
    return SequentialCellLayer(CELLS[kind](), dim, num_heads, gain_bound=gain_bound, gain_norm=gain_norm,
                               bias=bias, name=name)


def is_cell_layer(module: nn.Module) -> bool:
    if isinstance(module, SequentialCellLayer):
        return True
    return _KERNELS is not None and isinstance(module, _KERNELS.ParaRNNLayer)
