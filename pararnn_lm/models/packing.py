"""Document boundaries of a batch, derived once per forward and shared by every mixer.

The single source of truth is ``positions`` (B, T): the position of each token inside its document,
restarting at 0 at every document start. Everything else follows from it:

- a token with position 0 starts a document: RNN/SSM states and the conv window restart there, and
  attention only sees keys of the same document;
- a row whose first position is > 0 *continues* a document (from a cache when decoding);
- the packed layout (1, B*T) with ``cu_seqlens`` treats every row start as a boundary too (Mamba2's
  fla SSD uses it; the ParaRNN mixers pass ``resets`` to the engine instead, which needs no host
  sync; ``has_inner_resets`` - one sync - still decides the attention mask and the fla SSD path).

Left padding (``attention_mask`` with leading zeros) is folded into the same mechanism: every pad is
a one-token document, and the first real token starts a new one, so no state leaks from pads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(N+1,) document offsets of a packed row -> (1, total) positions restarting at every offset."""
    cu = cu_seqlens.to(torch.long)
    t = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu[1:-1].contiguous(), t, right=True) if cu.numel() > 2 else torch.zeros_like(t)
    return (t - cu[doc]).unsqueeze(0)


def positions_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask -> (B, S) positions; pads get position 0 (one-token documents)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0).masked_fill(attention_mask == 0, 0)


@dataclass
class SequenceInfo:
    positions: torch.Tensor  # (B, T) long
    resets: torch.Tensor = field(init=False)  # (B, T) bool: token starts a document
    _any_inner_reset: bool | None = field(default=None, init=False)
    _packed: dict | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.resets = self.positions == 0

    @classmethod
    def one_document_per_row(cls, positions: torch.Tensor) -> "SequenceInfo":
        """Positions known to continue one document along each row (no document starts after the first
        token), so ``has_inner_resets`` needs no look at the values."""
        info = cls(positions)
        info._any_inner_reset = False
        return info

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positions.shape)  # type: ignore[return-value]

    @property
    def continues(self) -> torch.Tensor:
        """(B,) bool: the row's first token continues an earlier (cached) state."""
        return ~self.resets[:, 0]

    @property
    def known_one_document_per_row(self) -> bool:
        """True when it is already known (without reading values now) that no document starts after a
        row's first token; False when unknown or when there are such starts. Never syncs."""
        return self._any_inner_reset is False

    @property
    def has_inner_resets(self) -> bool:
        """Whether some document starts after a row's first token (then mixers need the packed path)."""
        if self._any_inner_reset is None:
            self._any_inner_reset = bool(self.resets[:, 1:].any()) if self.positions.shape[1] > 1 else False
        return self._any_inner_reset

    def doc_ids(self, offset: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) id of each token's document, counting document starts along the row (+ offset)."""
        ids = self.resets.long().cumsum(-1)
        return ids if offset is None else ids + offset[:, None]

    def packed(self) -> dict:
        """Packed (1, B*T) view: ``cu_seqlens`` (N+1,) int32, ``first_doc`` (B,) and ``last_doc`` (B,)."""
        if self._packed is None:
            B, T = self.positions.shape
            starts = self.resets.clone()
            starts[:, 0] = True  # every row start is a boundary in the packed view
            flat = torch.nonzero(starts.flatten()).flatten()
            total = torch.tensor([B * T], device=flat.device, dtype=flat.dtype)
            cu = torch.cat((flat, total)).to(torch.int32)
            docs_per_row = starts.sum(-1)
            last_doc = docs_per_row.cumsum(0) - 1
            first_doc = last_doc - docs_per_row + 1
            self._packed = {"cu_seqlens": cu, "first_doc": first_doc, "last_doc": last_doc}
        return self._packed

    def initial_rows_to_docs(self, h0: torch.Tensor | None) -> torch.Tensor | None:
        """Per-row initial states (B, ...) -> per-document states (N, ...): a row's carried state goes to
        its first document when that document continues; every other document starts from zero."""
        if h0 is None:
            return None
        p = self.packed()
        n = p["cu_seqlens"].numel() - 1
        out = h0.new_zeros((n, *h0.shape[1:]))
        keep = self.continues.to(h0.dtype).view(-1, *([1] * (h0.dim() - 1)))
        return out.index_copy(0, p["first_doc"], h0 * keep)

    def masked_initial(self, h0: torch.Tensor | None) -> torch.Tensor | None:
        """Zero the carried state of rows whose first token starts a new document."""
        if h0 is None:
            return None
        return h0 * self.continues.to(h0.dtype).view(-1, *([1] * (h0.dim() - 1)))
