"""Generation cache for mixed stacks: a KV cache for attention layers, O(1) states for recurrent ones.

Built on transformers' ``Cache`` container (layers list): attention layers use ``DynamicLayer``,
every other layer (ParaGRU, ParaLSTM, Mamba2, registered mixers) a ``LinearAttentionLayer``-shaped
holder whose ``conv_states[0]`` is the causal conv's window of the last K-1 inputs (B, K-1, C) and
``recurrent_states[0]`` the cell/SSM state: a multi-token forward sets them, a one-token forward's mixer
``step`` updates them in place. ``constants`` keeps what that step reads that depends only on the weights
(models/inference.py), computed once by the forward that filled the cache. The cache also carries what the model needs to continue documents
across calls: each row's last position and, for attention, the document id of every cached token (so
a decode step never attends across a document boundary or to left padding).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

try:  # transformers >= 5.x with linear-attention cache layers
    from transformers.cache_utils import LinearAttentionLayer as _StateLayerBase
except Exception:  # older 5.x: a minimal holder with the same attributes
    class _StateLayerBase:  # type: ignore[no-redef]
        is_compileable = False
        is_sliding = False

        def __init__(self, **kwargs) -> None:
            self.conv_states = {0: None}
            self.recurrent_states = {0: None}
            self.is_conv_states_initialized = {0: False}
            self.is_recurrent_states_initialized = {0: False}
            self.has_previous_state = {0: False}
            self.device = None

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            for store in (self.conv_states, self.recurrent_states):
                if store[0] is not None:
                    store[0] = store[0].index_select(0, beam_idx.to(store[0].device))

        def get_seq_length(self) -> int:
            return 0

        def get_max_length(self) -> int:
            return -1


class RecurrentStateLayer(_StateLayerBase):
    """Conv window + recurrent state of one ParaRNN/Mamba2 layer, and its step's weight-derived constants."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.constants: dict[str, torch.Tensor] = {}

    is_initialized = property(lambda self: bool(self.has_previous_state[0]))
    # States are re-assigned (not copied in place) and the model keeps extra bookkeeping: never ask
    # generate() to build static/compiled masks for this cache.
    is_compileable = property(lambda self: False)

    def get_seq_length(self) -> int:
        return 0

    def get_state(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.has_previous_state[0]:
            return None, None
        return self.conv_states[0], self.recurrent_states[0]

    def set_state(self, conv: torch.Tensor | None, recurrent: torch.Tensor,
                  constants: dict[str, torch.Tensor] | None = None) -> None:
        # Copies that the cache owns: a one-token step of the mixer (models/inference.py) then updates
        # them in place, which must not touch tensors of the forward's autograd graph.
        self.conv_states[0] = conv.detach().clone() if conv is not None else None
        self.recurrent_states[0] = recurrent.detach().clone()
        if constants is not None:
            self.constants = {name: value.detach() for name, value in constants.items()}
        self.is_conv_states_initialized[0] = conv is not None
        self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True
        self.device = recurrent.device


class ParaRNNCache(Cache):
    def __init__(self, config) -> None:
        layers = [DynamicLayer() if m == "attention" else RecurrentStateLayer() for m in config.mixers]
        super().__init__(layers=layers)
        self.seen_tokens = 0
        self.last_positions: torch.Tensor | None = None  # (B,) position of each row's last token
        self.doc_ids: torch.Tensor | None = None  # (B, S) document id of every cached token

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # The model builds its own document-aware masks; this only keeps generic callers working.
        return self.seen_tokens + query_length, 0

    def recurrent_layer(self, layer_idx: int) -> RecurrentStateLayer:
        return self.layers[layer_idx]  # type: ignore[return-value]

    def last_doc_ids(self) -> torch.Tensor | None:
        return None if self.doc_ids is None else self.doc_ids[:, -1]

    def advance(self, positions: torch.Tensor, doc_ids: torch.Tensor | None) -> None:
        """Record a processed chunk: its positions (B, T) and, with attention, its doc ids (B, T)."""
        self.seen_tokens += positions.shape[1]
        self.last_positions = positions[:, -1].clone()
        if doc_ids is not None:
            self.doc_ids = doc_ids if self.doc_ids is None else torch.cat((self.doc_ids, doc_ids), dim=1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.last_positions is not None:
            self.last_positions = self.last_positions.index_select(0, beam_idx.to(self.last_positions.device))
        if self.doc_ids is not None:
            self.doc_ids = self.doc_ids.index_select(0, beam_idx.to(self.doc_ids.device))
