"""Self-contained stand-in for ``models/engine.py``: the cells and a pure-PyTorch cell layer.

Used by exported models (scripts/export_hf.py copies this file as the export's ``engine.py``, with the
block between the CELLS markers replaced by the cell classes' source from ``kernels/``), so an export
needs only torch + transformers. If the project's ``kernels`` package is importable, the export uses
it (Newton + parallel scans, Triton on GPU); otherwise this layer runs the exact sequential recurrence,
which computes the same function (to fp32 rounding) with the same parameters.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# --- CELLS BEGIN (replaced by the cell sources in an export) ---
from kernels.cell import Cell  # noqa: E402
from kernels.cells import ParaGRU, ParaLSTM  # noqa: E402
# --- CELLS END ---


class LastStats:
    """What the engine's NewtonStats reports; the sequential path does no Newton iterations."""

    iterations = 0
    residual = 0.0
    converged = True
    fell_back = False
    mode = "sequential_standalone"


class SequentialCellLayer(nn.Module):
    """Parameter-compatible with ``kernels.ParaRNNLayer`` (weight, bias, recurrent); sequential in time."""

    def __init__(self, cell: Cell, dim: int, num_heads: int, *, gain_bound: float | None = 0.5,
                 bias: bool = True, name: str | None = None, **_: Any) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.cell, self.dim, self.num_heads = cell, dim, num_heads
        self.head_dim = dim // num_heads
        self.gain_bound = gain_bound
        self.name = name or type(self).__name__
        G = cell.num_inputs
        self.weight = nn.Parameter(torch.empty(num_heads, self.head_dim, G, self.head_dim))
        self.bias = nn.Parameter(torch.zeros(G, dim)) if bias else None
        self.recurrent = nn.Parameter(torch.empty(cell.num_params, dim))
        self.last_stats = LastStats()
        self.reset_parameters()

    @property
    def state_size(self) -> int:
        return self.cell.state_size

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.head_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.xavier_normal_(self.recurrent)
        if self.gain_bound is not None:
            with torch.no_grad():
                self.recurrent.copy_(self.recurrent_params())

    def recurrent_params(self) -> torch.Tensor:
        p = self.recurrent
        if self.gain_bound is None or p.numel() == 0:
            return p
        return p * (self.gain_bound / p.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        xh = x.unflatten(-1, (self.num_heads, self.head_dim))
        u = torch.einsum("...hi,higj->...ghj", xh, self.weight.to(x.dtype)).flatten(-2)
        return u if self.bias is None else u + self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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

    def step(self, x_t: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        if h is None:
            h = x_t.new_zeros(x_t.shape[0], self.state_size, self.dim, dtype=compute)
        h = self.cell.step(h.to(compute), self.project(x_t).to(compute), self.recurrent_params().to(compute))
        return self.cell.output(h).to(x_t.dtype), h


def _project_engine():
    """The project's fast engine if it is importable (a ``kernels`` package with the ParaRNN layers)."""
    try:
        import kernels as project_kernels
    except Exception:
        return None
    if not all(hasattr(project_kernels, n) for n in ("ParaGRULayer", "ParaLSTMLayer", "NewtonConfig", "ParaRNNLayer")):
        return None  # some other package called "kernels"
    return project_kernels


_KERNELS = _project_engine()
ENGINE = "kernels" if _KERNELS is not None else "standalone"
CELLS = {"paragru": ParaGRU, "paralstm": ParaLSTM}


def make_cell_layer(kind: str, dim: int, num_heads: int, *, gain_bound: float | None, mode: str,
                    newton: dict[str, Any] | None, bias: bool, name: str) -> nn.Module:
    if _KERNELS is not None:
        layer_cls = {"paragru": _KERNELS.ParaGRULayer, "paralstm": _KERNELS.ParaLSTMLayer}[kind]
        return layer_cls(dim, num_heads, gain_bound=gain_bound, mode=mode,
                         newton=_KERNELS.NewtonConfig(**(newton or {})), bias=bias, name=name)
    return SequentialCellLayer(CELLS[kind](), dim, num_heads, gain_bound=gain_bound, bias=bias, name=name)


def is_cell_layer(module: nn.Module) -> bool:
    if isinstance(module, SequentialCellLayer):
        return True
    return _KERNELS is not None and isinstance(module, _KERNELS.ParaRNNLayer)
