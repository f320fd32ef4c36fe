"""Rank- and worker-sharded, deterministic, exactly resumable batches of packed sequences.

Design (why resume is trivial): the whole run is one deterministic sequence of *global* indices
``g = 0, 1, 2, ...`` (epoch ``g // N``, shuffled per epoch by :class:`~data.packing.SequenceOrder`).
Rank ``r`` of ``W`` owns ``g = k*W + r`` for its local indices ``k = 0, 1, ...``, and its local batch ``b``
is ``k = b*B .. b*B + B - 1``. DataLoader worker ``w`` of ``n`` builds local batches ``b = w, w+n, ...``;
PyTorch returns worker outputs round-robin, so the main process sees batches ``0, 1, 2, ...`` in order
whatever ``n`` is. The batches handed to the caller are counted in the main process (not inside workers,
whose prefetched batches were not consumed).

The cursor is the *global* position ``P = next_batch * B * W``: the number of sequences all ranks together
have handed out (the same on every rank at an optimiser-step boundary). A global batch of ``G`` sequences
is ``g = s*G .. s*G + G - 1`` whatever ``W`` and ``B`` are (for ``G = B*W*accumulation``), so a run may
resume on another number of ranks or micro-batch size: rank ``r`` of ``W'`` continues at local batch
``P / (B'*W')`` and the global batches continue exactly.

Across ranks and workers every sequence of an epoch is used exactly once: no repeats, no gaps (the
training stream just continues into the next epoch). A validation loader is a finite single pass over
``N // W`` sequences per rank (equal on every rank, so collective ops in evaluation stay in step).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .packing import PackedDataset, SequenceOrder, collate_packed
from .worker_signals import ignore_stop_signals, stop_workers_at_exit

logger = logging.getLogger(__name__)

CURSOR_VERSION = 2


class _BatchStream(IterableDataset):
    """Batches ``start, start+1, ...`` (< stop) of a plan, split round-robin over DataLoader workers."""

    def __init__(self, loader: "PackedLoader", start: int, stop: Optional[int]):
        self.dataset, self.plan, self.start, self.stop = loader.dataset, loader.plan_batch, start, stop

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        batch = self.start + worker
        while self.stop is None or batch < self.stop:
            yield collate_packed([self.dataset[int(i)] for i in self.plan(batch)])
            batch += workers


class PackedLoader:
    """Iterable of collated batches ``{input_ids, labels, position_ids}`` (each (B, T) int64) for one rank.

    ``infinite=True`` (training): an endless stream over epochs, with a cursor (``state_dict``).
    ``infinite=False`` (validation): every ``iter()`` is one full pass over this rank's share, in order.
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = False, infinite: bool = True,
                 pin_memory: bool = False, prefetch_factor: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle, self.infinite = seed, shuffle, infinite
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.num_sequences = len(dataset)
        self.order = SequenceOrder(self.num_sequences, seed, shuffle and infinite)
        if infinite:
            if self.num_sequences < world_size * batch_size:
                logger.warning("%s: an epoch has %d sequences, fewer than one global batch (%d ranks x %d); "
                               "sequences repeat within a step", dataset.name, self.num_sequences, world_size, batch_size)
            self.sequences_per_rank: Optional[int] = None
        else:
            self.sequences_per_rank = self.num_sequences // world_size
            if self.sequences_per_rank == 0:
                raise ValueError(
                    f"{dataset.name}: {self.num_sequences} sequence(s) of {dataset.seq_len} tokens cannot be shared by "
                    f"{world_size} ranks; use more data (e.g. a larger validation fraction) or a shorter data.seq_len"
                )
            dropped = self.num_sequences - self.sequences_per_rank * world_size
            if dropped:
                logger.info("%s: %d sequence(s) left out so every rank gets %d", dataset.name, dropped, self.sequences_per_rank)
        self._next_batch = 0

    # -- the plan -------------------------------------------------------------------------------
    def local_indices(self, batch: int) -> np.ndarray:
        """This rank's local sequence indices ``k`` of local batch ``batch``."""
        k = np.arange(batch * self.batch_size, (batch + 1) * self.batch_size, dtype=np.int64)
        if self.sequences_per_rank is not None:
            k = k[k < self.sequences_per_rank]
        return k

    def global_indices(self, batch: int) -> np.ndarray:
        return self.local_indices(batch) * self.world_size + self.rank

    def plan_batch(self, batch: int) -> np.ndarray:
        """Dataset indices of local batch ``batch`` (the same on every process that asks)."""
        return self.order(self.global_indices(batch))

    @property
    def num_batches(self) -> Optional[int]:
        """Batches per pass (validation); None for the endless training stream."""
        if self.sequences_per_rank is None:
            return None
        return math.ceil(self.sequences_per_rank / self.batch_size)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an infinite (training) PackedLoader has no length; see batches_per_epoch")
        return self.num_batches

    @property
    def batches_per_epoch(self) -> float:
        return self.num_sequences / (self.world_size * self.batch_size)

    @property
    def epoch(self) -> int:
        """Epoch of the next sequence this rank will read (training)."""
        return int(self.global_indices(self._next_batch)[0] // self.num_sequences)

    # -- iteration ------------------------------------------------------------------------------
    def _loader(self, start: int, stop: Optional[int]):
        stream = _BatchStream(self, start, stop)
        if self.num_workers == 0:
            return iter(stream)
        kwargs: dict[str, Any] = {}
        if self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return stop_workers_at_exit(iter(DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False, worker_init_fn=ignore_stop_signals, **kwargs)))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.infinite:
            yield from self._loader(0, self.num_batches)
            return
        for batch in self._loader(self._next_batch, None):
            self._next_batch += 1  # counted when handed over, not when a worker produced it
            yield batch

    # -- cursor ---------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"seq_len": self.dataset.seq_len, "num_sequences": self.num_sequences, "seed": self.seed,
                "shuffle": self.shuffle, "label_mode": self.dataset.label_mode, "data": self.dataset.fingerprint}

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor: the global position (sequences handed out by all ranks), plus what it is
        only valid for."""
        return {"version": CURSOR_VERSION, "kind": "packed", "position": self._next_batch * self.batch_size * self.world_size,
                "next_batch": self._next_batch, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size, **self._identity()}

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Continue exactly after the last batch recorded in ``state`` (this rank's cursor, or those of every
        rank of the saving run), also on another number of ranks or micro-batch size; refuse another data setup."""
        cursors = [state] if isinstance(state, dict) else list(state)
        for cursor in cursors:
            if cursor.get("version") != CURSOR_VERSION or cursor.get("kind") != "packed":
                raise ValueError(f"data cursor (version {cursor.get('version')!r}, kind {cursor.get('kind')!r}) is not "
                                 f"a prepared-data cursor of version {CURSOR_VERSION}: resume with the data setup it was saved with")
            diffs = [f"{key}: checkpoint {cursor.get(key)!r} vs now {value!r}"
                     for key, value in self._identity().items() if cursor.get(key) != value]
            if diffs:
                raise ValueError("cannot resume the data stream exactly, the data setup changed (" + "; ".join(diffs)
                                 + "). Resume with the same data, seq_len and seed.")
        positions = {cursor["position"] for cursor in cursors}
        if len(positions) != 1:
            raise ValueError(f"the ranks' data cursors disagree on the global position ({sorted(positions)}): not one checkpoint")
        position, saved = positions.pop(), cursors[0]
        per_batch = self.batch_size * self.world_size
        if position % per_batch:
            raise ValueError(
                f"the checkpoint is at global sequence {position}, not a multiple of micro-batch {self.batch_size} x "
                f"{self.world_size} ranks: choose a micro-batch size and number of ranks whose product divides the "
                "global batch size")
        self._next_batch = position // per_batch
        if (saved["world_size"], saved["batch_size"]) != (self.world_size, self.batch_size):
            logger.warning("data cursor remapped: global sequence %d, saved by %d rank(s) x micro-batch %d, continues on "
                           "%d rank(s) x micro-batch %d (rank %d at batch %d)", position, saved["world_size"],
                           saved["batch_size"], self.world_size, self.batch_size, self.rank, self._next_batch)
        else:
            logger.info("data cursor restored: rank %d continues at batch %d (epoch %d)", self.rank, self._next_batch, self.epoch)
