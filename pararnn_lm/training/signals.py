"""Preemption: SLURM signals a job before its time limit (``--signal``), or an operator does.

Two ways in, one effect. A SIGTERM/SIGUSR1 to a training process, or a sentinel file ``PREEMPT`` in
the run directory (what the sbatch script writes when *it* gets the signal, so that the signal
reaches every rank on every node without depending on how torchrun forwards signals). The loop
checks the flag at step boundaries (all ranks agree through an all-reduce), writes a checkpoint
and exits with ``REQUEUE_EXIT_CODE``; the sbatch script then runs ``scontrol requeue``.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)
REQUEUE_EXIT_CODE = 3


class PreemptionFlag:
    def __init__(self, sentinel: Path | None = None, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self.sentinel = sentinel
        self.started = time.time()
        for sig in signals:
            signal.signal(sig, self._handle)

    def clear_sentinel(self) -> None:
        """Called by rank 0 at start: remove a sentinel left by the previous (preempted) attempt.

        One written after this process started is a new preemption notice and is kept.
        """
        if self.sentinel is None:
            return
        try:
            if self.sentinel.stat().st_mtime < self.started:
                self.sentinel.unlink()
        except FileNotFoundError:
            pass

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            logger.warning("received %s: will checkpoint at the end of this step and exit", signal.Signals(signum).name)
        self.received = signum

    def __bool__(self) -> bool:
        return self.received is not None or (self.sentinel is not None and self.sentinel.exists())
