"""The registry of solver modes behind :func:`kernels.parallel_rnn`.

A mode is a function ``run(cell, u, p, h0_rows, layout, newton, stats, name) -> h`` returning the
state trajectory (B, T, K, D), differentiable w.r.t. u, p and h0_rows, plus a predicate saying
whether it can serve a given cell and input (device, cell type). ``auto`` takes the first
available mode in ``AUTO_PREFERENCE``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .cell import Cell


def _no_cell(cell: Cell) -> bool:
    return False


@dataclass(frozen=True)
class Mode:
    name: str
    run: Callable[..., torch.Tensor]
    available: Callable[[Cell, torch.Tensor], bool]  # can it run this cell on this input at all?
    description: str
    auto: Callable[[Cell, torch.Tensor], bool]  # should 'auto' pick it (e.g. not Triton's CPU interpreter)?
    half_inputs: bool = False  # takes fp16/bf16 u as is (upcasts in registers) instead of an fp32 copy
    # For which cells it takes the gates' input bias as 3 extra rows of p (added to u inside its kernels);
    # for the others parallel_rnn adds it to u first.
    input_bias: Callable[[Cell], bool] = _no_cell


MODES: dict[str, Mode] = {}
# Fastest first: 'auto' picks the first mode that can serve the cell on the input's device.
AUTO_PREFERENCE: list[str] = ["fused", "newton_triton", "newton_torch"]


def register_mode(
    name: str,
    run: Callable[..., torch.Tensor],
    available: Callable[[Cell, torch.Tensor], bool] = lambda cell, u: True,
    description: str = "",
    auto: Callable[[Cell, torch.Tensor], bool] | None = None,
    half_inputs: bool = False,
    input_bias: Callable[[Cell], bool] = _no_cell,
) -> None:
    MODES[name] = Mode(name, run, available, description, auto or available, half_inputs, input_bias)


def resolve_mode(mode: str, cell: Cell, u: torch.Tensor) -> Mode:
    if mode == "auto":
        for candidate in AUTO_PREFERENCE:
            if candidate in MODES and MODES[candidate].auto(cell, u):
                return MODES[candidate]
        raise RuntimeError(f"no registered mode can run {cell!r} on {u.device}")  # pragma: no cover
    if mode not in MODES:
        known = ", ".join(["auto", *MODES])
        raise ValueError(f"unknown parallel_rnn mode {mode!r}; known modes: {known}")
    chosen = MODES[mode]
    if not chosen.available(cell, u):
        raise ValueError(f"mode {mode!r} cannot run {cell!r} on {u.device} ({chosen.description})")
    return chosen


def triton_usable(u: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under its CPU interpreter (tests)."""
    return u.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _fused_cells() -> dict[type, Callable[..., torch.Tensor]]:
    from .cells import ParaGRU, ParaLSTM
    from .cells.paragru.fused import paragru_fused_mode
    from .cells.paralstm.fused import paralstm_fused_mode

    return {ParaGRU: paragru_fused_mode, ParaLSTM: paralstm_fused_mode}


def _fused_run(cell, u, p, h0_rows, layout, newton, stats, name):
    return _fused_cells()[type(cell)](cell, u, p, h0_rows, layout, newton, stats, name)


def _has_fused_kernel(cell: Cell) -> bool:
    from .cells import ParaGRU, ParaLSTM

    return type(cell) in (ParaGRU, ParaLSTM)


def _bias_in_kernels(cell: Cell) -> bool:
    """Cells whose fused kernels get the input bias: only where it measured faster. Compiled 400M mixers,
    (16, 2048, 1024) bf16: ParaGRU 3.94 -> 3.68 ms (H200); ParaLSTM 3.18 -> 5.39 ms (H200) and
    3.62 -> 4.34 ms (H100), of which its shooting kernels account for only ~0.08 ms (H100 profile: the
    compiled graph around the op changes). The ParaLSTM kernels take the bias all the same (tested)."""
    from .cells import ParaGRU

    return type(cell) is ParaGRU


def _register_builtin() -> None:
    from .newton_torch import newton_torch_mode, newton_triton_mode
    from .scan.triton import MAX_K
    from .sequential import sequential_mode

    register_mode("sequential", sequential_mode, description="reference loop over time (autograd)")
    register_mode(
        "newton_torch", newton_torch_mode,
        description="Newton + log-depth PyTorch scan, Jacobians from step, adjoint backward",
    )
    register_mode(
        "newton_triton", newton_triton_mode,
        available=lambda cell, u: cell.state_size <= MAX_K and triton_usable(u),
        auto=lambda cell, u: cell.state_size <= MAX_K and u.is_cuda,
        description=f"Newton assembly in PyTorch, Triton scans; K <= {MAX_K}, CUDA (or TRITON_INTERPRET=1)",
    )
    register_mode(
        "fused", _fused_run,
        available=lambda cell, u: _has_fused_kernel(cell) and triton_usable(u),
        auto=lambda cell, u: _has_fused_kernel(cell) and u.is_cuda,
        half_inputs=True, input_bias=_bias_in_kernels,
        description="multiple-shooting Newton: exact sequential segments in parallel, Newton on the "
                    "segment starts (kernels/shooting.py); ParaGRU/ParaLSTM",
    )


_register_builtin()
