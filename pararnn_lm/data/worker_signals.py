"""Helper processes of the data pipeline (DataLoader workers, tokenizer pool workers) leave stop signals
to the training process.

A scheduler's preemption notice (SIGTERM, ``scancel --signal=USR1``), ``timeout`` or a terminal's Ctrl-C
can reach every process of the job or process group, workers included. The training process answers by
finishing the step and writing a checkpoint (``training.signals``); a worker that died of the same signal
would make the next batch fail first (``DataLoader worker ... is killed by signal: Terminated``) or leave a
pool task unanswered, and the checkpoint would never be written. So workers ignore those signals.

Since a worker then outlives ``Process.terminate()`` (a SIGTERM), the pipeline stops its workers the
cooperative way - DataLoader workers through the iterator's own shutdown, pool workers through
``Pool.close()`` + ``join()`` - also at interpreter exit, before ``multiprocessing`` would terminate and
join them. Both kinds also leave when their parent process is gone.
"""
from __future__ import annotations

import signal
import weakref

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(*_worker_id: int) -> None:
    """Run in a worker process at start (usable as a DataLoader ``worker_init_fn``)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _shutdown_loader_workers(iterator_ref: weakref.ref) -> None:
    iterator = iterator_ref()
    if iterator is not None:
        iterator._shutdown_workers()  # what the iterator's __del__ runs: sentinel to each worker, then join


def stop_workers_at_exit(iterator):
    """Shut a multi-process DataLoader iterator's workers down at interpreter exit if it is still alive
    then (weakref.finalize runs before multiprocessing's exit hook); returns the iterator."""
    weakref.finalize(iterator, _shutdown_loader_workers, weakref.ref(iterator))
    return iterator


def close_pool(pool) -> None:
    """Stop a ``multiprocessing.Pool`` whose workers ignore SIGTERM: no new tasks, the queued ones finish,
    every worker exits."""
    pool.close()
    pool.join()
