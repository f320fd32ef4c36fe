"""Streaming: read, shuffle, tokenize and pack on the fly (corpora too large to prepare, e.g. SlimPajama
with ``data.streaming=true``), from the Hugging Face hub or local .jsonl / .parquet files, one source or a
weighted mixture. Same batches and cursor contract as :class:`~pararnn_lm.data.loader.PackedLoader`.

Layout. The source is cut into ``S = data.stream_shards`` *streams* (by file, ``IterableDataset.shard``,
when it has at least S files; otherwise every stream reads the files and keeps every S-th document). Each
stream is an endless sequence of packed sequences of its own: its documents (for a mixture, the
components sampled by weight with ``interleave_datasets``, seeded per stream and epoch) are read in
blocks of ``data.shuffle_buffer`` documents, each block shuffled by a seeded permutation, tokenized (in
``data.num_workers`` worker processes, a block or two ahead), and packed; a sequence may span two blocks.

Global order. Global sequence ``g`` is sequence ``g // S`` of stream ``g % S``; rank ``r`` of ``W`` owns
``g = k*W + r`` (``k`` = its local sequence index), i.e. the streams ``p`` with ``p % W == r``, read
round-robin; its local batch ``b`` is ``k = b*B .. b*B + B - 1``. So a global batch of ``G`` sequences is
``g = s*G .. s*G + G - 1`` whatever the number of ranks and micro-batch size, as with ``PackedLoader``.

Cursor. The global position (sequences handed out over all ranks) and, per stream, where its last handed
out sequence came from: the ``datasets`` iterator state at the start of that block
(``IterableDataset.state_dict``), the block's number and the tokens carried into it, and how many of the
block's sequences were taken. Resuming loads that iterator state, re-reads and re-tokenizes that one block
and skips the taken sequences: exact, at a cost of one block wherever the run is. ``datasets``' own
shuffle buffer is not used because its content is not part of its state (a resume would refill it and
change the order). A resume on ``W'`` ranks (any divisor of S) picks the streams it now owns out of the
cursors of all the old ranks.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .bundle import DataBundle, build_tokenizer
from .packing import window_position_ids
from .sources import (
    JSONL_SUFFIXES, PARQUET_SUFFIXES, DataSourceError, TextSource, _offline, _suffix, holdout_score, resolve_files)
from .tokenize import TokenizerPool

logger = logging.getLogger(__name__)

STREAM_CURSOR_VERSION = 2
TOKENIZE_CHUNK_DOCS = 256  # documents per task sent to a tokenizer worker


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=4).digest(), "little")


# --- sources ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamComponent:
    """One source of a stream: a Hugging Face dataset (``kind='hf'``) or local files (``'files'``)."""

    name: str
    kind: str
    paths: tuple[str, ...]
    weight: float = 1.0
    hf_config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    text_field: str = "text"

    def files(self) -> list[Path]:
        files = resolve_files(list(self.paths))
        kinds = {"jsonl" if _suffix(f) in JSONL_SUFFIXES else "parquet" if _suffix(f) in PARQUET_SUFFIXES else "other"
                 for f in files}
        if kinds not in ({"jsonl"}, {"parquet"}):
            suffixes = {_suffix(f) for f in files}
            raise DataSourceError(f"{self.name}: streaming reads .jsonl/.json or .parquet files (one kind per source), "
                                  f"got {sorted(suffixes)}; use data.streaming=false for text files")
        return files

    def load(self, split: Optional[str] = None):
        """A ``datasets.IterableDataset`` of this component with one column, ``text``."""
        import datasets

        try:
            if self.kind == "files":
                files = self.files()
                builder = "parquet" if _suffix(files[0]) in PARQUET_SUFFIXES else "json"
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
            else:
                ds = datasets.load_dataset(self.paths[0], self.hf_config, split=split or self.split, streaming=True,
                                           revision=self.revision)
        except DataSourceError:
            raise
        except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
            hint = (" The hub is unreachable in offline mode and the dataset is not in the local cache."
                    if _offline() and self.kind == "hf" else "")
            raise DataSourceError(f"cannot stream {self.name}: {type(err).__name__}: {err}.{hint}") from err
        columns = ds.column_names
        if columns is not None and self.text_field not in columns:
            raise DataSourceError(f"{self.name} has no text field {self.text_field!r} (columns: {columns}); set data.text_field")
        ds = ds.select_columns([self.text_field])
        if self.text_field != "text":
            ds = ds.rename_column(self.text_field, "text")
        return ds.filter(lambda ex: ex["text"] is not None)

    @property
    def fingerprint(self) -> Any:
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files()] if self.kind == "files" else []
        return [self.name, self.kind, list(self.paths), self.weight, self.hf_config, self.split, self.revision,
                self.text_field, stats]


class StreamSource:
    """The documents of a (mixture of) streamed source(s), as ``datasets.IterableDataset`` s: the train or
    validation part, cut into streams, per epoch."""

    def __init__(self, components: Sequence[StreamComponent], *, part: str = "train", holdout_fraction: float = 0.0,
                 seed: int = 0, max_documents: Optional[int] = None, split: Optional[str] = None):
        if not components:
            raise DataSourceError("a stream needs at least one source")
        self.components, self.part, self.fraction = list(components), part, holdout_fraction
        self.seed, self.max_documents, self.split = seed, max_documents, split
        total = sum(c.weight for c in self.components)
        self.probabilities = [c.weight / total for c in self.components]
        self.names = [c.name for c in self.components]
        self.name = " + ".join(f"{c.name} ({p:.3g})" for c, p in zip(self.components, self.probabilities))
        self._loaded: dict[int, Any] = {}

    @property
    def fingerprint(self) -> str:
        parts = ["stream-v2", [c.fingerprint for c in self.components], self.part, self.fraction, self.seed,
                 self.max_documents, self.split]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    def _component(self, index: int):
        if index not in self._loaded:
            self._loaded[index] = self.components[index].load(self.split)
        return self._loaded[index]

    def dataset(self, stream: int = 0, num_streams: int = 1, epoch: int = 0):
        """Stream ``stream`` of ``num_streams`` in ``epoch``: examples ``{"text", "source"}`` (source: the
        component's index). A mixture is sampled by weight until every component was read once."""
        import datasets

        parts = []
        for index, component in enumerate(self.components):
            ds = self._component(index)
            if self.max_documents is not None:
                ds = ds.take(self.max_documents)
            if self.fraction > 0:
                want_validation, fraction, seed = self.part == "validation", self.fraction, self.seed
                ds = ds.filter(lambda ex: (holdout_score(ex["text"], seed) < fraction) == want_validation)
            if num_streams > 1:
                if ds.num_shards >= num_streams:  # whole files per stream: each file is read once
                    ds = ds.shard(num_streams, stream)
                else:
                    if epoch == 0 and stream == 0:
                        logger.warning("%s has %d file(s), fewer than the %d streams: every stream reads all of it and "
                                       "keeps every %d-th document", component.name, ds.num_shards, num_streams, num_streams)
                    ds = ds.filter(lambda ex, i: i % num_streams == stream, with_indices=True)
            parts.append(ds.map(lambda ex, i=index: {"source": i}))
        if len(parts) == 1:
            return parts[0]
        return datasets.interleave_datasets(parts, probabilities=self.probabilities, stopping_strategy="all_exhausted",
                                            seed=_seed_of("mixture", self.seed, stream, epoch))

    def texts(self) -> Iterator[str]:
        """Every document of the part, in order (what a tokenizer is trained on)."""
        for example in self.dataset():
            yield example["text"]


class _TextsOf(TextSource):
    """A :class:`StreamSource` as a plain text source (for training a tokenizer on it)."""

    def __init__(self, source: StreamSource):
        self.source, self.name = source, source.name

    @property
    def fingerprint(self) -> str:
        return self.source.fingerprint

    def texts(self) -> Iterator[str]:
        return self.source.texts()


# --- one stream ---------------------------------------------------------------------------------------


def fresh_stream_state(num_sources: int) -> dict[str, Any]:
    return {"epoch": 0, "block": 0, "hf_state": None, "carry": [], "carry_sources": [], "carry_starts": [],
            "taken": 0, "sequences": 0, "token_counts": [0] * num_sources}


class _Stream:
    """Stream ``index`` of ``num_streams``: its packed sequences, each with the state after it."""

    def __init__(self, source: StreamSource, index: int, num_streams: int, pool: TokenizerPool, *, seq_len: int,
                 shift: bool, block_docs: int, seed: int, infinite: bool, state: dict[str, Any]):
        self.source, self.index, self.num_streams, self.pool = source, index, num_streams, pool
        self.seq_len, self.shift, self.block_docs, self.seed = seq_len, shift, block_docs, seed
        self.infinite, self.state = infinite, state

    def _blocks(self) -> Iterator[tuple[int, int, Optional[str], list[tuple[str, int]]]]:
        """(epoch, block, iterator state at its start, its documents shuffled) from the resume point on."""
        epoch, block, hf_state = self.state["epoch"], self.state["block"], self.state["hf_state"]
        while True:
            ds = self.source.dataset(self.index, self.num_streams, epoch)
            if hf_state is not None:
                ds.load_state_dict(json.loads(hf_state))
            examples = iter(ds)
            while True:
                at_start = json.dumps(ds.state_dict())
                docs = [(ex["text"], ex["source"]) for ex in islice(examples, self.block_docs)]
                if not docs:
                    break
                if self.block_docs > 1:
                    order = np.random.default_rng([self.seed, self.index, epoch, block]).permutation(len(docs))
                    docs = [docs[i] for i in order]
                yield epoch, block, at_start, docs
                block += 1
                if len(docs) < self.block_docs:
                    break
            if block == 0:
                raise DataSourceError(f"{self.source.name}: stream {self.index} of {self.num_streams} holds no documents "
                                      "(fewer documents than streams? lower data.stream_shards)")
            if not self.infinite:
                return
            epoch, block, hf_state = epoch + 1, 0, None
            logger.info("%s: stream %d starts epoch %d", self.source.name, self.index, epoch)

    def _tokenized(self, lookahead: int) -> Iterator[tuple[int, int, str, list[int], list[np.ndarray]]]:
        """The blocks tokenized, ``lookahead`` blocks submitted ahead of the one consumed."""
        blocks, in_flight = self._blocks(), deque()

        def submit() -> bool:
            item = next(blocks, None)
            if item is None:
                return False
            epoch, block, at_start, docs = item
            texts = [text for text, _ in docs]
            handles = [self.pool.submit(texts[i:i + TOKENIZE_CHUNK_DOCS]) for i in range(0, len(texts), TOKENIZE_CHUNK_DOCS)]
            in_flight.append((epoch, block, at_start, [source for _, source in docs], handles))
            return True

        while len(in_flight) <= lookahead and submit():
            pass
        while in_flight:
            epoch, block, at_start, sources, handles = in_flight.popleft()
            ids = [doc for handle in handles for doc in handle.result()]
            submit()
            yield epoch, block, at_start, sources, ids

    def sequences(self, lookahead: int = 0) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        T, need = self.seq_len, self.seq_len + (1 if self.shift else 0)
        state = self.state
        carry = np.asarray(state["carry"], dtype=np.int64)
        carry_sources = np.asarray(state["carry_sources"], dtype=np.int64)
        carry_starts = list(state["carry_starts"])
        skip, total = state["taken"], state["sequences"]
        counts = np.asarray(state["token_counts"], dtype=np.int64)
        for epoch, block, at_start, sources, ids in self._tokenized(lookahead):
            carried = {"carry": carry.tolist(), "carry_sources": carry_sources.tolist(), "carry_starts": carry_starts}
            lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
            doc_starts = len(carry) + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            buffer = np.concatenate([carry, *ids]) if ids else carry
            token_sources = np.concatenate([carry_sources, np.repeat(np.asarray(sources, dtype=np.int64), lengths)])
            starts = np.asarray(carry_starts + doc_starts.tolist(), dtype=np.int64)
            offsets = np.unique(np.concatenate([[0], starts, [len(buffer)]]))
            n = (len(buffer) - need) // T + 1 if len(buffer) >= need else 0
            for i in range(skip, n):
                s = i * T
                counts += np.bincount(token_sources[s:s + T], minlength=len(counts))
                total += 1
                sample = {"input_ids": buffer[s:s + T], "labels": buffer[s + 1:s + T + 1] if self.shift else buffer[s:s + T],
                          "position_ids": window_position_ids(offsets, s, T)}
                yield sample, {"epoch": epoch, "block": block, "hf_state": at_start, **carried, "taken": i + 1,
                               "sequences": total, "token_counts": counts.tolist()}
            skip, used = 0, n * T
            carry, carry_sources = buffer[used:], token_sources[used:]
            carry_starts = [int(p) - used for p in starts if p >= used]


# --- the loader of one rank -------------------------------------------------------------------------


def _stack(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


class StreamingPackedLoader:
    """Iterable of ``{input_ids, labels, position_ids}`` (B, T) batches of one rank from a :class:`StreamSource`.

    ``infinite=True`` (training): endless, resumable (``state_dict`` / ``load_state_dict``), also onto
    another number of ranks or micro-batch size. ``infinite=False`` (validation): every ``iter()`` is one
    pass over this rank's share (stream ``rank`` of ``world_size``), unshuffled; a partial last batch is dropped.
    """

    def __init__(self, source: StreamSource, tokenizer, seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, num_streams: Optional[int] = None, label_mode: str = "unshifted",
                 add_bos: bool = False, shuffle_buffer: int = 1, seed: int = 0, num_workers: int = 0,
                 infinite: bool = True, name: str = "stream"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1 or shuffle_buffer < 1:
            raise ValueError(f"batch_size, seq_len and shuffle_buffer must be >= 1, got {batch_size}, {seq_len}, {shuffle_buffer}")
        self.source, self.tokenizer, self.seq_len, self.batch_size = source, tokenizer, seq_len, batch_size
        self.rank, self.world_size, self.label_mode, self.add_bos = rank, world_size, label_mode, add_bos
        self.shuffle_buffer, self.seed, self.num_workers = shuffle_buffer, seed, num_workers
        self.infinite, self.name = infinite, name
        self.shift = label_mode == "shifted"
        self.streams_configured = num_streams is not None
        self.num_streams = num_streams if infinite and num_streams is not None else world_size
        self._check_split(self.num_streams, world_size)
        self._pool: Optional[TokenizerPool] = None
        self._next = 0  # local sequences handed out
        self._stream_states = {p: fresh_stream_state(len(source.components)) for p in self.my_streams}

    @staticmethod
    def _check_split(num_streams: int, world_size: int) -> None:
        if num_streams % world_size:
            raise ValueError(f"the stream is cut into data.stream_shards={num_streams} parts, which {world_size} ranks "
                             f"cannot share evenly: use a number of ranks that divides {num_streams}")

    @property
    def my_streams(self) -> list[int]:
        return list(range(self.rank, self.num_streams, self.world_size))

    def _tokenizer_pool(self) -> TokenizerPool:
        if self._pool is None:
            self._pool = TokenizerPool(self.tokenizer, add_bos=self.add_bos, num_workers=self.num_workers if self.infinite else 0)
        return self._pool

    def _stream(self, index: int, state: dict[str, Any]) -> _Stream:
        return _Stream(self.source, index, self.num_streams, self._tokenizer_pool(), seq_len=self.seq_len,
                       shift=self.shift, block_docs=self.shuffle_buffer if self.infinite else 1, seed=self.seed,
                       infinite=self.infinite, state=state)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.infinite:
            sequences = self._stream(self.rank, fresh_stream_state(len(self.source.components))).sequences()
            while True:
                batch = [sample for sample, _ in islice(sequences, self.batch_size)]
                if len(batch) < self.batch_size:
                    return
                yield _stack(batch)
        streams = self.my_streams
        lookahead = 1 if self.num_workers else 0
        generators = [self._stream(p, copy.deepcopy(self._stream_states[p])).sequences(lookahead) for p in streams]
        while True:
            samples, states = [], {}
            for k in range(self._next, self._next + self.batch_size):
                slot = k % len(streams)  # local sequence k is global k*W + rank, of stream (k*W + rank) % S
                sample, states[streams[slot]] = next(generators[slot])
                samples.append(sample)
            batch = _stack(samples)
            self._stream_states.update(states)  # when handed over, not when read ahead
            self._next += self.batch_size
            yield batch

    # -- counts and cursor ------------------------------------------------------------------------
    def source_tokens(self) -> dict[str, int]:
        """Training tokens (``input_ids``) of this rank so far, per mixture component (over the whole run)."""
        totals = np.sum([state["token_counts"] for state in self._stream_states.values()], axis=0)
        return {name: int(count) for name, count in zip(self.source.names, totals)}

    def _identity(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "label_mode": self.label_mode, "add_bos": self.add_bos,
                "shuffle_buffer": self.shuffle_buffer, "seed": self.seed, "source": self.source.fingerprint}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STREAM_CURSOR_VERSION, "kind": "stream", "position": self._next * self.world_size,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "num_streams": self.num_streams, "streams": copy.deepcopy(self._stream_states), **self._identity()}

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Continue after the last batch of the saved run. ``state``: this rank's cursor, or the cursors of
        every rank of the saving run (needed when the number of ranks changed)."""
        cursors = [state] if isinstance(state, dict) else list(state)
        for cursor in cursors:
            if cursor.get("version") != STREAM_CURSOR_VERSION or cursor.get("kind") != "stream":
                raise ValueError(f"data cursor (version {cursor.get('version')!r}, kind {cursor.get('kind')!r}) is not a "
                                 f"streaming cursor of version {STREAM_CURSOR_VERSION}: resume with the data setup it was saved with")
            diffs = [f"{k}: checkpoint {cursor.get(k)!r} vs now {v!r}" for k, v in self._identity().items() if cursor.get(k) != v]
            if diffs:
                raise ValueError("cannot resume the data stream exactly, the data setup changed (" + "; ".join(diffs) + ")")
        positions = {c["position"] for c in cursors}
        if len(positions) != 1:
            raise ValueError(f"the ranks' data cursors disagree on the global position ({sorted(positions)}): not one checkpoint")
        position, saved = positions.pop(), cursors[0]
        num_streams = saved["num_streams"]
        if num_streams != self.num_streams:
            if self.streams_configured:
                raise ValueError(f"data.stream_shards={self.num_streams} but the checkpoint's stream has {num_streams} parts; "
                                 f"resume with data.stream_shards={num_streams} (or null)")
            self._check_split(num_streams, self.world_size)
            self.num_streams = num_streams
        if position % self.world_size:
            raise ValueError(f"the checkpoint is at global sequence {position}, which {self.world_size} ranks cannot share "
                             "(not at a global batch boundary)")
        found: dict[int, dict[str, Any]] = {}
        for cursor in cursors:
            found.update({int(p): s for p, s in cursor["streams"].items()})
        missing = [p for p in self.my_streams if p not in found]
        if missing:
            raise ValueError(f"rank {self.rank} needs the state of stream(s) {missing}, which the given cursor(s) lack: "
                             f"pass the cursors of every rank of the saved run (it had {saved['world_size']} ranks)")
        for p in self.my_streams:
            expected = max(0, -(-(position - p) // num_streams))  # global sequences g < position with g % S == p
            if found[p]["sequences"] != expected:
                raise ValueError(f"data cursor of stream {p} has handed out {found[p]['sequences']} sequences, but the "
                                 f"global position {position} implies {expected}: the rank files are not of one checkpoint")
        self._stream_states = {p: copy.deepcopy(found[p]) for p in self.my_streams}
        self._next = position // self.world_size
        if (saved["world_size"], saved["batch_size"]) != (self.world_size, self.batch_size):
            logger.warning("%s: resuming at global sequence %d on %d rank(s) x micro-batch %d (saved by %d rank(s) x "
                           "micro-batch %d); rank %d now reads stream(s) %s", self.name, position, self.world_size,
                           self.batch_size, saved["world_size"], saved["batch_size"], self.rank, self.my_streams)
        else:
            logger.info("%s: data cursor restored at global sequence %d", self.name, position)


# --- building -----------------------------------------------------------------------------------------


def stream_components(cfg) -> list[StreamComponent]:
    """The weighted sources of ``data.mixture``, or the single source of ``data.source`` / ``data.path``."""
    if not cfg.mixture:
        paths = (cfg.path, *cfg.extra_paths) if cfg.source == "files" else (cfg.path,)
        return [StreamComponent(cfg.path, cfg.source, tuple(paths), 1.0, cfg.hf_config, cfg.split, cfg.hf_revision,
                                cfg.text_field)]
    return [StreamComponent(part.name or part.path, part.source or cfg.source, (part.path,), part.weight,
                            part.hf_config if part.hf_config is not None else cfg.hf_config, part.split or cfg.split,
                            cfg.hf_revision, part.text_field or cfg.text_field) for part in cfg.mixture]


def stream_sources(cfg) -> tuple[StreamSource, StreamSource]:
    """(train, validation) stream sources: validation is ``data.validation_split`` (hf: a split name of every
    component; files: a path or glob) or the documents held out by a stable hash of their text."""
    components = stream_components(cfg)
    common = dict(seed=cfg.seed, max_documents=cfg.max_documents)
    if cfg.validation_split:
        if all(c.kind == "hf" for c in components):
            return StreamSource(components, **common), StreamSource(components, split=cfg.validation_split, **common)
        files = StreamComponent(cfg.validation_split, "files", (cfg.validation_split,), 1.0, text_field=cfg.text_field)
        return StreamSource(components, **common), StreamSource([files], **common)
    if cfg.validation_fraction <= 0:
        raise ValueError("no validation data: set data.validation_fraction > 0 or data.validation_split")
    return (StreamSource(components, part="train", holdout_fraction=cfg.validation_fraction, **common),
            StreamSource(components, part="validation", holdout_fraction=cfg.validation_fraction, **common))


def build_streaming(cfg, rank: int, world_size: int, batch_size: int, eval_batch_size: int) -> DataBundle:
    train_source, validation_source = stream_sources(cfg)
    tokenizer = build_tokenizer(cfg, _TextsOf(train_source)) if not cfg.tokenizer else build_tokenizer(cfg)
    common = dict(rank=rank, world_size=world_size, label_mode=cfg.label_mode, add_bos=cfg.add_bos, seed=cfg.seed)
    logger.info("data: streaming %s, %s, shuffled in blocks of %d documents, tokenized in %s", train_source.name,
                f"{cfg.stream_shards} streams" if cfg.stream_shards else "one stream per rank",
                cfg.shuffle_buffer if cfg.shuffle else 1,
                f"{cfg.num_workers} worker processes" if cfg.num_workers else "the main process")
    return DataBundle(
        train=StreamingPackedLoader(train_source, tokenizer, cfg.seq_len, batch_size, num_streams=cfg.stream_shards,
                                    shuffle_buffer=cfg.shuffle_buffer if cfg.shuffle else 1, num_workers=cfg.num_workers,
                                    infinite=True, name="train stream", **common),
        validation=StreamingPackedLoader(validation_source, tokenizer, cfg.seq_len, eval_batch_size, infinite=False,
                                         name="validation stream", **common),
        tokenizer=tokenizer,
    )
