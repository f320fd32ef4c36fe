"""One-token decoding: the interface every mixer implements, and the states the built-in mixers keep.

A mixer that decodes token by token implements

    state = mixer.allocate_inference_state(batch_size, max_length, dtype, device)
    y_t = mixer.step(x_t, state, position)   # x_t, y_t (B, hidden_size); updates ``state`` in place

``allocate_inference_state`` returns an :class:`InferenceState`: tensors of fixed shape allocated once
(``max_length`` bounds what grows with the sequence, e.g. attention's key/value slots). ``step`` only
reads and writes those tensors in place, with no host sync and no shape that depends on values, so
:class:`models.decode.StaticDecoder` can capture a whole decoding step of the model in one CUDA graph.
After the model's parallel forward over a prompt (with a ``ParaRNNCache``), :meth:`InferenceState.load`
copies that layer's cache entry into the state. A new mixer registered with ``@register_mixer`` decodes
with the StaticDecoder once it has these two methods and a state whose ``load`` reads what its forward
wrote into the cache.

Weight-derived constants: what a step reads that depends only on the weights (the cell's gain-bounded
recurrent parameters, Mamba2's A = -exp(A_log) and its fp32 copies of dt_bias and D) is computed once by
the forward that fills the cache - i.e. once per prompt, from the weights of that moment - and kept in
the cache entry (``RecurrentStateLayer.constants``) and, after ``load``, in the state's ``constants``.
A step then reads them instead of recomputing them per token, and new weights take effect at the next
prefill (every ``generate`` call) without any invalidation logic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenPosition:
    """Where the token of a decoding step sits, shared by every layer of the step.

    positions: (B,) long, the token's position inside its document; 0 starts a new document, whose
        states restart from zero.
    slot: (1,) long, the index of the token in the decoder's static buffers (attention's key/value slot);
        None where a mixer's step runs outside the StaticDecoder.
    continues: (B,) bool, ``positions > 0``: the token continues the document of the previous token.
        Computed once per step (here or by :meth:`advance`) and shared by every layer.
    """

    positions: torch.Tensor
    slot: torch.Tensor | None = None
    continues: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.continues is None:
            self.continues = self.positions > 0

    def advance(self) -> None:
        """In place: every row moves to its next position (the decoder's step, on its static buffers)."""
        self.positions.add_(1)
        torch.gt(self.positions, 0, out=self.continues)

    def carried(self, state: torch.Tensor) -> torch.Tensor:
        """``state`` (B, ...) where the token continues its document, zeros where it starts one."""
        return torch.where(self.continues.view(-1, *([1] * (state.dim() - 1))), state, 0.0)


class InferenceState:
    """Per-layer decoding buffers (subclasses are dataclasses of tensors, updated in place by ``step``;
    a ``constants`` dict, where a state has one, holds weight-derived tensors that ``step`` only reads)."""

    @property
    def capacity(self) -> int | None:
        """How many tokens the buffers hold (prompt + generated); None: no bound (recurrent states)."""
        return None

    def buffers(self) -> list[torch.Tensor]:
        """The tensors ``step`` mutates (the decoder saves and restores them around graph capture)."""
        return [value for value in vars(self).values() if isinstance(value, torch.Tensor)]

    def load(self, cache, layer_idx: int) -> None:
        """Copy layer ``layer_idx``'s entry of a prefilled ``ParaRNNCache`` into the buffers."""
        raise NotImplementedError(f"{type(self).__name__} does not load a prefilled cache")


@dataclass
class RecurrentState(InferenceState):
    """A recurrent layer's state: the causal conv's window and the cell / SSM state, in the layout of
    its ``ParaRNNCache`` entry (``RecurrentStateLayer.get_state()``)."""

    conv_window: torch.Tensor | None  # (B, K-1, C): the conv's last K-1 inputs; None without a conv
    state: torch.Tensor  # (B, ...) the recurrence's state, fp32 (fp64 for fp64 models)
    # weight-derived tensors the step reads (see the module docstring), refreshed by every load
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    def load(self, cache, layer_idx: int) -> None:
        layer = cache.recurrent_layer(layer_idx)
        window, state = layer.get_state()
        if self.conv_window is not None:
            self.conv_window.copy_(window)
        self.state.copy_(state)
        for name, value in self.constants.items():  # in place: a captured step keeps reading these tensors
            value.copy_(layer.constants[name])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype recurrent states are carried in: fp64 for fp64 models, otherwise fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
