"""Pure-PyTorch linear scans over K x K per-channel blocks.

``linear_scan_torch`` is log-depth and O(T) work (odd/even cyclic reduction): each level pairs
neighbouring steps with the combine (A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2), solves the
half-length problem recursively, then fills in the remaining steps in one vectorised op.
``linear_scan_sequential`` is the plain loop, kept as the reference the scans are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _apply(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel block matrix-vector product: A (..., K, K, D) @ x (..., K, D)."""
    if A.shape[-2] == 1:  # K == 1: diagonal Jacobian, plain elementwise product
        return A[..., 0, :, :] * x
    return torch.einsum("...ijd,...jd->...id", A, x)


def _compose(A2: torch.Tensor, A1: torch.Tensor) -> torch.Tensor:
    """Per-channel block matrix product A2 @ A1 for (..., K, K, D) blocks."""
    if A2.shape[-2] == 1:
        return A2 * A1
    return torch.einsum("...ijd,...jkd->...ikd", A2, A1)


def linear_scan_torch(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = A_t x_{t-1} + b_t along dim 1 with x_{-1} = 0. A (B,T,K,K,D), b (B,T,K,D)."""
    T = b.shape[1]
    if T == 1:
        return b
    if T % 2:  # pad one step (its output is dropped) so every step has a partner
        A = F.pad(A, (0, 0, 0, 0, 0, 0, 0, 1))
        b = F.pad(b, (0, 0, 0, 0, 0, 1))
    A_even, A_odd = A[:, 0::2], A[:, 1::2]
    b_even, b_odd = b[:, 0::2], b[:, 1::2]
    # Pair (2i, 2i+1): x_{2i+1} = (A_{2i+1} A_{2i}) x_{2i-1} + (A_{2i+1} b_{2i} + b_{2i+1}).
    x_odd = linear_scan_torch(_compose(A_odd, A_even), _apply(A_odd, b_even) + b_odd)
    # x_{2i} = A_{2i} x_{2i-1} + b_{2i}, with x_{-1} = 0.
    x_prev = F.pad(x_odd[:, :-1], (0, 0, 0, 0, 1, 0))
    x_even = _apply(A_even, x_prev) + b_even
    x = torch.stack((x_even, x_odd), dim=2).flatten(1, 2)
    return x[:, :T]


def linear_scan_adjoint_torch(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = b_t + A_{t+1}^T x_{t+1} along dim 1 with x_T = 0 (the adjoint of the causal scan)."""
    # Reverse time and transpose the blocks: x'_s = A'_s x'_{s-1} + b'_s with A'_s = A_{T-s}^T.
    A_rev = A.flip(1).transpose(-3, -2)
    A_rev = torch.cat((torch.zeros_like(A_rev[:, :1]), A_rev[:, :-1]), dim=1)
    return linear_scan_torch(A_rev, b.flip(1)).flip(1)


def linear_scan_sequential(A: torch.Tensor, b: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
    """The plain time loop, for tests."""
    T = b.shape[1]
    out = torch.empty_like(b)
    x = torch.zeros_like(b[:, 0])
    steps = range(T - 1, -1, -1) if adjoint else range(T)
    for t in steps:
        if adjoint:
            x = b[:, t] + (_apply(A[:, t + 1].transpose(-3, -2), x) if t + 1 < T else 0)
        else:
            x = _apply(A[:, t], x) + b[:, t]
        out[:, t] = x
    return out
