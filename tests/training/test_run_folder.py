"""A run folder (runs/NAME/) under misuse and damage: a second run in it, planted pickles, a `latest`
that leads out of it, truncated checkpoint files, a half-written metrics line, resumes under another
configuration, two processes at once, Ctrl-C, a single .txt file as data, an unknown architecture.
Every resume is compared with an uninterrupted run bit for bit (CPU), and checked to have started
where it should (the `start` records the loop writes into metrics.jsonl)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pararnn_lm.training.checkpoint import CheckpointManager
from pararnn_lm.training.metrics import MetricsLogger
from pararnn_lm.training.optim import warmup_cosine
from test_train import FAST, ROOT, assert_continues, attempts, latest_step, losses, records, run_train

STEPS = ["train.steps=8"]  # the trajectory every resume test compares with `reference`


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted 8-step run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(run_dir, *STEPS, "checkpoint.every=0")
    return losses(run_dir)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The message of the exception a failed run ended with."""
    return [line for line in result.stderr.splitlines() if "Error: " in line][-1]


def output(result: subprocess.CompletedProcess) -> str:
    """What a run logged (Hydra logs to stdout, tracebacks go to stderr)."""
    return result.stdout + result.stderr


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file a run wrote (not its logs)."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "hydra" not in p.parts}


# --- resume=none in a folder that holds a run -----------------------------------------------------------

def test_resume_none_in_a_folder_holding_a_run_is_refused_unless_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "train.steps=4", "checkpoint.every=2")
    before = snapshot(run_dir)
    result = run_train(run_dir, "train.steps=3", "checkpoint.every=1", "resume=none", expect=1)
    assert f"{run_dir} already holds a run" in output(result) and "run.overwrite=true" in output(result)
    assert snapshot(run_dir) == before  # nothing written, nothing deleted

    result = run_train(run_dir, "train.steps=3", "checkpoint.every=1", "resume=none", "run.overwrite=true")
    assert f"deleted {run_dir / 'checkpoints'} of the earlier run" in output(result)
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps == ["step_00000001", "step_00000002", "step_00000003"] and latest_step(run_dir) == 3
    run_ids = {json.loads((run_dir / "checkpoints" / s / "COMPLETE").read_text())["run_id"] for s in steps}
    assert len(run_ids) == 1
    assert attempts(run_dir) == [(0, [1, 2, 3])]  # the old run's metrics are gone, not mixed in
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 3


def test_keep_last_deletes_only_this_runs_older_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20):  # another run's checkpoints with higher step numbers
        manager.save(step, {"data": {}}, {"step": step}, record={"run_id": "other"})
    for step in (1, 2, 3):
        manager.save(step, {"data": {}}, {"step": step}, record={"run_id": "this"})
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == ["step_00000002", "step_00000003", "step_00000010", "step_00000020"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"


# --- no code from checkpoint files ----------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant(file: Path, marker: Path) -> None:
    """Add a payload to a checkpoint file (read as it is: this test's own run just wrote it)."""
    state = torch.load(file, map_location="cpu", weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, file)


def forge_manifest(file: Path) -> None:
    """Record a file's present size and checksum in its checkpoint's manifest: a run folder from someone
    else, consistent but malicious."""
    from pararnn_lm.training.checkpoint import file_record

    checkpoint = next(p for p in file.parents if (p / "COMPLETE").is_file())
    manifest = json.loads((checkpoint / "COMPLETE").read_text())
    manifest["files"][file.relative_to(checkpoint).as_posix()] = file_record(file)
    (checkpoint / "COMPLETE").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, backend", [("rank_00000.pt", "none"), ("state.pt", "none"),
                                           ("deepspeed/ds/mp_rank_00_model_states.pt", "zero2")])
def test_a_pickle_planted_in_a_checkpoint_does_not_run_on_resume(tmp_path, name, backend):
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    run_train(run_dir, "train.steps=2", "checkpoint.every=2", f"deepspeed={backend}")
    file = run_dir / "checkpoints" / "step_00000002" / name
    plant(file, marker)
    result = run_train(run_dir, "train.steps=2", f"deepspeed={backend}", expect=1)
    assert f"{file} is damaged" in output(result)  # found by the checksum first
    forge_manifest(file)
    result = run_train(run_dir, "train.steps=2", f"deepspeed={backend}",
                       f"resume={run_dir / 'checkpoints' / 'step_00000002'}", expect=1)
    message = error_line(result)
    assert "not loaded (unpickling them could run code)" in message
    assert str(file if backend == "none" else run_dir / "checkpoints" / "step_00000002" / "deepspeed") in message
    assert not marker.exists()


def test_export_and_the_synthetic_app_do_not_unpickle_code(tmp_path):
    from pararnn_lm.models import config_for
    from pararnn_lm.models.export import load_source
    from pararnn_lm.synthetic.config import SyntheticTrainConfig
    from pararnn_lm.synthetic.run import RunFiles

    marker = tmp_path / "PWNED"
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    torch.save({"model": {}, "payload": Payload(marker)}, checkpoint / "state.pt")
    with pytest.raises(Exception, match="Unsupported global"):
        load_source(checkpoint, config_for("paragru", "debug"))
    files = RunFiles(tmp_path, SyntheticTrainConfig(), 0)
    torch.save({"step": 1, "payload": Payload(marker)}, files.state)
    for read in (files.stopped_state, files.saved_identity):
        with pytest.raises(Exception, match="Unsupported global"):
            read()
    assert not marker.exists()


# --- `latest` leading out of the folder -----------------------------------------------------------------

def test_latest_pointing_outside_the_run_folder_is_refused(tmp_path):
    other, run_dir = tmp_path / "other", tmp_path / "run"
    run_train(other, "train.steps=2", "checkpoint.every=2")
    run_train(run_dir, "train.steps=1", "checkpoint.every=1")
    before = snapshot(run_dir)
    (run_dir / "checkpoints" / "latest").write_text("../../other/checkpoints/step_00000002\n")
    result = run_train(run_dir, "train.steps=1", expect=1)
    assert "../../other/checkpoints/step_00000002" in output(result) and "not followed" in output(result)
    # a link out of the folder under a checkpoint's name is refused the same way
    (run_dir / "checkpoints" / "step_00000009").symlink_to(other / "checkpoints" / "step_00000002")
    (run_dir / "checkpoints" / "latest").write_text("step_00000009\n")
    result = run_train(run_dir, "train.steps=1", expect=1)
    assert "'step_00000009'" in output(result) and "not followed" in output(result)
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if "latest" not in k} == {k: v for k, v in before.items() if "latest" not in k}


# --- damaged checkpoint files -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["state.pt", "rank_00000.pt"])
def test_a_truncated_file_is_named_and_auto_falls_back_to_a_checkpoint_that_verifies(tmp_path, reference, name):
    run_dir = tmp_path / "run"
    run_train(run_dir, *STEPS, "checkpoint.every=3", fault="sigkill@7", expect=-9)  # checkpoints 3 and 6
    damaged = run_dir / "checkpoints" / "step_00000006" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    result = run_train(run_dir, *STEPS, f"resume={damaged.parent}", expect=1)
    assert f"{damaged} is damaged (truncated or changed)" in output(result)
    result = run_train(run_dir, *STEPS)  # resume=auto
    assert f"{damaged} is damaged (truncated or changed)" in output(result)
    assert "resuming from step_00000003, the newest checkpoint that verifies (skipped: step_00000006)" in output(result)
    assert_continues(run_dir, reference, resumed_at=3)


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "train.steps=2", "checkpoint.every=2")
    state = run_dir / "checkpoints" / "step_00000002" / "state.pt"
    state.write_bytes(b"")
    before = snapshot(run_dir)
    result = run_train(run_dir, "train.steps=2", expect=1)
    assert "no checkpoint in" in output(result) and "step_00000002" in output(result)
    assert snapshot(run_dir) == before


# --- metrics.jsonl ------------------------------------------------------------------------------------------

def test_a_half_written_metrics_line_is_dropped_and_the_run_resumes(tmp_path, reference):
    run_dir = tmp_path / "run"
    run_train(run_dir, *STEPS, "checkpoint.every=2", fault="sigkill@5", expect=-9)  # last checkpoint: 4
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 7.12')  # the crash came mid-write
    result = run_train(run_dir, *STEPS)
    assert "dropped a half-written last line" in output(result)
    assert_continues(run_dir, reference, resumed_at=4)


def test_a_crash_while_metrics_are_trimmed_leaves_the_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9))
    path.write_text(text)

    def crash(*args):  # the process dies before the trimmed file is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, enabled=True, start_step=4)
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    monkeypatch.undo()
    MetricsLogger(tmp_path, enabled=True, start_step=4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


# --- resuming under another configuration ----------------------------------------------------------------

def test_changed_training_fields_are_refused_or_applied_when_allowed_and_recorded(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "train.steps=4", "checkpoint.every=2")
    before = snapshot(run_dir)
    changed = ["train.steps=6", "optim.lr=1e-3", "logging.wandb_mode=offline"]  # the last one may change freely
    message = error_line(run_train(run_dir, *changed, expect=1))
    assert "optim.lr (checkpoint 0.003, now 0.001)" in message and "train.steps (checkpoint 4, now 6)" in message
    assert "run.allow_changes=[optim.lr,train.steps]" in message and "wandb" not in message
    assert snapshot(run_dir) == before

    run_train(run_dir, *changed, "run.allow_changes=[optim.lr,train.steps]")
    start = [r for r in records(run_dir) if r.get("event") == "start"][-1]
    assert start["step"] == 4 and start["changed"] == {"optim.lr": {"checkpoint": 3e-3, "now": 1e-3},
                                                       "train.steps": {"checkpoint": 4, "now": 6}}
    lrs = {r["step"]: r["lr"] for r in records(run_dir) if "lr" in r}
    # the LR logged at a step is the next step's: the new peak LR on the new schedule, from the first step on
    assert lrs[5] == pytest.approx(1e-3 * warmup_cosine(5, 6, 0)) and lrs[6] == 0.0
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("override", ["model.arch=paralstm", "model.size=tiny", "+model.overrides.num_hidden_layers=1"])
def test_another_model_is_refused_before_anything_is_written(tmp_path, override):
    run_dir = tmp_path / "run"
    run_train(run_dir, "train.steps=2", "checkpoint.every=2")
    before = snapshot(run_dir)
    result = run_train(run_dir, "train.steps=2", override, expect=1)
    key = override.lstrip("+").split("=")[0]
    assert "holds another model or backend" in output(result) and key in output(result)
    assert "data:" not in output(result)  # refused before the data was prepared
    assert snapshot(run_dir) == before


# --- two processes, one folder ------------------------------------------------------------------------------

def _start(run_dir: Path, log: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PARARNN_TEST_FAULT", None)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "train.py", f"run_dir={run_dir}", *FAST, *overrides], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def test_a_second_run_on_a_locked_folder_fails_and_a_stale_lock_is_taken_over(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    first = _start(run_dir, log, "train.steps=100000", "checkpoint.every=0")
    try:
        deadline = time.time() + 180
        while not (run_dir / "metrics.jsonl").is_file() or not any("loss" in r for r in records(run_dir)):
            assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        holder = json.loads((run_dir / "LOCK").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = run_train(run_dir, "train.steps=100000", "train.max_time_minutes=0.05", expect=1)
        assert f"in use by another training run (pid {first.pid} on host {socket.gethostname()}" in output(second)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 3, log.read_text()[-3000:]  # checkpointed and released the lock
    finally:
        first.kill()
        first.wait()
    assert not (run_dir / "LOCK").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / "LOCK").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    result = run_train(run_dir, "train.steps=100000", "train.max_time_minutes=0.001")
    assert f"taking over the stale lock {run_dir / 'LOCK'} (pid {int(dead.stdout)} on this host is not running)" in output(result)
    assert not (run_dir / "LOCK").exists()


# --- Ctrl-C -------------------------------------------------------------------------------------------------

def test_ctrl_c_checkpoints_then_exits_and_the_resume_reproduces(tmp_path, reference):
    run_dir = tmp_path / "run"
    result = run_train(run_dir, *STEPS, "checkpoint.every=0", fault="sigint@5", expect=130)
    assert "received SIGINT" in output(result) and latest_step(run_dir) == 5
    run_train(run_dir, *STEPS)
    assert_continues(run_dir, reference, resumed_at=5)


# --- data and model settings checked at start -------------------------------------------------------------

def test_a_single_text_file_trains_with_its_last_paragraphs_as_validation(tmp_path):
    from pararnn_lm.data.config import DataConfig
    from pararnn_lm.data.sources import build_sources

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    paragraphs = [" ".join(words[(i + j) % len(words)] for j in range(40)) + f" ({i})" for i in range(60)]
    text_file = tmp_path / "ok.txt"
    text_file.write_text("\n\n".join(paragraphs) + "\n")
    train, validation = build_sources(DataConfig(source="files", path=str(text_file)))
    assert [d.text for d in validation.documents()] == ["\n\n".join(paragraphs[-3:])]  # 5 % of 60 paragraphs
    assert [d.text for d in train.documents()] == ["\n\n".join(paragraphs[:-3])]

    run_dir = tmp_path / "run"
    run_train(run_dir, "train.steps=2", "data=local", f"data.path={text_file}", "data.seq_len=32", "data.vocab_size=300",
              "data.num_workers=0")
    final = [r for r in records(run_dir) if "val_loss" in r][-1]
    assert 0 < final["val_loss"] < 20

    (tmp_path / "line.txt").write_text("one line only\n")
    with pytest.raises(Exception, match=r"line\.txt is a single line.*data\.validation_split"):
        list(build_sources(DataConfig(source="files", path=str(tmp_path / "line.txt")))[1].documents())


def test_an_unknown_arch_fails_before_data_preparation_and_config_yaml(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(run_dir, "model.arch=gru", "data=local", f"data.path={tmp_path}/nothing.txt", expect=1)
    message = error_line(result)
    assert "unknown architecture 'gru'" in message and "build_data" not in result.stderr
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
