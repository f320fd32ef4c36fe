"""Building blocks shared by the mixers: norms, SwiGLU, the document-aware causal conv, RoPE, init."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .engine import (fused_causal_conv1d, fused_causal_conv1d_supported, fused_gated_rms_norm,
                     fused_gated_rms_norm_supported)


def trunc_normal_init_(weight: torch.Tensor, std: float) -> None:
    """DCLM / open_lm style: truncated normal at +-3 std."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 so bf16 activations keep a stable scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """Mamba2-style gated norm: RMSNorm(y * silu(z)) (the gate is applied before normalising).

    On CUDA it runs the engine's fused Triton kernels (kernels/gated_norm.py: one kernel forward, one
    backward, y and z read in place, y * silu(z) kept in fp32 where the code below rounds it to y's dtype);
    ``fused`` forces them on (tests, under TRITON_INTERPRET) or off. Otherwise - CPU, exports without the
    project - the PyTorch code below, which is also the reference the kernels are tested against.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps)
        self.fused: bool | None = None  # None: on CUDA when the engine provides the kernels

    def _use_fused(self, y: torch.Tensor, z: torch.Tensor) -> bool:
        if fused_gated_rms_norm is None or self.fused is False:
            return False
        return bool(self.fused) or (y.is_cuda and fused_gated_rms_norm_supported(y, z))

    def reads_fp32(self, z: torch.Tensor) -> bool:
        """Whether :meth:`forward` with this gate reads an fp32 ``y`` as it is (the fused kernels): a mixer
        then hands over its recurrence's fp32 output instead of a rounded copy."""
        return self._use_fused(z, z)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The output is in z's dtype (the activations'), whatever y's."""
        if self._use_fused(y, z):
            return fused_gated_rms_norm(y, z, self.weight, self.eps, out_dtype=z.dtype)
        return super().forward(y * F.silu(z.to(y.dtype))).to(z.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False, layer_idx: int = 0) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = mark_residual_output(nn.Linear(hidden, dim, bias=bias), layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def mark_residual_output(linear: nn.Linear, layer_idx: int) -> nn.Linear:
    """Tag a projection that writes into the residual stream (its init std shrinks with depth)."""
    linear._residual_output_of_layer = layer_idx
    return linear


def output_std(std: float, layer_idx: int) -> float:
    """Residual-branch output projections shrink with depth (open_lm: std / sqrt(2 (layer_idx + 1)))."""
    return std / math.sqrt(2 * (layer_idx + 1))


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time that never reads across a document start.

    y_t = bias + sum_{j<K} w[K-1-j] * x_{t-j} * [pos_t >= j]: a tap reaching before the token's
    document start (pos_t < j) is masked, so the same code serves padded rows, packed documents and
    decoding from a cached window of the last K-1 inputs. The parameter is an ``nn.Conv1d``
    (weight (C, 1, K)) so checkpoints keep the familiar layout. ``silu=True`` applies SiLU to y.

    Without a carried window (training, prefill) on CUDA it runs the engine's fused Triton conv
    (kernels/conv.py: one kernel forward, two backward, fp32 accumulation); ``fused`` forces it on (tests, under
    TRITON_INTERPRET) or off. Otherwise - decoding, CPU, exports without the project - the PyTorch code
    below, which is also the reference the fused kernels are tested against. :meth:`step` is one token of
    it for decoding with a static window buffer (``allocate_inference_state``).
    """

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=True)
        self.fused: bool | None = None  # None: on CUDA when the engine provides the kernel

    def _use_fused(self, x: torch.Tensor) -> bool:
        if fused_causal_conv1d is None or self.fused is False:
            return False
        return bool(self.fused) or (x.is_cuda and fused_causal_conv1d_supported(x))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, context: torch.Tensor | None = None, *, silu: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), positions (B, T), context (B, K-1, C) or None -> y (B, T, C), new context."""
        B, T, C = x.shape
        K = self.kernel
        if context is None and self._use_fused(x):
            y = fused_causal_conv1d(x, self.conv.weight[:, 0, :], self.conv.bias, positions, silu)
            # The new window: the last K-1 inputs behind a zero start (read only when a cache keeps it).
            window = torch.cat((x.new_zeros(B, K - 1, C), x[:, max(T - (K - 1), 0) :]), dim=1)
            return y, window[:, window.shape[1] - (K - 1) :]
        if context is None:
            context = x.new_zeros(B, K - 1, C)
        xx = torch.cat((context.to(x.dtype), x), dim=1)  # (B, T+K-1, C)
        w = self.conv.weight[:, 0, :].to(x.dtype)  # (C, K)
        y = x * w[:, K - 1]
        for j in range(1, K):
            tap = xx[:, K - 1 - j : K - 1 - j + T] * (positions >= j).unsqueeze(-1).to(x.dtype)
            y = y + tap * w[:, K - 1 - j]
        y = y + self.conv.bias.to(x.dtype)
        return (F.silu(y) if silu else y), xx[:, xx.shape[1] - (K - 1) :]

    def allocate_inference_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The window of the last K-1 inputs (B, K-1, C) that :meth:`step` reads and updates."""
        return torch.zeros(batch_size, self.kernel - 1, self.conv.in_channels, dtype=dtype, device=device)

    def step(self, x_t: torch.Tensor, window: torch.Tensor, positions: torch.Tensor, *,
             silu: bool = False) -> torch.Tensor:
        """One token: x_t (B, C), positions (B,) -> y_t (B, C), as :meth:`forward` with ``window`` as
        the context; ``window`` is updated in place."""
        y, new_window = self.forward(x_t.unsqueeze(1), positions.unsqueeze(1), window, silu=silu)
        window.copy_(new_window.detach())
        return y[:, 0]


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention) from per-token positions, so packed documents restart at 0.

    The inverse frequencies are recomputed per call (head_dim/2 numbers) instead of kept in a buffer:
    a non-persistent buffer would stay uninitialised when HF builds the model on the meta device.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """(head_dim / 2,) fp32: the rotation frequencies theta^(-2i / head_dim)."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponent)

    def forward(self, positions: torch.Tensor,
                inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, head_dim) in fp32. ``inv_freq``: :meth:`inv_freq`, where a
        decoder keeps it for every step."""
        if inv_freq is None:
            inv_freq = self.inv_freq(positions.device)
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
