"""Registry of sequence mixers: name -> factory(config, layer_idx) -> nn.Module.

A mixer module implements ``forward(x, seq, cache, attn_mask) -> y`` (x, y: (B, T, hidden)); ``seq`` is a
:class:`models.packing.SequenceInfo`, ``cache`` a :class:`models.cache.ParaRNNCache` or None. For decoding
with static buffers (:class:`models.decode.StaticDecoder`) it also implements ``allocate_inference_state``
and a one-token ``step`` (models/inference.py). New mixers register with ``@register_mixer("name")``; the
config accepts their names once registered.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

MixerFactory = Callable[..., nn.Module]
MIXERS: dict[str, MixerFactory] = {}


def register_mixer(name: str) -> Callable[[MixerFactory], MixerFactory]:
    def wrap(factory: MixerFactory) -> MixerFactory:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is already registered")
        MIXERS[name] = factory
        return factory

    return wrap


def build_mixer(name: str, config, layer_idx: int) -> nn.Module:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(MIXERS))}")
    return MIXERS[name](config, layer_idx)
