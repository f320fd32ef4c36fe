"""Streaming: tokenize and pack on the fly (corpora too large to prepare, e.g. SlimPajama with
``data.streaming=true``). Same batches and cursor contract as :class:`~pararnn_lm.data.loader.PackedLoader`.

Rank ``r`` of ``W`` takes documents ``i`` with ``i % W == r`` (i = position in the source, per epoch),
packs them into its own token stream and cuts ``(B, T)`` batches from it. Tokenization runs in the main
process in chunks with the multi-threaded Rust tokenizer (``num_workers`` does not apply here).

Cursor: (epoch, index of the next unread document, the unconsumed token buffer with its document starts,
batches handed out). Resume re-reads the source up to that document without tokenizing it, so it is exact;
it costs one pass of reading over the skipped part of the epoch. Sequences are not shuffled (the order
is the source's); shuffle a streaming HF dataset upstream if needed.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Iterator

import numpy as np
import torch

from .bundle import DataBundle, build_tokenizer
from .packing import window_position_ids
from .sources import build_sources
from .tokenize import tokenize_documents

logger = logging.getLogger(__name__)

STREAM_CURSOR_VERSION = 1


class StreamingPackedLoader:
    """Iterable of ``{input_ids, labels, position_ids}`` (B, T) batches from a streamed text source."""

    def __init__(self, source, tokenizer, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 label_mode: str = "unshifted", add_bos: bool = False, infinite: bool = True, chunk_docs: int = 128,
                 name: str = "stream"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.source, self.tokenizer, self.seq_len, self.batch_size = source, tokenizer, seq_len, batch_size
        self.rank, self.world_size, self.label_mode, self.add_bos = rank, world_size, label_mode, add_bos
        self.infinite, self.chunk_docs, self.name = infinite, chunk_docs, name
        self.shift = label_mode == "shifted"
        self._state = self._fresh_state()

    @staticmethod
    def _fresh_state() -> dict[str, Any]:
        return {"epoch": 0, "next_doc": 0, "buffer": [], "starts": [], "batches": 0}

    def _my_texts(self, state: dict[str, Any], read: list) -> Iterator[str]:
        for i, doc in enumerate(self.source.documents()):
            if i < state["next_doc"] or i % self.world_size != self.rank:
                continue
            read.append(i)
            yield doc.text

    def _cut(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        T, B = self.seq_len, self.batch_size
        buffer = np.asarray(state["buffer"], dtype=np.int64)
        offsets = np.asarray(sorted(set([0] + state["starts"] + [len(buffer)])), dtype=np.int64)
        inputs, labels, positions = [], [], []
        for b in range(B):
            s = b * T
            inputs.append(buffer[s:s + T])
            labels.append(buffer[s + 1:s + T + 1] if self.shift else buffer[s:s + T])
            positions.append(window_position_ids(offsets, s, T))
        used = B * T
        state["buffer"] = state["buffer"][used:]
        state["starts"] = [p - used for p in state["starts"] if p >= used]
        state["batches"] += 1
        return {"input_ids": torch.from_numpy(np.stack(inputs)), "labels": torch.from_numpy(np.stack(labels)),
                "position_ids": torch.from_numpy(np.stack(positions))}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        state = self._state if self.infinite else self._fresh_state()
        need = self.batch_size * self.seq_len + (1 if self.shift else 0)
        while True:
            read: list[int] = []
            docs_this_pass = 0
            for ids in tokenize_documents(self._my_texts(state, read), self.tokenizer, add_bos=self.add_bos,
                                          chunk_docs=self.chunk_docs):
                state["next_doc"] = read[docs_this_pass] + 1
                docs_this_pass += 1
                state["starts"].append(len(state["buffer"]))
                state["buffer"].extend(ids.tolist())
                while len(state["buffer"]) >= need:
                    yield self._cut(state)
            if not self.infinite:
                return  # a partial final batch is dropped (validation only)
            if docs_this_pass == 0 and state["next_doc"] == 0:
                raise ValueError(f"{self.name}: empty dataset: {self.source.name} gave rank {self.rank} no documents")
            state["epoch"] += 1
            state["next_doc"] = 0
            logger.info("%s: rank %d starts epoch %d", self.name, self.rank, state["epoch"])

    def _identity(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "label_mode": self.label_mode, "add_bos": self.add_bos, "source": self.source.fingerprint}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STREAM_CURSOR_VERSION, **copy.deepcopy(self._state), **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STREAM_CURSOR_VERSION:
            raise ValueError(f"streaming data cursor version {state.get('version')!r} is not {STREAM_CURSOR_VERSION}")
        diffs = [f"{k}: checkpoint {state.get(k)!r} vs now {v!r}" for k, v in self._identity().items() if state.get(k) != v]
        if diffs:
            raise ValueError("cannot resume the data stream exactly, the data setup changed (" + "; ".join(diffs) + ")")
        self._state = {k: copy.deepcopy(state[k]) for k in self._fresh_state()}


def build_streaming(cfg, rank: int, world_size: int, batch_size: int, eval_batch_size: int):
    train_source, validation_source = build_sources(cfg)
    tokenizer = build_tokenizer(cfg, train_source)
    if cfg.num_workers:
        logger.info("data.streaming: tokenizing in the main process (data.num_workers=%d not used)", cfg.num_workers)
    if cfg.shuffle:
        logger.info("data.streaming: sequences follow the source order (data.shuffle not applied)")
    common = dict(rank=rank, world_size=world_size, label_mode=cfg.label_mode, add_bos=cfg.add_bos)
    return DataBundle(
        train=StreamingPackedLoader(train_source, tokenizer, cfg.seq_len, batch_size, infinite=True, name="train stream", **common),
        validation=StreamingPackedLoader(validation_source, tokenizer, cfg.seq_len, eval_batch_size, infinite=False,
                                         name="validation stream", **common),
        tokenizer=tokenizer,
    )
