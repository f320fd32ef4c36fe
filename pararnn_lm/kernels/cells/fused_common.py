"""What the fused ParaGRU / ParaLSTM ops share: Triton math helpers, the start map, the SM count the
launch plans are made for, the convergence-policy plumbing, and the torch.library ops with their
autograd and engine adapter (:class:`FusedCellOps`), built here once for both cells.

Start map: an int32 tensor (B, T): -1 where h_{t-1} is the previous step's state, r >= 0 where step
t starts a sequence/document from initial-state row r of h0_rows (R, K, D). Built on the device
with no host sync from the batch layout (t = 0 starts row b), cu_seqlens, or per-step ``resets``
(documents inside batch rows restart from an extra zero row of h0_rows). The shooting kernels also
take the compact (B, 1) map of one-document-per-row batches (row b starts at t = 0 from row SMAP[b]).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..config import NewtonConfig, NewtonConvergenceError, NewtonStats


# ----------------------------------------------------------------------------- Triton helpers
# On NVIDIA GPUs exp2 and 1/x use the flush-to-zero PTX approximations (one MUFU instruction each,
# <= 2 ulp): the plain forms add range-scaling code for subnormals around every one of them (~8
# instructions per sigmoid), a fifth of a ParaGRU step. Subnormal intermediates cannot change a
# gate: exp2 underflowing to 0 gives sigmoid = 1, tanh = -1, as the exact values round to. The
# interpreter (and any non-CUDA backend) keeps the plain forms.
_LOG2E = tl.constexpr(1.4426950408889634)
FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.version.hip is None)


@triton.jit
def _ptx_f32(x, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def exp2_(x):
    if FAST_MATH:
        return _ptx_f32(x, "ex2.approx.ftz.f32 $0, $1;")
    else:
        return tl.exp2(x)


@triton.jit
def rcp_(x):
    if FAST_MATH:
        return _ptx_f32(x, "rcp.approx.ftz.f32 $0, $1;")
    else:
        return 1.0 / x


@triton.jit
def tanh_(x):
    # tanh from exp (libdevice is not available in the interpreter); exact limits at +-inf.
    return 1.0 - 2.0 * rcp_(exp2_(x * (2.0 * _LOG2E)) + 1.0)


@triton.jit
def sigmoid_(x):
    return rcp_(1.0 + exp2_(x * -_LOG2E))


# ----------------------------------------------------------------------------- host helpers
def start_map_from_cu_seqlens(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """(1, T) int32: document index at each document's first step, -1 elsewhere (empty docs skipped)."""
    cu = cu_seqlens.to(torch.long)
    n = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    idx = torch.where(lengths > 0, cu[:-1], torch.full_like(cu[:-1], T)).clamp(0, T)
    smap = torch.full((T + 1,), -1, dtype=torch.int32, device=cu.device)
    smap.scatter_(0, idx, torch.arange(n, dtype=torch.int32, device=cu.device))
    return smap[:T].unsqueeze(0).contiguous()


_CONSTANTS: dict = {}


def _constant(key: tuple, device, make):
    """A read-only device tensor kept across calls (building one is a kernel launch, and the small eager
    shapes are host-bound). Not kept while torch.compile traces (it would become a graph constant) or a
    CUDA graph captures (the graph's pool owns what it allocates)."""
    if torch.compiler.is_compiling():
        return make()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device: key it by index
        device = torch.device("cuda", torch.cuda.current_device())
    key = (*key, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return make()
        with torch.inference_mode(False):  # a normal tensor (autograd may save it) even under inference_mode
            t = _CONSTANTS[key] = make()
    return t


def compact_start_map(B: int, device) -> torch.Tensor:
    """(B, 1): row b starts at t = 0 from h0 row b and nowhere else. Kernels that accept it skip the
    per-step start test (the shooting kernels); its meaning equals the full map's at T = 1. Read only."""
    return _constant(("compact_map", B), device, lambda: torch.arange(B, dtype=torch.int32, device=device)[:, None])


def sm_count(device: torch.device) -> int | None:
    """SMs of a CUDA device (cached: the launch planners ask on every call), None off the GPU."""
    if device.type != "cuda":
        return None
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def planning_sm_count(device: torch.device) -> int:
    """The SMs a launch plan is made for: the GPU's; off the GPU (the interpreter tests) an H100's 132, so
    the plans are the ones the GPU would run."""
    return sm_count(device) or 132


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def prepare_h0(h0: torch.Tensor | None, R: int, K: int, D: int, device) -> torch.Tensor:
    if h0 is None:  # read only: the kernels never write h0_rows
        return _constant(("zero_h0", R, K, D), device, lambda: torch.zeros(R, K, D, device=device, dtype=torch.float32))
    if h0.dim() != 3 or h0.shape[1:] != (K, D) or h0.shape[0] not in (1, R):
        raise ValueError(f"h0 must be (1 or {R}, {K}, {D}), got {tuple(h0.shape)}")
    return h0.float().expand(R, K, D).contiguous()


def finish_stats(iters: torch.Tensor, res: torch.Tensor, fail: torch.Tensor, newton: NewtonConfig,
                 stats: NewtonStats | None, who: str, mode: str) -> None:
    """Apply the convergence policy. 'raise' syncs on the failure flag; 'fallback' does not (the
    kernels already finished unconverged channels with the exact sequential recurrence), except to fill
    ``stats`` (pass stats=None in tuned loops; the device tensors are in ``stats.device``)."""
    iters, res, fail = iters.detach(), res.detach(), fail.detach()
    if newton.on_failure == "raise":
        if bool(fail.any()):
            r = float(res.max())
            raise NewtonConvergenceError(
                f"Newton did not converge for {who}: scaled residual {r:.3e} > tol after "
                f"{newton.max_iters} iteration(s) in at least one channel (fused kernel). The "
                "recurrence is probably not contractive: bound the recurrent gains, raise max_iters, "
                "or use on_failure='fallback'.")
    if stats is not None:
        stats.record_device(mode, who, iters, res, fail)


# ----------------------------------------------------------------------------- public ops per cell
class _EagerFused(torch.autograd.Function):
    """The eager twin of a FusedCellOps torch.library op: same launch functions, same saved tensors."""

    @staticmethod
    def forward(ctx, ops, u, p, h0_rows, smap, max_iters, tol, damping):
        h, iters, res, fail = ops._fwd_impl(u, p, h0_rows, smap, max_iters, tol, damping)
        ctx.ops = ops
        ctx.save_for_backward(u, p, h0_rows, smap, h)
        ctx.mark_non_differentiable(iters, res, fail)
        return h, iters, res, fail

    @staticmethod
    def backward(ctx, gh, *_):
        u, p, h0_rows, smap, h = ctx.saved_tensors
        du, dp, dh0 = ctx.ops._bwd_impl(u, p, h0_rows, smap, h, gh.contiguous())
        return None, du, dp, dh0, None, None, None, None


class FusedCellOps:
    """The torch.library ops, their autograd and the engine adapter of one fused cell.

    Each cell module provides only its launch functions ``forward(u, p, h0_rows, smap, max_iters,
    tol, damping) -> (h, iters, residual, fail)`` (the last three per (batch row, channel)) and
    ``backward(u, p, h0_rows, smap, h, g) -> (du, dp, dh0)``; everything else is shared here so the
    two cells cannot drift apart. The launch functions take p with G extra rows, the gates' input bias
    (added to u in the kernels), and return its gradient in the same rows of dp. ``pass_cap``: at most
    this many Newton iterations under on_failure='fallback' (each iteration is a kernel launch; the
    exact fallback pass finishes whatever is left).
    """

    def __init__(self, op_name: str, label: str, K: int, G: int, P: int, forward, backward, pass_cap: int):
        self.label, self.K, self.G, self.P, self.pass_cap = label, K, G, P, pass_cap

        def fwd_impl(u, p, h0_rows, smap, max_iters, tol, damping):
            with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
                return forward(u, p, h0_rows, smap, max_iters, tol, damping)

        def bwd_impl(u, p, h0_rows, smap, h, g):
            with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
                return backward(u, p, h0_rows, smap, h, g)

        # Explicit schemas: the ops are built here for both cells, not from annotated module functions.
        self.fwd = torch.library.custom_op(
            f"pararnn::{op_name}_fused_fwd", fwd_impl, mutates_args=(),
            schema="(Tensor u, Tensor p, Tensor h0_rows, Tensor smap, int max_iters, float tol, float damping)"
                   " -> (Tensor, Tensor, Tensor, Tensor)")
        self.bwd = torch.library.custom_op(
            f"pararnn::{op_name}_fused_bwd", bwd_impl, mutates_args=(),
            schema="(Tensor u, Tensor p, Tensor h0_rows, Tensor smap, Tensor h, Tensor g) -> (Tensor, Tensor, Tensor)")

        @self.fwd.register_fake
        def _(u, p, h0_rows, smap, max_iters, tol, damping):
            B, T, _, D = u.shape
            n = B * D  # iterations, residual and failure flag per (batch row, channel)
            return (u.new_empty(B, T, K, D, dtype=torch.float32), u.new_empty(n, dtype=torch.int32),
                    u.new_empty(n, dtype=torch.float32), u.new_empty(n, dtype=torch.int32))

        @self.bwd.register_fake
        def _(u, p, h0_rows, smap, h, g):
            return torch.empty_like(u), p.new_empty(p.shape, dtype=torch.float32), torch.empty_like(h0_rows)

        def setup_context(ctx, inputs, output):
            u, p, h0_rows, smap = inputs[:4]
            ctx.save_for_backward(u, p, h0_rows, smap, output[0])

        def autograd_backward(ctx, gh, *_):
            u, p, h0_rows, smap, h = ctx.saved_tensors
            du, dp, dh0 = self.bwd(u, p, h0_rows, smap, h, gh.contiguous())
            return du, dp, dh0, None, None, None, None

        self.fwd.register_autograd(autograd_backward, setup_context=setup_context)
        self._fwd_impl, self._bwd_impl = fwd_impl, bwd_impl

    def solve(self, u, p, h0_rows, smap, max_iters: int, tol: float, damping: float):
        """-> (h, iters, residual, fail), differentiable in u, p, h0_rows. Under torch.compile the
        torch.library op (traceable, with its fake); in eager mode the same launch functions through a
        plain autograd.Function, skipping the op's Python dispatch layers (H100 host: ~30 us forward,
        40-90 us backward - the eager module at (8, 2048, 1024) is host-bound)."""
        if torch.compiler.is_compiling():
            return self.fwd(u, p, h0_rows, smap, max_iters, tol, damping)
        return _EagerFused.apply(self, u, p, h0_rows, smap, max_iters, tol, damping)

    def run(self, u, p, h0_rows, smap, newton: NewtonConfig, stats: NewtonStats | None, who: str) -> torch.Tensor:
        if u.dim() != 4 or u.shape[2] != self.G:
            raise ValueError(f"fused {self.label}: u must be (B, T, {self.G}, D), got {tuple(u.shape)}")
        D = u.shape[-1]
        if p.dim() != 2 or p.shape[0] not in (self.P, self.P + self.G) or p.shape[1] != D:
            raise ValueError(f"fused {self.label}: p must be ({self.P}, {D}) or ({self.P + self.G}, {D}) with "
                             f"the input bias, got {tuple(p.shape)}")
        tol = newton.tolerance_for(torch.float32)
        max_iters = newton.max_iters
        if newton.on_failure == "fallback":
            max_iters = min(max_iters, self.pass_cap)
        h, iters, res, fail = self.solve(u, p.float().contiguous(), h0_rows, smap,
                                         max_iters, float(tol), float(newton.damping))
        finish_stats(iters, res, fail, newton, stats, who, "fused")
        return h

    def trajectory(self, u: torch.Tensor, p: torch.Tensor, h0: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, newton: NewtonConfig = NewtonConfig(),
              stats: NewtonStats | None = None, name: str | None = None) -> torch.Tensor:
        """The state trajectory (B, T, K, D) fp32, differentiable w.r.t. u, p and h0 (the op called directly:
        no mode registry, the input bias as G extra rows of p)."""
        B, T, _, D = u.shape
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError("cu_seqlens needs B == 1")
            smap = start_map_from_cu_seqlens(cu_seqlens.to(u.device), T)
            R = cu_seqlens.numel() - 1
        else:
            smap = compact_start_map(B, u.device)
            R = B
        h0_rows = prepare_h0(h0, R, self.K, D, u.device)
        return self.run(u, p, h0_rows, smap, newton, stats, name or self.label)

    def mode(self, cell, u, p, h0_rows, layout, newton, stats, name) -> torch.Tensor:
        """Engine adapter: run(cell, u, p, h0_rows, layout, newton, stats, name) -> h (B, T, K, D)."""
        smap = compact_start_map(layout.batch, u.device) if layout.rows_only else layout.start_map()
        return self.run(u, p, h0_rows.float().contiguous(), smap, newton, stats, name or self.label)
