"""Streaming data (data.streaming=true) from local multi-file jsonl / parquet datasets, offline: packing
equals the prepared pipeline's, ranks read disjoint documents whose union is the data, a kill -9 and a
resume give exactly the next batches, workers and block shuffling keep that, mixture weights hold."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pararnn_lm.data import (
    DataConfig, PackedDataset, build_datasets, bundled_documents, collate_packed, concat_documents, tokenize_documents,
    train_tokenizer)
from pararnn_lm.data.config import MixtureComponent, validate_data_config
from pararnn_lm.data.streaming import StreamComponent, StreamingPackedLoader, StreamSource, stream_sources

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chapters():
    return bundled_documents()


@pytest.fixture(scope="module")
def tokenizer_dir(chapters, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer([d.text for d in chapters[:150]], vocab_size=512, save_dir=directory)
    return directory


@pytest.fixture(scope="module")
def small_tokenizer(tokenizer_dir):
    from pararnn_lm.data import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def write_jsonl(directory: Path, texts: list[str], files: int, stem: str = "part") -> str:
    """``texts`` spread over ``files`` jsonl files (contiguously); returns their glob."""
    directory.mkdir(parents=True, exist_ok=True)
    for f, chunk in enumerate(np.array_split(np.arange(len(texts)), files)):
        (directory / f"{stem}{f:02d}.jsonl").write_text("".join(json.dumps({"text": texts[i]}) + "\n" for i in chunk))
    return str(directory / f"{stem}*.jsonl")


def numbered(n: int) -> list[str]:
    """Documents that say which they are: ``doc17 doc17 ...``."""
    return [" ".join([f"doc{i}"] * 6) for i in range(n)]


def doc_numbers(tokenizer, rows: list[torch.Tensor]) -> set[int]:
    """The documents in consecutive windows of one stream (decoded together: a window may cut a number),
    up to the last complete one."""
    text = tokenizer.decode(torch.cat([row.flatten() for row in rows])).rsplit(tokenizer.eos_token, 1)[0]
    return {int(m) for m in re.findall(r"doc(\d+)", text)}


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def source_of(glob: str, **kw) -> StreamSource:
    return StreamSource([StreamComponent("docs", "files", (glob,))], **kw)


# --- packing and single-process resume ---------------------------------------------------------------


@pytest.mark.parametrize("label_mode", ["unshifted", "shifted"])
def test_one_unshuffled_stream_packs_like_the_prepared_pipeline_and_resumes(tmp_path, small_tokenizer, chapters, label_mode):
    texts = [d.text for d in chapters[400:420]]
    source = source_of(write_jsonl(tmp_path, texts, 3))
    stream, offsets = concat_documents(list(tokenize_documents(texts, small_tokenizer)))
    reference = PackedDataset(stream, offsets, 48, label_mode=label_mode)
    make = lambda: StreamingPackedLoader(source, small_tokenizer, 48, 3, label_mode=label_mode)
    first_epoch = len(reference) // 3
    uninterrupted = take(make(), first_epoch + 4)  # continues into epoch 2
    for b, batch in enumerate(uninterrupted[:first_epoch]):
        expect = collate_packed([reference[3 * b + j] for j in range(3)])
        for key in expect:
            assert torch.equal(batch[key], expect[key]), (b, key)
    loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(first_epoch - 2)]
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    for a, b in zip(head + take(resumed, 6), uninterrupted, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["position_ids"], b["position_ids"])


def test_block_shuffle_and_workers_keep_the_batches_and_every_cursor_resumes(tmp_path, small_tokenizer):
    texts = numbered(90)
    source = source_of(write_jsonl(tmp_path, texts, 4))
    make = lambda workers=0: StreamingPackedLoader(source, small_tokenizer, 24, 2, num_streams=2, shuffle_buffer=8,
                                                   seed=5, num_workers=workers)
    reference = take(make(), 40)  # several epochs of both streams
    in_workers = take(make(workers=2), 40)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(in_workers, reference))
    # stream 0 (row 0 of every batch) reads files 0-1 (documents 0-45) in blocks of 8, each permuted
    text = small_tokenizer.decode(torch.cat([batch["input_ids"][0] for batch in reference]))
    order = list(dict.fromkeys(int(m) for m in re.findall(r"doc(\d+)", text)))
    assert sorted(order[:8]) == list(range(8)) and order[:8] != list(range(8))
    assert sorted(order[8:16]) == list(range(8, 16))
    other = take(StreamingPackedLoader(source, small_tokenizer, 24, 2, num_streams=2, shuffle_buffer=8, seed=6), 5)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(other, reference))
    loader = make()
    it = iter(loader)
    for stop in range(40):  # a cursor after every batch resumes exactly
        resumed = make()
        resumed.load_state_dict(loader.state_dict())
        following = take(resumed, 3)
        for b, batch in enumerate(following):
            if stop + b < 40:
                assert torch.equal(batch["input_ids"], reference[stop + b]["input_ids"]), (stop, b)
        assert torch.equal(next(it)["input_ids"], reference[stop]["input_ids"])


def test_parquet_files_stream_like_jsonl(tmp_path, small_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = numbered(30)
    jsonl = source_of(write_jsonl(tmp_path / "j", texts, 2))
    (tmp_path / "p").mkdir()
    for f, chunk in enumerate(np.array_split(np.arange(30), 2)):
        pq.write_table(pa.table({"body": [texts[i] for i in chunk]}), tmp_path / "p" / f"part{f}.parquet")
    parquet = StreamSource([StreamComponent("p", "files", (str(tmp_path / "p"),), text_field="body")])
    a = take(StreamingPackedLoader(jsonl, small_tokenizer, 16, 2, num_streams=2), 10)
    b = take(StreamingPackedLoader(parquet, small_tokenizer, 16, 2, num_streams=2), 10)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


# --- several ranks (processes) -------------------------------------------------------------------------

RANK_SCRIPT = '''
import json, os, signal, sys
import torch, torch.distributed as dist
from pararnn_lm.data import DataConfig, build_datasets


def main():  # under the __main__ guard: tokenizer workers are spawned processes, which import this file
    args = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train = build_datasets(DataConfig(**args["data"]), rank, world, batch_size=args["batch_size"]).train
    out = args["out"]
    if args.get("resume"):
        train.load_state_dict(torch.load(f"{out}/cursor_{rank}.pt", weights_only=True))
    it = iter(train)
    for b in range(args["batches"]):
        batch = next(it)
        torch.save(batch["input_ids"], f"{out}/batch_{rank}_{b}.pt")
        if b + 1 == args.get("checkpoint_after"):
            torch.save(train.state_dict(), f"{out}/cursor_{rank}.pt")
            dist.barrier()
        if b + 1 == args.get("kill_after"):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-run: batches past the checkpoint were read, workers ran ahead


if __name__ == "__main__":
    main()
'''


def run_ranks(tmp_path: Path, name: str, expect_ok: bool = True, world: int = 2, **args) -> Path:
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", str(script),
               json.dumps({"out": str(out), **args})]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if (result.returncode == 0) != expect_ok:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-5000:]}")
    return out


def batches_of(out: Path, rank: int, first: int, count: int) -> list[torch.Tensor]:
    return [torch.load(out / f"batch_{rank}_{b}.pt") for b in range(first, first + count)]


@pytest.mark.parametrize("files", [4, 1])  # files per stream / every stream reads the one file and keeps its share
def test_two_ranks_read_disjoint_documents_whose_union_is_the_data(tmp_path, tokenizer_dir, small_tokenizer, files):
    n = 60
    data = dict(source="files", path=write_jsonl(tmp_path / "data", numbered(n), files), streaming=True,
                tokenizer=str(tokenizer_dir), seq_len=32, validation_fraction=0.1, shuffle_buffer=4)
    out = run_ranks(tmp_path, "run", data=data, batch_size=2, batches=30)  # more than an epoch of each stream
    seen = [doc_numbers(small_tokenizer, batches_of(out, rank, 0, 30)) for rank in range(2)]  # one stream per rank
    _, validation_source = stream_sources(DataConfig(**data))
    held_out = {int(re.search(r"doc(\d+)", ex["text"]).group(1)) for ex in validation_source.dataset()}
    assert 0 < len(held_out) < n // 4
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n)) - held_out


def test_kill_9_mid_run_then_resume_gives_exactly_the_next_batches(tmp_path, tokenizer_dir):
    data = dict(source="files", path=write_jsonl(tmp_path / "data", numbered(80), 4), streaming=True,
                tokenizer=str(tokenizer_dir), seq_len=24, shuffle_buffer=6, num_workers=1, stream_shards=4)
    reference = run_ranks(tmp_path, "reference", data=data, batch_size=2, batches=24)
    run_ranks(tmp_path, "killed", expect_ok=False, data=data, batch_size=2, batches=24, checkpoint_after=9, kill_after=13)
    killed = tmp_path / "killed"
    run_ranks(tmp_path, "killed", data=data, batch_size=2, batches=15, resume=True)
    for rank in range(2):
        after = [torch.load(killed / f"batch_{rank}_{b}.pt") for b in range(15)]  # overwritten by the resumed run
        expect = batches_of(reference, rank, 9, 15)
        assert all(torch.equal(a, e) for a, e in zip(after, expect, strict=True)), rank


# --- mixtures ----------------------------------------------------------------------------------------


def test_mixture_weights_hold_within_four_binomial_sigmas(tmp_path, small_tokenizer):
    """Every document is the same L tokens (EOS included), so a component's tokens / L is its document
    count (up to the one document a batch cuts): over n sampled documents, component i's share is
    binomial, std sqrt(p (1 - p) / n)."""
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    word = "the"
    length = len(small_tokenizer(word, add_special_tokens=False)["input_ids"]) + 1
    components = [StreamComponent(name, "files", (write_jsonl(tmp_path / name, [word] * 3000, 2),), weight)
                  for name, weight in weights.items()]
    source = StreamSource(components, seed=3)
    loader = StreamingPackedLoader(source, small_tokenizer, 64, 4, num_streams=2, shuffle_buffer=50, seed=3)
    batches = take(loader, 16)  # 4096 tokens: over a thousand documents, no component (1500 per stream) runs out
    counts = loader.source_tokens()
    assert sum(counts.values()) == 16 * 4 * 64 == sum(int(b["input_ids"].numel()) for b in batches)
    n = sum(counts.values()) / length
    for name, p in weights.items():
        share = counts[name] / length / n
        assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n), (name, share, p, counts)
    resumed = StreamingPackedLoader(source, small_tokenizer, 64, 4, num_streams=2, shuffle_buffer=50, seed=3)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.source_tokens() == counts  # the counts are part of the cursor
    # another seed samples another sequence of components
    reseeded = StreamingPackedLoader(StreamSource(components, seed=4), small_tokenizer, 64, 4, num_streams=2,
                                     shuffle_buffer=50, seed=3)
    take(reseeded, 16)
    assert reseeded.source_tokens() != counts


def test_mixture_config_builds_and_bad_values_name_the_key(tmp_path, tokenizer_dir):
    a = write_jsonl(tmp_path / "a", numbered(40), 2)
    b = write_jsonl(tmp_path / "b", numbered(40), 2)
    cfg = DataConfig(source="files", streaming=True, tokenizer=str(tokenizer_dir), seq_len=16,
                     mixture=[MixtureComponent(path=a, weight=0.7, name="a"), MixtureComponent(path=b, weight=0.3, name="b")])
    bundle = build_datasets(cfg, batch_size=2)
    take(bundle.train, 3)
    assert set(bundle.train.source_tokens()) == {"a", "b"} and sum(bundle.train.source_tokens().values()) == 3 * 2 * 16
    assert len(take(bundle.validation, 1)) == 1
    bad = [
        (dict(mixture=[MixtureComponent(path=a, weight=0.0)]), r"data.mixture\[0\].weight must be > 0"),
        (dict(mixture=[MixtureComponent(path=a), MixtureComponent(path=a)]), "names its components twice"),
        (dict(mixture=[MixtureComponent(path=a)], streaming=False), "data.mixture needs data.streaming=true"),
        (dict(shuffle_buffer=0), "data.shuffle_buffer must be >= 1"),
        (dict(stream_shards=0), "data.stream_shards must be >= 1"),
        (dict(source="bundled", mixture=[]), "data.streaming applies to hf and files sources"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_data_config(DataConfig(**{**cfg.__dict__, **change}))


def test_text_files_and_bad_stream_splits_fail_clearly(tmp_path, small_tokenizer):
    from pararnn_lm.data import DataSourceError

    (tmp_path / "a.txt").write_text("some text\n")
    with pytest.raises(DataSourceError, match="streaming reads .jsonl/.json or .parquet files"):
        source_of(str(tmp_path / "a.txt")).dataset()
    source = source_of(write_jsonl(tmp_path / "d", numbered(10), 2))
    with pytest.raises(ValueError, match="data.stream_shards=3 parts, which 2 ranks cannot share evenly"):
        StreamingPackedLoader(source, small_tokenizer, 16, 1, rank=0, world_size=2, num_streams=3)
    loader = StreamingPackedLoader(source, small_tokenizer, 16, 1, num_streams=2)
    take(loader, 2)
    with pytest.raises(ValueError, match="data.stream_shards=4 but the checkpoint's stream has 2 parts"):
        StreamingPackedLoader(source, small_tokenizer, 16, 1, num_streams=4).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="shuffle_buffer: checkpoint 1 vs now 2"):
        StreamingPackedLoader(source, small_tokenizer, 16, 1, num_streams=2, shuffle_buffer=2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="needs the state of stream"):
        StreamingPackedLoader(source, small_tokenizer, 16, 1, rank=1, world_size=2, num_streams=2).load_state_dict(
            {**loader.state_dict(), "streams": {0: loader.state_dict()["streams"][0]}})
