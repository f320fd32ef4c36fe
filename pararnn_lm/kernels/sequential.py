"""The reference mode: the recurrence as a plain loop over time, differentiated by autograd.

Torch only (with cell.py, config.py and layout.py): Hugging Face exports of the models copy these files
verbatim (``pararnn_lm.models.export``) and run :func:`sequential_rnn` where the engine is not installed.
"""
from __future__ import annotations

import torch

from .cell import Cell
from .config import NewtonConfig, NewtonStats
from .layout import SequenceLayout


def run_sequential_steps(
    cell: Cell,
    u: torch.Tensor,
    p: torch.Tensor,
    h0_rows: torch.Tensor,
    layout: SequenceLayout,
    start: int = 0,
    h_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """States h_t for t in [start, T) (B, T - start, K, D), continuing from h_prev = h_{start-1}."""
    B, T = u.shape[:2]
    starts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b, t, row in zip(layout.start_b.tolist(), layout.start_t.tolist(), layout.start_row.tolist()):
        bs, rows = starts.setdefault(t, ([], []))
        bs.append(b)
        rows.append(row)
    h = h_prev if h_prev is not None else h0_rows.new_zeros(B, *h0_rows.shape[1:])
    out = []
    for t in range(start, T):
        if t in starts:
            bs, rows = starts[t]
            h = h.index_put((torch.tensor(bs, device=h.device),), h0_rows[torch.tensor(rows, device=h.device)])
        h = cell.step(h, u[:, t], p)
        out.append(h)
    return torch.stack(out, dim=1)


def sequential_mode(
    cell: Cell,
    u: torch.Tensor,
    p: torch.Tensor,
    h0_rows: torch.Tensor,
    layout: SequenceLayout,
    newton: NewtonConfig,
    stats: NewtonStats | None,
    name: str | None,
) -> torch.Tensor:
    if stats is not None:
        stats.iterations, stats.residual, stats.converged, stats.fell_back = 0, 0.0, True, False
    return run_sequential_steps(cell, u, p, h0_rows, layout)


def sequential_rnn(
    cell: Cell,
    u: torch.Tensor,
    p: torch.Tensor,
    h0: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    resets: torch.Tensor | None = None,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``parallel_rnn(cell, u, p, h0, cu_seqlens, mode="sequential", resets=resets, y_dtype=y_dtype)``
    returns, without its input checks and mode registry: y (B, T, D) in ``y_dtype`` (default u's) and
    h_last in the compute dtype."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    layout = SequenceLayout.build(u.shape[0], u.shape[1], u.device, cu_seqlens, resets)
    if h0 is not None and cu_seqlens is not None:
        h0 = h0.expand(layout.num_rows, *h0.shape[1:])  # one initial state shared by every document
    h0_rows = layout.initial_rows(h0, cell.state_size, u.shape[-1], compute, u.device)
    h = run_sequential_steps(cell, u.to(compute), p.to(compute), h0_rows, layout)
    return cell.output(h).to(u.dtype if y_dtype is None else y_dtype), layout.gather_last(h, h0_rows)
