"""Linear recurrences over K x K per-channel blocks: the inner solve of every Newton step.

    forward (causal):   x_t = A_t x_{t-1} + b_t,          x_{-1} = 0
    adjoint (reverse):  x_t = b_t + A_{t+1}^T x_{t+1},    x_T = 0

A (B, T, K, K, D), b (B, T, K, D). Document resets are expressed by A_t = 0 at a document start
(the engine does this), so the scans need no extra argument for them.
"""
from .reference import linear_scan_adjoint_torch, linear_scan_sequential, linear_scan_torch

__all__ = ["linear_scan_torch", "linear_scan_adjoint_torch", "linear_scan_sequential"]
