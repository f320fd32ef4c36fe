"""The per-head (block-diagonal) input projection x -> pre-activations, without layout copies.

``torch.einsum("...hi,higj->...ghj", x, W)`` runs one batched GEMM over heads, but it must first
permute x to (heads, tokens, i) and then the result from (heads, tokens, g, j) to the cell's
(tokens, g, heads, j) layout - full copies of the largest tensor of the layer (H100, (8, 2048,
1024) bf16, 16 heads: 0.19 ms forward, of which the GEMM is 0.05 ms), and back in the backward.
Here the forward's GEMMs read x and write u in place through strided views (a head's block of x
is a (tokens, head_dim) matrix with leading dimension dim; gate g of a head's block of u one with
leading dimension G * dim), one GEMM per gate; 16-bit heads up to 128 wide instead take one Triton
launch that reads each tile of x once and writes every gate (the three GEMMs and their views cost more
host time than the GPU spends on them at narrow heads). The backward, 16-bit on the GPU: dx from a Triton GEMM
per head whose K loop walks the gates (reading du in place); dW, for heads up to 128 wide, from a Triton
kernel summing x^T du over token chunks (fp32 partials, summed after), for wider heads as one strided
GEMM per gate written in place; otherwise (fp32/fp64, CPU) one head-major copy of du so that dx and dW
are single GEMMs over all gates with cuBLAS's numerics (and the fp32 split-K weight gradient below).

Where which: eager calls go through the plain autograd.Function ``_HeadProjection`` (the
torch.library dispatch costs ~30-90 us of host time per call, as for the fused cells); under
``torch.compile`` the same forward/backward run as the opaque ops ``pararnn::head_projection`` and
``pararnn::head_projection_backward`` (with fakes and registered autograd). Inductor would otherwise
lower the einsum with its permutes as separate copy kernels (H100, 400M ParaGRU step: ~6.5 ms over
24 layers). The ops take x flattened to 2-D (any strides) and return fresh contiguous tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cells.fused_common import planning_sm_count
from .launch import launch
from .modes import triton_usable


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """(N, H * dh) with unit channel stride -> the (H, N, dh) view of its head blocks."""
    return t.unflatten(-1, (H, -1)).transpose(0, 1)


def _triton_16bit(weight: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """What every Triton path of this op needs: CUDA (or the interpreter), 16-bit tensors of the weight's
    dtype (fp32 and fp64 keep cuBLAS's numerics), unit channel strides, a head width tl.dot takes (a
    power of two >= 16)."""
    dh = weight.shape[1]
    return (triton_usable(tensors[0]) and weight.dtype in (torch.bfloat16, torch.float16) and dh >= 16
            and dh & (dh - 1) == 0 and all(t.dtype == weight.dtype and t.stride(-1) == 1 for t in tensors))


@triton.jit
def _fwd_kernel(X, W, U, N, sXn, sWh, sWi, sWg, sWj, sUn, sUg,
                G: tl.constexpr, DH: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr):
    """u[n, g, h*DH + j] = sum_i x[n, h*DH + i] * W[h, i, g, j] for narrow heads: the whole head is one
    K block, so a program reads its (BN tokens, DH) tile of x once and writes all G gates' outputs."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    n64 = n.to(tl.int64)
    k = tl.arange(0, DH)
    x = tl.load(X + n64[:, None] * sXn + (h * DH + k)[None, :], mask=nmask[:, None], other=0.0)
    if UPCAST:  # the CPU interpreter has no bf16 dot
        x = x.to(tl.float32)
    for g in tl.static_range(G):
        w = tl.load(W + h * sWh + k[:, None] * sWi + g * sWg + k[None, :] * sWj)  # W[h, :, g, :]
        if UPCAST:
            w = w.to(tl.float32)
        acc = tl.dot(x, w)
        tl.store(U + n64[:, None] * sUn + g * sUg + (h * DH + k)[None, :], acc.to(U.dtype.element_ty),
                 mask=nmask[:, None])


# Widest head the one-pass forward takes on CUDA; wider heads are K-looped GEMMs, cuBLAS's ground.
NARROW_FORWARD_MAX_HEAD = 128


def _triton_fwd_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The one-launch forward (heads up to NARROW_FORWARD_MAX_HEAD wide, see _triton_16bit). Narrow heads
    are where the per-gate GEMMs cost most: 3 cuBLAS calls + ~15 view ops of host time (~0.2 ms on an H200
    host at (8, 2048, 1024), 16 heads) for ~0.05-0.09 ms of GPU work."""
    return weight.shape[1] <= NARROW_FORWARD_MAX_HEAD and _triton_16bit(weight, x)


def _forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, H * dh) (any strides), weight (H, dh, G, dh) -> u (N, G, H * dh), a fresh contiguous
    tensor: for narrow 16-bit heads from one Triton launch, otherwise one strided GEMM per gate."""
    H, dh, G, _ = weight.shape
    N, D = x.shape
    u = x.new_empty(N, G, D)
    if N and _triton_fwd_ok(x, weight):
        BN = 128 if dh <= 64 else 64
        launch(_fwd_kernel, (triton.cdiv(N, BN), H), x, weight, u, N, x.stride(0), *weight.stride(),
               u.stride(0), u.stride(1), G=G, DH=dh, BN=BN, UPCAST=not x.is_cuda, num_warps=4)
        return u
    xh = _heads(x, H)
    for g in range(G):
        torch.bmm(xh, weight[:, :, g, :], out=_heads(u[:, g], H))
    return u


@triton.jit
def _dx_kernel(DU, W, DX, N, sDUn, sDUg, sWh, sWi, sWg, sWj, sDXn,
               G: tl.constexpr, DH: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
               UPCAST: tl.constexpr):
    """dx[n, h*DH + i] = sum_g sum_j du[n, g, h*DH + j] * W[h, i, g, j]: a GEMM per head whose K loop walks
    the G gates (and DH in chunks of BK), reading du in its natural (N, G, H*DH) layout. Program: a
    (BN tokens, BI output channels) tile of one head."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    pid_i = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    i = pid_i * BI + tl.arange(0, BI)
    kk = tl.arange(0, BK)
    n64 = n.to(tl.int64)
    acc = tl.zeros([BN, BI], dtype=tl.float32)
    for g in tl.static_range(G):
        for k0 in range(0, DH, BK):
            j = k0 + kk
            du = tl.load(DU + n64[:, None] * sDUn + g * sDUg + (h * DH + j)[None, :], mask=nmask[:, None], other=0.0)
            w = tl.load(W + h * sWh + i[None, :] * sWi + g * sWg + j[:, None] * sWj)  # (j, i) tile of W[h, :, g, :]^T
            if UPCAST:  # the CPU interpreter has no bf16 dot
                acc += tl.dot(du.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(du, w)
    tl.store(DX + n64[:, None] * sDXn + (h * DH + i)[None, :], acc.to(DX.dtype.element_ty), mask=nmask[:, None])


def _triton_dx_ok(du: torch.Tensor, weight: torch.Tensor) -> bool:
    """The copy-free path (see _triton_16bit). On CUDA only from 128-wide heads:
    H200 bf16 backward, copy + cuBLAS vs copy-free: 4 x 256 (400M) 0.419 -> 0.385 ms, 4 x 1024 (7B)
    0.418 -> 0.349, but 16 x 64 0.216 -> 0.243 (cuBLAS's GEMM beats this kernel by more than the copy)."""
    return weight.shape[1] >= (128 if du.is_cuda else 16) and _triton_16bit(weight, du)


def _dx_triton(du: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """du (N, G, H * dh) with unit channel stride, weight (H, dh, G, dh) -> dx (N, H * dh) contiguous."""
    H, dh, G, _ = weight.shape
    N = du.shape[0]
    dx = du.new_empty(N, H * dh)
    BN, BI, BK = 128, min(dh, 128), min(dh, 64)
    launch(_dx_kernel, (triton.cdiv(N, BN), H, dh // BI),
        du, weight, dx, N, du.stride(0), du.stride(1), *weight.stride(), dx.stride(0),
        G=G, DH=dh, BN=BN, BI=BI, BK=BK, UPCAST=not du.is_cuda and du.dtype == torch.bfloat16,
        num_warps=8 if BI == 128 else 4, num_stages=3)
    return dx


@triton.jit
def _dw_kernel(X, DU, PART, N, CHUNK, sXn, sDUn, sDUg, sPc, sPh, sPi, sPg,
               DH: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr):
    """Partial weight gradient of one (token chunk, head, gate): PART[c, h, i, g, j] = sum over the chunk's
    tokens n of x[n, h*DH + i] * du[n, g, h*DH + j], in fp32; the chunks are summed afterwards (no atomics:
    deterministic). x and du are read in place, one (BN, DH) tile of each per step."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    k = tl.arange(0, DH)
    acc = tl.zeros([DH, DH], dtype=tl.float32)
    for off in range(0, CHUNK, BN):
        n = c * CHUNK + off + tl.arange(0, BN)
        nmask = n < N
        n64 = n.to(tl.int64)
        x = tl.load(X + n64[:, None] * sXn + (h * DH + k)[None, :], mask=nmask[:, None], other=0.0)
        du = tl.load(DU + n64[:, None] * sDUn + g * sDUg + (h * DH + k)[None, :], mask=nmask[:, None], other=0.0)
        if UPCAST:  # the CPU interpreter has no bf16 dot
            x = x.to(tl.float32)
            du = du.to(tl.float32)
        acc += tl.dot(tl.trans(x), du)
    tl.store(PART + c * sPc + h * sPh + k[:, None] * sPi + g * sPg + k[None, :], acc)


# Widest head the two-kernel backward (dx and dW straight from du, no copy, no cuBLAS) takes on CUDA.
NARROW_BACKWARD_MAX_HEAD = 128


def _narrow_backward_ok(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """16-bit heads up to NARROW_BACKWARD_MAX_HEAD wide (see _triton_16bit): both gradients from Triton
    kernels reading du in place, against the head-major copy of du and two cuBLAS calls with their ~10
    view ops (H100, 16 x 64, N = 16384: 0.256 -> 0.125 ms of GPU time, and far less host work)."""
    return weight.shape[1] <= NARROW_BACKWARD_MAX_HEAD and du.shape[0] > 0 and _triton_16bit(weight, du, x)


def _dw_triton(x: torch.Tensor, du: torch.Tensor, weight_shape) -> torch.Tensor:
    """x (N, H * dh), du (N, G, H * dh), both with unit channel stride -> dw (H, dh, G, dh) in x's dtype."""
    H, dh, G, _ = weight_shape
    N = x.shape[0]
    BN, warps = (128, 4) if dh <= 64 else (64, 8)
    # Enough (chunk, head, gate) programs for ~2 per SM; each chunk a whole number of token tiles.
    chunks = max(1, min(triton.cdiv(N, BN), triton.cdiv(2 * planning_sm_count(x.device), H * G)))
    chunk = triton.cdiv(triton.cdiv(N, chunks), BN) * BN
    chunks = triton.cdiv(N, chunk)
    part = torch.empty(chunks, H, dh, G, dh, device=x.device, dtype=torch.float32)
    launch(_dw_kernel, (chunks, H, G), x, du, part, N, chunk, x.stride(0), du.stride(0), du.stride(1),
           *part.stride()[:4], DH=dh, BN=BN, UPCAST=not x.is_cuda, num_warps=warps)
    return (part[0] if chunks == 1 else part.sum(0)).to(x.dtype)


def _backward(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_dx: bool, need_dw: bool):
    """-> (dx, dw): dx (N, H * dh) contiguous, dw like weight (contiguous, x's dtype); None where
    not needed."""
    H, dh, G, _ = weight.shape
    N = x.shape[0]
    if _narrow_backward_ok(du, x, weight):
        return (_dx_triton(du, weight) if need_dx else None), (_dw_triton(x, du, weight.shape) if need_dw else None)
    if _triton_dx_ok(du, weight) and _k_splits(N, H, dh, G * dh, x.device, x.dtype) == 1:
        # No head-major copy of du (H100/H200 400M step: 24 x ~0.26 ms): dx from a Triton kernel whose K
        # loop walks the gates, dW as one strided GEMM per gate written in place into dw[:, :, g, :].
        dx = _dx_triton(du, weight) if need_dx else None
        dw = None
        if need_dw:
            dw = x.new_empty(weight.shape)
            xt = _heads(x, H).transpose(1, 2)
            for g in range(G):
                torch.bmm(xt, _heads(du[:, g], H), out=dw[:, :, g, :])
        return dx, dw
    # The gradient GEMMs reduce over all G gates at once (K = G * dh for dx, fp32 accumulation
    # inside one GEMM; one wide dW GEMM per head): that needs du head-major, one copy of it.
    du_heads = du.reshape(N, G, H, dh).permute(2, 0, 1, 3).reshape(H, N, G * dh)
    dx = dw = None
    if need_dx:
        dx = x.new_empty(x.shape)
        torch.bmm(du_heads, weight.reshape(H, dh, G * dh).transpose(1, 2), out=_heads(dx, H))
    if need_dw:
        splits = _k_splits(N, H, dh, G * dh, x.device, x.dtype)
        dw = _weight_grad(x, du_heads, H, splits).view(weight.shape)
    return dx, dw


class _HeadProjection(torch.autograd.Function):
    """Eager twin of ``pararnn::head_projection``: same forward/backward, no library dispatch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _forward(x, weight)

    @staticmethod
    def backward(ctx, du: torch.Tensor):
        x, weight = ctx.saved_tensors
        return _backward(du, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("pararnn::head_projection", mutates_args=())
def head_projection_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, H * dh), weight (H, dh, G, dh) -> u (N, G, H * dh) contiguous."""
    return _forward(x, weight)


@head_projection_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[2], x.shape[1])


# Grads not asked for come back as empty (0,) placeholders (an op cannot return None); the flags
# are compile-time constants, so the unused GEMM is not run (x of the first layer, frozen weights).
@torch.library.custom_op("pararnn::head_projection_backward", mutates_args=())
def head_projection_backward_op(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx (N, H * dh) contiguous, dw like weight); each an empty (0,) tensor when not needed."""
    dx, dw = _backward(du, x, weight, need_dx, need_dw)
    return (x.new_empty(0) if dx is None else dx), (weight.new_empty(0) if dw is None else dw)


@head_projection_backward_op.register_fake
def _(du, x, weight, need_dx, need_dw):
    return (x.new_empty(x.shape if need_dx else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _op_backward(ctx, du):
    x, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dw):
        return None, None
    dx, dw = head_projection_backward_op(du, x, weight, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None)


head_projection_op.register_autograd(_op_backward, setup_context=_setup_context)


def _k_splits(N: int, H: int, dh: int, width: int, device: torch.device, dtype: torch.dtype) -> int:
    """Chunks of the token axis for the weight-gradient GEMM. dW of a head is (dh, G * dh) reduced
    over all N tokens: with 16 heads of 64 that is ~32 output tiles for 132 SMs, each walking 16k
    tokens (H100 fp32, (8, 2048, 1024): 0.6 ms, the largest kernel of the module's backward). Split
    the reduction until there are ~4 tiles per SM, each chunk >= 512 tokens, a power of two dividing N
    (H100, module fwd+bwd GPU time: (8, 2048, 1024) 2.06 -> 1.71 ms, (2, 16384, 1024) 4.01 -> 3.27).
    fp32 only: cuBLAS's bf16 kernels already keep the SMs busy there, and the split's copy of x and
    its reduction made the bf16 module 3-5% slower."""
    if device.type != "cuda" or dtype != torch.float32:
        return 1
    tiles = H * -(-dh // 128) * -(-width // 128)
    want = -(-4 * torch.cuda.get_device_properties(device).multi_processor_count // tiles)
    splits = 1
    while splits * 2 <= min(want, N // 512) and N % (splits * 2) == 0:
        splits *= 2
    return splits


def _weight_grad(x: torch.Tensor, du_heads: torch.Tensor, H: int, splits: int) -> torch.Tensor:
    """x (N, H * dh), du_heads (H, N, W) -> (H, dh, W) in x's dtype, accumulated in fp32; the token
    axis in ``splits`` chunks (a divisor of N)."""
    N, D = x.shape
    dh, width = D // H, du_heads.shape[-1]
    if splits == 1:
        dw = x.new_empty(H, dh, width)
        return torch.bmm(_heads(x, H).transpose(1, 2), du_heads, out=dw)
    # Split-K by hand: (H * splits) GEMMs over N / splits tokens each, partial sums kept in fp32 (or
    # fp64), then one reduction. Needs x head-major: one copy of x.
    xh = _heads(x, H).contiguous().view(H * splits, N // splits, dh).transpose(1, 2)
    dub = du_heads.reshape(H * splits, N // splits, width)
    if x.dtype not in (torch.float32, torch.float64):  # 16-bit: only reached by direct calls (tests)
        xh, dub = xh.float(), dub.float()
    return torch.bmm(xh, dub).view(H, splits, dh, width).sum(1).to(x.dtype)


def head_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., H * dh), weight (H, dh, G, dh) -> u (..., G, H * dh): u[..., g, h*dh + j] =
    sum_i x[..., h*dh + i] * weight[h, i, g, j]. Same dtype as x (cast the weight first)."""
    H, dh, G, dh2 = weight.shape
    if dh != dh2 or x.shape[-1] != H * dh:
        raise ValueError(f"head_projection: x (..., {H * dh}) and weight (H, dh, G, dh) expected, "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"head_projection: x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    x2 = x.reshape(-1, H * dh)
    # Compiled: the opaque library op (traceable, with its fake); eager: the same code through a
    # plain autograd.Function, skipping the op's dispatch layers (host time).
    if torch.compiler.is_compiling():
        u = head_projection_op(x2, weight)
    else:
        u = _HeadProjection.apply(x2, weight)
    return u.view(*x.shape[:-1], G, H * dh)
