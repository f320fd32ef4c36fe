"""The offline real-text corpus (``scripts/build_offline_corpus.py``): pack, unpack, per-source ranges.

A packed corpus is a directory small enough to copy to a training machine (xz-compressed tokens)::

    manifest.json          per source: client, package, version, licence, split rule; per split and source:
                           documents, tokens and the [first, last) document range in that split's stream
    tokenizer/             the byte-level BPE trained on the train split (a transformers tokenizer)
    train/ validation/ test/
        index.json         the prepared-shard index of ``prepare.py`` (format pararnn-token-shards-v1)
        doc_offsets.npy    document starts in the split's stream
        shard_00000.bin.xz the shard ``shard_00000.bin`` of the index, xz-compressed

Inside every split the documents are grouped by source in manifest order, so a source's text is one
contiguous token range (``source_token_ranges``): perplexity per source needs no second set of files.
``unpack_offline_corpus`` decompresses a packed corpus once into the cache as an ordinary prepared
directory (``data.prepared_dir``); the shard checksums of the index are verified when it is opened.
"""
from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import shutil
from pathlib import Path

import numpy as np

from ._cache import atomic_directory, cache_root, file_lock
from .prepare import INDEX_FILE, OFFSETS_FILE

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "pararnn-offline-corpus-v1"
SPLITS = ("train", "validation", "test")
PACKED_SUFFIX = ".xz"


class OfflineCorpusError(ValueError):
    """A packed offline corpus is missing, incomplete or inconsistent."""


def read_manifest(corpus_dir: str | os.PathLike) -> dict:
    path = Path(os.path.expanduser(str(corpus_dir))) / MANIFEST_FILE
    if not path.is_file():
        raise OfflineCorpusError(f"{path.parent} is not an offline corpus: no {MANIFEST_FILE} "
                                 "(build it with scripts/build_offline_corpus.py)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise OfflineCorpusError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def pack_split(prepared: Path, packed: Path) -> None:
    """Copy the prepared split directory ``prepared`` to ``packed`` with every shard xz-compressed."""
    packed.mkdir(parents=True, exist_ok=True)
    index = json.loads((prepared / INDEX_FILE).read_text())
    for shard in index["shards"]:
        with open(prepared / shard["file"], "rb") as src, lzma.open(packed / (shard["file"] + PACKED_SUFFIX), "wb",
                                                                    preset=9 | lzma.PRESET_EXTREME) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    shutil.copy2(prepared / INDEX_FILE, packed / INDEX_FILE)
    shutil.copy2(prepared / OFFSETS_FILE, packed / OFFSETS_FILE)


def unpack_offline_corpus(corpus_dir: str | os.PathLike, cache_dir: str) -> Path:
    """The packed corpus as a prepared directory in the cache (``tokenizer/``, ``train/``, ...).

    Decompressed on first use under a lock (concurrent ranks wait) and published atomically; the cache key
    is the manifest's content hash, so a rebuilt corpus unpacks afresh.
    """
    corpus = Path(os.path.expanduser(str(corpus_dir)))
    manifest_bytes = (corpus / MANIFEST_FILE).read_bytes() if (corpus / MANIFEST_FILE).is_file() else None
    read_manifest(corpus)  # a clear error when it is not a corpus
    key = hashlib.sha256(manifest_bytes).hexdigest()[:20]
    root = cache_root(cache_dir)
    target = root / "offline" / key
    with file_lock(root / "locks" / f"offline-{key}.lock"):
        if (target / "done").is_file():
            return target
        with atomic_directory(target) as tmp:
            shutil.copytree(corpus / "tokenizer", tmp / "tokenizer")
            for split in SPLITS:
                index_path = corpus / split / INDEX_FILE
                if not index_path.is_file():
                    raise OfflineCorpusError(f"{corpus / split}: missing {INDEX_FILE}; rebuild the corpus")
                (tmp / split).mkdir()
                for shard in json.loads(index_path.read_text())["shards"]:
                    source = corpus / split / (shard["file"] + PACKED_SUFFIX)
                    if not source.is_file():
                        raise OfflineCorpusError(f"missing shard {source}; rebuild or re-copy the corpus")
                    with lzma.open(source, "rb") as src, open(tmp / split / shard["file"], "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 24)
                shutil.copy2(index_path, tmp / split / INDEX_FILE)
                shutil.copy2(corpus / split / OFFSETS_FILE, tmp / split / OFFSETS_FILE)
            shutil.copy2(corpus / MANIFEST_FILE, tmp / MANIFEST_FILE)
            (tmp / "done").write_text(str(corpus.resolve()))
        logger.info("unpacked the offline corpus %s into %s", corpus, target)
    return target


def source_token_ranges(manifest: dict, split: str, doc_offsets: np.ndarray) -> dict[str, tuple[int, int]]:
    """{source: (first token, end token)} of ``split``'s stream, from the manifest's document ranges."""
    ranges = {}
    for name, entry in manifest["splits"][split]["sources"].items():
        first, last = entry["doc_range"]
        ranges[name] = (int(doc_offsets[first]), int(doc_offsets[last]))
    return ranges
