"""``torch.nn.Module`` layers around the paper's cells.

A layer owns the per-head (block-diagonal) input projection x -> G pre-activations per channel,
the per-channel recurrent parameters (a_*, c_*) with the paper's initialisation, and a bound on
their norm (the paper clips it to 0.5 for language models) that keeps Newton's method contractive.
It accepts and returns states, so sequences can be processed in chunks and decoded step by step.
"""
from __future__ import annotations

import torch

from .api import parallel_rnn
from .cell import Cell
from .cells import ParaGRU, ParaLSTM
from .config import NewtonConfig, NewtonStats
from .layer_base import CellLayerBase
from .projection import head_projection


class ParaRNNLayer(CellLayerBase):
    """x (B, T, dim) -> y (B, T, dim) through ``cell``, applied in parallel over time.

    Takes :class:`CellLayerBase`'s arguments plus ``mode`` and ``newton`` (passed to
    :func:`kernels.parallel_rnn`). Accepts and returns states for chunked processing.
    """

    def __init__(self, cell: Cell, dim: int, num_heads: int, *, mode: str = "auto",
                 newton: NewtonConfig | None = None, **kwargs) -> None:
        super().__init__(cell, dim, num_heads, **kwargs)
        self.mode = mode
        self.newton = newton or NewtonConfig()
        self._last_stats = NewtonStats()

    # Same values as the einsum, through strided per-gate GEMMs that skip its permute copies
    # (kernels/projection.py). The base class keeps the einsum: exported models run it with torch only.
    head_matmul = staticmethod(head_projection)

    @property
    def last_stats(self) -> NewtonStats:
        """The last forward's Newton statistics (read from the device on first access: one sync)."""
        return self._last_stats.resolve()

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
        *, resets: torch.Tensor | None = None, y_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y (B, T, dim) in ``y_dtype`` (default x's) and the final states (B, K, dim), or (N_docs, K, dim)
        with cu_seqlens.

        ``resets`` (B, T) bool: document starts inside the rows (restart from zero state), see
        :func:`kernels.parallel_rnn`; the final states are then each row's last step."""
        self._check_input(x, 3)
        stats = NewtonStats(lazy=True)
        # Under torch.compile the per-layer name would be a guarded constant: every layer of a stack of
        # compiled blocks would recompile (and past the recompile limit, silently run eagerly).
        name = None if torch.compiler.is_compiling() else self.name
        # The bias goes to the engine: the fused modes add it inside the cell kernels (no pass over u).
        y, h_last = parallel_rnn(
            self.cell, self.head_matmul(x, self.weight.to(x.dtype)), self.recurrent_params(), h0, cu_seqlens,
            mode=self.mode, newton=self.newton, resets=resets, stats=stats, name=name, u_bias=self.bias,
            y_dtype=y_dtype,
        )
        self._last_stats = stats
        return y, h_last

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"


class ParaGRULayer(ParaRNNLayer):
    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(ParaGRU(), dim, num_heads, **kwargs)


class ParaLSTMLayer(ParaRNNLayer):
    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(ParaLSTM(), dim, num_heads, **kwargs)
