"""Triton linear scans over K x K per-channel blocks (K = 1, 2).

    linear_scan_triton(A, b):          x_t = A_t x_{t-1} + b_t,          x_{-1} = 0
    linear_scan_adjoint_triton(A, b):  x_t = b_t + A_{t+1}^T x_{t+1},    x_T = 0

Shapes: A (B, T, K, K, D), b (B, T, K, D), any strides (natural layout, nothing is transposed or
copied). A and b may be fp32 / bf16 / fp16 / fp64 (fp64 is computed in fp32 too: use the torch
references for fp64 work); every product and sum is fp32 in registers. The output has b's dtype and
shape (contiguous). K > 2 raises ValueError (MAX_K).

Algorithm (log-depth in T, no sequential walk over chunks):
  1. one program per (chunk of CT steps, block of BD channels, batch row) scans its chunk in registers
     with ``tl.associative_scan`` and stores only the chunk's aggregate (A_c, b_c);
  2. the NC chunk aggregates form a linear scan of length NC: solved by the same function recursively
     (a single launch once NC <= CT, i.e. two levels up to T = CT^2 = 4096 for CT = 64);
  3. the programs of step 1 rescan their chunk with the carried-in state x_{chunk start - 1} added to
     the first step's b, and store x.
The adjoint runs the same kernels over logical time i = T - 1 - t with A'_i = A_{t+1}^T, so it is
a causal scan in the logical order (including the recursion over chunk aggregates).
Three passes over the inputs' bytes (read A, b twice, write x once); runs on the current stream, no
host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import launch

MAX_K = 2


# ----------------------------------------------------------------------------- raw Triton kernels
@triton.jit
def _combine1(a1, b1, a2, b2):
    # (a2, b2) o (a1, b1): apply step 1 then step 2.
    return a2 * a1, a2 * b1 + b2


@triton.jit
def _combine2(p00, p01, p10, p11, p0, p1, q00, q01, q10, q11, q0, q1):
    # (Q, q) o (P, p) = (Q P, Q p + q) for 2x2 blocks and 2-vectors.
    r00 = q00 * p00 + q01 * p10
    r01 = q00 * p01 + q01 * p11
    r10 = q10 * p00 + q11 * p10
    r11 = q10 * p01 + q11 * p11
    r0 = q00 * p0 + q01 * p1 + q0
    r1 = q10 * p0 + q11 * p1 + q1
    return r00, r01, r10, r11, r0, r1


@triton.jit
def _last_row(x, rows, CT: tl.constexpr):
    return tl.sum(tl.where(rows[:, None] == CT - 1, x, 0.0), axis=0)


@triton.jit
def _scan_chunk_kernel(
    A, Bv, X, AGG_A, AGG_B, CIN,
    T, D, NC,
    sAb, sAt, sAi, sAj, sAd,
    sBb, sBt, sBk, sBd,
    sXb, sXt, sXk, sXd,
    K: tl.constexpr, CT: tl.constexpr, BD: tl.constexpr,
    REVERSE: tl.constexpr, HAS_CIN: tl.constexpr, STORE_X: tl.constexpr, STORE_AGG: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, CT)
    i = pid_c * CT + rows  # logical step
    valid = i < T
    if REVERSE:
        t = T - 1 - i
        ta = t + 1  # A'_i = A_{t+1}^T
        valid_a = valid & (ta < T)
    else:
        t = i
        ta = t
        valid_a = valid
    t = tl.where(valid, t, 0).to(tl.int64)
    ta = tl.where(valid_a, ta, 0).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    m = valid[:, None] & dmask[None, :]
    ma = valid_a[:, None] & dmask[None, :]
    pa = A + pid_b * sAb + ta[:, None] * sAt + d[None, :] * sAd
    pb = Bv + pid_b * sBb + t[:, None] * sBt + d[None, :] * sBd
    # Chunk aggregates and carried-in states live in contiguous fp32 buffers (B, NC, K[, K], D).
    agg_a = AGG_A + (pid_b * NC + pid_c) * (K * K * D) + d
    agg_b = AGG_B + (pid_b * NC + pid_c) * (K * D) + d
    first = rows[:, None] == 0
    if K == 1:
        a = tl.load(pa, mask=ma, other=0.0).to(tl.float32)
        bb = tl.load(pb, mask=m, other=0.0).to(tl.float32)
        if HAS_CIN:
            cin = CIN + (pid_b * NC + pid_c - 1) * D + d
            x0 = tl.load(cin, mask=dmask & ((d * 0 + pid_c) > 0), other=0.0)
            bb = bb + tl.where(first, a * x0[None, :], 0.0)
        a, bb = tl.associative_scan((a, bb), 0, _combine1)
        if STORE_X:
            px = X + pid_b * sXb + t[:, None] * sXt + d[None, :] * sXd
            tl.store(px, bb.to(X.dtype.element_ty), mask=m)
        if STORE_AGG:
            tl.store(agg_a, _last_row(a, rows, CT), mask=dmask)
            tl.store(agg_b, _last_row(bb, rows, CT), mask=dmask)
    else:
        a00 = tl.load(pa, mask=ma, other=0.0).to(tl.float32)
        if REVERSE:  # the adjoint uses the transposed block
            a01 = tl.load(pa + sAi, mask=ma, other=0.0).to(tl.float32)
            a10 = tl.load(pa + sAj, mask=ma, other=0.0).to(tl.float32)
        else:
            a01 = tl.load(pa + sAj, mask=ma, other=0.0).to(tl.float32)
            a10 = tl.load(pa + sAi, mask=ma, other=0.0).to(tl.float32)
        a11 = tl.load(pa + sAi + sAj, mask=ma, other=0.0).to(tl.float32)
        b0 = tl.load(pb, mask=m, other=0.0).to(tl.float32)
        b1 = tl.load(pb + sBk, mask=m, other=0.0).to(tl.float32)
        if HAS_CIN:
            cin = CIN + (pid_b * NC + pid_c - 1) * (2 * D) + d
            cm = dmask & ((d * 0 + pid_c) > 0)
            x0 = tl.load(cin, mask=cm, other=0.0)[None, :]
            x1 = tl.load(cin + D, mask=cm, other=0.0)[None, :]
            b0 = b0 + tl.where(first, a00 * x0 + a01 * x1, 0.0)
            b1 = b1 + tl.where(first, a10 * x0 + a11 * x1, 0.0)
        a00, a01, a10, a11, b0, b1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), 0, _combine2)
        if STORE_X:
            px = X + pid_b * sXb + t[:, None] * sXt + d[None, :] * sXd
            tl.store(px, b0.to(X.dtype.element_ty), mask=m)
            tl.store(px + sXk, b1.to(X.dtype.element_ty), mask=m)
        if STORE_AGG:
            tl.store(agg_a, _last_row(a00, rows, CT), mask=dmask)
            tl.store(agg_a + D, _last_row(a01, rows, CT), mask=dmask)
            tl.store(agg_a + 2 * D, _last_row(a10, rows, CT), mask=dmask)
            tl.store(agg_a + 3 * D, _last_row(a11, rows, CT), mask=dmask)
            tl.store(agg_b, _last_row(b0, rows, CT), mask=dmask)
            tl.store(agg_b + D, _last_row(b1, rows, CT), mask=dmask)


# ----------------------------------------------------------------------------- launch functions
def _tile_shape(D: int, K: int) -> tuple[int, int]:
    """(CT steps, BD channels) of one program's register tile; 2x2 blocks hold 6 tiles, so half the steps."""
    BD = 32 if D >= 32 else max(triton.next_power_of_2(D), 1)
    CT = 64 if K == 1 else 32
    return CT, BD


def _launch(A, b, out, reverse: bool, CT: int | None = None, BD: int | None = None):
    Bn, T, K, _, D = A.shape
    ct, bd = _tile_shape(D, K)
    CT = CT or ct
    BD = BD or bd
    NC = triton.cdiv(T, CT)
    grid = (triton.cdiv(D, BD), NC, Bn)
    common = dict(K=K, CT=CT, BD=BD, REVERSE=reverse, num_warps=4)
    strides = (*A.stride(), *b.stride(), *out.stride())
    if NC == 1:
        dummy = out.new_empty(0, dtype=torch.float32)
        launch(_scan_chunk_kernel, grid, A, b, out, dummy, dummy, dummy, T, D, NC, *strides,
               HAS_CIN=False, STORE_X=True, STORE_AGG=False, **common)
        return out
    agg_a = torch.empty(Bn, NC, K, K, D, device=A.device, dtype=torch.float32)
    agg_b = torch.empty(Bn, NC, K, D, device=A.device, dtype=torch.float32)
    launch(_scan_chunk_kernel, grid, A, b, out, agg_a, agg_b, agg_b, T, D, NC, *strides,
           HAS_CIN=False, STORE_X=False, STORE_AGG=True, **common)
    # Inclusive scan of the chunk aggregates in logical order: x at the end of every chunk.
    x_end = torch.empty_like(agg_b)
    _launch(agg_a, agg_b, x_end, False, CT, BD)
    launch(_scan_chunk_kernel, grid, A, b, out, agg_a, agg_b, x_end, T, D, NC, *strides,
           HAS_CIN=True, STORE_X=True, STORE_AGG=False, **common)
    return out


def _check(A: torch.Tensor, b: torch.Tensor, name: str):
    if A.dim() != 5 or b.dim() != 4:
        raise ValueError(f"{name}: A must be (B, T, K, K, D) and b (B, T, K, D), got {tuple(A.shape)} and {tuple(b.shape)}")
    Bn, T, K, K2, D = A.shape
    if K != K2 or tuple(b.shape) != (Bn, T, K, D):
        raise ValueError(f"{name}: shapes do not match: A {tuple(A.shape)}, b {tuple(b.shape)}")
    if K > MAX_K or K < 1:
        raise ValueError(f"{name}: K={K} per-channel blocks are not supported by the Triton scan (1 <= K <= {MAX_K}); use linear_scan_torch")
    if A.device != b.device:
        raise ValueError(f"{name}: A and b on different devices ({A.device}, {b.device})")


def _scan_impl(A: torch.Tensor, b: torch.Tensor, reverse: bool) -> torch.Tensor:
    out = torch.empty(b.shape, device=b.device, dtype=b.dtype)
    if b.numel() == 0:
        return out
    if b.device.type == "cuda":
        with torch.cuda.device(b.device):
            return _launch(A, b, out, reverse)
    return _launch(A, b, out, reverse)


# ----------------------------------------------------------------------------- autograd + public ops
# Gradients: x = L^{-1} b with L the block-bidiagonal matrix of the scan, so
#   db = L^{-T} gx (the adjoint scan), dA_t = db_t x_{t-1}^T;  and for the adjoint scan x = L^{-T} b:
#   db = L^{-1} gx (the causal scan), dA_{t+1} = x_t db_{t+1}^T... written out below.
@torch.library.custom_op("pararnn::linear_scan", mutates_args=())
def _linear_scan_op(A: torch.Tensor, b: torch.Tensor, reverse: bool) -> torch.Tensor:
    return _scan_impl(A, b, reverse)


@_linear_scan_op.register_fake
def _(A, b, reverse):
    return torch.empty(b.shape, device=b.device, dtype=b.dtype)


def _setup_context(ctx, inputs, output):
    A, b, reverse = inputs
    ctx.reverse = reverse
    ctx.save_for_backward(A, output)


def _backward(ctx, gx):
    A, x = ctx.saved_tensors
    gx = gx.contiguous()
    xf = x.float()
    if not ctx.reverse:
        # x_t = A_t x_{t-1} + b_t  ->  db = adjoint scan of gx; dA_t = db_t x_{t-1}^T.
        db = _linear_scan_op(A, gx, True)
        x_prev = torch.nn.functional.pad(xf[:, :-1], (0, 0, 0, 0, 1, 0))
        dA = db.float().unsqueeze(-2) * x_prev.unsqueeze(-3)  # [..., i, j] = db_i x_prev_j
    else:
        # x_t = b_t + A_{t+1}^T x_{t+1}  ->  db = causal scan of gx with A; dA_{t+1}[j, i] = x_{t+1,j}... :
        # d/dA_{t+1}[j, i] of sum_i db_t,i * (A_{t+1}^T x_{t+1})_i = db_{t,i} x_{t+1,j}.
        db = _linear_scan_op(A, gx, False)
        db_prev = torch.nn.functional.pad(db.float()[:, :-1], (0, 0, 0, 0, 1, 0))  # db_{t-1} at t
        dA = xf.unsqueeze(-2) * db_prev.unsqueeze(-3)  # [..., j, i] = x_{t,j} db_{t-1,i}
    return dA.to(A.dtype), db.to(gx.dtype), None


_linear_scan_op.register_autograd(_backward, setup_context=_setup_context)


def linear_scan_triton(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = A_t x_{t-1} + b_t along dim 1, x_{-1} = 0. A (B,T,K,K,D), b (B,T,K,D) -> x like b."""
    _check(A, b, "linear_scan_triton")
    return _linear_scan_op(A, b, False)


def linear_scan_adjoint_triton(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = b_t + A_{t+1}^T x_{t+1} along dim 1, x_T = 0. A (B,T,K,K,D), b (B,T,K,D) -> x like b."""
    _check(A, b, "linear_scan_adjoint_triton")
    return _linear_scan_op(A, b, True)
