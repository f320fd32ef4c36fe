"""Solver configuration, statistics and errors shared by every mode of :func:`parallel_rnn`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch


class NewtonConvergenceError(RuntimeError):
    """Newton did not reach the tolerance within the iteration cap and the policy is ``raise``."""


@dataclass(frozen=True)
class NewtonConfig:
    """How the Newton solve is run and what happens when it does not converge.

    max_iters: cap on Newton updates (each one linear scan).
    tol: convergence threshold on max_t |f(h_{t-1}, u_t) - h_t| / (1 + |h_t|). ``None`` picks one
        from the compute dtype (1e-5 for fp32, 1e-12 for fp64).
    damping: step size of each Newton update, in (0, 1]; 1 is plain Newton.
    on_failure: ``"fallback"`` finishes the trajectory with the exact sequential recurrence from the
        first unconverged step (warning once per cell), ``"raise"`` raises
        :class:`NewtonConvergenceError` naming the cell/layer and the residual.
    validate: run the value checks that need a host sync - inputs, parameters and the initial state
        finite, cu_seqlens well formed. Shape checks always run. Turn off in tuned training loops.
    """

    max_iters: int = 10
    tol: float | None = None
    damping: float = 1.0
    on_failure: Literal["fallback", "raise"] = "fallback"
    validate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_iters, int) or self.max_iters < 0:
            raise ValueError(f"NewtonConfig.max_iters must be an int >= 0, got {self.max_iters!r}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"NewtonConfig.tol must be > 0 or None, got {self.tol!r}")
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"NewtonConfig.damping must be in (0, 1], got {self.damping!r}")
        if self.on_failure not in ("fallback", "raise"):
            raise ValueError(
                f"NewtonConfig.on_failure must be 'fallback' or 'raise', got {self.on_failure!r}"
            )

    def tolerance_for(self, dtype: torch.dtype) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-12 if dtype == torch.float64 else 1e-5


_warned_fallback: set[str] = set()


@dataclass
class NewtonStats:
    """What the last solve did; filled in by :func:`parallel_rnn` when passed as ``stats=``.

    iterations: Newton updates performed (0 when the initial guess already met the tolerance).
    residual: the scaled max residual of the returned trajectory (before any fallback).
    converged: the residual met the tolerance within the cap.
    fell_back: the sequential fallback finished the trajectory.
    residuals: the scaled max residual of the initial guess and after each update (the modes that solve
        Newton over all T states, ``newton_torch`` / ``newton_triton``; empty for the others) - the
        convergence history of the paper's Fig. 4.

    With ``lazy=True`` the fused modes leave the numbers on the device (no host sync in the forward,
    nothing for torch.compile to break on); :meth:`resolve` reads them when they are wanted.
    """

    iterations: int = 0
    residual: float = float("nan")
    converged: bool = False
    fell_back: bool = False
    mode: str = ""
    device: dict | None = None  # fused modes: raw per-program device tensors (no host sync needed)
    lazy: bool = False
    who: str = ""
    pending: bool = field(default=False, repr=False)  # device numbers not yet read
    residuals: list[float] = field(default_factory=list)

    def record_device(self, mode: str, who: str, iterations: torch.Tensor, residual: torch.Tensor,
                      failed: torch.Tensor) -> None:
        """Keep the fused kernels' per-channel device tensors; read them now unless ``lazy``."""
        self.mode, self.who, self.pending = mode, who, True
        self.device = {"iterations": iterations, "residual": residual, "failed": failed}
        if not self.lazy:
            self.resolve()

    def resolve(self) -> "NewtonStats":
        """Fill the numbers from ``device`` (one host sync) if they were left there; returns self."""
        if self.pending:
            iters, res, fail = (self.device[k] for k in ("iterations", "residual", "failed"))
            self.iterations = int(iters.max()) if iters.numel() else 0
            self.residual = float(res.max()) if res.numel() else 0.0
            failed = bool(fail.any()) if fail.numel() else False
            self.converged, self.fell_back = not failed, failed
            if failed and self.who not in _warned_fallback:
                _warned_fallback.add(self.who)
                logging.getLogger("kernels").warning(
                    "Newton did not converge for %s in some channels; those channels were finished by "
                    "the exact sequential recurrence inside the kernels.", self.who)
            self.pending = False
        return self
