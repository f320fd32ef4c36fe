"""Fused ParaGRU: one Triton kernel for the whole Newton solve, one for the whole backward.

Contract (what the engine's "fused" mode registers):

    h = fused_paragru(u, p, h0=None, cu_seqlens=None, newton=NewtonConfig(), stats=None, name=None)
        u  (B, T, 3, D) fp32 / bf16 / fp16 pre-activations (rows z, r, c), any strides
        p  (3, D) (a_z, a_r, a_c), any float dtype
        h0 None (zeros), (B, 1, D), or with cu_seqlens (1, 1, D) / (N_docs, 1, D)
        cu_seqlens (N_docs + 1,) int32/int64 [0, ..., T], needs B == 1
        -> h (B, T, 1, D) float32 trajectory; differentiable w.r.t. u, p and h0 (torch.autograd
           through torch.library ops pararnn::paragru_fused_fwd / _bwd, torch.compile-able).
    paragru_fused_mode(cell, u, p, h0_rows, layout, newton, stats, name) -> h: the same with the
        engine's mode signature (kernels/modes.py).

Forward kernel: one program per (channel block of BD, batch row) walks the sequence in chunks of CT
steps. For each chunk it keeps the [CT, BD] tile in registers: initial guess h_t = f(0 | h0 | carry,
u_t), then Newton iterations (residual, Jacobian, in-register associative scan, update) until the
scaled residual max |f(h_{t-1}, u_t) - h_t| / (1 + |h_t|) <= tol or max_iters; the chunk starts from
the exact final state of the previous chunk, so each chunk is an independent short Newton solve.
A chunk still above tol at the cap (or NaN) is finished with the exact sequential recurrence in
registers (never a silently wrong answer); it is counted in the failure flag, which the 'raise'
policy reads (one host sync, only with on_failure='raise'). Iterations (max over chunks) and the
final residual (max over chunks, before any fallback) are per-program device tensors.

Backward kernel: the same programs walk the chunks in reverse, reload h (fp32) and u, recompute the
Jacobians, run the adjoint recurrence as an in-register scan of mu_t = J_t (g_t + mu_{t+1}), and
write du (u's dtype) and dh0 and per-(batch, channel) partial sums of dp (summed over B afterwards).

Forward dispatch: when B * D >= SEQ_FORWARD_MIN_BD (32768 for ParaGRU, 16384 for ParaLSTM) there are
enough independent channels to fill an H100, and the exact sequential recurrence (the
sequential_triton kernel, one thread per channel) is faster than any Newton solve (it does 1 step
evaluation per element instead of ~5); the forward then runs that kernel and reports 0 iterations,
residual 0. The backward kernel is the same either way.
"""
from __future__ import annotations

import functools


import torch
import triton
import triton.language as tl

from ...launch import launch
from ...shooting import (FALLBACK_PASS_CAP, _gru_gates, _gru_jac, _gru_step, _gru_value, sequential_forward,
                         shoot_backward, shoot_forward)
from ...scan.triton import _combine1
from ..fused_common import FusedCellOps, max_scaled_residual, row_of, shift_down


# ----------------------------------------------------------------------------- raw Triton kernels
@triton.jit
def _gru_fwd_kernel(
    U, P, H0, SMAP, H, ITERS, RES, FAIL,
    T, D, sUb, sUt, sUg, sUd,
    max_iters, tol, damping,
    CT: tl.constexpr, BD: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = tl.arange(0, CT)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    az1 = tl.load(P + d, mask=dmask, other=0.0)
    az = az1[None, :]
    ar1 = tl.load(P + D + d, mask=dmask, other=0.0)
    ar = ar1[None, :]
    ac1 = tl.load(P + 2 * D + d, mask=dmask, other=0.0)
    ac = ac1[None, :]
    pid_b64 = pid_b.to(tl.int64)
    ub = U + pid_b64 * sUb + d[None, :] * sUd
    hb = H + pid_b64 * T * D + d[None, :]
    carry = tl.zeros([BD], dtype=tl.float32)
    it_max = tl.program_id(0) * 0
    n_fail = tl.program_id(0) * 0
    res_max = tl.zeros([BD], dtype=tl.float32).sum(axis=0)
    for c0 in range(0, T, CT):
        t = c0 + rows
        valid = t < T
        m = valid[:, None] & dmask[None, :]
        t64 = tl.where(valid, t, 0).to(tl.int64)
        pu = ub + t64[:, None] * sUt
        uz = tl.load(pu, mask=m, other=0.0).to(tl.float32)
        ur = tl.load(pu + sUg, mask=m, other=0.0).to(tl.float32)
        uc = tl.load(pu + 2 * sUg, mask=m, other=0.0).to(tl.float32)
        srow = tl.load(SMAP + pid_b64 * T + t64, mask=valid, other=-1)
        st = (srow >= 0)[:, None]
        h0v = tl.load(H0 + srow[:, None].to(tl.int64) * D + d[None, :], mask=st & dmask[None, :], other=0.0)
        first = rows[:, None] == 0
        # Initial guess: exact at sequence starts and at the chunk's first step, f(0, u_t) elsewhere.
        hp = tl.where(st, h0v, tl.where(first, carry[None, :], 0.0))
        h = _gru_value(hp, uz, ur, uc, az, ar, ac)
        hp = tl.where(st, h0v, shift_down(h, rows, carry))
        f, J = _gru_step(hp, uz, ur, uc, az, ar, ac)
        res = max_scaled_residual(f - h, h, m)
        k = tl.program_id(0) * 0
        while (res > tol) & (k < max_iters):
            Jm = tl.where(st, 0.0, J)
            _, dh = tl.associative_scan((Jm, f - h), 0, _combine1)
            h = h + damping * dh
            hp = tl.where(st, h0v, shift_down(h, rows, carry))
            f, J = _gru_step(hp, uz, ur, uc, az, ar, ac)
            res = max_scaled_residual(f - h, h, m)
            k += 1
        failed = res > tol
        if failed:
            # Not converged at the cap: the exact sequential recurrence over this chunk.
            hc = carry
            stf = tl.where(st, 1.0, 0.0) + tl.zeros_like(h)
            for j in range(0, CT):
                hprev = tl.where(row_of(stf, rows, j) > 0.5, row_of(h0v, rows, j), hc)
                hc = _gru_value(hprev, row_of(uz, rows, j), row_of(ur, rows, j), row_of(uc, rows, j),
                            az1, ar1, ac1)
                h = tl.where(rows[:, None] == j, hc[None, :], h)
            n_fail += 1
        tl.store(hb + t64[:, None] * D, h, mask=m)
        carry = row_of(h, rows, CT - 1)
        it_max = tl.maximum(it_max, k)
        res_max = tl.maximum(res_max, res)
    pid = pid_b * tl.num_programs(0) + pid_d
    tl.store(ITERS + pid, it_max)
    tl.store(RES + pid, res_max)
    tl.store(FAIL + pid, n_fail)


@triton.jit
def _gru_bwd_kernel(
    U, P, H0, SMAP, H, G, DU, DP, DH0,
    T, D, sUb, sUt, sUg, sUd, sGb, sGt, sGd,
    CT: tl.constexpr, BD: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = tl.arange(0, CT)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    az1 = tl.load(P + d, mask=dmask, other=0.0)
    az = az1[None, :]
    ar1 = tl.load(P + D + d, mask=dmask, other=0.0)
    ar = ar1[None, :]
    ac1 = tl.load(P + 2 * D + d, mask=dmask, other=0.0)
    ac = ac1[None, :]
    pid_b64 = pid_b.to(tl.int64)
    ub = U + pid_b64 * sUb + d[None, :] * sUd
    dub = DU + pid_b64 * T * 3 * D + d[None, :]
    hb = H + pid_b64 * T * D + d[None, :]
    gb = G + pid_b64 * sGb + d[None, :] * sGd
    carry = tl.zeros([BD], dtype=tl.float32)  # mu at the first step of the chunk after this one
    acc_z = tl.zeros([BD], dtype=tl.float32)
    acc_r = tl.zeros([BD], dtype=tl.float32)
    acc_c = tl.zeros([BD], dtype=tl.float32)
    n_chunks = tl.cdiv(T, CT)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * CT + (CT - 1) - rows  # logical row i runs backwards in time
        valid = t < T
        m = valid[:, None] & dmask[None, :]
        t64 = tl.where(valid, t, 0).to(tl.int64)
        pu = ub + t64[:, None] * sUt
        uz = tl.load(pu, mask=m, other=0.0).to(tl.float32)
        ur = tl.load(pu + sUg, mask=m, other=0.0).to(tl.float32)
        uc = tl.load(pu + 2 * sUg, mask=m, other=0.0).to(tl.float32)
        g = tl.load(gb + t64[:, None] * sGt, mask=m, other=0.0).to(tl.float32)
        srow = tl.load(SMAP + pid_b64 * T + t64, mask=valid, other=-1)
        st = (srow >= 0)[:, None]
        h0v = tl.load(H0 + srow[:, None].to(tl.int64) * D + d[None, :], mask=st & dmask[None, :], other=0.0)
        hprev = tl.load(hb + (t64[:, None] - 1) * D, mask=m & (t64[:, None] >= 1) & (~st), other=0.0)
        hp = tl.where(st, h0v, hprev)
        z, r, cg = _gru_gates(hp, uz, ur, uc, az, ar, ac)
        J = _gru_jac(hp, z, r, cg, az, ar, ac)
        Jm = tl.where(st | (~m), 0.0, J)
        first = rows[:, None] == 0
        _, mu = tl.associative_scan((Jm, Jm * (g + tl.where(first, carry[None, :], 0.0))), 0, _combine1)
        lam = tl.where(m, g + shift_down(mu, rows, carry), 0.0)
        gc = lam * z * (1.0 - cg * cg)
        gz = lam * (cg - hp) * z * (1.0 - z)
        gr = gc * ac * hp * r * (1.0 - r)
        pdu = dub + t64[:, None] * (3 * D)
        tl.store(pdu, gz.to(DU.dtype.element_ty), mask=m)
        tl.store(pdu + D, gr.to(DU.dtype.element_ty), mask=m)
        tl.store(pdu + 2 * D, gc.to(DU.dtype.element_ty), mask=m)
        acc_z += tl.sum(gz * hp, axis=0)
        acc_r += tl.sum(gr * hp, axis=0)
        acc_c += tl.sum(gc * hp * r, axis=0)
        ghp = J * lam
        tl.store(DH0 + srow[:, None].to(tl.int64) * D + d[None, :], ghp, mask=st & m)
        carry = row_of(mu, rows, CT - 1)
    pdp = DP + pid_b64 * 3 * D + d
    tl.store(pdp, acc_z, mask=dmask)
    tl.store(pdp + D, acc_r, mask=dmask)
    tl.store(pdp + 2 * D, acc_c, mask=dmask)


# ----------------------------------------------------------------------------- launch functions
# Forward dispatch: B * D >= this many channels -> sequential kernel (H100 measurements).
SEQ_FORWARD_MIN_BD = 32768
LAST: dict = {}  # last compiled kernels (n_regs / n_spills for the benchmark)
_BLOCKS: dict = {}  # test/bench override: {"CT": .., "BD": .., "num_warps": ..}


def _blocks(B, D, device, which="fwd"):
    """Tile shapes measured best on an H100 (scripts/sweep_blocks.py, kernels/NOTES-perf.md)."""
    CT, BD, nw = (64, 16, 2) if which == "fwd" else (128, 16, 4)
    if D < BD:
        BD = max(triton.next_power_of_2(D), 2)
    return _BLOCKS.get("CT", CT), _BLOCKS.get("BD", BD), _BLOCKS.get("num_warps", nw)


def _forward(u, p, h0_rows, smap, max_iters, tol, damping):
    B, T, G, D = u.shape
    CT, BD, nw = _blocks(B, D, u.device)
    nD = triton.cdiv(D, BD)
    if B * D >= _BLOCKS.get("seq_min_bd", SEQ_FORWARD_MIN_BD):
        # Enough channels to fill the GPU: the exact sequential recurrence is work-optimal and
        # faster than Newton here (measured, kernels/NOTES-perf.md). Exact: 0 iterations, residual 0.
        h = sequential_forward(False, u, p, h0_rows, smap)
        z = torch.zeros(B * nD, device=u.device, dtype=torch.int32)
        return h, z, torch.zeros(B * nD, device=u.device, dtype=torch.float32), z.clone()
    h = torch.empty(B, T, 1, D, device=u.device, dtype=torch.float32)
    iters = torch.empty(B * nD, device=u.device, dtype=torch.int32)
    res = torch.empty(B * nD, device=u.device, dtype=torch.float32)
    fail = torch.empty(B * nD, device=u.device, dtype=torch.int32)
    if T > 0:
        LAST['fwd'] = launch(_gru_fwd_kernel, (nD, B),
            u, p, h0_rows, smap, h, iters, res, fail, T, D, *u.stride(),
            max_iters, tol, damping, CT=CT, BD=BD, num_warps=nw)
    return h, iters, res, fail


def _backward(u, p, h0_rows, smap, h, g):
    B, T, G, D = u.shape
    CT, BD, nw = _blocks(B, D, u.device, "bwd")
    nD = triton.cdiv(D, BD)
    du = torch.empty(B, T, 3, D, device=u.device, dtype=u.dtype)
    dp = torch.empty(B, 3, D, device=u.device, dtype=torch.float32)
    dh0 = torch.zeros_like(h0_rows)
    g = g.reshape(B, T, D)
    LAST['bwd'] = launch(_gru_bwd_kernel, (nD, B),
        u, p, h0_rows, smap, h, g, du, dp, dh0, T, D, *u.stride(), *g.stride(),
        CT=CT, BD=BD, num_warps=nw)
    return du, dp.sum(0), dh0


# ----------------------------------------------------------------------------- autograd + public op
def _num_programs(u: torch.Tensor) -> int:
    B, _, _, D = u.shape
    return B * triton.cdiv(D, _blocks(B, D, u.device)[1])


def _shoot_stats_size(u: torch.Tensor) -> int:
    return u.shape[0] * u.shape[-1]


# The ``fused`` mode: multiple-shooting Newton (kernels/shooting.py).
_OPS = FusedCellOps("paragru", "ParaGRU", K=1, G=3, P=3, forward=functools.partial(shoot_forward, False),
                    backward=functools.partial(shoot_backward, False), num_programs=_shoot_stats_size,
                    pass_cap=FALLBACK_PASS_CAP, compact_start_map=True, input_bias=True)
paragru_fused_fwd, paragru_fused_bwd = _OPS.fwd, _OPS.bwd  # pararnn::paragru_fused_fwd / _bwd
fused_paragru = _OPS.fused  # (u, p, h0=None, cu_seqlens=None, newton=..., stats=None, name=None) -> h (B, T, 1, D)
paragru_fused_mode = _OPS.mode  # the engine's mode "fused" for this cell

# The ``fused_stepwise`` mode: the per-step Newton solve in registers (the kernels above).
_STEPWISE = FusedCellOps("paragru_stepwise", "ParaGRU", K=1, G=3, P=3, forward=_forward, backward=_backward,
                         num_programs=_num_programs)
fused_paragru_stepwise = _STEPWISE.fused
paragru_stepwise_mode = _STEPWISE.mode
