"""The registry of solver modes behind :func:`kernels.parallel_rnn`.

A mode is a function ``run(cell, u, p, h0_rows, layout, newton, stats, name) -> h`` returning the
state trajectory (B, T, K, D), differentiable w.r.t. u, p and h0_rows, plus a predicate saying
whether it can serve a given cell and input (device, cell type). ``auto`` takes the first
available mode in ``AUTO_PREFERENCE``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .cell import Cell


@dataclass(frozen=True)
class Mode:
    name: str
    run: Callable[..., torch.Tensor]
    available: Callable[[Cell, torch.Tensor], bool]
    description: str


MODES: dict[str, Mode] = {}
# Fastest first: 'auto' picks the first mode that can serve the cell on the input's device.
AUTO_PREFERENCE: list[str] = ["fused", "newton_triton", "newton_torch"]


def register_mode(
    name: str,
    run: Callable[..., torch.Tensor],
    available: Callable[[Cell, torch.Tensor], bool] = lambda cell, u: True,
    description: str = "",
) -> None:
    MODES[name] = Mode(name, run, available, description)


def resolve_mode(mode: str, cell: Cell, u: torch.Tensor) -> Mode:
    if mode == "auto":
        for candidate in AUTO_PREFERENCE:
            if candidate in MODES and MODES[candidate].available(cell, u):
                return MODES[candidate]
        raise RuntimeError(f"no registered mode can run {cell!r} on {u.device}")  # pragma: no cover
    if mode not in MODES:
        known = ", ".join(["auto", *MODES])
        raise ValueError(f"unknown parallel_rnn mode {mode!r}; known modes: {known}")
    chosen = MODES[mode]
    if not chosen.available(cell, u):
        raise ValueError(f"mode {mode!r} cannot run {cell!r} on {u.device} ({chosen.description})")
    return chosen


def _register_builtin() -> None:
    from .newton_torch import newton_torch_mode
    from .sequential import sequential_mode

    register_mode("sequential", sequential_mode, description="reference loop over time (autograd)")
    register_mode(
        "newton_torch", newton_torch_mode,
        description="Newton + log-depth PyTorch scan, Jacobians from step, adjoint backward",
    )


_register_builtin()
