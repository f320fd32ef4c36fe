"""Where sequences start and end: batch rows, or packed documents given by ``cu_seqlens``.

Every mode needs the same three facts: which (b, t) positions restart from an initial state, which
initial-state row each of them uses, and where each row/document ends (for ``h_last``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceLayout:
    batch: int
    length: int
    num_rows: int  # initial/final state rows: B, or the number of documents with cu_seqlens
    start_b: torch.Tensor  # (S,) batch index of each non-empty sequence's first step
    start_t: torch.Tensor  # (S,) time index of that step
    start_row: torch.Tensor  # (S,) state row it starts from
    end_b: torch.Tensor  # (num_rows,) batch index of each row's last step
    end_t: torch.Tensor  # (num_rows,) time index of each row's last step (clamped for empty docs)
    empty: torch.Tensor | None  # (num_rows,) bool: documents of length 0 (h_last = h0), or None
    rows_only: bool = False  # True: row b starts at t = 0 from state row b, nowhere else (no cu_seqlens)

    @staticmethod
    def build(batch: int, length: int, device: torch.device, cu_seqlens: torch.Tensor | None) -> SequenceLayout:
        if cu_seqlens is None:
            rows = torch.arange(batch, device=device)
            zeros = torch.zeros(batch, dtype=torch.long, device=device)
            return SequenceLayout(batch, length, batch, rows, zeros, rows, rows, zeros + length - 1, None, True)
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        num_docs = cu.numel() - 1
        lengths = cu[1:] - cu[:-1]
        nonempty = torch.nonzero(lengths > 0).flatten()
        empty = lengths == 0
        start_t = cu[:-1][nonempty]
        zeros_s = torch.zeros_like(start_t)
        end_t = (cu[1:] - 1).clamp(min=0)
        return SequenceLayout(
            batch, length, num_docs, zeros_s, start_t, nonempty, torch.zeros_like(end_t), end_t,
            empty if bool(empty.any()) else None,
        )

    def start_mask(self) -> torch.Tensor:
        """(B, T) bool: steps whose previous state is an initial state (Jacobian zero there)."""
        mask = torch.zeros(self.batch, self.length, dtype=torch.bool, device=self.start_t.device)
        mask[self.start_b, self.start_t] = True
        return mask

    def shift(self, h: torch.Tensor, h0_rows: torch.Tensor) -> torch.Tensor:
        """h_{t-1} for every step of a trajectory h (B, T, K, D); initial states at sequence starts."""
        hp = torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), dim=1)
        return hp.index_put((self.start_b, self.start_t), h0_rows[self.start_row])

    def gather_last(self, h: torch.Tensor, h0_rows: torch.Tensor) -> torch.Tensor:
        """Final state of every row/document (num_rows, K, D); an empty document keeps its h0."""
        last = h[self.end_b, self.end_t]
        if self.empty is not None:
            last = torch.where(self.empty[:, None, None], h0_rows.to(last.dtype), last)
        return last

    def scatter_starts(self, grad_hp: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Sum the cotangent of the initial states used at sequence starts into (num_rows, K, D)."""
        out = grad_hp.new_zeros(num_rows, *grad_hp.shape[2:])
        return out.index_add(0, self.start_row, grad_hp[self.start_b, self.start_t])
