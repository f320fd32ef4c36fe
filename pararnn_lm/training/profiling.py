"""``profile.steps=[first, last]``: a ``torch.profiler`` trace of those training steps.

Each rank writes ``run_dir/profile/trace_steps_<first>-<last>_rank<r>.json`` (Chrome trace format: open
it in Perfetto or chrome://tracing; TensorBoard's profiler plugin reads it too), with CPU activity and,
on GPU, the CUDA kernels; every step is a ``ProfilerStep#N`` range numbered as in metrics.jsonl. On GPU
it also writes ``memory_steps_<first>-<last>_rank<r>.pickle``, a CUDA caching-allocator snapshot with
the allocation history of those steps (drop it on https://pytorch.org/memory_viz).

Steps are numbered from 1; a step's range is its whole iteration of the loop (forward, backward, update,
and the logging, evaluation or checkpoint that follow it). Profiling starts before step ``first`` and
stops after step ``last``; the device is waited for only there (the loop otherwise reads nothing from
it between log steps).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch.profiler import ProfilerAction

from .distributed import DistInfo

logger = logging.getLogger(__name__)

MEMORY_HISTORY_EVENTS = 100_000  # allocator events kept for the snapshot (the newest win)


class StepProfiler:
    """Profiles steps ``first..last`` of the loop, which calls :meth:`advance` at the start of every
    iteration with the number of steps done, and :meth:`close` when it stops.

    pause: a context in which time is not counted as step time (the loop's ``StepTimer.paused``); the
    trace is written inside it.
    """

    def __init__(self, steps: list[int], out_dir: Path, info: DistInfo, start_step: int = 0,
                 pause: Callable[[], ContextManager] = contextlib.nullcontext):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.out_dir, self.info, self.pause = Path(out_dir), info, pause
        self.cuda = info.device.type == "cuda"
        self.profiler: torch.profiler.profile | None = None
        if self.first is not None and start_step >= self.first:
            logger.warning("profile.steps=[%d, %d]: the run resumes after step %d, past the first of them: "
                           "not profiled", self.first, self.last, start_step)
            self.first = self.last = None

    def advance(self, step: int) -> None:
        """Steps up to ``step`` are done and the next begins: start before step ``first``, mark the step
        boundaries, stop after step ``last``."""
        if self.profiler is not None:
            if step >= self.last:
                self._finish(step)
            else:
                self.profiler.step()
        elif self.first is not None and step + 1 == self.first:
            self._start()

    def close(self, step: int) -> None:
        """The loop stopped after step ``step`` (the end, a preemption): write a trace that is still open."""
        if self.profiler is not None:
            if step < self.last:
                logger.warning("profile.steps=[%d, %d]: the run stopped at step %d; the trace covers steps %d..%d",
                               self.first, self.last, step, self.first, step)
            self._finish(step)

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_EVENTS)
        # A schedule (recording throughout: :meth:`_finish` stops it) makes the profiler mark each step
        # as a ProfilerStep#N range; N counts from ``first``, the loop's numbering.
        self.profiler = torch.profiler.profile(activities=activities, schedule=lambda _: ProfilerAction.RECORD,
                                               record_shapes=True, profile_memory=True)
        self.profiler.step_num = self.first
        self.profiler.start()

    def _finish(self, step: int) -> None:
        name = f"steps_{self.first}-{step}_rank{self.info.rank}"
        with self.pause():
            self.profiler.stop()
            self.profiler, profiler = None, self.profiler
            self.out_dir.mkdir(parents=True, exist_ok=True)
            trace = self.out_dir / f"trace_{name}.json"
            profiler.export_chrome_trace(str(trace))
            written = [trace]
            if self.cuda:
                snapshot = self.out_dir / f"memory_{name}.pickle"
                torch.cuda.memory._dump_snapshot(str(snapshot))
                torch.cuda.memory._record_memory_history(enabled=None)
                written.append(snapshot)
        self.first = self.last = None
        logger.info("profile of steps %s written: %s", name.split("_")[1], ", ".join(map(str, written)))
