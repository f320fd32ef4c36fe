"""``torch.nn.Module`` layers around the paper's cells.

A layer owns the per-head (block-diagonal) input projection x -> G pre-activations per channel,
the per-channel recurrent parameters (a_*, c_*) with the paper's initialisation, and a bound on
their norm (the paper clips it to 0.5 for language models) that keeps Newton's method contractive.
It accepts and returns states, so sequences can be processed in chunks and decoded step by step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .api import parallel_rnn
from .cell import Cell
from .cells import ParaGRU, ParaLSTM
from .config import NewtonConfig, NewtonStats
from .projection import head_projection


class CellLayerBase(nn.Module):
    """Parameters of a cell layer and everything that needs no solver: per-head input projection,
    initialisation, the gain bound and the single step. ``scripts/export_hf.py`` inlines this class
    into exported models (it uses torch only), so exports and the engine share one definition.

    Args:
        cell: the channelwise cell (its ``step`` defines the recurrence).
        dim: channels (input width = state width per state row).
        num_heads: blocks of the input projection; ``dim`` must be divisible by it.
        gain_bound: bound on the recurrent gains, enforced by a differentiable rescale in every
            forward (None disables it).
        gain_norm: what is bounded. "channel" (default): every gain, |a_i| <= gain_bound - the norm
            of the diagonal recurrence matrix diag(a), which is what keeps each channel's Jacobian
            small whatever the width (the reference implementation truncates its Gaussian gain init
            elementwise at the same bound). "row": the L2 norm of each parameter row over all
            channels (this project's behaviour before 2026-11-26; per-channel gains then shrink as
            bound / sqrt(dim)).
        name: how errors and warnings name this layer (e.g. "model.layers.3.mixer").
    """

    def __init__(
        self,
        cell,
        dim: int,
        num_heads: int,
        *,
        gain_bound: float | None = 0.5,
        gain_norm: str = "channel",
        bias: bool = True,
        name: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if gain_bound is not None and not gain_bound > 0:
            raise ValueError(f"gain_bound must be > 0 or None, got {gain_bound}")
        if gain_norm not in self.GAIN_NORMS:
            raise ValueError(f"gain_norm must be one of {sorted(self.GAIN_NORMS)}, got {gain_norm!r}")
        self.cell, self.dim, self.num_heads = cell, dim, num_heads
        self.head_dim = dim // num_heads
        self.gain_bound, self.gain_norm = gain_bound, gain_norm
        self.name = name or type(self).__name__  # shown in Newton errors/warnings; models set the module path
        factory = {"device": device, "dtype": dtype}
        G = cell.num_inputs
        # weight[h, i, g, j]: head h maps its input channel i to pre-activation g of its channel j.
        self.weight = nn.Parameter(torch.empty(num_heads, self.head_dim, G, self.head_dim, **factory))
        self.bias = nn.Parameter(torch.empty(G, dim, **factory)) if bias else None
        self.recurrent = nn.Parameter(torch.empty(cell.num_params, dim, **factory))
        self.reset_parameters()

    @property
    def state_size(self) -> int:
        return self.cell.state_size

    def reset_parameters(self) -> None:
        # Kaiming-uniform for a linear map of fan-in head_dim (as nn.Linear's default scale).
        bound = 1.0 / math.sqrt(self.head_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        # Small Xavier-Gaussian recurrent gains, then clipped to the bound (paper, Sec. 4).
        nn.init.xavier_normal_(self.recurrent)
        if self.gain_bound is not None:
            with torch.no_grad():
                self.recurrent.copy_(self.recurrent_params())

    # gain_norm -> the size that is bounded, broadcastable to the (P, dim) parameters.
    GAIN_NORMS = {
        "channel": lambda p: p.abs(),
        "row": lambda p: p.norm(dim=1, keepdim=True),
    }

    def recurrent_params(self) -> torch.Tensor:
        """The (P, dim) parameters the cell sees, rescaled so their size (``gain_norm``) is <= gain_bound."""
        p = self.recurrent
        if self.gain_bound is None or p.numel() == 0:
            return p
        size = self.GAIN_NORMS[self.gain_norm](p)
        return p * (self.gain_bound / size.clamp_min(1e-12)).clamp(max=1.0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> pre-activations (..., G, dim) through the block-diagonal heads."""
        u = self.head_matmul(x, self.weight.to(x.dtype))
        return u if self.bias is None else u + self.bias.to(x.dtype)

    @staticmethod
    def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (..., H * dh), weight (H, dh, G, dh) -> (..., G, H * dh), as one einsum."""
        H, dh = weight.shape[:2]
        return torch.einsum("...hi,higj->...ghj", x.unflatten(-1, (H, dh)), weight).flatten(-2)

    def _check_input(self, x: torch.Tensor, rank: int) -> None:
        if x.dim() != rank or x.shape[-1] != self.dim:
            want = "(B, T, dim)" if rank == 3 else "(B, dim)"
            raise ValueError(f"{type(self).__name__} expects x of shape {want} with dim={self.dim}, got {tuple(x.shape)}")

    def step(self, x_t: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for decoding: x_t (B, dim), h (B, K, dim) or None -> y_t (B, dim), new h (fp32+)."""
        self._check_input(x_t, 2)
        compute = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        if h is None:
            h = x_t.new_zeros(x_t.shape[0], self.state_size, self.dim, dtype=compute)
        elif h.shape != (x_t.shape[0], self.state_size, self.dim):
            raise ValueError(f"h must have shape {(x_t.shape[0], self.state_size, self.dim)}, got {tuple(h.shape)}")
        u = self.project(x_t).to(compute)
        h = self.cell.step(h.to(compute), u, self.recurrent_params().to(compute))
        return self.cell.output(h).to(x_t.dtype), h

    def extra_repr(self) -> str:
        return (f"cell={self.cell.name}, dim={self.dim}, num_heads={self.num_heads}, gain_bound={self.gain_bound}, "
                f"gain_norm={self.gain_norm!r}")


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
    # (kernels/projection.py). The base class keeps the einsum: exports inline it with torch only.
    head_matmul = staticmethod(head_projection)

    @property
    def last_stats(self) -> NewtonStats:
        """The last forward's Newton statistics (read from the device on first access: one sync)."""
        return self._last_stats.resolve()

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
        *, resets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y (B, T, dim) and the final states (B, K, dim), or (N_docs, K, dim) with cu_seqlens.

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
