"""Newton's method over the whole sequence in pure PyTorch, with an adjoint backward.

Nothing here is cell-specific: residuals come from ``cell.step`` and the K x K per-channel
Jacobians from K forward-mode JVPs of it (a one-hot tangent per state row gives one Jacobian
column for every channel at once, because the cell is channelwise).
"""
from __future__ import annotations

import logging

import torch
from torch.func import jvp, vjp

from .cell import Cell
from .config import NewtonConfig, NewtonConvergenceError, NewtonStats
from .layout import SequenceLayout
from .scan import linear_scan_adjoint_torch, linear_scan_torch
from .sequential import run_sequential_steps

logger = logging.getLogger(__name__)
_warned_fallback: set[str] = set()


def step_and_jacobian(cell: Cell, hp: torch.Tensor, u: torch.Tensor, p: torch.Tensor):
    """f(hp, u) (B,T,K,D) and J = df/dhp as per-channel blocks (B,T,K,K,D), J[..., i, j, :] = df_i/dh_j."""
    K = hp.shape[-2]
    columns = []
    f = None
    for j in range(K):
        tangent = torch.zeros_like(hp)
        tangent[..., j, :] = 1
        f, col = jvp(lambda x: cell.step(x, u, p), (hp,), (tangent,))
        columns.append(col)
    return f, torch.stack(columns, dim=-2)  # stack columns on the j axis


def scaled_residual(r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Elementwise |r| / (1 + |h|): absolute for small states, relative for large ones."""
    return r.abs() / (1 + h.abs())


def newton_solve(
    cell: Cell,
    u: torch.Tensor,
    p: torch.Tensor,
    h0_rows: torch.Tensor,
    layout: SequenceLayout,
    newton: NewtonConfig,
    stats: NewtonStats | None,
    name: str | None,
    scan=linear_scan_torch,
) -> torch.Tensor:
    """The trajectory h (B,T,K,D) solving h_t = f(h_{t-1}, u_t), or the configured failure policy."""
    start_mask = layout.start_mask()
    tol = newton.tolerance_for(u.dtype)
    # Initial guess f(0, u_t) everywhere (f(h0, u_t) at sequence starts, which is exact there).
    h = cell.step(layout.shift(torch.zeros_like(u[:, :, :1].expand(-1, -1, cell.state_size, -1)), h0_rows), u, p)
    iterations, history = 0, []
    while True:
        hp = layout.shift(h, h0_rows)
        if iterations < newton.max_iters:
            f, J = step_and_jacobian(cell, hp, u, p)
        else:
            f, J = cell.step(hp, u, p), None
        scaled = scaled_residual(f - h, h)
        residual = scaled.max().item()
        history.append(residual)
        converged = residual <= tol  # False for NaN
        if converged or J is None or residual != residual or residual == float("inf"):
            break
        J = J.masked_fill(start_mask[:, :, None, None, None], 0)
        d = scan(J, f - h)
        h = h + newton.damping * d
        iterations += 1

    if stats is not None:
        stats.iterations, stats.residual, stats.converged, stats.fell_back = iterations, residual, converged, False
        stats.residuals = history
    if converged:
        return h
    who = name or cell.name
    message = (
        f"Newton did not converge for {who}: scaled residual {residual:.3e} > tol {tol:.1e} after "
        f"{iterations} iteration(s) (max_iters={newton.max_iters}, T={u.shape[1]}). The recurrence is "
        "probably not contractive: bound the recurrent gains (e.g. gain_bound=0.5), raise max_iters, "
        "or use on_failure='fallback'."
    )
    if newton.on_failure == "raise":
        raise NewtonConvergenceError(message)
    if who not in _warned_fallback:
        _warned_fallback.add(who)
        logger.warning("%s Finishing with the sequential recurrence (warned once per cell).", message)
    if stats is not None:
        stats.fell_back = True
    # Steps before the first unconverged one are accurate: continue sequentially from there.
    bad_t = torch.nonzero(~(scaled <= tol).flatten(2).all(-1).all(0))
    t0 = int(bad_t[0]) if bad_t.numel() else 0
    h_prev = hp[:, t0] if t0 > 0 else None
    tail = run_sequential_steps(cell, u, p, h0_rows, layout, start=t0, h_prev=h_prev)
    return torch.cat((h[:, :t0], tail), dim=1)


class _NewtonRNN(torch.autograd.Function):
    """u, p, h0_rows -> trajectory h. Backward: one adjoint scan + one VJP of step at the solution."""

    @staticmethod
    def forward(ctx, u, p, h0_rows, cell, layout, newton, stats, name, scans):
        with torch.no_grad():
            h = newton_solve(cell, u, p, h0_rows, layout, newton, stats, name, scan=scans[0])
        ctx.cell, ctx.layout, ctx.adjoint_scan = cell, layout, scans[1]
        ctx.save_for_backward(u, p, h0_rows, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        u, p, h0_rows, h = ctx.saved_tensors
        cell, layout = ctx.cell, ctx.layout
        with torch.no_grad():
            hp = layout.shift(h, h0_rows)
            _, J = step_and_jacobian(cell, hp, u, p)
            J = J.masked_fill(layout.start_mask()[:, :, None, None, None], 0)
            lam = ctx.adjoint_scan(J, grad_h.to(h.dtype))
            _, pullback = vjp(lambda a, b, c: cell.step(a, b, c), hp, u, p)
            grad_hp, grad_u, grad_p = pullback(lam)
        grad_h0 = layout.scatter_starts(grad_hp, h0_rows.shape[0]) if ctx.needs_input_grad[2] else None
        return (
            grad_u if ctx.needs_input_grad[0] else None,
            grad_p if ctx.needs_input_grad[1] else None,
            grad_h0, None, None, None, None, None, None,
        )


def newton_torch_mode(cell, u, p, h0_rows, layout, newton, stats, name) -> torch.Tensor:
    return _NewtonRNN.apply(u, p, h0_rows, cell, layout, newton, stats, name, (linear_scan_torch, linear_scan_adjoint_torch))


def newton_triton_mode(cell, u, p, h0_rows, layout, newton, stats, name) -> torch.Tensor:
    """Same Newton assembly in PyTorch; the causal and adjoint linear solves by Triton scans."""
    from .scan.triton import linear_scan_adjoint_triton, linear_scan_triton

    return _NewtonRNN.apply(u, p, h0_rows, cell, layout, newton, stats, name, (linear_scan_triton, linear_scan_adjoint_triton))
