"""train.py end to end on the CPU: the default run, exact resume after a crash or a preemption,
data-parallel equivalence (DDP, DeepSpeed ZeRO-2/3), clear errors that leave checkpoints intact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# A small, fast run: the debug preset on 64-token sequences of the bundled corpus.
FAST = [
    "model.size=debug", "data.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=4",
    "train.log_every=1", "eval.every=0", "eval.max_batches=2", "logging.wandb_mode=disabled",
    "logging.progress_bar=false", "export.at_end=false", "checkpoint.keep_last=5",
]


def run_train(run_dir: Path, *overrides: str, fault: str | None = None, launcher: list[str] | None = None, fast: bool = True,
              expect: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # the deepspeed launcher decides the accelerator before train.py runs
    env.pop("PARARNN_TEST_FAULT", None)
    if fault:
        env["PARARNN_TEST_FAULT"] = fault
    command = [*(launcher or [sys.executable]), "train.py", f"run_dir={run_dir}", *(FAST if fast else []), *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != expect:
        raise AssertionError(f"exit {result.returncode} (expected {expect}) for {command}\n{result.stderr[-6000:]}")
    return result


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


def test_default_run_learns_checkpoints_evaluates_and_exports(tmp_path):
    # The README's `python train.py` (tiny ParaGRU), shortened for CI.
    run_dir = tmp_path / "default"
    result = run_train(
        run_dir, "train.steps=40", "train.micro_batch_size=8", "train.global_batch_size=8", "data.seq_len=128",
        "train.log_every=1", "eval.max_batches=4", "logging.wandb_mode=offline", fast=False,
    )
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 41))
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert last < first - 1.5, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_ppl" in r][-1]
    assert final["val_ppl"] < 2 ** 12 and "newton/iters/0" in records[0] and records[0]["tokens_per_s"] > 0
    assert latest_step(run_dir) == 40
    assert (run_dir / "export" / "model.safetensors").is_file() and (run_dir / "export" / "config.json").is_file()
    assert (run_dir / "export" / "tokenizer.json").is_file()
    assert (run_dir / "wandb").is_dir()  # offline W&B mirror
    assert "train:" in result.stderr and "tok_s" in result.stderr  # the progress bar


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    steps = ["train.steps=16", "checkpoint.every=4"]
    reference = tmp_path / "reference"
    run_train(reference, *steps)
    crashed = tmp_path / "crashed"
    run_train(crashed, *steps, fault="sigkill@10", expect=-9)  # dies mid-way: last checkpoint is step 8
    assert latest_step(crashed) == 8
    run_train(crashed, *steps, "resume=auto")
    expected, got = losses(reference), losses(crashed)
    assert sorted(got) == list(range(1, 17))
    for step in range(9, 17):
        assert abs(got[step] - expected[step]) <= 1e-6 * max(1.0, abs(expected[step])), (step, got[step], expected[step])


def test_sigterm_checkpoints_then_resume_reproduces(tmp_path):
    steps = ["train.steps=12", "checkpoint.every=0"]
    reference = tmp_path / "reference"
    run_train(reference, *steps)
    preempted = tmp_path / "preempted"
    run_train(preempted, *steps, fault="sigterm@5", expect=3)  # REQUEUE_EXIT_CODE
    assert latest_step(preempted) == 5
    run_train(preempted, *steps)  # resume=auto is the default
    expected, got = losses(reference), losses(preempted)
    for step in range(6, 13):
        assert abs(got[step] - expected[step]) <= 1e-6 * max(1.0, abs(expected[step])), step


@pytest.mark.parametrize("deepspeed, launcher", [("none", "torchrun"), ("zero2", "torchrun"), ("zero3", "torchrun"),
                                                 ("zero2", "deepspeed")])
def test_two_process_data_parallel_equals_one_process(tmp_path, deepspeed, launcher):
    common = ["train.steps=4", "train.micro_batch_size=2", "train.global_batch_size=4", "checkpoint.every=0",
              f"deepspeed={deepspeed}"]
    single = tmp_path / "single"
    run_train(single, *common)  # one process, gradient accumulation 2
    double = tmp_path / "double"
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
        "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=2",
                      f"--master_port={29700 + os.getpid() % 200}"],
    }
    run_train(double, *common, launcher=launchers[launcher])  # two processes, accumulation 1
    one, two = losses(single), losses(double)
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step] - two[step]) <= 2e-5 * abs(one[step]), (step, one[step], two[step])


def test_zero3_with_compiled_blocks_equals_eager(tmp_path):
    # ZeRO-3 gathers parameters in module hooks; compiled blocks are ZeRO-3 leaf modules whose forward
    # alone is compiled (pararnn_lm/training/build.py). Two ranks, compiled, against one rank, eager.
    common = ["train.steps=3", "train.micro_batch_size=2", "train.global_batch_size=4", "checkpoint.every=0",
              "deepspeed=zero3"]
    eager = tmp_path / "eager"
    run_train(eager, *common)
    compiled = tmp_path / "compiled"
    result = run_train(compiled, *common, "train.compile=true", launcher=[
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])
    assert "torch.compile: 2 decoder blocks (ZeRO-3 leaf modules)" in result.stderr + result.stdout
    one, two = losses(eager), losses(compiled)
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert abs(one[step] - two[step]) <= 2e-5 * abs(one[step]), (step, one[step], two[step])


def test_bad_data_fails_clearly_and_leaves_checkpoints_intact(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "train.steps=4", "checkpoint.every=2")
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints" / "step_00000004").iterdir()}
    missing = run_train(run_dir, "train.steps=8", "data=local", f"data.path={tmp_path}/nope/*.jsonl", expect=1)
    assert "nope" in missing.stderr
    corrupt = tmp_path / "bad.jsonl"
    corrupt.write_text('{"text": "fine"}\n{not json\n')
    result = run_train(run_dir, "train.steps=8", "data=local", f"data.path={corrupt}", expect=1)
    assert "bad.jsonl" in result.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_train(run_dir, "train.steps=8", "data=local", f"data.path={empty}", expect=1)
    assert "empty" in result.stderr.lower()
    result = run_train(run_dir, "train.steps=8", "data.seq_len=100000000", expect=1)
    assert "seq_len" in result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints" / "step_00000004").iterdir()}
    assert before == after and latest_step(run_dir) == 4


def test_bad_overrides_name_the_key(tmp_path):
    result = run_train(tmp_path / "x", "optim.lrr=1", expect=1)
    assert "optim.lrr" in result.stderr
    result = run_train(tmp_path / "x", "+optim.lrr=1", expect=1)
    assert "lrr" in result.stderr and "OptimConfig" in result.stderr
    result = run_train(tmp_path / "x", "train.steps=abc", expect=1)
    assert "train.steps" in result.stderr
    result = run_train(tmp_path / "x", "train.precision=fp8", expect=1)
    assert "train.precision='fp8' is not one of" in result.stderr
    result = run_train(tmp_path / "x", "model=rwkv", expect=1)
    assert "rwkv" in result.stderr


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_is_recorded_and_skipped_or_stops(tmp_path, policy):
    run_dir = tmp_path / policy
    expect = 0 if policy == "skip" else 1
    result = run_train(run_dir, "train.steps=6", "checkpoint.every=0", f"train.on_nonfinite={policy}",
                       fault="nan@3", expect=expect)
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    assert "step 3: non-finite loss" in result.stdout + result.stderr
    if policy == "skip":
        assert records[3]["skipped"] is True and records[3]["loss"] == "nan"
        assert all(not records[s]["skipped"] for s in (1, 2, 4, 5, 6))
        assert all(isinstance(records[s]["loss"], float) for s in (4, 5, 6))  # training went on, finite
        state = torch.load(run_dir / "checkpoints" / "step_00000006" / "state.pt", weights_only=False)
        assert state["nonfinite_steps"] == [3]
    else:
        assert "FloatingPointError" in result.stderr and latest_step(run_dir) == 3
        assert max(records) == 2  # the NaN step itself is not logged as a training step


def test_activation_checkpointing_reproduces_the_plain_run(tmp_path):
    """Recomputing each block in the backward changes memory, not the arithmetic: same losses."""
    common = ["train.steps=3", "checkpoint.every=0", "+model.overrides.num_hidden_layers=2"]
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    run_train(plain, *common)
    result = run_train(recomputed, *common, "train.activation_checkpointing=true")
    log = result.stdout + result.stderr
    assert "activation checkpointing: 2 decoder blocks recompute" in log
    one, two = losses(plain), losses(recomputed)
    assert sorted(two) == [1, 2, 3] and one[1] == two[1]  # the first loss comes before any update
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-6 * abs(one[step]), (step, one[step], two[step])
    config = (recomputed / "config.yaml").read_text()
    assert "activation_checkpointing: true" in config
