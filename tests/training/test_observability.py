"""Observability of a run: a torch.profiler trace of the steps profile.steps names (and on GPU a CUDA memory
snapshot), TensorBoard scalars that are metrics.jsonl's values read back from the event files, and clear
errors for profile.steps that cannot be profiled."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pararnn_lm.training.checkpoint import atomic_write_text
from pararnn_lm.training.config import TrainConfig, validate
from test_init_from import train_here
from test_train import records


def profiler_steps(trace: dict) -> list[str]:
    return sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))


def test_the_trace_covers_exactly_the_profiled_steps(tmp_path):
    run_dir = tmp_path / "run"
    train_here(run_dir, "train.steps=5", "profile.steps=[2,3]", "checkpoint.every=0")
    written = sorted(p.name for p in (run_dir / "profile").iterdir())
    assert written == ["trace_steps_2-3_rank0.json"]  # on the CPU: no memory snapshot
    trace = json.loads((run_dir / "profile" / written[0]).read_text())
    assert profiler_steps(trace) == ["ProfilerStep#2", "ProfilerStep#3"]
    steps = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"] if e["name"].startswith("ProfilerStep#")}
    # the steps' work is in the trace, inside the step ranges: matrix products and one optimiser update each
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    inside = [e["name"] for e in spans if any(a <= e["ts"] <= b for a, b in steps.values())]
    assert "aten::mm" in inside and inside.count("Optimizer.step#AdamW.step") == 2
    assert [e["name"] for e in spans].count("Optimizer.step#AdamW.step") == 2
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3, 4, 5]  # the run is unaffected


def test_a_run_preempted_inside_the_profiled_steps_writes_the_steps_it_traced(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PARARNN_TEST_FAULT", "sigterm@3")  # a preemption after step 3
    summary = train_here(run_dir, "train.steps=6", "profile.steps=[2,5]", "checkpoint.every=0")
    assert summary["step"] == 3 and summary["exit_code"] == 3
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["trace_steps_2-3_rank0.json"]
    trace = json.loads((run_dir / "profile" / "trace_steps_2-3_rank0.json").read_text())
    assert profiler_steps(trace) == ["ProfilerStep#2", "ProfilerStep#3"]
    # resumed past step 2, the run does not profile a part of the range
    monkeypatch.delenv("PARARNN_TEST_FAULT")
    train_here(run_dir, "train.steps=6", "profile.steps=[2,5]", "checkpoint.every=0")
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["trace_steps_2-3_rank0.json"]


@pytest.mark.gpu
def test_on_gpu_the_trace_has_cuda_kernels_and_a_memory_snapshot(tmp_path):
    run_dir = tmp_path / "run"
    train_here(run_dir, "train.steps=3", "profile.steps=[2,2]", "checkpoint.every=0", "train.device=cuda")
    trace = json.loads((run_dir / "profile" / "trace_steps_2-2_rank0.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])
    snapshot = run_dir / "profile" / "memory_steps_2-2_rank0.pickle"
    assert snapshot.is_file() and snapshot.stat().st_size > 0


@pytest.mark.parametrize("steps, message", [
    ([3, 2], "profile.steps=[3, 2]: they are not ascending"),
    ([-1, 2], "profile.steps=[-1, 2]: steps are numbered from 1"),
    ([0, 2], "steps are numbered from 1"),
    ([2], "profile.steps=[2]: it needs two steps"),
    ([1, 2, 3], "it needs two steps"),
    ([5, 301], "profile.steps=[5, 301]: the run has 300 steps"),
])
def test_profile_steps_that_cannot_be_profiled_are_refused(steps, message):
    cfg = TrainConfig()
    cfg.profile.steps = steps
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(cfg)
    cfg.profile.steps = [300, 300]
    validate(cfg)


def tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows them (its loader applies the writer's purge marks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        scalars = events.Scalars(tag)
        assert len({s.step for s in scalars}) == len(scalars), f"{tag}: a step shown twice"
        out[tag] = {s.step: s.value for s in scalars}
    return out


def jsonl_scalars(run_dir) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for record in records(run_dir):
        if "event" in record:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(key, {})[record["step"]] = value
    return out


def assert_same_scalars(run_dir) -> None:
    """TensorBoard holds every numeric value of metrics.jsonl at its step, as float32 (its storage type)."""
    board, jsonl = tensorboard_scalars(run_dir), jsonl_scalars(run_dir)
    assert set(board) == set(jsonl)
    for tag, values in jsonl.items():
        assert board[tag] == {step: float(np.float32(value)) for step, value in values.items()}, tag


def test_tensorboard_holds_the_values_of_metrics_jsonl_also_after_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    common = ["train.steps=4", "checkpoint.every=2", "logging.tensorboard=true", "eval.every=2", "eval.at_end=true"]
    train_here(run_dir, *common)
    assert {"loss", "lr", "grad_norm", "val_loss", "newton/iters/0"} <= set(tensorboard_scalars(run_dir))
    assert sorted(tensorboard_scalars(run_dir)["loss"]) == [1, 2, 3, 4]
    assert_same_scalars(run_dir)
    # The run goes back to its step-2 checkpoint (the step-4 one is gone) and trains steps 3-4 again:
    # metrics.jsonl drops the first attempt's records past step 2, TensorBoard stops showing them.
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    atomic_write_text(run_dir / "checkpoints" / "latest", "step_00000002\n")
    train_here(run_dir, *common, "optim.lr=1e-2", "run.allow_changes=[optim.lr]")  # steps 3-4 differ now
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert sorted(tensorboard_scalars(run_dir)["loss"]) == [1, 2, 3, 4]
    assert_same_scalars(run_dir)
    assert [r["step"] for r in records(run_dir) if "event" in r] == [0, 2]


def test_no_tensorboard_files_unless_asked_for(tmp_path):
    run_dir = tmp_path / "run"
    train_here(run_dir, "train.steps=1")
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "profile").exists()
