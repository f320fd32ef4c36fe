"""Where sequences start and end: batch rows, packed documents given by ``cu_seqlens``, or document
starts marked inside batch rows by ``resets``.

Every mode needs the same three facts: which (b, t) positions restart from an initial state, which
initial-state row each of them uses, and where each row/document ends (for ``h_last``).

With ``resets`` (B, T) bool the layout is built without reading any value on the host: the start map
(:meth:`SequenceLayout.start_map`, what the Triton kernels read) is a pair of ``torch.where`` on the
device. The initial-state rows are then the B rows of h0 plus one zero row (index ``zero_row`` = B)
that every document start inside a row (and a row whose first step is reset) restarts from. The
explicit start lists (``start_b``, ``start_t``, ``start_row``) that the PyTorch modes use are derived
from that map on first access (``torch.nonzero``: one host sync, reference modes only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SequenceLayout:
    batch: int
    length: int
    num_rows: int  # initial-state rows: B, the number of documents with cu_seqlens, or B + 1 with resets
    _start_b: torch.Tensor | None  # (S,) batch index of each non-empty sequence's first step
    _start_t: torch.Tensor | None  # (S,) time index of that step
    _start_row: torch.Tensor | None  # (S,) state row it starts from
    end_b: torch.Tensor  # (R,) batch index of each row's/document's last step (R: the rows of h_last)
    end_t: torch.Tensor  # (R,) time index of that step (clamped for empty docs)
    empty: torch.Tensor | None  # (R,) bool: documents of length 0 (h_last = h0), or None
    rows_only: bool = False  # True: row b starts at t = 0 from state row b, nowhere else (no cu_seqlens)
    resets: torch.Tensor | None = None  # (B, T) bool document starts from the zero row ``zero_row``
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def build(batch: int, length: int, device: torch.device, cu_seqlens: torch.Tensor | None,
              resets: torch.Tensor | None = None) -> SequenceLayout:
        if cu_seqlens is not None and resets is not None:
            raise ValueError("pass at most one of cu_seqlens and resets")
        if cu_seqlens is None:
            rows = torch.arange(batch, device=device)
            zeros = torch.zeros(batch, dtype=torch.long, device=device)
            if resets is not None:  # starts known only on the device: lists derived lazily
                return SequenceLayout(batch, length, batch + 1, None, None, None, rows, zeros + length - 1, None,
                                      False, resets.to(device=device, dtype=torch.bool))
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

    # ------------------------------------------------------------------ initial-state rows
    @property
    def zero_row(self) -> int | None:
        """With ``resets``: the index of the extra all-zero initial-state row (= batch); else None."""
        return self.batch if self.resets is not None else None

    def initial_rows(self, h0: torch.Tensor | None, state_size: int, dim: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
        """The (num_rows, K, D) initial states the modes read: h0 (or zeros), plus the zero row with
        ``resets``. Differentiable w.r.t. h0; the zero row's gradient is dropped."""
        if h0 is None:
            return torch.zeros(self.num_rows, state_size, dim, dtype=dtype, device=device)
        h0 = h0.to(dtype)
        if self.resets is not None:
            h0 = torch.cat((h0, h0.new_zeros(1, *h0.shape[1:])))
        return h0

    # ------------------------------------------------------------------ where sequences start
    def start_map(self) -> torch.Tensor:
        """(B, T) int32: the initial-state row a step restarts from, -1 where it continues the previous
        step (kernels/cells/fused_common.py). With ``resets``: built on the device, no host sync."""
        smap = self._cache.get("smap")
        if smap is None:
            if self.resets is not None:
                device = self.resets.device
                zero = torch.full((), self.zero_row, dtype=torch.int32, device=device)
                smap = torch.where(self.resets, zero, torch.full_like(zero, -1))
                rows = torch.arange(self.batch, dtype=torch.int32, device=device)
                smap[:, 0] = torch.where(self.resets[:, 0], zero, rows)
            else:
                smap = torch.full((self.batch, self.length), -1, dtype=torch.int32, device=self.end_t.device)
                smap[self.start_b, self.start_t] = self.start_row.to(torch.int32)
            smap = smap.contiguous()
            self._cache["smap"] = smap
        return smap

    def _start_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.resets is None:
            return self._start_b, self._start_t, self._start_row  # type: ignore[return-value]
        lists = self._cache.get("lists")
        if lists is None:
            smap = self.start_map()
            start_b, start_t = torch.nonzero(smap >= 0, as_tuple=True)  # host sync (reference modes only)
            lists = (start_b, start_t, smap[start_b, start_t].long())
            self._cache["lists"] = lists
        return lists

    @property
    def start_b(self) -> torch.Tensor:
        return self._start_lists()[0]

    @property
    def start_t(self) -> torch.Tensor:
        return self._start_lists()[1]

    @property
    def start_row(self) -> torch.Tensor:
        return self._start_lists()[2]

    def start_mask(self) -> torch.Tensor:
        """(B, T) bool: steps whose previous state is an initial state (Jacobian zero there)."""
        if self.resets is not None:
            return self.start_map() >= 0
        mask = torch.zeros(self.batch, self.length, dtype=torch.bool, device=self.start_t.device)
        mask[self.start_b, self.start_t] = True
        return mask

    def shift(self, h: torch.Tensor, h0_rows: torch.Tensor) -> torch.Tensor:
        """h_{t-1} for every step of a trajectory h (B, T, K, D); initial states at sequence starts."""
        hp = torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), dim=1)
        return hp.index_put((self.start_b, self.start_t), h0_rows[self.start_row])

    def gather_last(self, h: torch.Tensor, h0_rows: torch.Tensor) -> torch.Tensor:
        """Final state of every row/document (B or num_docs, K, D); an empty document keeps its h0."""
        last = h[self.end_b, self.end_t]
        if self.empty is not None:
            last = torch.where(self.empty[:, None, None], h0_rows.to(last.dtype), last)
        return last

    def scatter_starts(self, grad_hp: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Sum the cotangent of the initial states used at sequence starts into (num_rows, K, D)."""
        out = grad_hp.new_zeros(num_rows, *grad_hp.shape[2:])
        return out.index_add(0, self.start_row, grad_hp[self.start_b, self.start_t])
