"""Gated RMSNorm of the ParaGRU / ParaLSTM / Mamba2 mixers: one forward kernel, one backward kernel.

    x = y * silu(z)                      (per row of D channels, in fp32)
    out = x * rsqrt(mean(x^2) + eps) * weight

models/layers.py ``GatedRMSNorm`` holds the parameter and the PyTorch reference (which rounds y * silu(z)
to y's dtype before its fp32 statistics; here nothing is rounded before the output). Compiled from
PyTorch for the GPU, the backward's reductions within rows (for dy, dz) and over rows (d weight) are
separate inductor kernels, each reading dout, y and z. Here:

- forward: a program normalises BN whole rows (a row fits in registers); y and z are read in place
  through their row strides (z may be a slice of the in-projection's output, as in Mamba2);
- backward: one pass per row: x and the row's rstd are recomputed from y and z (nothing is saved but the
  inputs), dy and dz are written, and each program adds dout * x * rstd over its rows into one fp32
  partial sum of d weight per channel; the (programs, D) partials are summed after (deterministic, no
  atomics).

Eager calls go through the plain autograd.Function ``_GatedRMSNorm`` (no torch.library dispatch host
cost); under ``torch.compile`` the same launch functions run as the opaque ops ``pararnn::gated_rms_norm``
and ``pararnn::gated_rms_norm_backward`` (with fakes and registered autograd).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cells.fused_common import planning_sm_count, sigmoid_
from .launch import launch
from .modes import triton_usable

# Widest row the kernels hold in registers (a tile is whole rows); wider rows take the PyTorch path. The
# backward at 8192 channels would need 16 values of each tensor per thread at the 16-warp maximum that
# fits an SM's registers: 208 bytes of spills (sm_90).
MAX_WIDTH = 4096
# Tiles (whole rows): forward ~4096 elements, <= 16 values of each tensor per thread (1024 channels: 4 rows,
# 8 warps, 48 registers); backward one row per step of a program's loop, 8 values per thread (1024
# channels: 4 warps, 113 registers; 2048 channels at 16 values per thread took 211). Not swept.
_FWD_TILE_ELEMENTS = 4096
_BWD_TILE_ELEMENTS = 1024
_FWD_VALUES_PER_THREAD = 16
_BWD_VALUES_PER_THREAD = 8
# Backward programs (each walks consecutive rows and writes one fp32 d weight partial): 16 warps per SM, as
# many as are resident at once at ~113 registers, so the grid is one wave; the partials stay small (132
# SMs x 4 programs x 1024 channels x 4 bytes = 2 MB to sum).
_BWD_WARPS_PER_SM = 16


@triton.jit
def _fwd_kernel(Y, Z, W, OUT, N, D, sYn, sZn, eps, BN: tl.constexpr, BD: tl.constexpr):
    """Program: rows [pid * BN, (pid + 1) * BN), all D channels."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    d = tl.arange(0, BD)
    dm = d < D
    m = (n < N)[:, None] & dm[None, :]
    n64 = n.to(tl.int64)[:, None]
    y = tl.load(Y + n64 * sYn + d[None, :], mask=m, other=0.0).to(tl.float32)
    z = tl.load(Z + n64 * sZn + d[None, :], mask=m, other=0.0).to(tl.float32)
    x = y * z * sigmoid_(z)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + d, mask=dm, other=0.0).to(tl.float32)
    tl.store(OUT + n64 * D + d[None, :], (x * rstd[:, None] * w[None, :]).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(Y, Z, W, DOUT, DY, DZ, DWP, N, D, sYn, sZn, sDOn, eps, blocks,
                BN: tl.constexpr, BD: tl.constexpr):
    """Program: ``blocks`` consecutive blocks of BN rows. With xh = x * rstd and g = dout * weight:
    dx = rstd * (g - xh * mean(g * xh)), dy = dx * silu(z), dz = dx * y * silu'(z); the program's sum of
    dout * xh over its rows goes to DWP[pid]."""
    pid = tl.program_id(0)
    d = tl.arange(0, BD)
    dm = d < D
    w = tl.load(W + d, mask=dm, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BD], dtype=tl.float32)
    for i in range(blocks):
        n = (pid * blocks + i) * BN + tl.arange(0, BN)
        m = (n < N)[:, None] & dm[None, :]
        n64 = n.to(tl.int64)[:, None]
        y = tl.load(Y + n64 * sYn + d[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.load(Z + n64 * sZn + d[None, :], mask=m, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + n64 * sDOn + d[None, :], mask=m, other=0.0).to(tl.float32)
        sig = sigmoid_(z)
        s = z * sig
        x = y * s
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        xh = x * rstd[:, None]
        dw_acc += tl.sum(dout * xh, axis=0)
        g = dout * w[None, :]
        dx = rstd[:, None] * (g - xh * (tl.sum(g * xh, axis=1) / D)[:, None])
        tl.store(DY + n64 * D + d[None, :], (dx * s).to(DY.dtype.element_ty), mask=m)
        dz = dx * y * sig * (1.0 + z * (1.0 - sig))
        tl.store(DZ + n64 * D + d[None, :], dz.to(DZ.dtype.element_ty), mask=m)
    tl.store(DWP + pid * D + d, dw_acc, mask=dm)


def supported(y: torch.Tensor, z: torch.Tensor) -> bool:
    """Where the Triton kernels run: CUDA (or the CPU interpreter), fp32/bf16/fp16 y and z of one shape
    with unit channel stride, rows up to MAX_WIDTH channels."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return (triton_usable(y) and y.dtype in dtypes and z.dtype in dtypes and y.shape == z.shape and y.dim() >= 1
            and 0 < y.shape[-1] <= MAX_WIDTH and y.stride(-1) == 1 and z.stride(-1) == 1)


def _tile(D: int, elements: int, values_per_thread: int) -> tuple[int, int, int]:
    """(rows BN, channels BD, warps) of a tile of about ``elements`` values holding whole rows: 4 to 16
    warps, at most ``values_per_thread`` values of each tensor per thread."""
    BD = triton.next_power_of_2(D)
    BN = max(1, elements // BD)
    return BN, BD, max(4, min(16, BN * BD // (32 * values_per_thread)))


def _forward(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
             out_dtype: torch.dtype) -> torch.Tensor:
    """y, z (N, D) with unit channel stride, weight (D,) -> out (N, D) in ``out_dtype``, contiguous."""
    N, D = y.shape
    out = torch.empty(N, D, device=y.device, dtype=out_dtype)
    if N:
        BN, BD, warps = _tile(D, _FWD_TILE_ELEMENTS, _FWD_VALUES_PER_THREAD)
        launch(_fwd_kernel, (triton.cdiv(N, BN),), y, z, weight, out, N, D, y.stride(0), z.stride(0), eps,
               BN=BN, BD=BD, num_warps=warps)
    return out


def _backward(dout: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> dy (like y), dz (like z), d weight (like weight); dy and dz contiguous."""
    N, D = y.shape
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dy = torch.empty(N, D, device=y.device, dtype=y.dtype)
    dz = torch.empty(N, D, device=z.device, dtype=z.dtype)
    if not N:
        return dy, dz, torch.zeros_like(weight)
    BN, BD, warps = _tile(D, _BWD_TILE_ELEMENTS, _BWD_VALUES_PER_THREAD)
    n_blocks = triton.cdiv(N, BN)
    most = max(1, _BWD_WARPS_PER_SM // warps) * planning_sm_count(y.device)
    blocks = triton.cdiv(n_blocks, min(n_blocks, most))
    programs = triton.cdiv(n_blocks, blocks)
    dwp = torch.empty(programs, D, device=y.device, dtype=torch.float32)
    launch(_bwd_kernel, (programs,), y, z, weight, dout, dy, dz, dwp, N, D, y.stride(0), z.stride(0),
           dout.stride(0), eps, blocks, BN=BN, BD=BD, num_warps=warps)
    return dy, dz, dwp.sum(0).to(weight.dtype)


class _GatedRMSNorm(torch.autograd.Function):
    """Eager twin of ``pararnn::gated_rms_norm``: same forward/backward, no library dispatch."""

    @staticmethod
    def forward(ctx, y, z, weight, eps, out_dtype):
        ctx.save_for_backward(y, z, weight)
        ctx.eps = eps
        return _forward(y, z, weight, eps, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        y, z, weight = ctx.saved_tensors
        dy, dz, dw = _backward(dout, y, z, weight, ctx.eps)
        need = ctx.needs_input_grad
        return (dy if need[0] else None), (dz if need[1] else None), (dw if need[2] else None), None, None


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("pararnn::gated_rms_norm", mutates_args=())
def gated_rms_norm_op(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """y, z (N, D), weight (D,) -> out (N, D) in ``out_dtype``, contiguous."""
    return _forward(y, z, weight, eps, out_dtype)


@gated_rms_norm_op.register_fake
def _(y, z, weight, eps, out_dtype):
    return y.new_empty(y.shape, dtype=out_dtype)


@torch.library.custom_op("pararnn::gated_rms_norm_backward", mutates_args=())
def gated_rms_norm_backward_op(dout: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dy (N, D) contiguous, dz (N, D) contiguous, d weight)."""
    return _backward(dout, y, z, weight, eps)


@gated_rms_norm_backward_op.register_fake
def _(dout, y, z, weight, eps):
    return y.new_empty(y.shape), z.new_empty(z.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    y, z, weight, eps, _ = inputs
    ctx.save_for_backward(y, z, weight)
    ctx.eps = eps


def _op_backward(ctx, dout):
    y, z, weight = ctx.saved_tensors
    dy, dz, dw = gated_rms_norm_backward_op(dout, y, z, weight, ctx.eps)
    need = ctx.needs_input_grad
    return (dy if need[0] else None), (dz if need[1] else None), (dw if need[2] else None), None, None


gated_rms_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """rmsnorm(y * silu(z)) * weight over the last axis, see the module docstring.

    y, z (..., D) of one shape (fp32/bf16/fp16, may differ), unit channel stride, any other strides;
    weight (D,) -> out (..., D) in ``out_dtype`` (default y's), contiguous. Gradients for y, z and weight
    in their dtypes (computed in fp32). A mixer passes its recurrence's fp32 output as y with
    ``out_dtype`` the activations' dtype: no rounded copy of y is written, read or kept for the backward."""
    D = y.shape[-1]
    if weight.shape != (D,) or not supported(y, z):
        raise ValueError(f"gated_rms_norm: y, z (..., D) of one shape with unit channel stride, fp32/bf16/fp16, "
                         f"D <= {MAX_WIDTH}, on CUDA (or TRITON_INTERPRET=1), weight (D,) expected; got y "
                         f"{tuple(y.shape)} {y.dtype} strides {y.stride()} on {y.device}, z {tuple(z.shape)} "
                         f"{z.dtype} strides {z.stride()}, weight {tuple(weight.shape)}")
    # Flattening the leading axes is a view for the mixers' tensors (one row stride); the ops take rows.
    y2, z2 = y.reshape(-1, D), z.reshape(-1, D)
    out_dtype = y.dtype if out_dtype is None else out_dtype
    if torch.compiler.is_compiling():
        out = gated_rms_norm_op(y2, z2, weight, eps, out_dtype)
    else:
        out = _GatedRMSNorm.apply(y2, z2, weight, eps, out_dtype)
    return out.view(y.shape)
