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
from typing import Iterable, Iterator, Optional

import numpy as np

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


def _worker_init(spec: str) -> None:
    global _WORKER_BACKEND
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; avoid oversubscription
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


def tokenize_documents(texts: Iterable[str], tokenizer, *, add_bos: bool = False, num_proc: int = 1,
                       chunk_docs: int = 256) -> Iterator[np.ndarray]:
    """Yield one int64 array per document: ``[BOS] + ids + [EOS]``, in input order.

    ``num_proc == 1`` encodes in this process (the Rust tokenizer already uses several threads);
    ``num_proc > 1`` spreads chunks of ``chunk_docs`` documents over a spawned process pool.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (needed as the document separator)")
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise ValueError("data.add_bos=true but the tokenizer has no BOS token")
    head = [] if bos is None else [bos]
    spec = backend_json(tokenizer)

    def wrap(ids_list: list[list[int]]) -> Iterator[np.ndarray]:
        for ids in ids_list:
            yield np.asarray(head + list(ids) + [eos], dtype=np.int64)

    if spec is None:  # slow tokenizer: no Rust backend to share with workers
        if num_proc > 1:
            logger.warning("tokenizer %s has no fast backend; tokenizing in one process", type(tokenizer).__name__)
        for chunk in _chunks(texts, chunk_docs):
            yield from wrap(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return

    if num_proc <= 1:
        backend = _make_backend(spec)
        for chunk in _chunks(texts, chunk_docs):
            yield from wrap([enc.ids for enc in backend.encode_batch(chunk, add_special_tokens=False)])
        return

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_worker_init, initargs=(spec,)) as pool:
        # imap keeps document order; a few chunks in flight per worker keep all processes busy.
        for ids_list in pool.imap(_encode_chunk, _chunks(texts, chunk_docs), chunksize=1):
            yield from wrap(ids_list)
