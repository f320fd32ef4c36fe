"""What a data pipeline hands the trainer (:class:`DataBundle`) and the tokenizer it is built with.

Shared by the prepared-shard pipeline (``build.py``) and the streaming one (``streaming.py``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

from .config import DataConfig
from .sources import TextSource, build_sources
from .tokenizer import get_or_train_tokenizer, load_tokenizer


class DataBundle(NamedTuple):
    """What the trainer needs: ``train`` (endless, resumable), ``validation`` (finite), ``tokenizer``."""

    train: Any
    validation: Any
    tokenizer: Any

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id


def build_tokenizer(cfg: DataConfig, train_source: Optional[TextSource] = None):
    """``data.tokenizer`` if set, else the one saved in ``data.prepared_dir``, else the cached BPE trained
    on the training text (trained on first use)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.prepared_dir and (Path(os.path.expanduser(cfg.prepared_dir)) / "tokenizer").is_dir():
        return load_tokenizer(str(Path(os.path.expanduser(cfg.prepared_dir)) / "tokenizer"))
    if train_source is None:
        train_source, _ = build_sources(cfg)
    return get_or_train_tokenizer(train_source, cfg.vocab_size, cfg.cache_dir, min_frequency=cfg.tokenizer_min_frequency,
                                  max_chars=cfg.tokenizer_train_max_chars)
