"""train.py end to end on the CPU: the default run, exact resume after a crash, a preemption or ten
hard kills, data-parallel equivalence (DDP, DeepSpeed ZeRO-2/3), DeepSpeed ZeRO-1/2/3 against the
torch backend (same losses, precision and weights), clear errors that leave checkpoints intact."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
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
    # a process group of its own: a fault that signals the group reaches train.py and its workers, not pytest
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                            start_new_session=True)
    if result.returncode != expect:
        raise AssertionError(f"exit {result.returncode} (expected {expect}) for {command}\n{result.stderr[-6000:]}")
    return result


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def attempts(run_dir: Path) -> list[tuple[int, list[int]]]:
    """(step it started from, steps it logged) of every process that trained in the folder, from the
    `start` record each writes."""
    out: list[tuple[int, list[int]]] = []
    for record in records(run_dir):
        if record.get("event") == "start":
            out.append((record["step"], []))
        elif "loss" in record:
            out[-1][1].append(record["step"])
    return out


def assert_continues(run_dir: Path, reference: dict[int, float], resumed_at: int) -> None:
    """The last process started at ``resumed_at`` and logged exactly the steps after it; the file holds
    every step once, with the uninterrupted run's losses bit for bit (== on CPU: the same arithmetic in
    the same order)."""
    start, logged = attempts(run_dir)[-1]
    assert start == resumed_at and logged == list(range(resumed_at + 1, max(reference) + 1)), attempts(run_dir)
    assert [r["step"] for r in records(run_dir) if "loss" in r] == sorted(reference)
    assert losses(run_dir) == reference


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
    logged = records(run_dir)
    final = [r for r in logged if "val_ppl" in r][-1]
    first_step = next(r for r in logged if "loss" in r)
    assert final["val_ppl"] < 2 ** 12 and "newton/iters/0" in first_step and first_step["tokens_per_s"] > 0
    assert attempts(run_dir) == [(0, list(range(1, 41)))]
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
    assert_continues(crashed, losses(reference), resumed_at=8)


def test_sigterm_checkpoints_then_resume_reproduces(tmp_path):
    steps = ["train.steps=12", "checkpoint.every=0"]
    reference = tmp_path / "reference"
    run_train(reference, *steps)
    preempted = tmp_path / "preempted"
    run_train(preempted, *steps, fault="sigterm@5", expect=3)  # REQUEUE_EXIT_CODE
    assert latest_step(preempted) == 5
    run_train(preempted, *steps)  # resume=auto is the default
    assert_continues(preempted, losses(reference), resumed_at=5)


def test_a_preemption_signal_to_every_process_checkpoints_despite_data_workers(tmp_path):
    """SIGTERM to the whole process group (``timeout``, a terminal, a scheduler signalling the job): the
    DataLoader workers get it too and must leave the stop to the training process, which checkpoints."""
    steps = ["train.steps=10", "checkpoint.every=0", "data.num_workers=2"]
    reference = tmp_path / "reference"
    run_train(reference, *steps)
    preempted = tmp_path / "preempted"
    run_train(preempted, *steps, fault="sigterm_group@4", expect=3)  # REQUEUE_EXIT_CODE
    assert latest_step(preempted) == 4
    run_train(preempted, *steps)
    assert_continues(preempted, losses(reference), resumed_at=4)


def test_ten_hard_kills_at_random_times_then_resume_equal_the_uninterrupted_run(tmp_path):
    """Chaos: SIGKILL at random times (in start-up and resume, mid-step, mid-checkpoint) of a run that
    checkpoints every step, ten times; then it runs to the end. The losses equal an uninterrupted run's
    bit for bit, every step is in metrics.jsonl once, and every attempt resumed from the checkpoint
    `latest` named when the previous one was killed, which was never more than one step behind."""
    # 10 attempts advance at most ~15 steps each (~0.1 s a step): it never finishes early
    steps = ["train.steps=200", "checkpoint.every=1", "checkpoint.keep_last=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PARARNN_TEST_FAULT", None)
    reference, chaos = tmp_path / "reference", tmp_path / "chaos"
    command = [sys.executable, "train.py", *FAST, *steps]
    with open(tmp_path / "reference.log", "w") as log:  # alongside, on the other core
        uninterrupted = subprocess.Popen([*command, f"run_dir={reference}"], cwd=ROOT, env=env, stdout=log, stderr=log)

    def readable() -> list[dict]:  # the file as a reader sees it mid-run: a last line may be half-written
        out = []
        for line in (chaos / "metrics.jsonl").read_text().splitlines() if (chaos / "metrics.jsonl").exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    seed = int(os.environ.get("PARARNN_CHAOS_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    kills: list[tuple[int, int]] = []  # (last step logged, step `latest` names) at each kill
    try:
        while len(kills) < 10:
            starts = sum(r.get("event") == "start" for r in readable())
            launched = time.monotonic()
            with open(tmp_path / f"attempt{len(kills)}.log", "w") as log:
                proc = subprocess.Popen([*command, f"run_dir={chaos}"], cwd=ROOT, env=env, stdout=log, stderr=log)
            if len(kills) % 2:  # timed from launch, around the time start-up took: while loading or resuming
                deadline = launched + rng.uniform(0.6, 1.2) * startup
            else:  # timed from its start record: mid-step or mid-checkpoint
                while proc.poll() is None and sum(r.get("event") == "start" for r in readable()) <= starts:
                    time.sleep(0.02)
                startup = time.monotonic() - launched
                deadline = time.monotonic() + rng.uniform(0.0, 1.5)
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, f"seed {seed}: attempt {len(kills)} ended by itself ({proc.returncode})"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            logged = max((r["step"] for r in readable() if "loss" in r), default=0)
            kills.append((logged, latest_step(chaos) if (chaos / "checkpoints" / "latest").exists() else 0))
        run_train(chaos, *steps)
        assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        uninterrupted.kill()
    context = f"seed {seed}, kills (last logged, latest): {kills}, attempts: {attempts(chaos)}"
    assert [r["step"] for r in records(chaos) if "loss" in r] == list(range(1, 201)), context
    assert losses(chaos) == losses(reference), context
    assert all(latest >= logged - 1 for logged, latest in kills), context  # a checkpoint every step
    assert {start for start, _ in attempts(chaos)[1:]} <= {latest for _, latest in kills}, context


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


# One process under each backend, the same configuration; the torch backend's runs are made once for
# the three ZeRO stages.
ZERO_FP32 = ["train.steps=20", "checkpoint.every=0", "eval.at_end=false", "train.precision=fp32", "export.at_end=true"]
ZERO_BF16 = ["train.steps=1", "checkpoint.every=0", "eval.at_end=false", "train.precision=bf16", "export.at_end=true"]


@pytest.fixture(scope="module")
def torch_backend_runs(tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("torch_backend")
    run_train(runs / "fp32", *ZERO_FP32)
    run_train(runs / "bf16", *ZERO_BF16)
    return {"fp32": runs / "fp32", "bf16": runs / "bf16"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_like_the_torch_backend_and_exports_the_fp32_masters(tmp_path, torch_backend_runs, stage):
    """ZeRO-1/2/3 against the plain torch backend (``deepspeed=none``), one process each.

    fp32, 20 steps with clipping and the warm-up + cosine schedule active: the first loss (before any
    update) bit for bit, every LR equal, the losses and the final weights within a few float32
    roundings. Not bit-equal because the last bits differ: the torch backend's AdamW is the fused one,
    DeepSpeed's the per-tensor loop (pararnn_lm/train.py); DeepSpeed takes the clipping norm over its
    flat buffers in another order, with its own clip-coefficient formula; ZeRO-3's backward hooks pass
    every module's inputs through an identity autograd function, which changes the order in which the
    three gradients of the residual stream (x + f(x), and RMSNorm's x**2 and x / rms) are summed.
    Measured: losses at most one float32 rounding apart (<= 1.2e-7 relative), weights <= 5e-7
    (relative norm per tensor); with fused AdamW under both and no clipping ZeRO-1/2 are bit-equal. A
    DeepSpeed backend that does not clip is 7e-4 off in the loss, one that clips at 1.1x the norm 2e-5
    off in the weights, one that does not step the schedule has other LRs.

    bf16 autocast over fp32 parameters under both backends (DeepSpeed's own bf16 mode would cast every
    parameter, the recurrent gains and norms included, to bf16: the first loss 1e-4 off): the first
    loss bit for bit, and the export holds the fp32 master weights that zero_to_fp32 consolidates from
    the optimiser state, bit for bit."""
    from safetensors.torch import load_file

    from pararnn_lm.models import ParaRNNLMConfig
    from pararnn_lm.models.export import load_source

    plain = torch_backend_runs["fp32"]
    zero = tmp_path / "fp32"
    run_train(zero, *ZERO_FP32, f"deepspeed=zero{stage}")
    one, two = ({r["step"]: r for r in records(run) if "loss" in r} for run in (plain, zero))
    assert sorted(two) == list(range(1, 21)) and one[1]["loss"] == two[1]["loss"]
    for step in one:
        assert one[step]["lr"] == two[step]["lr"], (step, one[step]["lr"], two[step]["lr"])
        assert abs(one[step]["loss"] - two[step]["loss"]) <= 1e-6 * abs(one[step]["loss"]), \
            (step, one[step]["loss"], two[step]["loss"])
    reference, trained = (load_file(run / "export" / "model.safetensors") for run in (plain, zero))
    assert trained.keys() == reference.keys()
    for name, tensor in trained.items():
        assert torch.linalg.vector_norm(tensor - reference[name]) <= 5e-6 * torch.linalg.vector_norm(reference[name]), name

    plain, zero = torch_backend_runs["bf16"], tmp_path / "bf16"
    run_train(zero, *ZERO_BF16, f"deepspeed=zero{stage}")
    assert losses(zero) == losses(plain)
    exported = load_file(zero / "export" / "model.safetensors")
    masters = load_source(zero / "checkpoints" / "step_00000001",
                          ParaRNNLMConfig.from_pretrained(zero / "export")).state_dict()
    assert all(t.dtype == torch.float32 for t in exported.values())
    for name, tensor in exported.items():
        assert torch.equal(tensor, masters[name]), name


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
    more = ["train.steps=8", "run.allow_changes=[train.steps,data]"]  # resuming with other data, knowingly
    missing = run_train(run_dir, *more, "data=local", f"data.path={tmp_path}/nope/*.jsonl", expect=1)
    assert "nope" in missing.stderr
    corrupt = tmp_path / "bad.jsonl"
    corrupt.write_text('{"text": "fine"}\n{not json\n')
    result = run_train(run_dir, *more, "data=local", f"data.path={corrupt}", expect=1)
    assert "bad.jsonl" in result.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_train(run_dir, *more, "data=local", f"data.path={empty}", expect=1)
    assert "empty" in result.stderr.lower()
    result = run_train(run_dir, *more, "data.seq_len=100000000", expect=1)
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
        state = torch.load(run_dir / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
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
