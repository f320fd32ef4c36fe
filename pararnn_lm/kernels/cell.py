"""The channelwise cell contract: the only thing a user writes to get a parallel RNN.

A channelwise cell couples ``state_size`` (K) state values *within* a channel and never across
channels, so every Newton Jacobian is a K x K block per channel. ``step`` must therefore be
elementwise over the channel axis (the last axis) and over any leading axes.
"""
from __future__ import annotations

import torch


class Cell:
    """Base class of a channelwise recurrent cell.

    Subclasses set the three sizes and implement :meth:`step`; :meth:`output` is optional.

    Shapes (``...`` are any leading axes, ``D`` channels):
        h_prev (..., K, D), u (..., G, D), p (P, D)  ->  h (..., K, D)
    """

    state_size: int = 1  # K: states per channel
    num_inputs: int = 1  # G: pre-activations per channel per step
    num_params: int = 0  # P: per-channel parameter rows

    def step(self, h_prev: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement step(h_prev, u, p)")

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Map states (..., K, D) to the layer output (..., D); default: the last state row."""
        return h[..., -1, :]

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return (
            f"{self.name}(state_size={self.state_size}, num_inputs={self.num_inputs}, "
            f"num_params={self.num_params})"
        )
