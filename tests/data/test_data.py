"""data/: corpus, tokenizer, packing, sharding, cursor, prepare round-trips (CPU, offline, small data)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pararnn_lm.data import (
    BundledSource, DataConfig, FileSource, FirstN, HoldoutSubset, PackedDataset, PackedLoader, TokenShards,
    build_datasets, bundled_documents, collate_packed, concat_documents, cu_seqlens_from_position_ids,
    get_or_train_tokenizer, load_tokenizer, prepare_dataset, prepare_shards, tokenize_documents,
    tokenizer_fingerprint, train_tokenizer,
)
from pararnn_lm.data.packing import SequenceOrder, feistel_permute
from pararnn_lm.data.prepare import token_dtype


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


@pytest.fixture(scope="module")
def chapters():
    return bundled_documents()


@pytest.fixture(scope="module")
def small_tokenizer(chapters, tmp_path_factory):
    return train_tokenizer([d.text for d in chapters[:150]], vocab_size=512,
                           save_dir=tmp_path_factory.mktemp("tok"))


# --- corpus ---------------------------------------------------------------------------------------


def test_bundled_corpus_is_kjv_chapters(chapters):
    assert len(chapters) == 1189  # chapters of the KJV
    assert len({d.id for d in chapters}) == 1189
    assert chapters[0].id == "Genesis 1"
    assert chapters[0].text.startswith("Genesis 1\n\nIn the beginning God created the heaven and the earth.\n")
    assert chapters[-1].id == "Revelation 22"
    assert chapters[-1].text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert sum(len(d.text.split()) for d in chapters) > 780_000


def test_holdout_split_is_disjoint_complete_and_deterministic():
    base = BundledSource()
    train = [d.id for d in HoldoutSubset(base, 0.05, 0, "train").documents()]
    val = [d.id for d in HoldoutSubset(base, 0.05, 0, "validation").documents()]
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(d.id for d in base.documents())
    assert 30 <= len(val) <= 90  # ~5% of 1189 chapters
    assert val == [d.id for d in HoldoutSubset(base, 0.05, 0, "validation").documents()]
    assert val != [d.id for d in HoldoutSubset(base, 0.05, 1, "validation").documents()]
    assert len({i.split()[0] for i in val}) > 10  # spread over many books, not one block


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_reload(chapters, small_tokenizer, tmp_path):
    texts = [d.text for d in chapters[1000:1010]] + ["  Odd   spacing\t\ttabs\n\n\nünïcödé ☃ 漢字 <|endoftext|> end "]
    for text in texts:
        ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert small_tokenizer.decode(ids) == text
    assert len(small_tokenizer) == 512
    assert small_tokenizer.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|startoftext|>"]
    assert small_tokenizer.eos_token_id == 0 and small_tokenizer.bos_token_id == 1
    small_tokenizer.save_pretrained(tmp_path / "t")
    reloaded = load_tokenizer(str(tmp_path / "t"))
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(small_tokenizer)
    assert reloaded(texts[0])["input_ids"] == small_tokenizer(texts[0])["input_ids"]
    # BPE learned merges: far fewer tokens than bytes on English
    assert len(small_tokenizer(texts[0])["input_ids"]) < 0.5 * len(texts[0].encode())


def test_tokenizer_cache_reuses_the_trained_tokenizer(tmp_path, monkeypatch):
    import pararnn_lm.data.tokenizer as tokmod

    source = FirstN(BundledSource(), 30)
    first = get_or_train_tokenizer(source, 300, str(tmp_path))
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1

    def boom(*args, **kwargs):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(tokmod, "train_tokenizer", boom)
    again = get_or_train_tokenizer(source, 300, str(tmp_path))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(first)
    with pytest.raises(AssertionError, match="trained again"):  # other settings = other cache entry
        get_or_train_tokenizer(source, 320, str(tmp_path))


def test_special_token_text_is_not_a_separator(small_tokenizer):
    [ids] = list(tokenize_documents(["a <|endoftext|> b"], small_tokenizer))
    assert (ids == small_tokenizer.eos_token_id).sum() == 1 and ids[-1] == small_tokenizer.eos_token_id


# --- packing --------------------------------------------------------------------------------------


def random_documents(rng, n, eos=0, vocab=50):
    return [np.append(rng.integers(1, vocab, size=int(rng.integers(1, 40))), eos).astype(np.int64) for _ in range(n)]


def reference_samples(docs, T, shifted):
    """Independent packing: plain Python lists, a document id per token, sliced by hand."""
    stream, doc_of = [], []
    for d, doc in enumerate(docs):
        stream += [int(t) for t in doc]
        doc_of += [d] * len(doc)
    out = []
    i = 0
    while (i + 1) * T + (1 if shifted else 0) <= len(stream):
        s = i * T
        inp = stream[s:s + T]
        lab = stream[s + 1:s + T + 1] if shifted else list(inp)
        pos = []
        for t in range(T):
            pos.append(0 if t == 0 or doc_of[s + t] != doc_of[s + t - 1] else pos[-1] + 1)
        out.append((inp, lab, pos))
        i += 1
    return out


@pytest.mark.parametrize("label_mode", ["unshifted", "shifted"])
@pytest.mark.parametrize("T", [1, 7, 64])
def test_packing_matches_reference(label_mode, T):
    rng = np.random.default_rng(T)
    docs = random_documents(rng, 60)
    stream, offsets = concat_documents(docs)
    ds = PackedDataset(stream, offsets, T, label_mode=label_mode)
    ref = reference_samples(docs, T, label_mode == "shifted")
    assert len(ds) == len(ref) > 0
    for i, (inp, lab, pos) in enumerate(ref):
        sample = ds[i]
        assert sample["input_ids"].tolist() == inp
        assert sample["labels"].tolist() == lab
        assert sample["position_ids"].tolist() == pos
    # every EOS is followed by a new segment (position 0) inside a window
    batch = collate_packed([ds[i] for i in range(len(ds))])
    inp, pos = batch["input_ids"], batch["position_ids"]
    assert torch.all(pos[:, 1:][inp[:, :-1] == 0] == 0)
    assert torch.all(pos[:, 1:][inp[:, :-1] != 0] != 0)


def test_cu_seqlens_by_hand():
    pos = torch.tensor([[0, 1, 2, 0, 1],
                        [3, 4, 0, 0, 1]])  # row 1 continues a document: its start is still a boundary
    cu = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 7, 8, 10]
    assert cu_seqlens_from_position_ids(torch.tensor([0, 1, 0])).tolist() == [0, 2, 3]
    batch = collate_packed([{"position_ids": pos[0]}, {"position_ids": pos[1]}], with_cu_seqlens=True)
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 7, 8, 10]


def test_feistel_is_a_permutation_and_depends_on_seed_and_epoch():
    for n in (1, 2, 3, 10, 257, 1000):
        perm = feistel_permute(np.arange(n), n, seed=3, epoch=1)
        assert sorted(perm.tolist()) == list(range(n))
    a, b, c = (feistel_permute(np.arange(100), 100, s, e) for s, e in ((0, 0), (0, 1), (1, 0)))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    order = SequenceOrder(100, seed=0, shuffle=True)
    assert np.array_equal(order(np.arange(100, 200)), b)


# --- sharding and cursor --------------------------------------------------------------------------


def identity_dataset(num_sequences, T=4):
    """Tokens 0..N*T: a sequence's first token // T is its index (checked from the data itself)."""
    tokens = np.arange(num_sequences * T, dtype=np.int64)
    offsets = np.arange(0, num_sequences * T + 1, 3, dtype=np.int64)
    offsets = np.append(offsets[offsets < num_sequences * T], num_sequences * T)
    return PackedDataset(tokens, offsets, T, label_mode="unshifted")


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def seq_ids(batches, T=4):
    return [int(x) // T for b in batches for x in b["input_ids"][:, 0]]


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2), (3, 2), (4, 1)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_x_workers_cover_each_sequence_once(world, workers, shuffle):
    N, B = 50, 3
    ds = identity_dataset(N)
    per_rank_batches = -(-N // (world * B))  # enough for one epoch
    global_seen = {}
    for rank in range(world):
        loader = PackedLoader(ds, B, rank=rank, world_size=world, num_workers=workers, seed=7, shuffle=shuffle)
        batches = take(loader, per_rank_batches)
        ids = seq_ids(batches)
        # same batches whatever the number of workers
        ref = PackedLoader(ds, B, rank=rank, world_size=world, num_workers=0, seed=7, shuffle=shuffle)
        assert ids == seq_ids(take(ref, per_rank_batches))
        for k, sid in enumerate(ids):
            global_seen[k * world + rank] = sid
    first_epoch = [global_seen[g] for g in range(N)]
    assert sorted(first_epoch) == list(range(N))  # no repeats, no gaps
    assert (first_epoch != list(range(N))) == shuffle
    # validation: a finite pass, equal share per rank, no repeats across ranks
    shares = []
    for rank in range(world):
        val = PackedLoader(ds, B, rank=rank, world_size=world, num_workers=workers, infinite=False)
        ids = seq_ids(list(val))
        assert len(ids) == N // world and len(list(val)) == len(val) == -(-(N // world) // B)
        assert seq_ids(list(val)) == ids  # every pass is the same
        shares += ids
    assert sorted(shares) == list(range(world * (N // world)))


@pytest.mark.parametrize("workers", [0, 2])
def test_cursor_restores_exactly_the_next_batches(workers):
    ds = identity_dataset(23)  # small: the run crosses epochs (23 sequences / (2 ranks x 2) per step)
    make = lambda rank: PackedLoader(ds, 2, rank=rank, world_size=2, num_workers=workers, seed=1, shuffle=True)
    for rank in range(2):
        uninterrupted = take(make(rank), 17)
        first = make(rank)
        it = iter(first)
        head = [next(it) for _ in range(6)]
        state = first.state_dict()
        assert state["next_batch"] == 6
        del it
        resumed = make(rank)
        resumed.load_state_dict(state)
        tail = take(resumed, 11)
        for a, b in zip(head + tail, uninterrupted):
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(a[key], b[key])
        assert resumed.state_dict()["next_batch"] == 17
        assert resumed.epoch >= 2


# --- prepare -> memmap -> dataset -------------------------------------------------------------------


def test_prepare_roundtrip_equals_direct_tokenization(chapters, small_tokenizer, tmp_path):
    texts = [d.text for d in chapters[200:240]]
    eos = small_tokenizer.eos_token_id
    direct = [small_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    stream = np.concatenate([np.asarray(d) for d in direct])
    out = prepare_shards(texts, small_tokenizer, tmp_path / "p", shard_tokens=1000, progress=False)
    shards = TokenShards(out, tokenizer=small_tokenizer)
    assert len(shards.index["shards"]) == -(-len(stream) // 1000) > 3  # documents straddle shard files
    assert shards.dtype == np.dtype("<u2") and (out / "shard_00000.bin").stat().st_size == 2000
    assert np.array_equal(shards.read(0, len(stream)), stream)
    assert np.array_equal(shards.read(995, 1007), stream[995:1007])
    assert np.array_equal(shards.doc_offsets, np.cumsum([0] + [len(d) for d in direct]))
    for mode in ("unshifted", "shifted"):
        from_disk = PackedDataset(shards, None, 100, label_mode=mode)
        in_memory = PackedDataset(stream, np.cumsum([0] + [len(d) for d in direct]), 100, label_mode=mode)
        assert len(from_disk) == len(in_memory)
        for i in range(len(in_memory)):
            for key, value in in_memory[i].items():
                assert torch.equal(from_disk[i][key], value), (mode, i, key)
    # a process pool yields identical shards
    pooled = prepare_shards(texts, small_tokenizer, tmp_path / "q", shard_tokens=1000, num_proc=2, progress=False)
    assert np.array_equal(TokenShards(pooled).read(0, len(stream)), stream)
    # multi-worker loading from memory-mapped shards
    loader = PackedLoader(PackedDataset(shards, None, 50), 4, num_workers=2, shuffle=True, seed=3)
    ref = PackedLoader(PackedDataset(stream, shards.doc_offsets, 50), 4, num_workers=0, shuffle=True, seed=3)
    for a, b in zip(take(loader, 5), take(ref, 5)):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_token_dtype_by_vocab():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_000) == np.uint32


# --- end to end -------------------------------------------------------------------------------------


def test_build_datasets_bundled_subset(tmp_path):
    cfg = DataConfig(max_documents=80, vocab_size=400, seq_len=64, cache_dir=str(tmp_path / "cache"),
                     validation_fraction=0.1, num_workers=0)
    train, val, tok = build_datasets(cfg, rank=0, world_size=1, batch_size=4)
    batch = next(iter(train))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(v.shape == (4, 64) and v.dtype == torch.int64 for v in batch.values())
    assert int(batch["input_ids"].max()) < len(tok) == 400
    assert torch.equal(batch["labels"], batch["input_ids"])  # HF convention (models/ shift inside)
    val_batches = list(val)
    assert len(val_batches) == len(val) > 0
    # the validation text is held out: no validation chapter heading occurs in the training stream
    val_ids = [d.id for d in HoldoutSubset(FirstN(BundledSource(), 80), 0.1, 0, "validation").documents()]
    train_text = tok.decode(train.dataset.tokens.read(0, train.dataset.num_tokens))
    assert val_ids and not any(f"{i}\n\n" in train_text for i in val_ids)
    # second build: everything from the cache, identical batches
    again = build_datasets(cfg, rank=0, world_size=1, batch_size=4)
    assert torch.equal(next(iter(again.train))["input_ids"], batch["input_ids"])
    assert again.vocab_size == 400


def test_build_datasets_from_files_and_prepared_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d.text for d in bundled_documents()[300:330]]
    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "a.jsonl", "w") as f:
        import json
        for text in docs[:10]:
            f.write(json.dumps({"content": text, "id": 1}) + "\n")
    pq.write_table(pa.table({"content": docs[10:20]}), tmp_path / "corpus" / "b.parquet")
    source = FileSource(str(tmp_path / "corpus"), text_field="content")
    assert [d.text for d in source.documents()] == docs[:20]
    for i, text in enumerate(docs[20:30]):
        (tmp_path / f"c{i}.txt").write_text(text)
    assert [d.text for d in FileSource(str(tmp_path / "c*.txt")).documents()] == docs[20:30]
    lines = FileSource(str(tmp_path / "c0.txt"), text_unit="line")
    assert [d.text for d in lines.documents()] == [l for l in docs[20].splitlines() if l.strip()]

    cfg = DataConfig(source="files", path=str(tmp_path / "corpus"), text_field="content",
                     validation_split=str(tmp_path / "c*.txt"), vocab_size=300, seq_len=32,
                     cache_dir=str(tmp_path / "cache"))
    bundle = build_datasets(cfg, batch_size=2)
    assert bundle.validation.dataset.num_documents == 10 and bundle.train.dataset.num_documents == 20
    # the prepare CLI path: same tokens when read back through data.prepared_dir
    out = prepare_dataset(cfg, tmp_path / "prepared", progress=False)
    prepared = build_datasets(dataclasses.replace(cfg, prepared_dir=str(out)), batch_size=2)
    assert tokenizer_fingerprint(prepared.tokenizer) == tokenizer_fingerprint(bundle.tokenizer)
    for a, b in zip(take(prepared.train, 3), take(bundle.train, 3)):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["position_ids"], b["position_ids"])


def test_prepare_script_cli(tmp_path):
    from repo_scripts import load_script

    cli = load_script("scripts/prepare_data.py")
    out = cli.main(["--out", str(tmp_path / "p"), "--max-documents", "25", "--vocab-size", "300",
                    "--tokenizer-train-max-chars", "none", "--cache-dir", str(tmp_path / "c")])
    shards = TokenShards(out / "train", tokenizer=load_tokenizer(str(out / "tokenizer")))
    assert shards.vocab_size == 300 and shards.num_documents + TokenShards(out / "validation").num_documents == 25


def test_workers_survive_the_stop_signals_the_training_process_handles(small_tokenizer, chapters):
    """A preemption notice (SIGTERM / SIGUSR1) or Ctrl-C reaches the data pipeline's worker processes too;
    they leave it to the training process (which checkpoints), and the batches and encodings go on."""
    import multiprocessing
    import os
    import signal

    from pararnn_lm.data.tokenize import TokenizerPool

    def signal_children() -> int:
        children = multiprocessing.active_children()
        for child in children:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                os.kill(child.pid, sig)
        return len(children)

    stream = np.arange(4000) % 500 + 1
    offsets = np.arange(0, 4001, 40)
    loader = PackedLoader(PackedDataset(stream, offsets, 50), 4, num_workers=2, shuffle=True, seed=3)
    ref = PackedLoader(PackedDataset(stream, offsets, 50), 4, num_workers=0, shuffle=True, seed=3)
    batches, expected = iter(loader), take(ref, 8)
    for want in expected[:2]:  # one batch from each worker: both have started
        assert torch.equal(next(batches)["input_ids"], want["input_ids"])
    assert signal_children() == 2
    for want in expected[2:]:
        assert torch.equal(next(batches)["input_ids"], want["input_ids"])

    texts = [d.text for d in chapters[:6]]
    direct = TokenizerPool(small_tokenizer).submit(texts).result()
    pool = TokenizerPool(small_tokenizer, num_workers=2)
    try:
        pool.submit(texts[:1]).result()  # the workers are up
        assert signal_children() >= 2
        encoded = pool.submit(texts).result()
    finally:
        pool.close()
    assert all(np.array_equal(a, b) for a, b in zip(encoded, direct)) and len(encoded) == len(direct)


def test_a_process_with_live_workers_still_exits(tmp_path):
    """Workers that ignore SIGTERM must not hold up the interpreter's exit (multiprocessing terminates and
    joins leftover children there): a loader iterator and a tokenizer pool left open at exit."""
    import subprocess
    import sys

    script = tmp_path / "leave_open.py"
    script.write_text(
        "import numpy as np\n"
        "from pararnn_lm.data import PackedDataset, PackedLoader, bundled_documents, train_tokenizer\n"
        "from pararnn_lm.data.tokenize import TokenizerPool\n"
        "if __name__ == '__main__':  # the pool spawns its workers\n"
        "    stream = np.arange(4000) % 500 + 1\n"
        "    loader = PackedLoader(PackedDataset(stream, np.arange(0, 4001, 40), 50), 4, num_workers=2)\n"
        "    LIVE = iter(loader)\n"
        "    next(LIVE)\n"
        f"    tok = train_tokenizer([d.text for d in bundled_documents()[:20]], vocab_size=300, save_dir={str(tmp_path)!r})\n"
        "    POOL = TokenizerPool(tok, num_workers=2)\n"
        "    POOL.submit(['in the beginning']).result()\n"
        "    print('done', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
