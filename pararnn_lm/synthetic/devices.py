"""Where runs train: one process advances its runs round-robin (on a GPU each on its own CUDA stream), and
several devices get one worker process each.

One process feeds one GPU: a d = 64 step is a chain of tiny kernels, so more runs per GPU overlap only so
far, and a second GPU needs a second host thread to feed it. With several ``devices`` each gets a worker
process and every len(devices)-th run (so each device trains a mix of architectures), up to
``concurrent_runs`` at once; the runs, their saved states and the tables are the same as in one process.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from pararnn_lm.eval.synthetic.models import register_arch, registered_archs

from .config import SyntheticTrainConfig
from .run import RunFiles, SeedRun, check_resumable, planned_steps

log = logging.getLogger(__name__)

Job = tuple[SyntheticTrainConfig, int]  # (settings, seed)


def _state_folders(state_dir: str | Path | Sequence[str | Path | None] | None, num_jobs: int) -> list[Path | None]:
    """One state folder (or None) per job: a sequence gives each job its own, a single folder is shared."""
    if isinstance(state_dir, (list, tuple)):
        if len(state_dir) != num_jobs:
            raise ValueError(f"{len(state_dir)} state folders for {num_jobs} jobs")
        return [None if d is None else Path(d) for d in state_dir]
    return [None if state_dir is None else Path(state_dir)] * num_jobs


def train_runs(jobs: Sequence[Job], *, concurrent_runs: int = 1, time_budget_s: float | None = None,
               progress: bool = True, state_dir: str | Path | Sequence[str | Path | None] | None = None,
               resume: bool = False, progress_position: int | None = None) -> list[dict[str, Any]]:
    """Train ``(cfg, seed)`` jobs in this process, at most ``concurrent_runs`` at a time, advanced round-robin.

    On a GPU each run enqueues on its own stream, so graphed runs overlap; on a CPU interleaving gains
    nothing, so use ``concurrent_runs=1`` there. A run is built when it starts and freed once its test
    accuracy is measured (a 100k-sequence test set per run would not fit 60 times in host memory).
    Returns one result per job, in order; a job that raised records ``error`` instead of ``test_acc``.
    When the wall-clock budget ends, running jobs report their best weights so far and queued jobs
    report ``error: "not started (time budget)"``.

    ``state_dir``: each finished run writes ``KEY.result.json`` there and a run stopped by the budget
    writes ``KEY.pt`` (:class:`~pararnn_lm.synthetic.run.RunFiles`); with ``resume`` finished runs are read
    back and stopped runs continue exactly where they were, so a long budget can be spread over several
    calls (SLURM time limits). A sequence gives each job its own folder (a sweep keeps each setting's runs
    apart under the same keys).
    """
    t0 = time.time()
    states = _state_folders(state_dir, len(jobs))
    for folder in dict.fromkeys(d for d in states if d is not None):
        folder.mkdir(parents=True, exist_ok=True)
        if resume:
            check_resumable([job for job, d in zip(jobs, states) if d == folder], folder)
    files = [None if d is None else RunFiles(d, cfg, seed) for (cfg, seed), d in zip(jobs, states)]
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    queue = list(range(len(jobs)))
    active: list[tuple[int, SeedRun]] = []
    where = "" if progress_position is None or not jobs else f"{jobs[0][0].device}: "
    bar = tqdm(total=sum(planned_steps(cfg) for cfg, _ in jobs), desc=f"{where}{len(jobs)} run(s)",
               disable=not progress, position=progress_position)

    def fail(i: int, err: BaseException | str) -> None:
        cfg, seed = jobs[i]
        if isinstance(err, BaseException):
            log.error("%s/%s seed %d failed: %r", cfg.arch, cfg.task, seed, err, exc_info=err)
        results[i] = {"seed": seed, "test_acc": None, "error": err if isinstance(err, str) else repr(err)}

    def finish(i: int, run: SeedRun) -> None:
        bar.update(run.horizon - run.step)  # the unused remainder of its budget
        try:
            if files[i] is not None and not run.done:  # before result(), which loads the best weights
                files[i].save_stopped(run)
            results[i] = run.result()
            if files[i] is not None and run.done:
                files[i].save_finished(results[i])
        except Exception as err:
            fail(i, err)

    def start(i: int) -> SeedRun | None:
        cfg, seed = jobs[i]
        if resume and files[i] is not None and (done := files[i].finished()) is not None:
            results[i] = done
            bar.update(planned_steps(cfg))
            log.info("%s: finished earlier (test acc %.4f)", files[i].key, done["test_acc"])
            return None
        run = SeedRun(cfg, seed)
        if resume and files[i] is not None and (state := files[i].stopped_state()) is not None:
            run.load_state_dict(state)
            bar.update(run.step)
            log.info("%s: resumed at epoch %d, step %d", files[i].key, run.epoch, run.step)
        return run

    rounds, out_of_time, steps_done, last_log = 0, False, 0, t0
    while queue or active:
        while queue and len(active) < max(concurrent_runs, 1) and not out_of_time:
            i = queue.pop(0)
            try:
                run = start(i)
            except Exception as err:
                fail(i, err)
                continue
            if run is not None:
                active.append((i, run))
        if out_of_time or not active:
            break
        still = []
        for i, run in active:
            try:
                run.advance()
            except Exception as err:
                fail(i, err)
                continue
            bar.update(1)
            steps_done += 1
            if run.done:
                finish(i, run)
            else:
                still.append((i, run))
        active = still
        rounds += 1
        if rounds % 64 == 0:
            bar.set_postfix(running=len(active), queued=len(queue))
            if time.time() - last_log > 60:  # a line for batch logs, where the bar is off
                last_log = time.time()
                log.info("%.0f s: %d steps (%.0f steps/s), %d running, %d queued, %d finished", last_log - t0,
                         steps_done, steps_done / (last_log - t0), len(active), len(queue),
                         sum(r is not None for r in results))
            if time_budget_s is not None and time.time() - t0 > time_budget_s:
                log.warning("time budget of %.0f s reached: %d run(s) stop early, %d not started",
                            time_budget_s, len(active), len(queue))
                out_of_time = True
                for i, run in active:
                    finish(i, run)
                active = []
    for i in queue:
        fail(i, "not started (time budget)")
    bar.close()
    return [r for r in results if r is not None]


def train_runs_on_devices(jobs: Sequence[Job], *, devices: Sequence[str] = (),
                          state_dir: str | Path | Sequence[str | Path | None] | None = None,
                          **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`train_runs` spread over ``devices``: one worker process per device (spawned: CUDA cannot be
    used in a forked child), each training every len(devices)-th job with the same ``kwargs`` (concurrency,
    time budget, resume); the state folders are shared, a run's files being named by its key. Results come
    back in job order. A worker that dies records its own jobs as failed and keeps the others' results.
    Factories registered with ``register_arch`` must be picklable (module-level)."""
    if len(devices) <= 1:
        if devices:
            jobs = [(dataclasses.replace(cfg, device=devices[0]), seed) for cfg, seed in jobs]
        return train_runs(jobs, state_dir=state_dir, **kwargs)
    states = _state_folders(state_dir, len(jobs))
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    context = torch.multiprocessing.get_context("spawn")
    # one single-process pool per device: a worker that dies breaks its own pool only
    threads = max(1, (os.cpu_count() or 1) // len(devices))  # the host's cores shared, not oversubscribed
    pools = [concurrent.futures.ProcessPoolExecutor(1, mp_context=context) for _ in devices]
    try:
        shards = {}
        for rank, (device, pool) in enumerate(zip(devices, pools)):
            shard = list(range(rank, len(jobs), len(devices)))
            if shard:
                own = [(dataclasses.replace(jobs[i][0], device=device), jobs[i][1]) for i in shard]
                future = pool.submit(_device_worker, device, rank, own, [states[i] for i in shard],
                                     registered_archs(), logging.getLogger().getEffectiveLevel(), threads, kwargs)
                shards[future] = (device, shard)
        for future in concurrent.futures.as_completed(shards):
            device, shard = shards[future]
            try:
                out = future.result()
            except Exception as err:  # the worker process itself failed (a run's own error is in its result)
                log.error("worker on %s failed: %r", device, err)
                out = [{"seed": jobs[i][1], "test_acc": None, "error": f"worker on {device} failed: {err!r}"}
                       for i in shard]
            for i, res in zip(shard, out):
                results[i] = res
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
    return [r for r in results if r is not None]


def _device_worker(device: str, rank: int, jobs: list[Job], states: list[Path | None],
                   registered: dict[str, Any], log_level: int, threads: int,
                   kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """One device's share of :func:`train_runs_on_devices`, in its own process."""
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s [{device}]: %(message)s")
    torch.set_num_threads(threads)  # workers each taking every core spin against each other (100x slower)
    for name, factory in registered.items():  # a spawned process starts with an empty registry
        register_arch(name, factory)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # streams, graphs and allocations default to it
    return train_runs(jobs, state_dir=states, progress_position=rank, **kwargs)


def resolve_devices(names: Sequence[str]) -> tuple[str, ...]:
    """``["all"]`` -> every visible GPU; otherwise the names as given (each a valid torch device; a GPU
    index must exist). Repeats are allowed (two workers on one device)."""
    if list(names) == ["all"]:
        count = torch.cuda.device_count()
        if not count:
            raise ValueError("--devices all: no GPU is visible")
        return tuple(f"cuda:{i}" for i in range(count))
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--devices: {name!r} is not a device (e.g. cuda:0, cpu)") from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--devices: {name} is not visible ({torch.cuda.device_count()} GPU(s))")
    return tuple(names)


def describe_devices(devices: Sequence[str]) -> str:
    """``"NVIDIA H200"``, ``"4 x NVIDIA H200"``, ``"cpu"``: where a grid ran, for its result file."""
    names = [torch.cuda.get_device_name(torch.device(d)) if torch.device(d).type == "cuda" else torch.device(d).type
             for d in devices]
    return " + ".join(f"{names.count(n)} x {n}" if names.count(n) > 1 else n for n in dict.fromkeys(names))
