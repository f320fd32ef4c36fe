"""Fused ParaGRU: the ``fused`` mode's ops for this cell (multiple-shooting kernels of kernels/shooting.py).

    h = fused_paragru(u, p, h0=None, cu_seqlens=None, newton=NewtonConfig(), stats=None, name=None)
        u  (B, T, 3, D) fp32 / bf16 / fp16 pre-activations (rows z, r, c), any strides
        p  (3, D) (a_z, a_r, a_c), or (6, D) with the gates' input bias as its last 3 rows; any float dtype
        h0 None (zeros), (B, 1, D), or with cu_seqlens (1, 1, D) / (N_docs, 1, D)
        cu_seqlens (N_docs + 1,) int32/int64 [0, ..., T], needs B == 1
        -> h (B, T, 1, D) float32 trajectory; differentiable w.r.t. u, p and h0 (through the torch.library
           ops pararnn::paragru_fused_fwd / _bwd, torch.compile-able).
    paragru_fused_mode(cell, u, p, h0_rows, layout, newton, stats, name) -> h: the same with the engine's
        mode signature (kernels/modes.py).
"""
from __future__ import annotations

import functools

from ...shooting import FALLBACK_PASS_CAP, shoot_backward, shoot_forward
from ..fused_common import FusedCellOps

_OPS = FusedCellOps("paragru", "ParaGRU", K=1, G=3, P=3, forward=functools.partial(shoot_forward, False),
                    backward=functools.partial(shoot_backward, False), pass_cap=FALLBACK_PASS_CAP)
paragru_fused_fwd, paragru_fused_bwd = _OPS.fwd, _OPS.bwd  # pararnn::paragru_fused_fwd / _bwd
fused_paragru = _OPS.trajectory
paragru_fused_mode = _OPS.mode
