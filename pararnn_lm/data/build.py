"""One entry point for the trainer: ``build_datasets(cfg, rank, world_size, batch_size)``.

Source -> tokenizer (given, or trained on the training text and cached) -> token shards (prepared once
into the cache, or read from ``data.prepared_dir``) -> packed datasets -> per-rank loaders.
Building under a file lock makes concurrent ranks safe: the first builds, the others reuse.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

from ._cache import cache_root, file_lock
from .bundle import DataBundle, build_tokenizer
from .config import DataConfig, validate_data_config
from .loader import PackedLoader
from .offline import unpack_offline_corpus
from .packing import PackedDataset
from .prepare import FORMAT, INDEX_FILE, TokenShards, prepare_shards
from .sources import TextSource, build_sources
from .streaming import build_streaming
from .tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)


def prepared_split(cfg: DataConfig, source: TextSource, tokenizer, split: str, *, progress: bool = True) -> TokenShards:
    """Token shards of ``source`` in the cache (prepared on first use), validated against ``tokenizer``."""
    key = hashlib.sha256(json.dumps(
        [FORMAT, source.fingerprint, tokenizer_fingerprint(tokenizer), cfg.add_bos]).encode()).hexdigest()[:20]
    root = cache_root(cfg.cache_dir)
    directory = root / "tokens" / f"{split}-{key}"
    with file_lock(root / "locks" / f"tokens-{key}.lock"):
        if not (directory / INDEX_FILE).is_file():
            logger.info("preparing %s tokens of %s into %s", split, source.name, directory)
            prepare_shards(source.texts(), tokenizer, directory, add_bos=cfg.add_bos, num_proc=cfg.num_proc,
                           shard_tokens=cfg.shard_tokens, source_name=source.name,
                           source_fingerprint=source.fingerprint, total_documents=source.num_documents(),
                           progress=progress)
        else:
            logger.info("reusing prepared %s tokens %s", split, directory)
    return TokenShards(directory, tokenizer=tokenizer, verify=cfg.verify_checksums)


def prepare_dataset(cfg: DataConfig, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Write ``out_dir/{tokenizer,train,validation}`` for ``data.prepared_dir`` (multi-node runs)."""
    validate_data_config(cfg)
    out = Path(os.path.expanduser(str(out_dir)))
    out.mkdir(parents=True, exist_ok=True)
    train_source, validation_source = build_sources(cfg)
    tokenizer = build_tokenizer(dataclasses.replace(cfg, prepared_dir=None), train_source)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    for split, source in (("train", train_source), ("validation", validation_source)):
        prepare_shards(source.texts(), tokenizer, out / split, add_bos=cfg.add_bos, num_proc=cfg.num_proc,
                       shard_tokens=cfg.shard_tokens, source_name=source.name, source_fingerprint=source.fingerprint,
                       total_documents=source.num_documents(), progress=progress)
    (out / "data_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    logger.info("prepared %s; train with data.prepared_dir=%s", out, out)
    return out


def build_datasets(cfg: DataConfig, rank: int = 0, world_size: int = 1, batch_size: int = 8,
                   eval_batch_size: Optional[int] = None, *, progress: Optional[bool] = None) -> DataBundle:
    """(train loader, validation loader, tokenizer) for one rank.

    ``batch_size`` is the per-rank micro batch. The train loader is endless and resumable
    (``state_dict``/``load_state_dict``); the validation loader is one in-order pass per ``iter()``.
    """
    validate_data_config(cfg)
    progress = (rank == 0) if progress is None else progress
    if cfg.streaming:
        return build_streaming(cfg, rank, world_size, batch_size, eval_batch_size or batch_size)
    if cfg.source == "offline":  # a packed corpus: decompressed once into the cache, then read as prepared shards
        cfg = dataclasses.replace(cfg, prepared_dir=str(unpack_offline_corpus(cfg.path, cfg.cache_dir)))
    if cfg.prepared_dir:
        base = Path(os.path.expanduser(cfg.prepared_dir))
        tokenizer = build_tokenizer(cfg)
        train_tokens = TokenShards(base / "train", tokenizer=tokenizer, verify=cfg.verify_checksums)
        validation_tokens = TokenShards(base / "validation", tokenizer=tokenizer, verify=cfg.verify_checksums)
    else:
        train_source, validation_source = build_sources(cfg)
        tokenizer = build_tokenizer(cfg, train_source)
        train_tokens = prepared_split(cfg, train_source, tokenizer, "train", progress=progress)
        validation_tokens = prepared_split(cfg, validation_source, tokenizer, "validation", progress=progress)
    if train_tokens.index.get("add_bos", False) != cfg.add_bos:
        raise ValueError(f"data.add_bos={cfg.add_bos} but the shards in {train_tokens.directory} were prepared with add_bos="
                         f"{train_tokens.index.get('add_bos')}")
    train = PackedDataset(train_tokens, None, cfg.seq_len, label_mode=cfg.label_mode, name="train split",
                          fingerprint=train_tokens.fingerprint)
    validation = PackedDataset(validation_tokens, None, cfg.seq_len, label_mode=cfg.label_mode, name="validation split",
                               fingerprint=validation_tokens.fingerprint)
    logger.info("data: train %d tokens -> %d sequences of %d; validation %d tokens -> %d sequences; vocab %d",
                train.num_tokens, len(train), cfg.seq_len, validation.num_tokens, len(validation), len(tokenizer))
    common = dict(rank=rank, world_size=world_size, num_workers=cfg.num_workers, seed=cfg.seed, pin_memory=cfg.pin_memory)
    return DataBundle(
        train=PackedLoader(train, batch_size, shuffle=cfg.shuffle, infinite=True, **common),
        validation=PackedLoader(validation, eval_batch_size or batch_size, shuffle=False, infinite=False, **common),
        tokenizer=tokenizer,
    )
