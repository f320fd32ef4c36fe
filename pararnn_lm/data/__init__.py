"""Data pipeline: text sources -> tokenizer -> packed, sharded, resumable token streams.

    from pararnn_lm.data import DataConfig, build_datasets
    train, validation, tokenizer = build_datasets(DataConfig(), rank=0, world_size=1, batch_size=8)
    batch = next(iter(train))   # {"input_ids", "labels", "position_ids"}: (B, T) int64
    state = train.state_dict()  # this rank's cursor (a global position); train.load_state_dict(state) resumes,
                                # and load_state_dict([every rank's cursor]) resumes on another number of ranks

Submodules are imported lazily so that ``from pararnn_lm.data.config import DataConfig`` (the Hydra schema) stays
light, and spawned tokenization workers do not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config", "validate_data_config": "config",
    "Document": "corpus", "bundled_documents": "corpus", "kjv_path": "corpus", "BundledCorpusError": "corpus",
    "TextSource": "sources", "BundledSource": "sources", "FileSource": "sources", "HFSource": "sources",
    "HoldoutSubset": "sources", "FirstN": "sources", "DataSourceError": "sources", "build_sources": "sources",
    "train_tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "get_or_train_tokenizer": "tokenizer",
    "tokenizer_fingerprint": "tokenizer", "TokenizerError": "tokenizer", "EOS_TOKEN": "tokenizer", "BOS_TOKEN": "tokenizer",
    "tokenize_documents": "tokenize",
    "PackedDataset": "packing", "collate_packed": "packing", "cu_seqlens_from_position_ids": "packing",
    "concat_documents": "packing", "window_position_ids": "packing", "SequenceOrder": "packing", "IGNORE_INDEX": "packing",
    "PackedLoader": "loader",
    "prepare_shards": "prepare", "TokenShards": "prepare", "ShardError": "prepare", "token_dtype": "prepare",
    "build_datasets": "build", "prepare_dataset": "build", "build_tokenizer": "bundle", "DataBundle": "bundle",
    "StreamingPackedLoader": "streaming", "build_streaming": "streaming", "StreamSource": "streaming",
    "StreamComponent": "streaming", "MixtureComponent": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
