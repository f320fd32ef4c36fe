"""Fused ParaLSTM: the ``fused`` mode's ops for this cell (multiple-shooting kernels of kernels/shooting.py).

    h = fused_paralstm(u, p, h0=None, cu_seqlens=None, newton=NewtonConfig(), stats=None, name=None)
        u  (B, T, 3, D) fp32 / bf16 / fp16 pre-activations (rows f, z, o), any strides
        p  (5, D) (a_f, a_z, a_o, c_f, c_o), or (8, D) with the gates' input bias as its last 3 rows
        h0 None (zeros), (B, 2, D), or with cu_seqlens (1, 2, D) / (N_docs, 2, D); rows [c; h]
        cu_seqlens (N_docs + 1,) int32/int64 [0, ..., T], needs B == 1
        -> h (B, T, 2, D) float32 trajectory of [c; h]; differentiable w.r.t. u, p and h0 (through the
           torch.library ops pararnn::paralstm_fused_fwd / _bwd, torch.compile-able).
    paralstm_fused_mode(cell, u, p, h0_rows, layout, newton, stats, name) -> h: the engine's mode.

The engine passes the input bias to these kernels only for ParaGRU (kernels/modes.py says why); the
ParaLSTM kernels take it all the same (tested through this op).
"""
from __future__ import annotations

import functools

from ...shooting import FALLBACK_PASS_CAP, shoot_backward, shoot_forward
from ..fused_common import FusedCellOps

_OPS = FusedCellOps("paralstm", "ParaLSTM", K=2, G=3, P=5, forward=functools.partial(shoot_forward, True),
                    backward=functools.partial(shoot_backward, True), pass_cap=FALLBACK_PASS_CAP)
paralstm_fused_fwd, paralstm_fused_bwd = _OPS.fwd, _OPS.bwd  # pararnn::paralstm_fused_fwd / _bwd
fused_paralstm = _OPS.trajectory
paralstm_fused_mode = _OPS.mode
