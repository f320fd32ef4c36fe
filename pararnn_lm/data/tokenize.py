"""Document tokenization, in-process (multi-threaded Rust) or in a process pool for large corpora.

Kept free of torch imports so pool workers (spawned, not forked: the Rust tokenizer's thread pool and
torch's threads do not survive ``fork`` safely) start quickly.

Every document becomes ``[BOS] ids... EOS`` (BOS only with ``add_bos``). Special-token strings that occur
in the raw text (e.g. a literal "<|endoftext|>") are encoded as ordinary text, so the only EOS tokens in a
stream are the separators we insert.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections import deque
from typing import Iterable, Iterator, Optional

import numpy as np

from .worker_signals import close_pool, ignore_stop_signals

logger = logging.getLogger(__name__)

_WORKER_BACKEND = None  # the tokenizer of a pool worker


def backend_json(tokenizer) -> Optional[str]:
    """The Rust tokenizer's JSON (what pool workers rebuild), or None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else backend.to_str()


def _make_backend(spec: str):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(spec)
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = True  # literal special-token strings in text stay text
    return backend


def _exit_with_parent(parent: int) -> None:
    """A pool worker holds both ends of its task pipe, so it would wait forever for a parent killed
    with SIGKILL (a preempted job): leave when the parent is gone, as DataLoader workers do."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _worker_init(spec: str) -> None:
    global _WORKER_BACKEND
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; avoid oversubscription
    ignore_stop_signals()
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _WORKER_BACKEND = _make_backend(spec)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return [enc.ids for enc in _WORKER_BACKEND.encode_batch(texts, add_special_tokens=False)]


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class TokenizerPool:
    """Encodes lists of texts into ``[BOS] ids... EOS`` arrays, in this process (``num_workers=0``: the
    multi-threaded Rust tokenizer) or in ``num_workers`` spawned worker processes.

    ``submit(texts)`` returns at once with a handle whose ``result()`` gives the arrays in input order;
    a caller keeps a bounded number of handles in flight (reading ahead of what it consumes), which
    keeps every worker busy without reading the whole corpus into the task queue.
    """

    def __init__(self, tokenizer, *, add_bos: bool = False, num_workers: int = 0):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token (needed as the document separator)")
        bos = tokenizer.bos_token_id if add_bos else None
        if add_bos and bos is None:
            raise ValueError("data.add_bos=true but the tokenizer has no BOS token")
        self.head, self.eos = [] if bos is None else [bos], eos
        spec = backend_json(tokenizer)
        self._slow = tokenizer if spec is None else None
        if spec is None and num_workers > 0:
            logger.warning("tokenizer %s has no fast backend; tokenizing in one process", type(tokenizer).__name__)
        self.num_workers = num_workers if spec is not None else 0
        self._backend = _make_backend(spec) if spec is not None and self.num_workers == 0 else None
        self._pool = None
        if self.num_workers:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.num_workers, initializer=_worker_init, initargs=(spec,))
            self._close = weakref.finalize(self, close_pool, self._pool)  # also when dropped or at exit

    def _wrap(self, ids_list: list[list[int]]) -> list[np.ndarray]:
        return [np.asarray(self.head + list(ids) + [self.eos], dtype=np.int64) for ids in ids_list]

    def submit(self, texts: list[str]) -> "_Encoded":
        if self._pool is not None:
            return _Encoded(self, pending=self._pool.apply_async(_encode_chunk, (texts,)))
        if self._slow is not None:
            return _Encoded(self, done=self._slow(texts, add_special_tokens=False)["input_ids"])
        return _Encoded(self, done=[enc.ids for enc in self._backend.encode_batch(texts, add_special_tokens=False)])

    def close(self) -> None:
        if self._pool is not None:
            self._close()
            self._pool = None


class _Encoded:
    def __init__(self, pool: TokenizerPool, pending=None, done=None):
        self.pool, self.pending, self.done = pool, pending, done

    def result(self) -> list[np.ndarray]:
        return self.pool._wrap(self.pending.get() if self.done is None else self.done)


def tokenize_documents(texts: Iterable[str], tokenizer, *, add_bos: bool = False, num_proc: int = 1,
                       chunk_docs: int = 256) -> Iterator[np.ndarray]:
    """Yield one int64 array per document: ``[BOS] + ids + [EOS]``, in input order.

    ``num_proc == 1`` encodes in this process (the Rust tokenizer already uses several threads);
    ``num_proc > 1`` spreads chunks of ``chunk_docs`` documents over a spawned process pool, with a
    few chunks per worker in flight.
    """
    pool = TokenizerPool(tokenizer, add_bos=add_bos, num_workers=num_proc if num_proc > 1 else 0)
    in_flight: deque = deque()
    try:
        for chunk in _chunks(texts, chunk_docs):
            in_flight.append(pool.submit(chunk))
            if len(in_flight) > 2 * pool.num_workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()
    finally:
        pool.close()
