"""Elastic resume: a run resumed on another number of ranks or micro-batch size continues the same
sequence of global batches. Checked on the data cursors (the rows of every global batch after the
resume equal those of an uninterrupted run, prepared and streamed data) and end to end with train.py
(2 ranks -> 1 and 1 -> 2: the losses continue the uninterrupted run's, within the reduction-order
tolerance of data parallel vs one process). DeepSpeed ZeRO on another number of ranks, through its universal
checkpoint: test_universal_checkpoint.py."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from pararnn_lm.data import PackedDataset, PackedLoader, bundled_documents, concat_documents, train_tokenizer
from pararnn_lm.data.streaming import StreamComponent, StreamingPackedLoader, StreamSource
from test_train import attempts, losses, run_train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer([d.text for d in bundled_documents()[:100]], vocab_size=400,
                           save_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def stream_source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream")
    texts = [d.text[:400] for d in bundled_documents()[200:260]]
    for f in range(4):
        (directory / f"part{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[f::4]))
    return StreamSource([StreamComponent("docs", "files", (str(directory / "*.jsonl"),))])


def global_batches(make, world: int, micro: int, steps: int, cursors=None):
    """Rows of each global batch (sorted: the order of rows within a step is the layout's), and the ranks'
    cursors after ``steps`` optimiser steps of ``world`` ranks x ``micro`` x accumulation."""
    accum = GLOBAL_BATCH // (world * micro)
    loaders = [make(rank, world, micro) for rank in range(world)]
    if cursors is not None:
        for loader in loaders:
            loader.load_state_dict(cursors)
    iterators = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        rows = [tuple(row.tolist()) for it in iterators for _ in range(accum) for row in next(it)["input_ids"]]
        assert len(rows) == GLOBAL_BATCH
        out.append(sorted(rows))
    return out, [loader.state_dict() for loader in loaders]


def packed_maker():
    stream, offsets = concat_documents([np.arange(1, 1 + n) for n in range(5, 60)])
    dataset = PackedDataset(stream, offsets, 16)
    return lambda rank, world, micro: PackedLoader(dataset, micro, rank=rank, world_size=world, shuffle=True, seed=4)


def streaming_maker(source, tokenizer):
    return lambda rank, world, micro: StreamingPackedLoader(source, tokenizer, 16, micro, rank=rank, world_size=world,
                                                            num_streams=4, shuffle_buffer=3, seed=2)


@pytest.mark.parametrize("data", ["prepared", "streamed"])
@pytest.mark.parametrize("before, after", [((2, 2), (1, 4)), ((1, 2), (2, 1)), ((2, 4), (4, 2)), ((4, 1), (2, 2))])
def test_cursor_continues_the_global_batches_on_another_layout(data, before, after, stream_source, tokenizer):
    make = packed_maker() if data == "prepared" else streaming_maker(stream_source, tokenizer)
    reference, _ = global_batches(make, *before, steps=9)  # past an epoch of the prepared data
    _, cursors = global_batches(make, *before, steps=4)
    resumed, _ = global_batches(make, *after, steps=5, cursors=cursors)
    assert resumed == reference[4:]


def test_cursor_refuses_a_layout_it_cannot_continue(stream_source, tokenizer):
    make = streaming_maker(stream_source, tokenizer)
    _, cursors = global_batches(make, 2, 2, steps=1)
    with pytest.raises(ValueError, match="data.stream_shards=4 parts, which 3 ranks cannot share evenly"):
        make(0, 3, 1)
    with pytest.raises(ValueError, match="needs the state of stream"):
        make(0, 1, 4).load_state_dict(cursors[:1])  # the other rank's cursor is missing
    packed = packed_maker()
    _, cursors = global_batches(packed, 2, 4, steps=1)
    with pytest.raises(ValueError, match="global sequence 8, not a multiple of micro-batch 3 x 1 ranks"):
        packed(0, 1, 3).load_state_dict(cursors)


# --- end to end --------------------------------------------------------------------------------------

COMMON = ["train.steps=6", f"train.global_batch_size={GLOBAL_BATCH}", "checkpoint.every=1"]  # 64-token sequences (FAST)


def assert_close_continuation(resumed: dict[int, float], reference: dict[int, float], after: int) -> None:
    """Steps after the resume equal the reference within the tolerance of data parallel vs one process
    (test_train's DDP check): another reduction order, the same batches and arithmetic otherwise."""
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert abs(resumed[step] - loss) <= 2e-5 * abs(loss), (step, resumed[step], loss)


@pytest.mark.parametrize("data", ["bundled", "streamed"])
def test_train_resumes_two_ranks_onto_one_and_one_onto_two(tmp_path, data):
    extra = []
    if data == "streamed":
        directory = tmp_path / "corpus"
        directory.mkdir()
        texts = [d.text for d in bundled_documents()[:120]]
        for f in range(4):
            (directory / f"part{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[f::4]))
        extra = ["data=local", f"data.path={directory}/*.jsonl", "data.streaming=true", "data.stream_shards=2",
                 "data.shuffle_buffer=8", "data.vocab_size=400", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1"]
    reference = tmp_path / "reference"
    run_train(reference, *COMMON, *extra, "train.micro_batch_size=4")  # one rank, accumulation 2
    expected = losses(reference)

    down = tmp_path / "down"  # 2 ranks x micro 2 (accumulation 2), killed after step 4 (checkpoint 3), then 1 rank x micro 8
    run_train(down, *COMMON, *extra, "train.micro_batch_size=2", launcher=TORCHRUN, fault="sigkill@4", expect=1)
    result = run_train(down, *COMMON, *extra, "train.micro_batch_size=8", "run.allow_changes=[train.micro_batch_size]")
    log = result.stdout + result.stderr
    assert "elastic resume" in log and "ranks 2 -> 1, micro-batch 2 -> 8, gradient accumulation 2 -> 1" in log
    assert attempts(down)[-1][0] == 3
    assert_close_continuation(losses(down), expected, 3)

    up = tmp_path / "up"  # 1 rank x micro 4, killed after step 3 (checkpoint 2), then 2 ranks x micro 4 (accumulation 1)
    run_train(up, *COMMON, *extra, "train.micro_batch_size=4", fault="sigkill@3", expect=-9)
    result = run_train(up, *COMMON, *extra, "train.micro_batch_size=4", launcher=TORCHRUN)
    assert "ranks 1 -> 2, micro-batch 4 -> 4, gradient accumulation 2 -> 1" in result.stdout + result.stderr
    assert attempts(up)[-1][0] == 2
    assert_close_continuation(losses(up), expected, 2)
    if data == "streamed":  # the per-source token count is logged, summed over the ranks
        last = [r for r in map(json.loads, (up / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
        assert last[f"tokens/{directory}/*.jsonl"] == last["tokens"] == 6 * GLOBAL_BATCH * 64

