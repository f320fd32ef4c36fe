"""The one-thread-per-channel sequential baseline (mode ``sequential_triton``) for ParaGRU/ParaLSTM.

One program per (block of BD channels, batch row), one channel per thread, a loop over all T steps
(forward) and back (backward). Exact recurrence, no Newton. Same contract as the fused kernels:

    h = sequential_triton_rnn(cell_name, u, p, h0_rows, smap) -> (B, T, K, D) fp32, differentiable
        cell_name "paragru" (K=1, p (3,D)) or "paralstm" (K=2, p (5,D)); u (B,T,3,D) any float dtype;
        h0_rows (R, K, D) fp32; smap (B, T) int32 start map (kernels/cells/fused_common.py)
    sequential_triton_mode(cell, u, p, h0_rows, layout, newton, stats, name) -> h (engine adapter)
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .cells.fused_common import sigmoid_, start_map_from_layout, tanh_


# ----------------------------------------------------------------------------- raw Triton kernels
@triton.jit
def _seq_fwd_kernel(U, P, H0, SMAP, H, T, D, sUb, sUt, sUg, sUd,
                    LSTM: tl.constexpr, BD: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    dm = d < D
    K: tl.constexpr = 2 if LSTM else 1
    a0 = tl.load(P + d, mask=dm, other=0.0)
    a1 = tl.load(P + D + d, mask=dm, other=0.0)
    a2 = tl.load(P + 2 * D + d, mask=dm, other=0.0)
    if LSTM:
        c_f = tl.load(P + 3 * D + d, mask=dm, other=0.0)
        c_o = tl.load(P + 4 * D + d, mask=dm, other=0.0)
    hc = tl.zeros([BD], dtype=tl.float32)
    cc = tl.zeros([BD], dtype=tl.float32)
    ub = U + pid_b * sUb + d * sUd
    hb = H + pid_b * T * K * D + d
    for t in range(0, T):
        s = tl.load(SMAP + pid_b * T + t)
        if s >= 0:
            hc = tl.load(H0 + s.to(tl.int64) * K * D + (K - 1) * D + d, mask=dm, other=0.0)
            if LSTM:
                cc = tl.load(H0 + s.to(tl.int64) * K * D + d, mask=dm, other=0.0)
        pu = ub + t * sUt
        u0 = tl.load(pu, mask=dm, other=0.0).to(tl.float32)
        u1 = tl.load(pu + sUg, mask=dm, other=0.0).to(tl.float32)
        u2 = tl.load(pu + 2 * sUg, mask=dm, other=0.0).to(tl.float32)
        if LSTM:
            f = sigmoid_(a0 * hc + u0 + c_f * cc)
            z = tanh_(a1 * hc + u1)
            cc = f * cc + (1.0 - f) * z
            o = sigmoid_(a2 * hc + u2 + c_o * cc)
            hc = o * tanh_(cc)
            tl.store(hb + t * 2 * D, cc, mask=dm)
            tl.store(hb + t * 2 * D + D, hc, mask=dm)
        else:
            z = sigmoid_(a0 * hc + u0)
            r = sigmoid_(a1 * hc + u1)
            c = tanh_(a2 * (hc * r) + u2)
            hc = hc + z * (c - hc)
            tl.store(hb + t * D, hc, mask=dm)


@triton.jit
def _seq_bwd_kernel(U, P, H0, SMAP, H, G, DU, DP, DH0, T, D, sUb, sUt, sUg, sUd, sGb, sGt, sGk, sGd,
                    LSTM: tl.constexpr, BD: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    dm = d < D
    K: tl.constexpr = 2 if LSTM else 1
    NP: tl.constexpr = 5 if LSTM else 3
    a0 = tl.load(P + d, mask=dm, other=0.0)
    a1 = tl.load(P + D + d, mask=dm, other=0.0)
    a2 = tl.load(P + 2 * D + d, mask=dm, other=0.0)
    c_f = a0 * 0.0
    c_o = a0 * 0.0
    if LSTM:
        c_f = tl.load(P + 3 * D + d, mask=dm, other=0.0)
        c_o = tl.load(P + 4 * D + d, mask=dm, other=0.0)
    acc0 = tl.zeros([BD], dtype=tl.float32)
    acc1 = tl.zeros([BD], dtype=tl.float32)
    acc2 = tl.zeros([BD], dtype=tl.float32)
    acc3 = tl.zeros([BD], dtype=tl.float32)
    acc4 = tl.zeros([BD], dtype=tl.float32)
    mu_c = tl.zeros([BD], dtype=tl.float32)  # J_{t+1}^T lam_{t+1} (0 across a start)
    mu_h = tl.zeros([BD], dtype=tl.float32)
    ub = U + pid_b * sUb + d * sUd
    dub = DU + pid_b * T * 3 * D + d
    hb = H + pid_b * T * K * D + d
    gb = G + pid_b * sGb + d * sGd
    for tt in range(0, T):
        t = T - 1 - tt
        s = tl.load(SMAP + pid_b * T + t)
        pu = ub + t * sUt
        u0 = tl.load(pu, mask=dm, other=0.0).to(tl.float32)
        u1 = tl.load(pu + sUg, mask=dm, other=0.0).to(tl.float32)
        u2 = tl.load(pu + 2 * sUg, mask=dm, other=0.0).to(tl.float32)
        if s >= 0:
            pprev = H0 + s.to(tl.int64) * K * D + d
        else:
            pprev = hb + (t - 1) * K * D
        okp = dm & (((d * 0 + s) >= 0) | ((d * 0 + t) > 0))
        hp = tl.load(pprev + (K - 1) * D, mask=okp, other=0.0)
        lh = tl.load(gb + t * sGt + (K - 1) * sGk, mask=dm, other=0.0).to(tl.float32) + mu_h
        pdu = dub + t * 3 * D
        if LSTM:
            cp = tl.load(pprev, mask=okp, other=0.0)
            lc = tl.load(gb + t * sGt, mask=dm, other=0.0).to(tl.float32) + mu_c
            f = sigmoid_(a0 * hp + u0 + c_f * cp)
            z = tanh_(a1 * hp + u1)
            cn = f * cp + (1.0 - f) * z
            o = sigmoid_(a2 * hp + u2 + c_o * cn)
            tc = tanh_(cn)
            dpo = lh * tc * o * (1.0 - o)
            dcn = lc + lh * o * (1.0 - tc * tc) + dpo * c_o
            dpf = dcn * f * (1.0 - f) * (cp - z)
            dpz = dcn * (1.0 - f) * (1.0 - z * z)
            tl.store(pdu, dpf.to(DU.dtype.element_ty), mask=dm)
            tl.store(pdu + D, dpz.to(DU.dtype.element_ty), mask=dm)
            tl.store(pdu + 2 * D, dpo.to(DU.dtype.element_ty), mask=dm)
            acc0 += dpf * hp
            acc1 += dpz * hp
            acc2 += dpo * hp
            acc3 += dpf * cp
            acc4 += dpo * cn
            gcp = dcn * f + dpf * c_f
            ghp = dpo * a2 + dpf * a0 + dpz * a1
            if s >= 0:
                tl.store(DH0 + s.to(tl.int64) * 2 * D + d, gcp, mask=dm)
                tl.store(DH0 + s.to(tl.int64) * 2 * D + D + d, ghp, mask=dm)
                mu_c = gcp * 0.0
                mu_h = ghp * 0.0
            else:
                mu_c = gcp
                mu_h = ghp
        else:
            z = sigmoid_(a0 * hp + u0)
            r = sigmoid_(a1 * hp + u1)
            cg = tanh_(a2 * (hp * r) + u2)
            gc = lh * z * (1.0 - cg * cg)
            gz = lh * (cg - hp) * z * (1.0 - z)
            gr = gc * a2 * hp * r * (1.0 - r)
            tl.store(pdu, gz.to(DU.dtype.element_ty), mask=dm)
            tl.store(pdu + D, gr.to(DU.dtype.element_ty), mask=dm)
            tl.store(pdu + 2 * D, gc.to(DU.dtype.element_ty), mask=dm)
            acc0 += gz * hp
            acc1 += gr * hp
            acc2 += gc * hp * r
            ghp = lh * (1.0 - z) + gz * a0 + gr * a1 + gc * a2 * r
            if s >= 0:
                tl.store(DH0 + s.to(tl.int64) * D + d, ghp, mask=dm)
                mu_h = ghp * 0.0
            else:
                mu_h = ghp
    pdp = DP + pid_b * NP * D + d
    tl.store(pdp, acc0, mask=dm)
    tl.store(pdp + D, acc1, mask=dm)
    tl.store(pdp + 2 * D, acc2, mask=dm)
    if LSTM:
        tl.store(pdp + 3 * D, acc3, mask=dm)
        tl.store(pdp + 4 * D, acc4, mask=dm)


# ----------------------------------------------------------------------------- launch functions
def _bd(D: int) -> int:
    return 128 if D >= 128 else max(triton.next_power_of_2(D), 2)


def _dev(u):
    return torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()


def _fwd(lstm: bool, u, p, h0_rows, smap):
    B, T, _, D = u.shape
    K = 2 if lstm else 1
    BD = _bd(D)
    h = torch.empty(B, T, K, D, device=u.device, dtype=torch.float32)
    _seq_fwd_kernel[(triton.cdiv(D, BD), B)](u, p, h0_rows, smap, h, T, D, *u.stride(),
                                              LSTM=lstm, BD=BD, num_warps=max(BD // 32, 1))
    return h


def _bwd(lstm: bool, u, p, h0_rows, smap, h, g):
    B, T, _, D = u.shape
    BD = _bd(D)
    du = torch.empty(B, T, 3, D, device=u.device, dtype=u.dtype)
    dp = torch.empty(B, p.shape[0], D, device=u.device, dtype=torch.float32)
    dh0 = torch.zeros_like(h0_rows)
    _seq_bwd_kernel[(triton.cdiv(D, BD), B)](u, p, h0_rows, smap, h, g, du, dp, dh0, T, D, *u.stride(),
                                              *g.stride(), LSTM=lstm, BD=BD, num_warps=max(BD // 32, 1))
    return du, dp.sum(0), dh0


# ----------------------------------------------------------------------------- autograd + public op
@torch.library.custom_op("pararnn::sequential_triton_fwd", mutates_args=())
def sequential_triton_fwd(u: torch.Tensor, p: torch.Tensor, h0_rows: torch.Tensor, smap: torch.Tensor,
                          lstm: bool) -> torch.Tensor:
    with _dev(u):
        return _fwd(lstm, u, p, h0_rows, smap)


@sequential_triton_fwd.register_fake
def _(u, p, h0_rows, smap, lstm):
    B, T, _, D = u.shape
    return u.new_empty(B, T, 2 if lstm else 1, D, dtype=torch.float32)


@torch.library.custom_op("pararnn::sequential_triton_bwd", mutates_args=())
def sequential_triton_bwd(u: torch.Tensor, p: torch.Tensor, h0_rows: torch.Tensor, smap: torch.Tensor,
                          h: torch.Tensor, g: torch.Tensor, lstm: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _dev(u):
        return _bwd(lstm, u, p, h0_rows, smap, h, g)


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
    return sequential_triton_rnn(type(cell).__name__, u, p, h0_rows, start_map_from_layout(layout))
