"""Packing: a token stream with document offsets -> fixed-length training sequences.

Layout. The documents of a split are concatenated into one stream, each ending with EOS
(``[BOS] doc EOS``). ``doc_offsets`` (int64, length ``num_documents + 1``) holds each document's start in
the stream and, last, the stream length. Sequence ``i`` covers stream positions ``[i*T, (i+1)*T)``:

* ``input_ids[t]  = stream[i*T + t]``
* ``labels[t]     = input_ids[t]`` with ``label_mode="unshifted"`` (default; the HF convention that
  ``models/`` follows: the model shifts, position t predicts ``labels[t+1]``, so the first token of each
  window is never a target), or ``= stream[i*T + t + 1]`` with ``"shifted"`` (next-token targets for a
  model that does NOT shift; windows then read T+1 tokens, so every stream token but the first is a target
  exactly once).
* ``position_ids[t]`` = offset from the latest document start inside the window; it restarts at 0 at every
  document start *and* at the window start (a window that begins mid-document is a fresh segment for the
  model: recurrent state and attention both start there). Hence ``position_ids == 0`` marks exactly the
  segment starts, which :func:`cu_seqlens_from_position_ids` turns into the flattened ``cu_seqlens``.

Sample dicts hold int64 tensors of shape (T,); :func:`collate_packed` stacks them to (B, T).
"""
from __future__ import annotations

import hashlib
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


class TokenArray(Protocol):
    """Anything that holds a 1-D token stream: ``len()`` and ``read(start, stop) -> np.ndarray``."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class InMemoryTokens:
    """A token stream held in a numpy array (tests, small corpora, streaming buffers)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise ValueError(f"a token stream is 1-D, got shape {self.tokens.shape}")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]


def concat_documents(documents: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(stream, doc_offsets) of already-tokenized documents (each including its EOS)."""
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stream = np.concatenate(documents).astype(np.int64) if documents else np.zeros(0, dtype=np.int64)
    return stream, offsets


def window_position_ids(doc_offsets: np.ndarray, start: int, length: int) -> np.ndarray:
    """Position ids of stream positions ``[start, start + length)``: restart at document and window starts."""
    positions = np.arange(start, start + length, dtype=np.int64)
    doc = np.searchsorted(doc_offsets, positions, side="right") - 1
    segment_start = np.maximum(np.asarray(doc_offsets[doc], dtype=np.int64), start)
    return positions - segment_start


class PackedDataset(torch.utils.data.Dataset):
    """Map-style dataset of packed sequences: ``dataset[i] -> {input_ids, labels, position_ids}``.

    ``tokens`` may be a numpy array or any :class:`TokenArray` (e.g. memory-mapped shards). Reads are
    lazy, so a dataset over memory-mapped shards is cheap to pickle into DataLoader workers.
    """

    def __init__(self, tokens, doc_offsets: Optional[np.ndarray], seq_len: int, *, label_mode: str = "unshifted",
                 name: str = "dataset", fingerprint: Optional[str] = None):
        if label_mode not in ("shifted", "unshifted"):
            raise ValueError(f"label_mode={label_mode!r} is not 'shifted' or 'unshifted'")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens: TokenArray = InMemoryTokens(tokens) if isinstance(tokens, np.ndarray) else tokens
        # doc_offsets=None: take them from the token store lazily (memory-mapped, re-opened per process
        # instead of being pickled into every DataLoader worker).
        self._own_offsets = doc_offsets
        doc_offsets = self.doc_offsets
        self.seq_len, self.label_mode, self.name = seq_len, label_mode, name
        self.num_tokens = len(self.tokens)
        self.num_documents = len(doc_offsets) - 1
        if self.num_documents < 0 or int(doc_offsets[-1]) != self.num_tokens or (self.num_documents and int(doc_offsets[0]) != 0):
            raise ValueError(f"{name}: document offsets do not match the token stream ({self.num_tokens} tokens)")
        self.shift = label_mode == "shifted"
        need = seq_len + 1 if self.shift else seq_len
        if self.num_tokens < need:
            raise ValueError(
                f"{name}: seq_len={seq_len} is longer than the available data: one sequence needs {need} tokens "
                f"but there are only {self.num_tokens} ({self.num_documents} documents). Lower data.seq_len or use more data."
            )
        self._len = (self.num_tokens - 1) // seq_len if self.shift else self.num_tokens // seq_len
        self.fingerprint = fingerprint or hashlib.sha256(
            f"{name}|{self.num_tokens}|{self.num_documents}".encode()).hexdigest()

    @property
    def doc_offsets(self) -> np.ndarray:
        if self._own_offsets is not None:
            return self._own_offsets
        cached = self.__dict__.get("_lazy_offsets")
        if cached is None:
            cached = self.__dict__["_lazy_offsets"] = self.tokens.doc_offsets
        return cached

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lazy_offsets", None)
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self._len:
            raise IndexError(f"sequence {index} out of range [0, {self._len})")
        T = self.seq_len
        start = index * T
        chunk = np.asarray(self.tokens.read(start, start + T + (1 if self.shift else 0)), dtype=np.int64)
        input_ids = torch.from_numpy(chunk[:T].copy())
        labels = torch.from_numpy(chunk[1:].copy()) if self.shift else input_ids.clone()
        position_ids = torch.from_numpy(window_position_ids(self.doc_offsets, start, T))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_packed(samples: Sequence[dict[str, torch.Tensor]], with_cu_seqlens: bool = False) -> dict[str, torch.Tensor]:
    """Stack samples into (B, T) tensors; optionally add the flattened ``cu_seqlens`` (int32)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    if with_cu_seqlens:
        batch["cu_seqlens"] = cu_seqlens_from_position_ids(batch["position_ids"])
    return batch


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 ``cu_seqlens`` of the (1, B*T) flattening of a packed (B, T) batch.

    A segment starts wherever ``position_ids == 0`` and at every row start (rows are independent
    sequences even if a caller's position ids continue across the row boundary). Returns
    ``[0, s_1, ..., B*T]`` (starts then the total length), strictly increasing.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (T,) or (B, T), got shape {tuple(position_ids.shape)}")
    B, T = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().flatten()
    total = torch.tensor([B * T], device=position_ids.device, dtype=flat.dtype)
    return torch.cat([flat, total]).to(torch.int32)


# --- sequence order ---------------------------------------------------------------------------


_MIX = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xBF58476D1CE4E5B9)


def _round_keys(seed: int, epoch: int, rounds: int = 4) -> list[np.uint64]:
    digest = hashlib.blake2b(f"feistel|{seed}|{epoch}".encode(), digest_size=8 * rounds).digest()
    return [np.uint64(int.from_bytes(digest[8 * r: 8 * r + 8], "little")) for r in range(rounds)]


def feistel_permute(indices: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A pseudo-random bijection of ``[0, n)`` (seeded by ``seed`` and ``epoch``) applied to ``indices``.

    A 4-round Feistel network on the smallest even bit width covering ``n``, with cycle walking to stay
    in range. O(1) memory, so shuffling billions of sequences costs nothing and every worker and rank
    computes the same order independently.
    """
    idx = np.asarray(indices, dtype=np.uint64)
    if n <= 1:
        return idx.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(seed, epoch)

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for key in keys:
            mixed = (right ^ key) * _MIX
            mixed ^= mixed >> np.uint64(29)
            mixed *= _MIX2
            mixed ^= mixed >> np.uint64(32)
            left, right = right, left ^ (mixed & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        out = once(idx)
        todo = out >= np.uint64(n)
        while todo.any():  # cycle walking: expected < 4 extra rounds since 2**bits < 4n
            out[todo] = once(out[todo])
            todo = out >= np.uint64(n)
    return out.astype(np.int64)


class SequenceOrder:
    """Global sequence index ``g`` (0, 1, 2, ... over all epochs) -> dataset index.

    Epoch ``e = g // n`` visits every sequence once; with ``shuffle`` in a fresh permutation per epoch.
    """

    def __init__(self, num_sequences: int, seed: int = 0, shuffle: bool = False):
        if num_sequences < 1:
            raise ValueError("no sequences to order")
        self.n, self.seed, self.shuffle = num_sequences, seed, shuffle

    def __call__(self, global_indices: np.ndarray) -> np.ndarray:
        g = np.asarray(global_indices, dtype=np.int64)
        epoch, within = np.divmod(g, self.n)
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for e in np.unique(epoch):  # a batch spans at most two epochs
            sel = epoch == e
            out[sel] = feistel_permute(within[sel], self.n, self.seed, int(e))
        return out
