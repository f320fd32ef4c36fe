"""Depthwise causal conv over time (+ optional SiLU) that never reads across a document start.

    a[b, t, c] = bias[c] + sum_{j<K} weight[c, K-1-j] * x[b, t-j, c] * [positions[b, t] >= j]
    y = silu(a) (or a)

The short conv of the ParaGRU / ParaLSTM / Mamba2 mixers (models/layers.py ``CausalConv1d`` holds the
parameters and the PyTorch reference). Written out in PyTorch and compiled, inductor lowered the conv,
its SiLU, the recomputation of both in the backward and the weight gradient as four to five
elementwise/reduction kernels per layer at 0.2-0.8 TB/s (H200, 400M ParaGRU step: ~17 ms of ~180).
Here: one forward kernel (x read in place through its strides, e.g. a chunk of the in-projection's
output; y written once) and two backward kernels: one recomputes a, writes g = dL/da and the
per-(row, token chunk) partial sums of d weight and d bias (reduced by one small sum - deterministic,
no atomics); one gathers dx from g at the K - 1 following tokens. Accumulation in fp32 whatever the
input dtype.

Eager calls go through the plain autograd.Function ``_CausalConv1d`` (no torch.library dispatch host
cost); under ``torch.compile`` the same code runs as the opaque ops ``pararnn::causal_conv1d`` and
``pararnn::causal_conv1d_backward`` (with fakes and registered autograd).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cells.fused_common import sm_count
from .launch import launch
from .modes import triton_usable

# Tiles (tokens, channels, warps[, token blocks per program]); H200 sweeps, 400M layer, bf16.
_FWD_TILE = (32, 128, 4)
_BWD_G_TILE = (32, 64, 2, 16)
_BWD_DX_TILE = (32, 64, 2)


@triton.jit
def _sigmoid(a):
    return 1.0 / (1.0 + tl.exp(-a))


@triton.jit
def _conv_at(X, W, bias, pos_s, s, c, s_ok, cm, sXt, sWc, sWk, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Pre-activation a at tokens s (a (BT,) vector of one row; X points at that row) for channels c."""
    a = tl.zeros([BT, BC], dtype=tl.float32) + bias[None, :]
    for i in tl.static_range(K):
        w = tl.load(W + c * sWc + (K - 1 - i) * sWk, mask=cm, other=0.0).to(tl.float32)
        m = s_ok & (pos_s >= i) & (s >= i)
        xv = tl.load(X + (s - i).to(tl.int64)[:, None] * sXt + c[None, :], mask=m[:, None] & cm[None, :], other=0.0)
        a += xv.to(tl.float32) * w[None, :]
    return a


@triton.jit
def _conv_fwd_kernel(X, W, BIAS, POS, Y, T, C, sXb, sXt, sWc, sWk, sPb, sPt, sYb, sYt,
                     K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr):
    """Program: a (BT tokens, BC channels) tile of one batch row."""
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    tm, cm = t < T, c < C
    pos = tl.load(POS + b * sPb + t * sPt, mask=tm, other=0)
    bias = tl.load(BIAS + c, mask=cm, other=0.0).to(tl.float32)
    a = _conv_at(X + b * sXb, W, bias, pos, t, c, tm, cm, sXt, sWc, sWk, K, BT, BC)
    if SILU:
        a = a * _sigmoid(a)
    tl.store(Y + b * sYb + t.to(tl.int64)[:, None] * sYt + c[None, :], a.to(Y.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


@triton.jit
def _conv_bwd_g_kernel(X, W, BIAS, POS, DY, G, DWP, DBP, T, C, n_chunks, sXb, sXt, sWc, sWk, sPb, sPt,
                       sDYb, sDYt, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                       TB: tl.constexpr, SILU: tl.constexpr):
    """Backward, pass 1: g = dy * silu'(a) (a recomputed from the K taps, fp32) written to G (B, T, C) in
    G's dtype, and the partial sums (from g before any rounding) of d weight (DWP[row, c, k]) and d bias (DBP[row, c]) over this program's TB
    token blocks of BT."""
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    c = pid_c * BC + tl.arange(0, BC)
    cm = c < C
    kk = tl.arange(0, KP)
    Xb, POSb = X + b * sXb, POS + b * sPb
    bias = tl.load(BIAS + c, mask=cm, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([KP, BC], dtype=tl.float32)
    db_acc = tl.zeros([BC], dtype=tl.float32)
    for blk in range(TB):
        t = (pid_t * TB + blk) * BT + tl.arange(0, BT)
        tm = t < T
        t64 = t.to(tl.int64)
        pos = tl.load(POSb + t * sPt, mask=tm, other=0)
        g = tl.load(DY + b * sDYb + t64[:, None] * sDYt + c[None, :], mask=tm[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)
        if SILU:
            a = _conv_at(Xb, W, bias, pos, t, c, tm, cm, sXt, sWc, sWk, K, BT, BC)
            sig = _sigmoid(a)
            g = g * sig * (1.0 + a * (1.0 - sig))
        tl.store(G + (b * T + t64)[:, None] * C + c[None, :], g.to(G.dtype.element_ty), mask=tm[:, None] & cm[None, :])
        db_acc += tl.sum(g, axis=0)
        for i in tl.static_range(K):  # the taps again (cache hits): d weight[c, K-1-i] += g[t] x[t-i]
            m = tm & (pos >= i) & (t >= i)
            xv = tl.load(Xb + (t - i).to(tl.int64)[:, None] * sXt + c[None, :], mask=m[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            dw_acc += tl.where(kk[:, None] == K - 1 - i, tl.sum(g * xv, axis=0)[None, :], 0.0)
    row = b * n_chunks + pid_t
    tl.store(DWP + (row * C + c[None, :]) * K + kk[:, None], dw_acc, mask=(kk[:, None] < K) & cm[None, :])
    tl.store(DBP + row * C + c, db_acc, mask=cm)


@triton.jit
def _conv_bwd_dx_kernel(G, W, POS, DX, T, C, sWc, sWk, sPb, sPt, sDXb, sDXt,
                        K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Backward, pass 2: dx[t] = sum_j w[K-1-j] g[t+j] [pos[t+j] >= j] - the forward's taps, looking ahead."""
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    tm, cm = t < T, c < C
    dx = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        s = t + j
        m = (s < T) & (tl.load(POS + b * sPb + s * sPt, mask=s < T, other=0) >= j)
        w = tl.load(W + c * sWc + (K - 1 - j) * sWk, mask=cm, other=0.0).to(tl.float32)
        g = tl.load(G + (b * T + s.to(tl.int64))[:, None] * C + c[None, :], mask=m[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)
        dx += g * w[None, :]
    tl.store(DX + b * sDXb + t.to(tl.int64)[:, None] * sDXt + c[None, :], dx.to(DX.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


def supported(x: torch.Tensor) -> bool:
    """Where the Triton kernels run: CUDA (or the CPU interpreter), fp32/bf16/fp16, unit channel stride."""
    return triton_usable(x) and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.stride(-1) == 1


def _check(x, weight, bias, positions):
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or bias.shape != (C,) or positions.shape != (B, T):
        raise ValueError(f"causal_conv1d: x (B, T, C), weight (C, K), bias (C,), positions (B, T) expected, got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(positions.shape)}")
    if not supported(x):
        raise ValueError(f"causal_conv1d: needs a CUDA tensor (or TRITON_INTERPRET=1) of fp32/bf16/fp16 with "
                         f"unit channel stride, got {x.device} {x.dtype} strides {x.stride()}")


def _forward(x, weight, bias, positions, silu: bool) -> torch.Tensor:
    B, T, C = x.shape
    y = torch.empty(B, T, C, device=x.device, dtype=x.dtype)
    BT, BC, warps = _FWD_TILE
    if y.numel():
        launch(_conv_fwd_kernel, (triton.cdiv(T, BT), triton.cdiv(C, BC), B),
            x, weight, bias, positions, y, T, C, x.stride(0), x.stride(1), *weight.stride(), *positions.stride(),
            y.stride(0), y.stride(1), K=weight.shape[1], BT=BT, BC=BC, SILU=silu, num_warps=warps)
    return y


def _backward(dy, x, weight, bias, positions, silu: bool):
    """-> dx (like x, contiguous), d weight (like weight), d bias (like bias). Two passes through
    g = dL/da: recomputing a at the K - 1 following tokens inside one kernel instead made it 5x the
    forward's loads (H200, 400M layer: 0.48-0.58 ms against the forward's 0.06)."""
    B, T, C = x.shape
    K = weight.shape[1]
    dx = torch.empty(B, T, C, device=x.device, dtype=x.dtype)
    BT, BC, warps, TB = _BWD_G_TILE
    TB = _blocks_per_program(TB, triton.cdiv(T, BT), B * triton.cdiv(C, BC), x.device)
    n_chunks = triton.cdiv(T, BT * TB)
    # g in fp32 for fp32 inputs; 16-bit otherwise (half the bytes; the parameter gradients use g before
    # rounding, and dx is rounded to 16 bits anyway).
    g = torch.empty(B, T, C, device=x.device, dtype=torch.float32 if x.dtype == torch.float32 else x.dtype)
    dwp = torch.empty(B * n_chunks, C, K, device=x.device, dtype=torch.float32)
    dbp = torch.empty(B * n_chunks, C, device=x.device, dtype=torch.float32)
    if dx.numel():
        launch(_conv_bwd_g_kernel, (n_chunks, triton.cdiv(C, BC), B),
            x, weight, bias, positions, dy, g, dwp, dbp, T, C, n_chunks, x.stride(0), x.stride(1),
            *weight.stride(), *positions.stride(), dy.stride(0), dy.stride(1),
            K=K, KP=triton.next_power_of_2(K), BT=BT, BC=BC, TB=TB, SILU=silu, num_warps=warps)
        BT, BC, warps = _BWD_DX_TILE
        launch(_conv_bwd_dx_kernel, (triton.cdiv(T, BT), triton.cdiv(C, BC), B),
            g, weight, positions, dx, T, C, *weight.stride(), *positions.stride(), dx.stride(0), dx.stride(1),
            K=K, BT=BT, BC=BC, num_warps=warps)
    # (no launch: T, C or B is 0, and then so is the partial-sum axis: the sums below are zeros)
    return dx, dwp.sum(0).to(weight.dtype), dbp.sum(0).to(bias.dtype)


def _blocks_per_program(most: int, n_tblocks: int, columns: int, device: torch.device) -> int:
    """Token blocks each pass-1 program walks: up to ``most`` (fewer partial sums to reduce), but on a GPU
    few enough to leave >= 16 programs per SM (H200, 8 x 2048 tokens x 1024 channels: 16 blocks per program
    gave 512 programs of 2 warps, and the compiled ParaGRU layer lost 0.7 ms to this kernel)."""
    tb = min(most, n_tblocks)
    if device.type == "cuda":
        tb = min(tb, max(1, n_tblocks * columns // (16 * sm_count(device))))
    return max(tb, 1)


def _contiguous_channels(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _CausalConv1d(torch.autograd.Function):
    """Eager twin of ``pararnn::causal_conv1d``: same forward/backward, no library dispatch."""

    @staticmethod
    def forward(ctx, x, weight, bias, positions, silu):
        ctx.save_for_backward(x, weight, bias, positions)
        ctx.silu = silu
        return _forward(x, weight, bias, positions, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, positions = ctx.saved_tensors
        dx, dw, db = _backward(_contiguous_channels(dy), x, weight, bias, positions, ctx.silu)
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("pararnn::causal_conv1d", mutates_args=())
def causal_conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
                     silu: bool) -> torch.Tensor:
    """x (B, T, C), weight (C, K), bias (C,), positions (B, T) -> y (B, T, C) contiguous."""
    return _forward(x, weight, bias, positions, silu)


@causal_conv1d_op.register_fake
def _(x, weight, bias, positions, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("pararnn::causal_conv1d_backward", mutates_args=())
def causal_conv1d_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              positions: torch.Tensor, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (B, T, C) contiguous, d weight, d bias)."""
    return _backward(_contiguous_channels(dy), x, weight, bias, positions, silu)


@causal_conv1d_backward_op.register_fake
def _(dy, x, weight, bias, positions, silu):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, positions, silu = inputs
    ctx.save_for_backward(x, weight, bias, positions)
    ctx.silu = silu


def _op_backward(ctx, dy):
    x, weight, bias, positions = ctx.saved_tensors
    dx, dw, db = causal_conv1d_backward_op(dy, x, weight, bias, positions, ctx.silu)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None), None, None


causal_conv1d_op.register_autograd(_op_backward, setup_context=_setup_context)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
                  silu: bool = False) -> torch.Tensor:
    """Depthwise causal conv (+ SiLU) with document-start masking, see the module docstring.

    x (B, T, C) with unit channel stride (any other strides), weight (C, K), bias (C,), positions (B, T)
    integer (each token's position in its document) -> y (B, T, C) in x's dtype, contiguous. Gradients
    for x, weight and bias (in their dtypes; accumulated in fp32)."""
    _check(x, weight, bias, positions)
    if torch.compiler.is_compiling():
        return causal_conv1d_op(x, weight, bias, positions, silu)
    return _CausalConv1d.apply(x, weight, bias, positions, silu)
