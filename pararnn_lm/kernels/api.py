"""``parallel_rnn``: apply a channelwise cell over a sequence, in parallel, differentiably."""
from __future__ import annotations

import torch

from .cell import Cell
from .config import NewtonConfig, NewtonStats
from .layout import SequenceLayout
from .modes import resolve_mode

_DEFAULT_NEWTON = NewtonConfig()


def parallel_rnn(
    cell: Cell,
    u: torch.Tensor,
    p: torch.Tensor | None,
    h0: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "auto",
    newton: NewtonConfig = _DEFAULT_NEWTON,
    *,
    resets: torch.Tensor | None = None,
    stats: NewtonStats | None = None,
    name: str | None = None,
    u_bias: torch.Tensor | None = None,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``cell`` over time: h_t = cell.step(h_{t-1}, u_t, p), y_t = cell.output(h_t).

    Args:
        u: pre-activations (B, T, G, D).
        p: per-channel parameters (P, D); may be None when the cell has none.
        h0: initial states (B, K, D), or with ``cu_seqlens`` (1, K, D) shared by every document or
            (N_docs, K, D); None means zeros.
        cu_seqlens: (N_docs + 1,) integer offsets [0, ..., T] of packed documents; needs B == 1.
            Each document restarts from its initial state; no state or gradient crosses a boundary.
        resets: (B, T) bool, True where step t of row b starts a new document from the zero state
            (documents packed inside batch rows, e.g. position_ids restarting at 0). A row's first
            step starts from h0[b] (zeros when h0 is None) unless resets[b, 0]. No state or gradient
            crosses a reset (h0[b] gets zero gradient when resets[b, 0]). Read only on the device:
            no host sync in the fused Triton modes. Exclusive with ``cu_seqlens``.
        mode: "auto" or a registered mode ("sequential", "newton_torch", ...).
        newton: iteration cap, tolerance, damping and the policy when not converged.
        stats: filled with the iterations used and the final residual of this call.
        name: the layer's name, used in convergence errors and warnings.
        u_bias: (G, D) added to u_t at every step (the input projection's bias), differentiable. Modes
            that take it for this cell (``fused`` for ParaGRU) add it inside their kernels, saving a pass
            over u; the others get ``u + u_bias`` (in u's dtype).
        y_dtype: the dtype of y (default u's). The compute dtype returns the trajectory itself (no rounded
            copy): a consumer that reads fp32, like the mixers' fused gated norm, saves a pass each way.

    Returns:
        y (B, T, D) in ``y_dtype`` (default u's dtype), and h_last: (B, K, D) (with resets too: the state at each row's
        last step), or (N_docs, K, D) with cu_seqlens, in the compute dtype (fp64 for fp64 inputs,
        otherwise fp32, so carried states keep precision).
    """
    h0_rows, p = _validate(cell, u, p, h0, cu_seqlens, newton, resets)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    layout = SequenceLayout.build(u.shape[0], u.shape[1], u.device, cu_seqlens, resets)
    chosen = resolve_mode(mode, cell, u)
    if stats is not None:
        stats.mode = chosen.name
    h0_rows = layout.initial_rows(h0_rows, cell.state_size, u.shape[-1], compute, u.device)
    p = p.to(compute)
    if u_bias is not None:
        if u_bias.shape != u.shape[2:]:
            raise ValueError(f"u_bias must have shape (G, D) = {tuple(u.shape[2:])}, got {tuple(u_bias.shape)}")
        if chosen.input_bias(cell):
            p = torch.cat((p, u_bias.to(compute)))
        else:
            u = u + u_bias.to(u.dtype)
    u_in = u if chosen.half_inputs and u.dtype in (torch.float16, torch.bfloat16) else u.to(compute)
    h = chosen.run(cell, u_in, p, h0_rows, layout, newton, stats, name)
    y = cell.output(h).to(u.dtype if y_dtype is None else y_dtype)
    return y, layout.gather_last(h, h0_rows)


def _validate(cell, u, p, h0, cu_seqlens, newton, resets=None):
    """Shape checks always; value checks (host syncs) when ``newton.validate``."""
    if not isinstance(cell, Cell):
        raise TypeError(f"cell must be a kernels.Cell instance, got {type(cell).__name__}")
    K, G, P = cell.state_size, cell.num_inputs, cell.num_params
    if not isinstance(u, torch.Tensor) or u.dim() != 4:
        shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"u must be a 4-D tensor (B, T, G={G}, D) for {cell.name}, got {shape}")
    if not u.is_floating_point():
        raise TypeError(f"u must be a floating-point tensor, got {u.dtype}")
    B, T, G_u, D = u.shape
    if G_u != G:
        raise ValueError(f"u has {G_u} pre-activations per channel (dim 2) but {cell.name} takes G={G}")
    if T < 1 or B < 1 or D < 1:
        raise ValueError(f"u must have B, T, D >= 1, got shape {tuple(u.shape)}")
    if p is None:
        if P:
            raise ValueError(f"{cell.name} needs parameters p of shape ({P}, {D}), got None")
        p = u.new_zeros(0, D)
    elif p.dim() != 2 or p.shape != (P, D):
        raise ValueError(f"p must have shape (P={P}, D={D}) for {cell.name}, got {tuple(p.shape)}")
    num_rows = B
    if resets is not None:
        if cu_seqlens is not None:
            raise ValueError("pass at most one of cu_seqlens (packed documents, B == 1) and resets "
                             "(document starts inside batch rows)")
        if not isinstance(resets, torch.Tensor):
            raise TypeError(f"resets must be a (B, T) bool tensor, got {type(resets).__name__}")
        if resets.dtype != torch.bool:
            raise TypeError(f"resets must be a bool tensor (True where a document starts), got {resets.dtype}")
        if tuple(resets.shape) != (B, T):
            raise ValueError(f"resets must have shape (B, T) = {(B, T)}, got {tuple(resets.shape)}")
        if resets.device != u.device:
            raise ValueError(f"resets is on {resets.device} but u is on {u.device}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor of document offsets [0, ..., T]")
        if B != 1:
            raise ValueError(f"cu_seqlens needs packed input with B == 1, got B={B}")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens needs at least 2 entries [0, ..., T]")
        num_rows = cu_seqlens.numel() - 1
        if newton.validate:
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != T:
                raise ValueError(f"cu_seqlens must cover the sequence: start at 0 and end at T={T}, got {cu[0]}..{cu[-1]}")
            if any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError("cu_seqlens must be non-decreasing")
    if h0 is not None:
        allowed = {(B, K, D)} if cu_seqlens is None else {(1, K, D), (num_rows, K, D)}
        if h0.dim() != 3 or tuple(h0.shape) not in allowed:
            raise ValueError(f"h0 must have shape {' or '.join(map(str, sorted(allowed)))} for {cell.name}, got {tuple(h0.shape)}")
        if h0.shape[0] != num_rows:
            h0 = h0.expand(num_rows, K, D)
    if newton.validate:
        for label, tensor in (("u", u), ("p", p), ("h0", h0)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{label} contains NaN or Inf values ({cell.name}); set NewtonConfig(validate=False) to skip this check")
    return h0, p
