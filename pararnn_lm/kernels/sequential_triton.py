"""The one-thread-per-channel sequential baseline (mode ``sequential_triton``) for ParaGRU/ParaLSTM.

One program per (block of BD channels, batch row), one channel per thread, a loop over all T steps
(forward) and back (backward). Exact recurrence, no Newton: the multiple-shooting kernels of
kernels/shooting.py with a single segment. Same contract as the fused kernels:

    h = sequential_triton_rnn(cell_name, u, p, h0_rows, smap) -> (B, T, K, D) fp32, differentiable
        cell_name "paragru" (K=1, p (3,D)) or "paralstm" (K=2, p (5,D)); u (B,T,3,D) any float dtype;
        h0_rows (R, K, D) fp32; smap (B, T) int32 start map (kernels/cells/fused_common.py)
    sequential_triton_mode(cell, u, p, h0_rows, layout, newton, stats, name) -> h (engine adapter)
"""
from __future__ import annotations

import torch

from .shooting import sequential_backward, sequential_forward


# ----------------------------------------------------------------------------- autograd + public op
@torch.library.custom_op("pararnn::sequential_triton_fwd", mutates_args=())
def sequential_triton_fwd(u: torch.Tensor, p: torch.Tensor, h0_rows: torch.Tensor, smap: torch.Tensor,
                          lstm: bool) -> torch.Tensor:
    return sequential_forward(lstm, u, p, h0_rows, smap)


@sequential_triton_fwd.register_fake
def _(u, p, h0_rows, smap, lstm):
    B, T, _, D = u.shape
    return u.new_empty(B, T, 2 if lstm else 1, D, dtype=torch.float32)


@torch.library.custom_op("pararnn::sequential_triton_bwd", mutates_args=())
def sequential_triton_bwd(u: torch.Tensor, p: torch.Tensor, h0_rows: torch.Tensor, smap: torch.Tensor,
                          h: torch.Tensor, g: torch.Tensor, lstm: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sequential_backward(lstm, u, p, h0_rows, smap, h, g)


@sequential_triton_bwd.register_fake
def _(u, p, h0_rows, smap, h, g, lstm):
    return torch.empty_like(u), p.new_empty(p.shape, dtype=torch.float32), torch.empty_like(h0_rows)


def _setup(ctx, inputs, output):
    u, p, h0_rows, smap, lstm = inputs
    ctx.lstm = lstm
    ctx.save_for_backward(u, p, h0_rows, smap, output)


def _backward(ctx, gh):
    u, p, h0_rows, smap, h = ctx.saved_tensors
    du, dp, dh0 = sequential_triton_bwd(u, p, h0_rows, smap, h, gh.contiguous(), ctx.lstm)
    return du, dp, dh0, None, None


sequential_triton_fwd.register_autograd(_backward, setup_context=_setup)


def sequential_triton_rnn(cell_name: str, u, p, h0_rows, smap):
    lstm = {"paragru": False, "paralstm": True}[cell_name.lower()]
    return sequential_triton_fwd(u, p.float().contiguous(), h0_rows.float().contiguous(), smap, lstm)


def sequential_triton_mode(cell, u, p, h0_rows, layout, newton, stats, name):
    """Engine adapter (mode ``sequential_triton``): ParaGRU / ParaLSTM cells only."""
    if stats is not None:
        stats.iterations, stats.residual, stats.converged, stats.fell_back = 0, 0.0, True, False
    return sequential_triton_rnn(type(cell).__name__, u, p, h0_rows, layout.start_map())
