"""Stopping a run cleanly: preemption (SLURM signals a job before its time limit, ``--signal``, or an
operator does) and Ctrl-C.

Preemption has two ways in, one effect. A SIGTERM/SIGUSR1 to a training process, or a sentinel file
``PREEMPT`` in the run directory (what the sbatch script writes when *it* gets the signal, so that the
signal reaches every rank on every node without depending on how torchrun forwards signals). The loop
checks the flag at step boundaries (all ranks agree through an all-reduce), writes a checkpoint and
exits with ``REQUEUE_EXIT_CODE``; the sbatch script then runs ``scontrol requeue``.

Ctrl-C (SIGINT) does the same but exits with ``INTERRUPT_EXIT_CODE`` (no requeue). A second Ctrl-C
interrupts at once (KeyboardInterrupt), without waiting for the checkpoint.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)
REQUEUE_EXIT_CODE = 3
INTERRUPT_EXIT_CODE = 130  # the shell's code for a process ended by SIGINT


class PreemptionFlag:
    def __init__(self, sentinel: Path | None = None,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.received: int | None = None
        self.sentinel = sentinel
        self.started = time.time()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def restore(self) -> None:
        """Give the signals back to the handlers they had before (the run is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

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
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        if self.received is None:
            logger.warning("received %s: will checkpoint at the end of this step and exit", signal.Signals(signum).name)
            self.received = signum

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (not a preemption: no requeue)."""
        return self.received == signal.SIGINT

    def __bool__(self) -> bool:
        return self.received is not None or (self.sentinel is not None and self.sentinel.exists())
