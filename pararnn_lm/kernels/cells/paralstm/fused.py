"""Fused ParaLSTM: one Triton kernel for the whole Newton solve, one for the whole backward.

Contract (what the engine's "fused" mode registers):

    h = fused_paralstm(u, p, h0=None, cu_seqlens=None, newton=NewtonConfig(), stats=None, name=None)
        u  (B, T, 3, D) fp32 / bf16 / fp16 pre-activations (rows f, z, o), any strides
        p  (5, D) (a_f, a_z, a_o, c_f, c_o), any float dtype
        h0 None (zeros), (B, 2, D), or with cu_seqlens (1, 2, D) / (N_docs, 2, D); rows [c; h]
        cu_seqlens (N_docs + 1,) int32/int64 [0, ..., T], needs B == 1
        -> h (B, T, 2, D) float32 trajectory of [c; h]; differentiable w.r.t. u, p and h0 (through
           torch.library ops pararnn::paralstm_fused_fwd / _bwd, torch.compile-able).
    paralstm_fused_mode(cell, u, p, h0_rows, layout, newton, stats, name) -> h: the engine's mode.

Same scheme as kernels/cells/paragru/fused.py (chunked Newton in registers from the exact carried
state, per-chunk early exit, sequential finish of unconverged chunks, reverse adjoint scan in the
backward), with 2x2 per-channel Jacobian blocks.

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
from ...shooting import (FALLBACK_PASS_CAP, _lstm_gates, _lstm_jac, _lstm_step, _lstm_value, sequential_forward,
                         shoot_backward, shoot_forward)
from ...scan.triton import _combine2
from ..fused_common import FusedCellOps, max_scaled_residual, row_of, shift_down


# ----------------------------------------------------------------------------- raw Triton kernels
@triton.jit
def _lstm_fwd_kernel(
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
    af1 = tl.load(P + d, mask=dmask, other=0.0)
    af = af1[None, :]
    az1 = tl.load(P + D + d, mask=dmask, other=0.0)
    az = az1[None, :]
    ao1 = tl.load(P + 2 * D + d, mask=dmask, other=0.0)
    ao = ao1[None, :]
    cf1 = tl.load(P + 3 * D + d, mask=dmask, other=0.0)
    cf = cf1[None, :]
    co1 = tl.load(P + 4 * D + d, mask=dmask, other=0.0)
    co = co1[None, :]
    pid_b64 = pid_b.to(tl.int64)
    ub = U + pid_b64 * sUb + d[None, :] * sUd
    hb = H + pid_b64 * T * 2 * D + d[None, :]
    carry_c = tl.zeros([BD], dtype=tl.float32)
    carry_h = tl.zeros([BD], dtype=tl.float32)
    it_max = tl.program_id(0) * 0
    n_fail = tl.program_id(0) * 0
    res_max = tl.zeros([BD], dtype=tl.float32).sum(axis=0)
    for c0 in range(0, T, CT):
        t = c0 + rows
        valid = t < T
        m = valid[:, None] & dmask[None, :]
        t64 = tl.where(valid, t, 0).to(tl.int64)
        pu = ub + t64[:, None] * sUt
        uf = tl.load(pu, mask=m, other=0.0).to(tl.float32)
        uz = tl.load(pu + sUg, mask=m, other=0.0).to(tl.float32)
        uo = tl.load(pu + 2 * sUg, mask=m, other=0.0).to(tl.float32)
        srow = tl.load(SMAP + pid_b64 * T + t64, mask=valid, other=-1)
        st = (srow >= 0)[:, None]
        p0 = H0 + srow[:, None].to(tl.int64) * (2 * D) + d[None, :]
        h0c = tl.load(p0, mask=st & dmask[None, :], other=0.0)
        h0h = tl.load(p0 + D, mask=st & dmask[None, :], other=0.0)
        first = rows[:, None] == 0
        cp = tl.where(st, h0c, tl.where(first, carry_c[None, :], 0.0))
        hp = tl.where(st, h0h, tl.where(first, carry_h[None, :], 0.0))
        c, h = _lstm_value(cp, hp, uf, uz, uo, af, az, ao, cf, co)
        cp = tl.where(st, h0c, shift_down(c, rows, carry_c))
        hp = tl.where(st, h0h, shift_down(h, rows, carry_h))
        fc, fh, jcc, jch, jhc, jhh = _lstm_step(cp, hp, uf, uz, uo, af, az, ao, cf, co)
        res = tl.maximum(max_scaled_residual(fc - c, c, m), max_scaled_residual(fh - h, h, m))
        k = tl.program_id(0) * 0
        while (res > tol) & (k < max_iters):
            jcc = tl.where(st, 0.0, jcc)
            jch = tl.where(st, 0.0, jch)
            jhc = tl.where(st, 0.0, jhc)
            jhh = tl.where(st, 0.0, jhh)
            _, _, _, _, dc, dh = tl.associative_scan((jcc, jch, jhc, jhh, fc - c, fh - h), 0, _combine2)
            c = c + damping * dc
            h = h + damping * dh
            cp = tl.where(st, h0c, shift_down(c, rows, carry_c))
            hp = tl.where(st, h0h, shift_down(h, rows, carry_h))
            fc, fh, jcc, jch, jhc, jhh = _lstm_step(cp, hp, uf, uz, uo, af, az, ao, cf, co)
            res = tl.maximum(max_scaled_residual(fc - c, c, m), max_scaled_residual(fh - h, h, m))
            k += 1
        failed = res > tol
        if failed:
            # Not converged at the cap: the exact sequential recurrence over this chunk.
            cc = carry_c
            hc = carry_h
            stf = tl.where(st, 1.0, 0.0) + tl.zeros_like(h)
            for j in range(0, CT):
                sj = row_of(stf, rows, j) > 0.5
                cprev = tl.where(sj, row_of(h0c, rows, j), cc)
                hprev = tl.where(sj, row_of(h0h, rows, j), hc)
                cc, hc = _lstm_value(cprev, hprev, row_of(uf, rows, j), row_of(uz, rows, j), row_of(uo, rows, j),
                                 af1, az1, ao1, cf1, co1)
                c = tl.where(rows[:, None] == j, cc[None, :], c)
                h = tl.where(rows[:, None] == j, hc[None, :], h)
            n_fail += 1
        ph = hb + t64[:, None] * (2 * D)
        tl.store(ph, c, mask=m)
        tl.store(ph + D, h, mask=m)
        carry_c = row_of(c, rows, CT - 1)
        carry_h = row_of(h, rows, CT - 1)
        it_max = tl.maximum(it_max, k)
        res_max = tl.maximum(res_max, res)
    pid = pid_b * tl.num_programs(0) + pid_d
    tl.store(ITERS + pid, it_max)
    tl.store(RES + pid, res_max)
    tl.store(FAIL + pid, n_fail)


@triton.jit
def _lstm_bwd_kernel(
    U, P, H0, SMAP, H, G, DU, DP, DH0,
    T, D, sUb, sUt, sUg, sUd, sGb, sGt, sGk, sGd,
    CT: tl.constexpr, BD: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = tl.arange(0, CT)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    af1 = tl.load(P + d, mask=dmask, other=0.0)
    af = af1[None, :]
    az1 = tl.load(P + D + d, mask=dmask, other=0.0)
    az = az1[None, :]
    ao1 = tl.load(P + 2 * D + d, mask=dmask, other=0.0)
    ao = ao1[None, :]
    cf1 = tl.load(P + 3 * D + d, mask=dmask, other=0.0)
    cf = cf1[None, :]
    co1 = tl.load(P + 4 * D + d, mask=dmask, other=0.0)
    co = co1[None, :]
    pid_b64 = pid_b.to(tl.int64)
    ub = U + pid_b64 * sUb + d[None, :] * sUd
    dub = DU + pid_b64 * T * 3 * D + d[None, :]
    hb = H + pid_b64 * T * 2 * D + d[None, :]
    gb = G + pid_b64 * sGb + d[None, :] * sGd
    carry_c = tl.zeros([BD], dtype=tl.float32)
    carry_h = tl.zeros([BD], dtype=tl.float32)
    acc_af = tl.zeros([BD], dtype=tl.float32)
    acc_az = tl.zeros([BD], dtype=tl.float32)
    acc_ao = tl.zeros([BD], dtype=tl.float32)
    acc_cf = tl.zeros([BD], dtype=tl.float32)
    acc_co = tl.zeros([BD], dtype=tl.float32)
    n_chunks = tl.cdiv(T, CT)
    for ci in range(0, n_chunks):
        ch = n_chunks - 1 - ci
        t = ch * CT + (CT - 1) - rows  # logical row i runs backwards in time
        valid = t < T
        m = valid[:, None] & dmask[None, :]
        t64 = tl.where(valid, t, 0).to(tl.int64)
        pu = ub + t64[:, None] * sUt
        uf = tl.load(pu, mask=m, other=0.0).to(tl.float32)
        uz = tl.load(pu + sUg, mask=m, other=0.0).to(tl.float32)
        uo = tl.load(pu + 2 * sUg, mask=m, other=0.0).to(tl.float32)
        pg = gb + t64[:, None] * sGt
        gc = tl.load(pg, mask=m, other=0.0).to(tl.float32)
        gh = tl.load(pg + sGk, mask=m, other=0.0).to(tl.float32)
        srow = tl.load(SMAP + pid_b64 * T + t64, mask=valid, other=-1)
        st = (srow >= 0)[:, None]
        p0 = H0 + srow[:, None].to(tl.int64) * (2 * D) + d[None, :]
        h0c = tl.load(p0, mask=st & dmask[None, :], other=0.0)
        h0h = tl.load(p0 + D, mask=st & dmask[None, :], other=0.0)
        pprev = hb + (t64[:, None] - 1) * (2 * D)
        mprev = m & (t64[:, None] >= 1) & (~st)
        cp = tl.where(st, h0c, tl.load(pprev, mask=mprev, other=0.0))
        hp = tl.where(st, h0h, tl.load(pprev + D, mask=mprev, other=0.0))
        f, z, cn, o, tc = _lstm_gates(cp, hp, uf, uz, uo, af, az, ao, cf, co)
        dfp = f * (1.0 - f) * (cp - z)
        do = tc * o * (1.0 - o)
        jcc, jch, jhc, jhh = _lstm_jac(cp, f, z, o, tc, af, az, ao, cf, co)
        zero = st | (~m)
        # mu_t = J_t^T (g_t + mu_{t+1}): scan blocks are the transposed Jacobians.
        a00 = tl.where(zero, 0.0, jcc)
        a01 = tl.where(zero, 0.0, jhc)
        a10 = tl.where(zero, 0.0, jch)
        a11 = tl.where(zero, 0.0, jhh)
        first = rows[:, None] == 0
        x0 = gc + tl.where(first, carry_c[None, :], 0.0)
        x1 = gh + tl.where(first, carry_h[None, :], 0.0)
        _, _, _, _, mu_c, mu_h = tl.associative_scan(
            (a00, a01, a10, a11, a00 * x0 + a01 * x1, a10 * x0 + a11 * x1), 0, _combine2)
        lc = tl.where(m, gc + shift_down(mu_c, rows, carry_c), 0.0)
        lh = tl.where(m, gh + shift_down(mu_h, rows, carry_h), 0.0)
        # VJP of the step at the solution.
        dpo = lh * do
        dcn = lc + lh * o * (1.0 - tc * tc) + dpo * co
        dpf = dcn * dfp
        dpz = dcn * (1.0 - f) * (1.0 - z * z)
        pdu = dub + t64[:, None] * (3 * D)
        tl.store(pdu, dpf.to(DU.dtype.element_ty), mask=m)
        tl.store(pdu + D, dpz.to(DU.dtype.element_ty), mask=m)
        tl.store(pdu + 2 * D, dpo.to(DU.dtype.element_ty), mask=m)
        acc_af += tl.sum(dpf * hp, axis=0)
        acc_az += tl.sum(dpz * hp, axis=0)
        acc_ao += tl.sum(dpo * hp, axis=0)
        acc_cf += tl.sum(dpf * cp, axis=0)
        acc_co += tl.sum(dpo * cn, axis=0)
        pd0 = DH0 + srow[:, None].to(tl.int64) * (2 * D) + d[None, :]
        tl.store(pd0, jcc * lc + jhc * lh, mask=st & m)
        tl.store(pd0 + D, jch * lc + jhh * lh, mask=st & m)
        carry_c = row_of(mu_c, rows, CT - 1)
        carry_h = row_of(mu_h, rows, CT - 1)
    pdp = DP + pid_b64 * 5 * D + d
    tl.store(pdp, acc_af, mask=dmask)
    tl.store(pdp + D, acc_az, mask=dmask)
    tl.store(pdp + 2 * D, acc_ao, mask=dmask)
    tl.store(pdp + 3 * D, acc_cf, mask=dmask)
    tl.store(pdp + 4 * D, acc_co, mask=dmask)


# ----------------------------------------------------------------------------- launch functions
# Forward dispatch: B * D >= this many channels -> sequential kernel (H100 measurements).
SEQ_FORWARD_MIN_BD = 16384
LAST: dict = {}  # last compiled kernels (n_regs / n_spills for the benchmark)
_BLOCKS: dict = {}  # test/bench override: {"CT": .., "BD": .., "num_warps": ..}


def _blocks(B, D, device, which="fwd"):
    """Tile shapes measured best on an H100 (scripts/sweep_blocks.py, kernels/NOTES-perf.md)."""
    CT, BD, nw = (64, 16, 4) if which == "fwd" else (64, 16, 4)
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
        h = sequential_forward(True, u, p, h0_rows, smap)
        z = torch.zeros(B * nD, device=u.device, dtype=torch.int32)
        return h, z, torch.zeros(B * nD, device=u.device, dtype=torch.float32), z.clone()
    h = torch.empty(B, T, 2, D, device=u.device, dtype=torch.float32)
    iters = torch.empty(B * nD, device=u.device, dtype=torch.int32)
    res = torch.empty(B * nD, device=u.device, dtype=torch.float32)
    fail = torch.empty(B * nD, device=u.device, dtype=torch.int32)
    LAST['fwd'] = launch(_lstm_fwd_kernel, (nD, B),
        u, p, h0_rows, smap, h, iters, res, fail, T, D, *u.stride(),
        max_iters, tol, damping, CT=CT, BD=BD, num_warps=nw)
    return h, iters, res, fail


def _backward(u, p, h0_rows, smap, h, g):
    B, T, G, D = u.shape
    CT, BD, nw = _blocks(B, D, u.device, "bwd")
    nD = triton.cdiv(D, BD)
    du = torch.empty(B, T, 3, D, device=u.device, dtype=u.dtype)
    dp = torch.empty(B, 5, D, device=u.device, dtype=torch.float32)
    dh0 = torch.zeros_like(h0_rows)
    LAST['bwd'] = launch(_lstm_bwd_kernel, (nD, B),
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
_OPS = FusedCellOps("paralstm", "ParaLSTM", K=2, G=3, P=5, forward=functools.partial(shoot_forward, True),
                    backward=functools.partial(shoot_backward, True), num_programs=_shoot_stats_size,
                    pass_cap=FALLBACK_PASS_CAP, compact_start_map=True, input_bias=True)
paralstm_fused_fwd, paralstm_fused_bwd = _OPS.fwd, _OPS.bwd  # pararnn::paralstm_fused_fwd / _bwd
fused_paralstm = _OPS.fused  # (u, p, h0=None, cu_seqlens=None, newton=..., stats=None, name=None) -> h (B, T, 2, D)
paralstm_fused_mode = _OPS.mode  # the engine's mode "fused" for this cell

# The ``fused_stepwise`` mode: the per-step Newton solve in registers (the kernels above).
_STEPWISE = FusedCellOps("paralstm_stepwise", "ParaLSTM", K=2, G=3, P=5, forward=_forward, backward=_backward,
                         num_programs=_num_programs)
fused_paralstm_stepwise = _STEPWISE.fused
paralstm_stepwise_mode = _STEPWISE.mode
