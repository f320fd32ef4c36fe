"""Multiple-shooting Newton kernels for ParaGRU / ParaLSTM: the ``fused`` mode's engine.

The paper (Danieli et al., "ParaRNN", arXiv 2510.21450) applies Newton's method to all T states of
h_t = f(h_{t-1}, u_t), one parallel linear scan per iteration (modes ``newton_torch`` / ``newton_triton``).
Here the sequence is cut into S segments of L steps and Newton's method is applied to the S unknown
segment-start states only:

    x_s = F_{s-1}(x_{s-1})      F_s = the exact sequential recurrence over segment s

One Newton iteration = one pass in which every (batch row, channel, segment) runs F_s from its current
start x_s, sequentially, in registers, and records the end state e_s and the Jacobian product
P_s = dF_s/dx_s = J_last ... J_first (diagonal per channel: a scalar for ParaGRU, 2x2 for ParaLSTM),
followed by the coarse update, a K x K linear recurrence over the S segments:

    x_1 = e_0,   x_s <- x_s + damping * (e_{s-1} + P_{s-1} (x_{s-1}^new - x_{s-1}) - x_s)

Within a segment the residual f(h_{t-1}, u_t) - h_t is exactly zero; at the segment starts it is
r_s = e_{s-1} - x_s. Converged when max_s |r_s| / (1 + |x_s|) <= tol after a pass that wrote h, so
the solution meets the same scaled-residual criterion as the ``newton_*`` modes. On contractive
cells P_s is tiny and the first correction is exact: 2 passes (one that only finds the segment ends,
one that writes h). Each pass does 1 cell evaluation per step (Newton over all T states needs ~5),
and the work is parallel over B x D x S, so S is chosen to fill the GPU (S = 1 when B x D already
does: then it is the plain sequential kernel, exact in one pass).

The coarse update runs in the kernel: every thread does a per-channel atomic increment after storing
its segment's (e_s, P_s); the thread that arrives last for its channel (release/acquire through that
counter) walks the S segments and writes the new starts, the residual and the converged flag.
Passes are launched 1 + max_iters times; a pass whose channels have all converged returns at once,
so nothing syncs with the host. Channels still unconverged after the cap are finished by one exact
sequential pass over the whole sequence (``fallback``) and flagged (the 'raise' policy reads the flag).

Backward (adjoint, exact, linear): lam_t = g_t + J_{t+1}^T lam_{t+1}. Pass A runs every segment in
reverse from a zero carry and records c_s = J_first^T lam_first and M_s = (J_last ... J_first)^T; the
last thread per channel solves the reverse recurrence m_{s-1} = c_s + M_s m_s over segments; pass B
reruns every segment from its exact carry m_s and writes du, per-segment dp partials and dh0.
Document starts (the start map) zero the Jacobian at that step, so no state or gradient crosses them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cells.fused_common import planning_sm_count, sigmoid_, tanh_
from .launch import launch

# ----------------------------------------------------------------------------- cell math


@triton.jit
def _gru_jac(hp, z, r, c, a0, a1, a2):
    """dh/dh_prev of ParaGRU from its gates at h_prev."""
    return (1.0 - z) + z * (1.0 - z) * a0 * (c - hp) + z * (1.0 - c * c) * a2 * (r + hp * r * (1.0 - r) * a1)


@triton.jit
def _gru_gates(hp, u0, u1, u2, a0, a1, a2):
    """ParaGRU gates (z, r, candidate c) at h_prev."""
    z = sigmoid_(a0 * hp + u0)
    r = sigmoid_(a1 * hp + u1)
    c = tanh_(a2 * (hp * r) + u2)
    return z, r, c


@triton.jit
def _gru_value(hp, u0, u1, u2, a0, a1, a2):
    """ParaGRU step, value only."""
    z, r, c = _gru_gates(hp, u0, u1, u2, a0, a1, a2)
    return hp + z * (c - hp)


@triton.jit
def _gru_step(hp, u0, u1, u2, a0, a1, a2):
    """ParaGRU step and its derivative dh/dh_prev."""
    z, r, c = _gru_gates(hp, u0, u1, u2, a0, a1, a2)
    return hp + z * (c - hp), _gru_jac(hp, z, r, c, a0, a1, a2)


@triton.jit
def _lstm_jac(cp, f, z, o, tc, a0, a1, a2, c_f, c_o):
    """2x2 Jacobian of ParaLSTM (rows c', h'; columns c, h) from its gates and tanh(c')."""
    fd = f * (1.0 - f)
    od = o * (1.0 - o)
    j_cc = f + fd * c_f * (cp - z)
    j_ch = fd * a0 * (cp - z) + (1.0 - f) * (1.0 - z * z) * a1
    k = od * c_o * tc + o * (1.0 - tc * tc)
    return j_cc, j_ch, k * j_cc, od * tc * a2 + k * j_ch


@triton.jit
def _lstm_gates(cp, hp, u0, u1, u2, a0, a1, a2, c_f, c_o):
    """ParaLSTM gates at [c_prev; h_prev]: f, z, the new c, o and tanh(c)."""
    f = sigmoid_(a0 * hp + u0 + c_f * cp)
    z = tanh_(a1 * hp + u1)
    c = f * cp + (1.0 - f) * z
    o = sigmoid_(a2 * hp + u2 + c_o * c)
    return f, z, c, o, tanh_(c)


@triton.jit
def _lstm_value(cp, hp, u0, u1, u2, a0, a1, a2, c_f, c_o):
    """ParaLSTM step on the state [c; h], value only."""
    f, z, c, o, tc = _lstm_gates(cp, hp, u0, u1, u2, a0, a1, a2, c_f, c_o)
    return c, o * tc


@triton.jit
def _lstm_step(cp, hp, u0, u1, u2, a0, a1, a2, c_f, c_o):
    """ParaLSTM step on the state [c; h] and its 2x2 Jacobian (rows c', h'; columns c, h)."""
    f, z, c, o, tc = _lstm_gates(cp, hp, u0, u1, u2, a0, a1, a2, c_f, c_o)
    j_cc, j_ch, j_hc, j_hh = _lstm_jac(cp, f, z, o, tc, a0, a1, a2, c_f, c_o)
    return c, o * tc, j_cc, j_ch, j_hc, j_hh


@triton.jit
def _left_mul2(ok, a_cc, a_ch, a_hc, a_hh, b_cc, b_ch, b_hc, b_hh):
    """2x2 product A B where ``ok``, B elsewhere (matrices as their cc, ch, hc, hh entries)."""
    return (tl.where(ok, a_cc * b_cc + a_ch * b_hc, b_cc), tl.where(ok, a_cc * b_ch + a_ch * b_hh, b_ch),
            tl.where(ok, a_hc * b_cc + a_hh * b_hc, b_hc), tl.where(ok, a_hc * b_ch + a_hh * b_hh, b_hh))


@triton.jit
def _eye2(mask):
    """The 2x2 identity (entries cc, ch, hc, hh) as [BD] vectors, zero where ``mask`` is off."""
    one = tl.where(mask, 1.0, 0.0)
    return one, one * 0.0, one * 0.0, one


@triton.jit
def _load_params(P, d, dm, D, LSTM: tl.constexpr):
    """Per-channel recurrent parameters: a_0..a_2 and, for ParaLSTM, the peepholes c_f, c_o."""
    a0 = tl.load(P + d, mask=dm, other=0.0)
    a1 = tl.load(P + D + d, mask=dm, other=0.0)
    a2 = tl.load(P + 2 * D + d, mask=dm, other=0.0)
    c_f = a0 * 0.0
    c_o = a0 * 0.0
    if LSTM:
        c_f = tl.load(P + 3 * D + d, mask=dm, other=0.0)
        c_o = tl.load(P + 4 * D + d, mask=dm, other=0.0)
    return a0, a1, a2, c_f, c_o


@triton.jit
def _load_bias(P, d, dm, D, LSTM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The input bias of the three gates (rows NP .. NP+2 of P, after the recurrent parameters), added
    to u where it is converted to fp32 - no separate pass over u. Without HAS_BIAS: placeholders."""
    NP: tl.constexpr = 5 if LSTM else 3
    if HAS_BIAS:
        b0 = tl.load(P + NP * D + d, mask=dm, other=0.0)
        b1 = tl.load(P + (NP + 1) * D + d, mask=dm, other=0.0)
        b2 = tl.load(P + (NP + 2) * D + d, mask=dm, other=0.0)
    else:
        b0 = tl.zeros_like(d).to(tl.float32)
        b1 = b0
        b2 = b0
    return b0, b1, b2


@triton.jit
def _gate_inputs(x0, x1, x2, b0, b1, b2, HAS_BIAS: tl.constexpr):
    """One step's three pre-activations in fp32, plus the input bias where the kernel has it."""
    v0 = x0.to(tl.float32)
    v1 = x1.to(tl.float32)
    v2 = x2.to(tl.float32)
    if HAS_BIAS:
        v0 += b0
        v1 += b1
        v2 += b2
    return v0, v1, v2


@triton.jit
def _load_block(ub, sUt, sUg, t, t1, act, d, NB: tl.constexpr):
    """Steps t .. t+NB-1 (masked at t1): three NB-tuples of [BD] pre-activation vectors in u's dtype.
    Tuples of 1-D loads, not an [NB, BD] tile: a tile's layout is the compiler's choice, and with
    vectorised channels it spreads the steps over warps (a cross-warp exchange per step)."""
    u0 = ()
    u1 = ()
    u2 = ()
    for j in tl.static_range(NB):
        k = act & ((d * 0 + t + j) < t1)
        p = ub + (t + j) * sUt
        u0 = u0 + (tl.load(p, mask=k, other=0.0),)
        u1 = u1 + (tl.load(p + sUg, mask=k, other=0.0),)
        u2 = u2 + (tl.load(p + 2 * sUg, mask=k, other=0.0),)
    return u0, u1, u2


@triton.jit
def _fwd_step(t, t1, sm, u0, u1, u2, cc, hc, p_cc, p_ch, p_hc, p_hh, H0, hb, d, act, D,
              a0, a1, a2, c_f, c_o, LSTM: tl.constexpr, COARSE: tl.constexpr, WRITE: tl.constexpr,
              DOCS: tl.constexpr):
    """One step (a no-op past the segment end t1): state, Jacobian product, optional store of h.
    With DOCS, ``sm`` >= 0 where a document starts at t: the state restarts from that h0 row and
    nothing depends on the steps before (the Jacobian product restarts at zero)."""
    K: tl.constexpr = 2 if LSTM else 1
    ok = (d * 0 + t) < t1
    if DOCS:
        st = (d * 0 + sm) >= 0
        h0p = H0 + tl.where(st, sm, 0).to(tl.int64) * K * D + d
        hc = tl.where(st, tl.load(h0p + (K - 1) * D, mask=act & st, other=0.0), hc)
        if LSTM:
            cc = tl.where(st, tl.load(h0p, mask=act & st, other=0.0), cc)
        if COARSE:
            p_cc = tl.where(st, 0.0, p_cc)
            p_ch = tl.where(st, 0.0, p_ch)
            p_hc = tl.where(st, 0.0, p_hc)
            p_hh = tl.where(st, 0.0, p_hh)
    if LSTM:
        c2, h2, j_cc, j_ch, j_hc, j_hh = _lstm_step(cc, hc, u0, u1, u2, a0, a1, a2, c_f, c_o)
        if COARSE:  # P <- J P
            p_cc, p_ch, p_hc, p_hh = _left_mul2(ok, j_cc, j_ch, j_hc, j_hh, p_cc, p_ch, p_hc, p_hh)
        cc = tl.where(ok, c2, cc)
        hc = tl.where(ok, h2, hc)
        if WRITE:
            tl.store(hb + t * 2 * D, cc, mask=act & ok)
            tl.store(hb + t * 2 * D + D, hc, mask=act & ok)
    else:
        if COARSE:
            h2, j = _gru_step(hc, u0, u1, u2, a0, a1, a2)
            p_hh = tl.where(ok, j * p_hh, p_hh)
        else:  # no Jacobian needed: the value-only step
            h2 = _gru_value(hc, u0, u1, u2, a0, a1, a2)
        hc = tl.where(ok, h2, hc)
        if WRITE:
            tl.store(hb + t * D, hc, mask=act & ok)
    return cc, hc, p_cc, p_ch, p_hc, p_hh


# ----------------------------------------------------------------------------- forward pass


@triton.jit
def _fwd_walk(ub, hb, smap_row, H0, sUt, sUg, ts, t1, cc, hc, p_cc, p_ch, p_hc, p_hh, d, act, D,
              a0, a1, a2, c_f, c_o, b0, b1, b2, LSTM: tl.constexpr, COARSE: tl.constexpr, WRITE: tl.constexpr,
              DOCS: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Steps ts .. t1-1 from the given state and Jacobian product. Steps go NB at a time; the next
    block's loads are issued before this block's dependent chain, so memory latency overlaps NB step
    evaluations (prefetch depth NB)."""
    n0, n1, n2 = _load_block(ub, sUt, sUg, ts, t1, act, d, NB)
    for tb in range(ts, t1, NB):
        x0, x1, x2 = n0, n1, n2
        n0, n1, n2 = _load_block(ub, sUt, sUg, tb + NB, t1, act, d, NB)
        for j in tl.static_range(NB):
            sm_j = -1
            if DOCS:  # a scalar load (every thread, same address): an L1 hit, off the chain
                sm_j = tl.load(smap_row + tb + j, mask=tb + j < t1, other=-1)
            v0, v1, v2 = _gate_inputs(x0[j], x1[j], x2[j], b0, b1, b2, HAS_BIAS)
            cc, hc, p_cc, p_ch, p_hc, p_hh = _fwd_step(
                tb + j, t1, sm_j, v0, v1, v2, cc, hc, p_cc, p_ch, p_hc, p_hh, H0, hb, d, act, D,
                a0, a1, a2, c_f, c_o, LSTM, COARSE, WRITE, DOCS)
    return cc, hc, p_cc, p_ch, p_hc, p_hh


@triton.jit
def _fwd_start(START, H0, smap_row, seg, ts, d, act, D, LSTM: tl.constexpr, DOCS: tl.constexpr):
    """State and Jacobian product at step ts: the segment's start row, or h0 where the (compact) start
    map puts a sequence start at ts = 0; the product is the identity, zero at a sequence start."""
    K: tl.constexpr = 2 if LSTM else 1
    hc = tl.load(START + seg + (K - 1) * D, mask=act, other=0.0)
    cc = hc * 0.0
    if LSTM:
        cc = tl.load(START + seg, mask=act, other=0.0)
    # d(end)/d(start): identity, zeroed at a document start inside the segment.
    p_cc, p_ch, p_hc, p_hh = _eye2(act)
    if not DOCS:
        # The start map is compact (B, 1): each row starts at t = 0 from h0 row SMAP[b], nowhere else.
        if ts == 0:
            h0p = H0 + tl.load(smap_row).to(tl.int64) * K * D + d
            hc = tl.load(h0p + (K - 1) * D, mask=act, other=0.0)
            if LSTM:
                cc = tl.load(h0p, mask=act, other=0.0)
            p_cc = p_cc * 0.0
            p_ch = p_cc
            p_hc = p_cc
            p_hh = p_cc
    return cc, hc, p_cc, p_ch, p_hc, p_hh


@triton.jit
def _fwd_run(START, H0, ub, hb, smap_row, seg, sUt, sUg, ts, t1, d, act, D, a0, a1, a2, c_f, c_o,
             b0, b1, b2, LSTM: tl.constexpr, COARSE: tl.constexpr, WRITE: tl.constexpr, DOCS: tl.constexpr,
             NB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The walk over steps ts .. t1-1 from the state :func:`_fwd_start` gives at ts."""
    cc, hc, p_cc, p_ch, p_hc, p_hh = _fwd_start(START, H0, smap_row, seg, ts, d, act, D, LSTM, DOCS)
    return _fwd_walk(ub, hb, smap_row, H0, sUt, sUg, ts, t1, cc, hc, p_cc, p_ch, p_hc, p_hh, d, act, D,
                     a0, a1, a2, c_f, c_o, b0, b1, b2, LSTM, COARSE, WRITE, DOCS, NB, HAS_BIAS)


@triton.jit
def _shoot_fwd_kernel(
    U, P, H0, SMAP, H, START, END, PROD, CNT, PENDING, ITERS, RES,
    T, D, S, L, sUb, sUt, sUg, max_iters, tol, damping, tail, tail_eps,
    LSTM: tl.constexpr, FIRST: tl.constexpr, WRITE: tl.constexpr, COARSE: tl.constexpr,
    BD: tl.constexpr, NB: tl.constexpr, DOCS: tl.constexpr, HAS_BIAS: tl.constexpr = False,
):
    """One pass over segment s (program axis 2) of L steps. FIRST: no convergence flags yet.
    WRITE: store h. COARSE: record (e_s, P_s) and let the last thread per channel do the coarse
    update (S > 1). Without COARSE it is the exact sequential recurrence (S == 1 or the fallback).

    The first coarse pass (FIRST and COARSE, starts all zero) runs only the last ``tail`` steps of
    each segment from a zero state: on a contractive cell the end state forgets where the walk began,
    and the tail's Jacobian product bounds how much (|e_tail - e_full| <= |P_tail| |h_ts - 0|). A
    program whose channels' |P_tail| exceeds ``tail_eps`` walks the whole segment instead. Either way
    the pass only proposes starts: the next pass writes h from them and checks their residual."""
    K: tl.constexpr = 2 if LSTM else 1
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    dm = d < D
    col = b * D + d
    # A program reruns ALL its channels while any of them is unconverged: the masks then depend on
    # the channel index only, so loads and stores vectorise (a per-channel flag in the mask splits
    # them into scalar accesses). Rerunning a converged channel is harmless: its starts only had
    # Newton updates since, so it rewrites h as accurately and its residual is checked again.
    run = 1
    if not FIRST:
        run = tl.max((tl.load(PENDING + col, mask=dm, other=0) != 0).to(tl.int32), axis=0)
    if run > 0:
        act = dm
        a0, a1, a2, c_f, c_o = _load_params(P, d, dm, D, LSTM)
        b0, b1, b2 = _load_bias(P, d, dm, D, LSTM, HAS_BIAS)
        t0 = s * L
        t1 = tl.minimum(t0 + L, T)
        seg = (b * S + s) * K * D + d  # START / END row of this segment, state k at + k * D
        ub = U + b * sUb + d  # u is contiguous along channels
        hb = H + b * T * K * D + d
        smap_row = SMAP + b * T if DOCS else SMAP + b  # the compact map has one entry per row
        ts = t0
        if FIRST and COARSE:
            ts = tl.maximum(t0, t1 - tail)
        cc, hc, p_cc, p_ch, p_hc, p_hh = _fwd_run(START, H0, ub, hb, smap_row, seg, sUt, sUg, ts, t1, d, act, D,
                                                  a0, a1, a2, c_f, c_o, b0, b1, b2, LSTM, COARSE, WRITE, DOCS, NB,
                                                  HAS_BIAS)
        if FIRST and COARSE:
            if ts > t0:
                big = tl.abs(p_hh)
                if LSTM:
                    big = tl.maximum(tl.maximum(big, tl.abs(p_hc)), tl.maximum(tl.abs(p_cc), tl.abs(p_ch)))
                ok = (big <= tail_eps) | (act == 0)  # NaN counts as too large
                if tl.min(ok.to(tl.int32), axis=0) == 0:  # the start still matters: walk it all
                    cc, hc, p_cc, p_ch, p_hc, p_hh = _fwd_run(
                        START, H0, ub, hb, smap_row, seg, sUt, sUg, t0, t1, d, act, D,
                        a0, a1, a2, c_f, c_o, b0, b1, b2, LSTM, COARSE, WRITE, DOCS, NB, HAS_BIAS)
        if COARSE:
            tl.store(END + seg + (K - 1) * D, hc, mask=act)
            if LSTM:
                tl.store(END + seg, cc, mask=act)
                pr = (b * S + s) * 4 * D + d
                tl.store(PROD + pr, p_cc, mask=act)
                tl.store(PROD + pr + D, p_ch, mask=act)
                tl.store(PROD + pr + 2 * D, p_hc, mask=act)
                tl.store(PROD + pr + 3 * D, p_hh, mask=act)
            else:
                tl.store(PROD + (b * S + s) * D + d, p_hh, mask=act)
            # Release this thread's stores; the last arrival per channel acquires everyone's.
            old = tl.atomic_add(CNT + col, 1, mask=act, sem="acq_rel", scope="gpu")
            last = act & (old == S - 1)
            if tl.max(last.to(tl.int32), axis=0) > 0:
                tl.store(CNT + col, 0, mask=last)
                _coarse_update(START, END, PROD, PENDING, ITERS, RES, b, d, last, S, D, max_iters, tol, damping,
                               LSTM, WRITE)


@triton.jit
def _coarse_update(START, END, PROD, PENDING, ITERS, RES, b, d, last, S, D, max_iters, tol, damping,
                   LSTM: tl.constexpr, WRITE: tl.constexpr):
    """For the channels in ``last``: residual of the current starts, then the Newton update."""
    K: tl.constexpr = 2 if LSTM else 1
    col = b * D + d
    base = b * S * K * D + d
    # Segment 0 always starts with a sequence start (the start map has t = 0), so x_0 is exact
    # and never changes: new - old = 0 for it.
    dx_h = tl.zeros_like(d).to(tl.float32)
    dx_c = dx_h
    res = dx_h
    for s2 in range(1, S):
        prev = base + (s2 - 1) * K * D
        cur = base + s2 * K * D
        e_h = tl.load(END + prev + (K - 1) * D, mask=last, other=0.0, cache_modifier=".cg")
        x_h = tl.load(START + cur + (K - 1) * D, mask=last, other=0.0, cache_modifier=".cg")
        r_h = e_h - x_h
        s_h = tl.abs(r_h) / (1.0 + tl.abs(x_h))
        if LSTM:
            e_c = tl.load(END + prev, mask=last, other=0.0, cache_modifier=".cg")
            x_c = tl.load(START + cur, mask=last, other=0.0, cache_modifier=".cg")
            pr = (b * S + s2 - 1) * 4 * D + d
            p_cc = tl.load(PROD + pr, mask=last, other=0.0, cache_modifier=".cg")
            p_ch = tl.load(PROD + pr + D, mask=last, other=0.0, cache_modifier=".cg")
            p_hc = tl.load(PROD + pr + 2 * D, mask=last, other=0.0, cache_modifier=".cg")
            p_hh = tl.load(PROD + pr + 3 * D, mask=last, other=0.0, cache_modifier=".cg")
            r_c = e_c - x_c
            s_c = tl.abs(r_c) / (1.0 + tl.abs(x_c))
            s_h = tl.maximum(s_h, s_c)
            n_c = damping * (r_c + p_cc * dx_c + p_ch * dx_h)
            n_h = damping * (r_h + p_hc * dx_c + p_hh * dx_h)
            dx_c = n_c
            dx_h = n_h
            tl.store(START + cur, x_c + dx_c, mask=last)
        else:
            p_hh = tl.load(PROD + (b * S + s2 - 1) * D + d, mask=last, other=0.0, cache_modifier=".cg")
            dx_h = damping * (r_h + p_hh * dx_h)
        tl.store(START + cur + (K - 1) * D, x_h + dx_h, mask=last)
        res = tl.maximum(res, tl.where(s_h != s_h, float("inf"), s_h))  # NaN never converges
    if WRITE:
        # h was written from these starts: converged if their residual is within tol.
        iters = tl.load(ITERS + col, mask=last, other=0)
        done = res <= tol  # NaN: not done
        tl.store(PENDING + col, 1 - done.to(tl.int32), mask=last)
        tl.store(RES + col, res, mask=last)
        tl.store(ITERS + col, tl.where(done | (iters >= max_iters), iters, iters + 1), mask=last)
    else:
        # Pass 0 only proposed starts: one iteration so far, and every channel still needs its written
        # pass. It sets all three per-channel arrays (the host allocates them uninitialised).
        one = tl.full(d.shape, 1, tl.int32)
        tl.store(ITERS + col, one, mask=last)
        tl.store(RES + col, res, mask=last)
        tl.store(PENDING + col, one, mask=last)


@triton.jit
def _load_block_reverse(ub, sUt, sUg, gb, sGt, sGk, hb, t, t0, dm, d, D, NB: tl.constexpr, LSTM: tl.constexpr):
    """Steps t, t-1, .., t-NB+1 (entry i = step t - i, masked below t0) as NB-tuples of [BD] vectors:
    u (3 gates, u's dtype), dh (h and c rows, fp32) and the previous state h_{t-1} (h and c rows;
    zero at t = 0). Tuples of 1-D loads for the reason given at ``_load_block``."""
    K: tl.constexpr = 2 if LSTM else 1
    u0 = ()
    u1 = ()
    u2 = ()
    g_h = ()
    g_c = ()
    h_h = ()
    h_c = ()
    for i in tl.static_range(NB):
        ti = t - i
        tv = d * 0 + ti
        k = dm & (tv >= t0)
        kh = k & (tv >= 1)
        pu = ub + ti * sUt
        pg = gb + ti * sGt
        ph = hb + (ti - 1) * K * D
        u0 = u0 + (tl.load(pu, mask=k, other=0.0),)
        u1 = u1 + (tl.load(pu + sUg, mask=k, other=0.0),)
        u2 = u2 + (tl.load(pu + 2 * sUg, mask=k, other=0.0),)
        g_h = g_h + (tl.load(pg + (K - 1) * sGk, mask=k, other=0.0).to(tl.float32),)
        h_h = h_h + (tl.load(ph + (K - 1) * D, mask=kh, other=0.0),)
        if LSTM:
            g_c = g_c + (tl.load(pg, mask=k, other=0.0).to(tl.float32),)
            h_c = h_c + (tl.load(ph, mask=kh, other=0.0),)
        else:  # placeholders, never read
            g_c = g_c + (dm.to(tl.float32),)
            h_c = h_c + (dm.to(tl.float32),)
    return u0, u1, u2, g_h, g_c, h_h, h_c


@triton.jit
def _bwd_step(t, t0, st, sm, u0, u1, u2, g_h, g_c, hp, cp, mu_c, mu_h, q_cc, q_ch, q_hc, q_hh,
              acc0, acc1, acc2, acc3, acc4, H0, dub, DH0, DU, d, dm, D, a0, a1, a2, c_f, c_o,
              LSTM: tl.constexpr, PASS_A: tl.constexpr):
    """One reverse step of the adjoint (a no-op below the segment start t0). ``st`` ([BD] mask): a
    sequence / document starts at t, from h0 row ``sm``."""
    ok = (d * 0 + t) >= t0
    w = dm & ok
    K: tl.constexpr = 2 if LSTM else 1
    row = tl.where(st, sm, 0).to(tl.int64) * K * D + d
    h0p = H0 + row
    hp = tl.where(st, tl.load(h0p + (K - 1) * D, mask=dm & st, other=0.0), hp)
    if LSTM:
        cp = tl.where(st, tl.load(h0p, mask=dm & st, other=0.0), cp)
    lh = g_h + mu_h
    pdu = dub + t * 3 * D
    if LSTM:
        lc = g_c + mu_c
        f, z, cn, o, tc = _lstm_gates(cp, hp, u0, u1, u2, a0, a1, a2, c_f, c_o)
        dpo = lh * tc * o * (1.0 - o)
        dcn = lc + lh * o * (1.0 - tc * tc) + dpo * c_o
        dpf = dcn * f * (1.0 - f) * (cp - z)
        dpz = dcn * (1.0 - f) * (1.0 - z * z)
        gcp = dcn * f + dpf * c_f
        ghp = dpo * a2 + dpf * a0 + dpz * a1
        if PASS_A:
            j_cc, j_ch, j_hc, j_hh = _lstm_jac(cp, f, z, o, tc, a0, a1, a2, c_f, c_o)
            # Q <- J^T Q (J transposed: its ch and hc entries swap)
            q_cc, q_ch, q_hc, q_hh = _left_mul2(ok, j_cc, j_hc, j_ch, j_hh, q_cc, q_ch, q_hc, q_hh)
        else:
            tl.store(pdu, dpf.to(DU.dtype.element_ty), mask=w)
            tl.store(pdu + D, dpz.to(DU.dtype.element_ty), mask=w)
            tl.store(pdu + 2 * D, dpo.to(DU.dtype.element_ty), mask=w)
            acc0 += tl.where(ok, dpf * hp, 0.0)
            acc1 += tl.where(ok, dpz * hp, 0.0)
            acc2 += tl.where(ok, dpo * hp, 0.0)
            acc3 += tl.where(ok, dpf * cp, 0.0)
            acc4 += tl.where(ok, dpo * cn, 0.0)
        # At a start the gradient goes to h0 (pass B) and nothing flows to the steps before it.
        if not PASS_A:
            tl.store(DH0 + row, gcp, mask=w & st)
            tl.store(DH0 + row + D, ghp, mask=w & st)
        gcp = tl.where(st, 0.0, gcp)
        ghp = tl.where(st, 0.0, ghp)
        q_cc = tl.where(st, 0.0, q_cc)
        q_ch = tl.where(st, 0.0, q_ch)
        q_hc = tl.where(st, 0.0, q_hc)
        q_hh = tl.where(st, 0.0, q_hh)
        mu_c = tl.where(ok, gcp, mu_c)
        mu_h = tl.where(ok, ghp, mu_h)
    else:
        z, r, cg = _gru_gates(hp, u0, u1, u2, a0, a1, a2)
        gc = lh * z * (1.0 - cg * cg)
        gz = lh * (cg - hp) * z * (1.0 - z)
        gr = gc * a2 * hp * r * (1.0 - r)
        ghp = lh * (1.0 - z) + gz * a0 + gr * a1 + gc * a2 * r
        if PASS_A:
            j = _gru_jac(hp, z, r, cg, a0, a1, a2)
            q_hh = tl.where(ok, j * q_hh, q_hh)
        else:
            tl.store(pdu, gz.to(DU.dtype.element_ty), mask=w)
            tl.store(pdu + D, gr.to(DU.dtype.element_ty), mask=w)
            tl.store(pdu + 2 * D, gc.to(DU.dtype.element_ty), mask=w)
            acc0 += tl.where(ok, gz * hp, 0.0)
            acc1 += tl.where(ok, gr * hp, 0.0)
            acc2 += tl.where(ok, gc * hp * r, 0.0)
        if not PASS_A:
            tl.store(DH0 + row, ghp, mask=w & st)
        ghp = tl.where(st, 0.0, ghp)
        q_hh = tl.where(st, 0.0, q_hh)
        mu_h = tl.where(ok, ghp, mu_h)
    return mu_c, mu_h, q_cc, q_ch, q_hc, q_hh, acc0, acc1, acc2, acc3, acc4


# ----------------------------------------------------------------------------- backward passes


@triton.jit
def _shoot_bwd_kernel(
    U, P, H0, SMAP, H, G, DU, DP, DH0, CARRY, CM, CNT,
    T, D, S, L, sUb, sUt, sUg, sGb, sGt, sGk,
    LSTM: tl.constexpr, PASS_A: tl.constexpr, BD: tl.constexpr, NB: tl.constexpr, DOCS: tl.constexpr,
    HAS_BIAS: tl.constexpr = False,
):
    """Reverse walk over segment s. PASS_A: from a zero carry, record (c_s, M_s) and let the last
    thread per channel solve the carries; else from CARRY[s] (zero if S == 1) write du, dp, dh0."""
    K: tl.constexpr = 2 if LSTM else 1
    NP: tl.constexpr = 5 if LSTM else 3
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    dm = d < D
    a0, a1, a2, c_f, c_o = _load_params(P, d, dm, D, LSTM)
    b0, b1, b2 = _load_bias(P, d, dm, D, LSTM, HAS_BIAS)
    t0 = s * L
    t1 = tl.minimum(t0 + L, T)
    seg = (b * S + s) * K * D + d
    mu_h = a0 * 0.0
    mu_c = a0 * 0.0
    if not PASS_A:
        if S > 1:
            mu_h = tl.load(CARRY + seg + (K - 1) * D, mask=dm, other=0.0)
            if LSTM:
                mu_c = tl.load(CARRY + seg, mask=dm, other=0.0)
    # Q = J_t^T ... J_last^T (PASS_A only), identity at the segment end.
    q_cc, q_ch, q_hc, q_hh = _eye2(dm)
    acc0 = a0 * 0.0
    acc1 = a0 * 0.0
    acc2 = a0 * 0.0
    acc3 = a0 * 0.0
    acc4 = a0 * 0.0
    ub = U + b * sUb + d  # u and g are contiguous along channels
    dub = DU + b * T * 3 * D + d
    hb = H + b * T * K * D + d
    gb = G + b * sGb + d
    # Reverse walk, NB steps per block, the next block's loads issued before this block's chain.
    smap_row = SMAP + b * T if DOCS else SMAP + b  # the compact map has one entry per row
    sm0 = tl.load(smap_row) if not DOCS else 0  # compact map: the h0 row of this batch row (start at t = 0)
    n0, n1, n2, ngh, ngc, nhh, nhc = _load_block_reverse(ub, sUt, sUg, gb, sGt, sGk, hb, t1 - 1, t0, dm, d, D, NB, LSTM)
    for tt in range(0, t1 - t0, NB):
        tb = t1 - 1 - tt
        x0, x1, x2, xgh, xgc, xhh, xhc = n0, n1, n2, ngh, ngc, nhh, nhc
        n0, n1, n2, ngh, ngc, nhh, nhc = _load_block_reverse(ub, sUt, sUg, gb, sGt, sGk, hb, tb - NB, t0, dm, d, D, NB, LSTM)
        for j in tl.static_range(NB):
            if DOCS:  # a scalar load (every thread, same address): an L1 hit, off the chain
                sm_j = tl.load(smap_row + tb - j, mask=tb - j >= t0, other=-1)
                st = (d * 0 + sm_j) >= 0
            else:
                sm_j = sm0
                st = ((d * 0 + (tb - j)) == 0) & ((d * 0 + t0) == 0)  # t = 0 may lie in a block, below t0
            v0, v1, v2 = _gate_inputs(x0[j], x1[j], x2[j], b0, b1, b2, HAS_BIAS)
            mu_c, mu_h, q_cc, q_ch, q_hc, q_hh, acc0, acc1, acc2, acc3, acc4 = _bwd_step(
                tb - j, t0, st, sm_j, v0, v1, v2,
                xgh[j], xgc[j], xhh[j], xhc[j], mu_c, mu_h, q_cc, q_ch, q_hc, q_hh,
                acc0, acc1, acc2, acc3, acc4, H0, dub, DH0, DU, d, dm, D, a0, a1, a2, c_f, c_o, LSTM, PASS_A)
    if PASS_A:
        # c_s = the carry this segment hands to the previous one from a zero carry-in; M_s = Q.
        tl.store(CM + (b * S + s) * (K + K * K) * D + (K - 1) * D + d, mu_h, mask=dm)
        if LSTM:
            cm = (b * S + s) * 6 * D + d
            tl.store(CM + cm, mu_c, mask=dm)
            tl.store(CM + cm + 2 * D, q_cc, mask=dm)
            tl.store(CM + cm + 3 * D, q_ch, mask=dm)
            tl.store(CM + cm + 4 * D, q_hc, mask=dm)
            tl.store(CM + cm + 5 * D, q_hh, mask=dm)
        else:
            tl.store(CM + (b * S + s) * 2 * D + D + d, q_hh, mask=dm)
        col = b * D + d
        old = tl.atomic_add(CNT + col, 1, mask=dm, sem="acq_rel", scope="gpu")
        last = dm & (old == S - 1)
        if tl.max(last.to(tl.int32), axis=0) > 0:
            tl.store(CNT + col, 0, mask=last)
            # m_{S-1} = 0; m_{s-1} = c_s + M_s m_s, walking the segments backwards.
            m_h = a0 * 0.0
            m_c = a0 * 0.0
            tl.store(CARRY + (b * S + S - 1) * K * D + (K - 1) * D + d, m_h, mask=last)
            if LSTM:
                tl.store(CARRY + (b * S + S - 1) * K * D + d, m_c, mask=last)
            for i in range(0, S - 1):
                s2 = S - 1 - i
                if LSTM:
                    cm = (b * S + s2) * 6 * D + d
                    c_c = tl.load(CM + cm, mask=last, other=0.0, cache_modifier=".cg")
                    c_h = tl.load(CM + cm + D, mask=last, other=0.0, cache_modifier=".cg")
                    m_cc = tl.load(CM + cm + 2 * D, mask=last, other=0.0, cache_modifier=".cg")
                    m_ch = tl.load(CM + cm + 3 * D, mask=last, other=0.0, cache_modifier=".cg")
                    m_hc = tl.load(CM + cm + 4 * D, mask=last, other=0.0, cache_modifier=".cg")
                    m_hh = tl.load(CM + cm + 5 * D, mask=last, other=0.0, cache_modifier=".cg")
                    n_c = c_c + m_cc * m_c + m_ch * m_h
                    n_h = c_h + m_hc * m_c + m_hh * m_h
                    m_c = n_c
                    m_h = n_h
                    tl.store(CARRY + (b * S + s2 - 1) * 2 * D + d, m_c, mask=last)
                    tl.store(CARRY + (b * S + s2 - 1) * 2 * D + D + d, m_h, mask=last)
                else:
                    cm = (b * S + s2) * 2 * D + d
                    c_h = tl.load(CM + cm, mask=last, other=0.0, cache_modifier=".cg")
                    m_hh = tl.load(CM + cm + D, mask=last, other=0.0, cache_modifier=".cg")
                    m_h = c_h + m_hh * m_h
                    tl.store(CARRY + (b * S + s2 - 1) * D + d, m_h, mask=last)
    else:
        pdp = DP + (b * S + s) * NP * D + d
        tl.store(pdp, acc0, mask=dm)
        tl.store(pdp + D, acc1, mask=dm)
        tl.store(pdp + 2 * D, acc2, mask=dm)
        if LSTM:
            tl.store(pdp + 3 * D, acc3, mask=dm)
            tl.store(pdp + 4 * D, acc4, mask=dm)


# ----------------------------------------------------------------------------- launch functions
# Writing passes launched when unconverged channels may fall back to the exact sequential pass
# (NewtonConfig.on_failure='fallback'): each launch costs CPU time even when it exits at once, and
# contractive cells converge after the first. 'raise' launches all max_iters passes.
FALLBACK_PASS_CAP = 2
# Overrides of the plan for tests and `bench_kernels.py sweep`: segments, BD, num_warps, threads_per_sm,
# single_tps, NB, NB_bwd, tail, tail_eps, maxnreg_bwd.
TUNING: dict = {}
# Steps of each segment the first forward pass walks (its end state from a zero start). At the
# benchmark's default-like init the Jacobian product over 48 steps is <= 2e-9 (32 steps: up to 2e-5,
# above tol/8 = 1.25e-6 for some channels); a larger product makes that program walk its whole segment.
# H100 (bf16 forward, GPU time): 40 steps with ~900 threads per SM beat 48 with 1024 at every
# multi-segment shape ((8, 2048, 1024) ParaGRU 0.116 -> 0.108 ms, ParaLSTM 0.153 -> 0.144 ms;
# (2, 16384, 1024) 0.215 -> 0.202 / 0.286 -> 0.276; (1, 131072, 1024) 0.627 -> 0.621 / 0.880 -> 0.870).
FIRST_PASS_TAIL = 40


# Steps per block (= prefetch depth: the next block's loads are in flight while this block's dependent
# steps run). H200 sweep (kernels/README.md): one segment (few warps per SM, latency exposed) wants
# 8 steps (ParaLSTM backward at (16, 2048, 2048): 0.97 -> 0.69 ms over 4); many segments (the SMs full
# of warps) do best with 4 - deeper blocks only cost registers there.
def _prefetch_steps(which: str, lstm: bool, segments: int) -> int:
    key = "NB" if which == "fwd" else "NB_bwd"
    if key in TUNING:
        return TUNING[key]
    return 8 if segments == 1 else 4


def plan(B: int, T: int, D: int, device, which: str = "fwd", lstm: bool = False) -> tuple[int, int, int, int]:
    """(S, L, BD, num_warps): enough (batch, channel, segment) threads to fill the GPU.

    S = 1 (the plain sequential recurrence, exact in one pass) once B x D channels alone give
    ``threads_per_sm`` threads per SM; otherwise more segments, each at least 32 steps, at most 256
    segments (the coarse walk over segments is sequential per channel)."""
    if "segments" in TUNING:
        S = max(1, min(int(TUNING["segments"]), T))
    else:
        # H100/H200 sweeps (kernels/README.md): one segment once B x D gives 200 threads per SM; else
        # segments up to ~900 (forward) / ~2048 (backward) threads per SM.
        sm = planning_sm_count(device)
        single = TUNING.get("single_tps", 200) * sm
        want = TUNING.get("threads_per_sm", 896 if which == "fwd" else 2048) * sm
        S = 1 if B * D >= single else min(triton.cdiv(want, B * D), max(T // 32, 1), 256)
    L = triton.cdiv(T, S) if T else 1
    S = triton.cdiv(T, L) if T else 1
    # Channels per program: 2 per thread (256 with 4 warps) when segments fill the GPU; 1 per thread
    # with one segment, where twice the warps per SM hide more latency (H200: ParaGRU forward at
    # (16, 2048, 2048) 0.41 -> 0.33 ms, backward 0.80 -> 0.76 ms).
    # The ParaLSTM backward keeps 1 per thread (184 registers at 2; H200 (8, 2048, 1024) bf16: 0.33 ->
    # 0.30 ms).
    width = 128 if S == 1 or (lstm and which == "bwd") else 256
    BD = TUNING.get("BD", width if D >= width else max(triton.next_power_of_2(D), 16))
    num_warps = TUNING.get("num_warps", max(min(BD // 32, 4), 1))
    return S, L, BD, num_warps


def _has_bias(lstm: bool, p: torch.Tensor) -> bool:
    """p holds the recurrent parameters (NP rows), optionally followed by the 3 gates' input bias."""
    NP = 5 if lstm else 3
    if p.shape[0] not in (NP, NP + 3):
        raise ValueError(f"p must have {NP} rows (+3 for the input bias), got {tuple(p.shape)}")
    return p.shape[0] == NP + 3


def shoot_forward(lstm: bool, u, p, h0_rows, smap, max_iters: int, tol: float, damping: float):
    """-> h (B, T, K, D) fp32, iterations (B*D,) int32, residual (B*D,) fp32, failed (B*D,) int32.
    p: (NP, D) recurrent parameters, or (NP + 3, D) with the gates' input bias added to u in the kernel."""
    B, T, _, D = u.shape
    K = 2 if lstm else 1
    has_bias = _has_bias(lstm, p)
    S, L, BD, nw = plan(B, T, D, u.device)
    docs = smap.shape[1] > 1  # else the compact map: starts at t = 0 only
    nb = _prefetch_steps("fwd", lstm, 1 if max_iters == 0 else S)
    dev = u.device
    h = torch.empty(B, T, K, D, device=dev, dtype=torch.float32)
    n = B * D
    nD = triton.cdiv(D, BD)
    if u.stride(-1) != 1:  # the kernels address channels contiguously
        u = u.contiguous()
    strides = u.stride()[:3]
    if S == 1 or max_iters == 0 or T == 0:  # exact in one pass: no iterations, nothing failed
        iters = torch.zeros(n, device=dev, dtype=torch.int32)
        res = torch.zeros(n, device=dev, dtype=torch.float32)
        fail = torch.zeros(n, device=dev, dtype=torch.int32)
        if T:
            launch(_shoot_fwd_kernel, (nD, B, 1),
                   u, p, h0_rows, smap, h, h, h, h, iters, iters, iters, res, T, D, 1, T, *strides,
                   0, tol, damping, T, 0.0, LSTM=lstm, FIRST=True, WRITE=True, COARSE=False, BD=BD, NB=nb, DOCS=docs,
                   HAS_BIAS=has_bias, num_warps=nw)
        return h, iters, res, fail
    # The per-channel outputs (iterations, residual, pending = failed flags) are set by pass 0 for every
    # channel: no fill. One zero fill (each torch op is host time; the small shapes are host-bound) for
    # the segment starts and, as int32 (same element size, zero bits), the arrival counters, the
    # latter 16-byte aligned (Triton specialises pointers on it: no extra kernel variants).
    iters = torch.empty(n, device=dev, dtype=torch.int32)
    res = torch.empty(n, device=dev, dtype=torch.float32)
    pending = torch.empty(n, device=dev, dtype=torch.int32)
    n_start = -(-B * S * K * D // 4) * 4
    zeros = torch.zeros(n_start + n, device=dev, dtype=torch.float32)
    cnt = zeros[n_start:].view(torch.int32)
    start = zeros[:B * S * K * D].view(B, S, K, D)
    end = torch.empty_like(start)
    prod = torch.empty(B, S, K * K, D, device=dev, dtype=torch.float32)
    # Pass 0 walks only each segment's last ``tail`` steps where that fixes its end state to well
    # within tol (see _shoot_fwd_kernel): ~L/tail times less work than walking it all.
    tail = int(TUNING.get("tail", FIRST_PASS_TAIL))
    tail_eps = float(TUNING.get("tail_eps", tol / 8))
    common = (u, p, h0_rows, smap, h, start, end, prod, cnt, pending, iters, res, T, D, S, L, *strides,
              max_iters, tol, damping, tail, tail_eps)
    grid = (nD, B, S)
    # Pass 0 only proposes segment ends from zero starts (the tail of each segment) and marks every
    # channel pending; passes 1.. write h and clear the flag of converged channels.
    launch(_shoot_fwd_kernel, grid, *common, LSTM=lstm, FIRST=True, WRITE=False, COARSE=True, BD=BD, NB=nb, DOCS=docs, HAS_BIAS=has_bias, num_warps=nw)
    for _ in range(max(max_iters, 1)):
        launch(_shoot_fwd_kernel, grid, *common, LSTM=lstm, FIRST=False, WRITE=True, COARSE=True, BD=BD, NB=nb, DOCS=docs, HAS_BIAS=has_bias, num_warps=nw)
    # Channels still pending (above tol): the exact sequential recurrence over the whole sequence; they
    # stay flagged as failed.
    launch(_shoot_fwd_kernel, (nD, B, 1),
           u, p, h0_rows, smap, h, start, end, prod, cnt, pending, iters, res, T, D, 1, T, *strides,
           max_iters, tol, damping, T, 0.0, LSTM=lstm, FIRST=False, WRITE=True, COARSE=False, BD=BD, NB=nb, DOCS=docs,
           HAS_BIAS=has_bias, num_warps=nw)
    return h, iters, res, pending


def shoot_backward(lstm: bool, u, p, h0_rows, smap, h, g):
    """-> du (u's dtype), dp (like p's rows, fp32: with the input bias its last 3 rows are du summed over
    batch and time), dh0 (like h0_rows)."""
    B, T, _, D = u.shape
    K = 2 if lstm else 1
    NP = 5 if lstm else 3
    has_bias = _has_bias(lstm, p)
    S, L, BD, nw = plan(B, T, D, u.device, "bwd", lstm)
    docs = smap.shape[1] > 1  # else the compact map: starts at t = 0 only
    nb = _prefetch_steps("bwd", lstm, S)
    dev = u.device
    du = torch.empty(B, T, 3, D, device=dev, dtype=u.dtype)
    # dh0: only the rows some sequence starts from are written; with it (one zero fill) the arrival
    # counters of the multi-segment pass A.
    off = -(-h0_rows.numel() // 4) * 4  # the counters 16-byte aligned (Triton specialises on it)
    zeros = torch.zeros(off + B * D, device=dev, dtype=torch.float32)
    dh0 = zeros[:h0_rows.numel()].view(h0_rows.shape)
    if T == 0:
        return du, torch.zeros(p.shape[0], D, device=dev, dtype=torch.float32), dh0
    dp = torch.empty(B, S, NP, D, device=dev, dtype=torch.float32)  # every (row, segment) writes its part
    nD = triton.cdiv(D, BD)
    carry = torch.empty(B, S, K, D, device=dev, dtype=torch.float32)  # pass A writes all S (read only if S > 1)
    if u.stride(-1) != 1:  # the kernels address channels contiguously
        u = u.contiguous()
    if g.stride(-1) != 1:
        g = g.contiguous()
    strides = (T, D, S, L, *u.stride()[:3], *g.stride()[:3])
    opts = {}
    if "maxnreg_bwd" in TUNING:
        opts["maxnreg"] = TUNING["maxnreg_bwd"]
    elif u.is_cuda and not lstm and S == 1 and nD * B > 3 * planning_sm_count(dev):
        # The one-segment ParaGRU backward compiles to ~155 registers: 3 programs per SM, so more
        # than 3 x SMs programs run in two waves. Capped at 128 (no spills on sm_90), 4 fit: H100
        # (32, 2048, 2048) bf16 1.45 -> 1.12 ms. Not below that (one wave either way: 0.70 -> 0.76
        # ms at (16, 2048, 2048)), nor for ParaLSTM (spills: 1.70 -> 2.30 ms).
        opts["maxnreg"] = 128
    if S > 1:
        cm = torch.empty(B, S, K + K * K, D, device=dev, dtype=torch.float32)
        cnt = zeros[off:].view(torch.int32)
        launch(_shoot_bwd_kernel, (nD, B, S), u, p, h0_rows, smap, h, g, du, dp, dh0, carry, cm, cnt, *strides,
               LSTM=lstm, PASS_A=True, BD=BD, NB=nb, DOCS=docs, HAS_BIAS=has_bias, num_warps=nw, **opts)
    launch(_shoot_bwd_kernel, (nD, B, S), u, p, h0_rows, smap, h, g, du, dp, dh0, carry, carry, carry, *strides,
           LSTM=lstm, PASS_A=False, BD=BD, NB=nb, DOCS=docs, HAS_BIAS=has_bias, num_warps=nw, **opts)
    dp = dp.sum((0, 1))
    if has_bias:  # d bias = du summed over batch and time (one reduction; not in the kernel's registers)
        dp = torch.cat((dp, du.sum((0, 1), dtype=torch.float32)))
    return du, dp, dh0
