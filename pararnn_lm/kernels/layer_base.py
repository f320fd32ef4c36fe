"""The parameters of a cell layer and everything that needs no solver (torch only).

:class:`CellLayerBase` is what :class:`kernels.ParaRNNLayer` (layers.py) adds its parallel forward to.
This file imports nothing but torch, so Hugging Face exports of the models copy it verbatim
(``pararnn_lm.models.export``) and run the layer's reference recurrence (sequential.py) without Triton.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class CellLayerBase(nn.Module):
    """Parameters of a cell layer and everything that needs no solver: per-head input projection,
    initialisation, the gain bound and the single step.

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
            channels (per-channel gains then shrink as bound / sqrt(dim)).
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

    def step(self, x_t: torch.Tensor, h: torch.Tensor | None = None,
             recurrent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for decoding: x_t (B, dim), h (B, K, dim) or None -> y_t (B, dim), new h (fp32+).

        ``recurrent``: ``recurrent_params()`` in the compute dtype, when a decoder computed it once for
        many steps (the gain bound is then not recomputed per token)."""
        self._check_input(x_t, 2)
        compute = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        if h is None:
            h = x_t.new_zeros(x_t.shape[0], self.state_size, self.dim, dtype=compute)
        elif h.shape != (x_t.shape[0], self.state_size, self.dim):
            raise ValueError(f"h must have shape {(x_t.shape[0], self.state_size, self.dim)}, got {tuple(h.shape)}")
        u = self.project(x_t).to(compute)
        if recurrent is None:
            recurrent = self.recurrent_params().to(compute)
        h = self.cell.step(h.to(compute), u, recurrent)
        return self.cell.output(h).to(x_t.dtype), h

    def extra_repr(self) -> str:
        return (f"cell={self.cell.name}, dim={self.dim}, num_heads={self.num_heads}, gain_bound={self.gain_bound}, "
                f"gain_norm={self.gain_norm!r}")
