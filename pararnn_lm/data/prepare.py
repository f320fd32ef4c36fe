"""Prepare once, train many times: tokenize a source into memory-mapped token shards.

Directory layout (one per split)::

    index.json        format, dtype, vocab size, tokenizer fingerprint, EOS/BOS ids, source, shard list
                      (file, tokens, blake2b checksum), token and document counts
    doc_offsets.npy   int64 (num_documents + 1,): document starts in the global stream, then its length
    shard_00000.bin   raw little-endian tokens (uint16 when the vocabulary fits, else uint32)
    ...

Shards are consecutive slices of one global stream (documents may straddle two shards). Readers open them
with ``numpy.memmap`` lazily, per process, so DataLoader workers and many ranks share the page cache.
Everything is written into a temporary directory and renamed into place at the end: an interrupted
prepare never leaves a directory that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ._cache import atomic_directory
from .tokenize import tokenize_documents
from .tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)

FORMAT = "pararnn-token-shards-v1"
INDEX_FILE = "index.json"
OFFSETS_FILE = "doc_offsets.npy"
VERIFY_BELOW_BYTES = 1 << 30  # verify_checksums=None: verify shards smaller than this in total


class ShardError(ValueError):
    """Prepared shards are missing, corrupt, truncated, or do not match the tokenizer."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _progress(total: Optional[int], desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not enabled, mininterval=1.0, dynamic_ncols=True)


def prepare_shards(texts: Iterable[str], tokenizer, out_dir: str | os.PathLike, *, add_bos: bool = False,
                   num_proc: int = 1, shard_tokens: int = 1 << 27, source_name: str = "",
                   source_fingerprint: str = "", total_documents: Optional[int] = None,
                   progress: bool = True) -> Path:
    """Tokenize ``texts`` (one document each) into shards under ``out_dir`` (replaced atomically)."""
    out_dir = Path(out_dir)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    shards: list[dict] = []
    offsets: list[int] = [0]
    total = 0
    with atomic_directory(out_dir) as tmp:
        handle, hasher, in_shard = None, None, 0

        def close_shard() -> None:
            nonlocal handle, hasher, in_shard
            if handle is not None:
                handle.close()
                shards[-1].update(tokens=in_shard, blake2b=hasher.hexdigest())
            handle, hasher, in_shard = None, None, 0

        with _progress(total_documents, f"tokenizing -> {out_dir.name}", progress) as bar:
            for ids in tokenize_documents(texts, tokenizer, add_bos=add_bos, num_proc=num_proc):
                if ids.size and int(ids.max()) >= vocab_size:
                    raise ShardError(f"token id {int(ids.max())} >= vocab size {vocab_size}: inconsistent tokenizer")
                data = ids.astype(dtype)
                while data.size:  # split documents across shard boundaries
                    if handle is None:
                        name = f"shard_{len(shards):05d}.bin"
                        shards.append({"file": name})
                        handle, hasher = open(tmp / name, "wb"), hashlib.blake2b(digest_size=16)
                    take = data[: shard_tokens - in_shard]
                    raw = take.astype(dtype.newbyteorder("<"), copy=False).tobytes()
                    handle.write(raw)
                    hasher.update(raw)
                    in_shard += take.size
                    data = data[take.size:]
                    if in_shard == shard_tokens:
                        close_shard()
                total += ids.size
                offsets.append(total)
                bar.update(1)
        close_shard()
        if total == 0:
            raise ShardError(f"empty dataset: {source_name or 'the source'} produced no documents")
        np.save(tmp / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
        index = {
            "format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id if add_bos else None,
            "add_bos": add_bos, "num_tokens": total, "num_documents": len(offsets) - 1,
            "source": source_name, "source_fingerprint": source_fingerprint, "shards": shards,
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    logger.info("prepared %s: %d documents, %d tokens, %d shard(s) of %s", out_dir, len(offsets) - 1, total,
                len(shards), dtype.name)
    return out_dir


class TokenShards:
    """Read-only view of a prepared directory: a lazily memory-mapped token stream.

    Validates on open: the index, every shard's size (truncation), the checksums (``verify``), the
    document offsets, and - when given - the tokenizer fingerprint and vocabulary size.
    """

    def __init__(self, directory: str | os.PathLike, *, tokenizer=None, vocab_size: Optional[int] = None,
                 verify: Optional[bool] = None):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise ShardError(f"{self.directory} is not a prepared token directory: no {INDEX_FILE} "
                             "(run scripts/prepare_data.py, or remove data.prepared_dir)")
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as err:
            raise ShardError(f"{index_path} is corrupt ({err.msg}); re-run the prepare step") from err
        if self.index.get("format") != FORMAT:
            raise ShardError(f"{index_path}: format {self.index.get('format')!r}, expected {FORMAT!r}; re-run the prepare step")
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.vocab_size = int(self.index["vocab_size"])
        self.num_tokens = int(self.index["num_tokens"])
        self.num_documents = int(self.index["num_documents"])
        self.eos_token_id = self.index["eos_token_id"]
        self.fingerprint = hashlib.sha256(json.dumps(
            [self.index["tokenizer_fingerprint"], self.index["shards"]], sort_keys=True).encode()).hexdigest()
        self._check_tokenizer(tokenizer, vocab_size)
        self._check_shards(verify)
        self._offsets_path = self.directory / OFFSETS_FILE
        offsets = self.doc_offsets
        if offsets.ndim != 1 or len(offsets) != self.num_documents + 1 or int(offsets[0]) != 0 \
                or int(offsets[-1]) != self.num_tokens:
            raise ShardError(f"{self._offsets_path} does not match {index_path} "
                             f"({len(offsets)} offsets for {self.num_documents} documents); re-run the prepare step")
        self._maps: Optional[list[np.memmap]] = None

    # -- validation ---------------------------------------------------------------------------
    def _check_tokenizer(self, tokenizer, vocab_size: Optional[int]) -> None:
        if tokenizer is not None:
            vocab_size = len(tokenizer) if vocab_size is None else vocab_size
            theirs = self.index["tokenizer_fingerprint"]
            ours = tokenizer_fingerprint(tokenizer)
            if theirs != ours:
                raise ShardError(
                    f"tokenizer mismatch: the shards in {self.directory} were tokenized with tokenizer {theirs[:12]} "
                    f"(vocab {self.vocab_size}), but this run uses tokenizer {ours[:12]} (vocab {len(tokenizer)}). "
                    "Use the tokenizer saved with the shards (data.tokenizer) or re-run the prepare step."
                )
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ShardError(f"vocab size mismatch: the shards in {self.directory} have vocab {self.vocab_size}, "
                             f"this run expects {vocab_size}")

    def _check_shards(self, verify: Optional[bool]) -> None:
        total = 0
        for shard in self.index["shards"]:
            path = self.directory / shard["file"]
            if not path.is_file():
                raise ShardError(f"missing shard {path}; re-run the prepare step")
            expected = int(shard["tokens"]) * self.dtype.itemsize
            actual = path.stat().st_size
            if actual != expected:
                raise ShardError(f"shard {path} is truncated or corrupt: {actual} bytes, expected {expected} "
                                 f"({shard['tokens']} tokens); re-run the prepare step")
            total += int(shard["tokens"])
        if total != self.num_tokens:
            raise ShardError(f"{self.directory / INDEX_FILE}: shards hold {total} tokens, index says {self.num_tokens}")
        if verify is None:
            verify = total * self.dtype.itemsize < VERIFY_BELOW_BYTES
        if verify:
            for shard in self.index["shards"]:
                path = self.directory / shard["file"]
                hasher = hashlib.blake2b(digest_size=16)
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 24), b""):
                        hasher.update(block)
                if hasher.hexdigest() != shard["blake2b"]:
                    raise ShardError(f"shard {path} is corrupt: checksum mismatch; re-run the prepare step")

    # -- reading ------------------------------------------------------------------------------
    @property
    def doc_offsets(self) -> np.ndarray:
        """Document starts + stream length (memory-mapped: large corpora have many documents)."""
        return np.load(self._offsets_path, mmap_mode="r")

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(self.directory / s["file"], dtype=self.dtype, mode="r", shape=(int(s["tokens"]),))
                          for s in self.index["shards"]]
            self._starts = np.cumsum([0] + [int(s["tokens"]) for s in self.index["shards"]])
        return self._maps

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the global stream (may span shards) as int64."""
        start, stop = max(0, start), min(stop, self.num_tokens)
        maps = self._open()
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, pos, shard = [], start, first
        while pos < stop:
            lo = pos - int(self._starts[shard])
            hi = min(stop, int(self._starts[shard + 1])) - int(self._starts[shard])
            parts.append(np.asarray(maps[shard][lo:hi], dtype=np.int64))
            pos += hi - lo
            shard += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __getstate__(self) -> dict:
        # memmaps are re-opened in each process (pickling them would copy the data)
        state = self.__dict__.copy()
        state["_maps"] = None
        return state
