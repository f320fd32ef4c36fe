"""SLURM for real: the project's own sbatch template (slurm/launch.py -> slurm/train.sbatch) trains the
tiny model with 2 processes on a one-node localhost cluster, is preempted by the signal SLURM sends
before a time limit (USR1 to the batch script), checkpoints, requeues itself, resumes and finishes,
with the same losses as an uninterrupted 2-process torchrun run.

The cluster comes from `.ci/slurm/setup.sh` (called by .ci/run); without one answering, the test is
skipped with the reason setup.sh recorded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("PARARNN_SLURM_STATE", "/tmp/pararnn-slurm"))
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(480)]

STEPS, CKPT_EVERY = 60, 10
# Tiny and deterministic (fp32 CPU, one OpenMP thread): ~0.15 s a step with 2 processes on 2 CPUs.
OVERRIDES = [
    "model.size=debug", "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=8",
    f"train.steps={STEPS}", "train.log_every=1", f"checkpoint.every={CKPT_EVERY}", "checkpoint.keep_last=50",
    "eval.every=0", "eval.max_batches=2", "logging.wandb_mode=disabled", "logging.progress_bar=false",
    "export.at_end=false",
]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _slurm_unavailable() -> str | None:
    status = (STATE / "setup.status").read_text().strip() if (STATE / "setup.status").exists() else "not run"
    hint = f"(.ci/slurm/setup.sh status: {status})"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"SLURM client not installed {hint}"
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T %c"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 15 s {hint}"
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()} {hint}"
    if not any(line.split()[0].rstrip("*~#") in ("idle", "mixed") for line in result.stdout.splitlines() if line.strip()):
        return f"no idle SLURM node: {result.stdout.strip() or 'none'} {hint}"
    return None


def _node_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True).stdout.split()
    return max(int(x) for x in out) if out else 1


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return records


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once the job has left the controller's memory)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PARARNN_TEST_FAULT", None)
    return env


class Job:
    def __init__(self, job_id: str, run_dir: Path):
        self.id, self.run_dir = job_id, run_dir
        self.log = run_dir / f"slurm-{job_id}.out"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no job log yet)"

    def fail(self, message: str) -> None:
        ctld = STATE / "slurmctld.log"
        ctld_tail = "\n".join(ctld.read_text(errors="replace").splitlines()[-20:]) if ctld.exists() else ""
        pytest.fail(
            f"{message}\n--- scontrol show job {self.id}: {_job(self.id)}\n--- job log {self.log}:\n"
            f"{self.log_text()[-8000:]}\n--- tail of {ctld}:\n{ctld_tail}", pytrace=False,
        )

    def wait_for(self, what: str, condition, timeout: float, interval: float = 0.5, allow_final: bool = False):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            state = _job(self.id).get("JobState")
            if not allow_final and state in FINAL_STATES:
                self.fail(f"job {self.id} ended ({state}) while waiting for {what}")
            time.sleep(interval)
        self.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_sbatch_preempted_by_signal_requeues_resumes_and_matches_uninterrupted_run(tmp_path):
    reason = _slurm_unavailable()
    if reason and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the SLURM test, but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
    t_start = time.monotonic()

    # 1. The uninterrupted reference: the same run, 2 processes under torchrun on this machine.
    reference = tmp_path / "reference"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run([*torchrun, "train.py", f"run_dir={reference}", *OVERRIDES], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"reference run failed ({result.returncode}):\n{result.stderr[-6000:]}"
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    print(f"\n[test_slurm] reference run: {time.monotonic() - t_start:.1f} s")

    # 2. Submit the same run through the launcher: 1 node, 2 training processes on CPU.
    run_dir = tmp_path / "slurm-run"
    launch = [
        sys.executable, "slurm/launch.py", "cluster=slurm", "cluster.gpus_per_node=0", "cluster.procs_per_node=2",
        f"cluster.cpus_per_task={min(2, _node_cpus())}", "cluster.time=00:10:00", "cluster.signal_seconds=60",
        # the default rendezvous port (derived from the job id) is what users get: test that one
        "run_name=slurm-test", f"run_dir={run_dir}", *OVERRIDES,
    ]
    result = subprocess.run(launch, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"launch.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}"
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match, result.stdout
    job = Job(match.group(1), run_dir)
    t_submit = time.monotonic()
    print(f"[test_slurm] submitted job {job.id}; log {job.log}")
    finished = False
    try:
        # 3. Let it train past a checkpoint, then preempt it the way SLURM does before a time limit:
        #    USR1 to the batch script only (what `#SBATCH --signal=B:USR1@N` sends).
        target = CKPT_EVERY + 2
        job.wait_for(f"step {target} in metrics.jsonl", lambda: max(_losses(run_dir), default=0) >= target, 180, 0.2)
        signalled_at = max(_losses(run_dir))
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=30)
        print(f"[test_slurm] USR1 sent at step {signalled_at}, {time.monotonic() - t_submit:.1f} s after submission")

        # 4. The job checkpoints, requeues itself (same id, Restarts=1), resumes and completes.
        def done() -> bool:
            info = _job(job.id)
            state, restarts = info.get("JobState"), int(info.get("Restarts", "0"))
            if state in FINAL_STATES and (state != "COMPLETED" or restarts < 1):
                job.fail(f"job {job.id} ended {state} after {restarts} restart(s); expected COMPLETED after 1")
            if not info:  # aged out of the controller (MinJobAge): judge by the log
                return "restart 1" in job.log_text() and "training exited with status 0" in job.log_text()
            return state == "COMPLETED"

        job.wait_for("the requeued job to complete", done, 240, 1.0, allow_final=True)
        finished = True
        print(f"[test_slurm] job {job.id} completed {time.monotonic() - t_submit:.1f} s after submission")
    finally:
        if not finished:
            subprocess.run(["scancel", job.id], timeout=30)

    # 5. One restart, through the preemption path, from the checkpoint written at the signal.
    log = job.log_text()
    info = _job(job.id)
    if info:
        assert info.get("Restarts") == "1", info
    for expected_line in (f"job {job.id} restart 0", "got USR1", "requeueing job", f"job {job.id} restart 1",
                          "training exited with status 0"):
        assert expected_line in log, f"{expected_line!r} missing from the job log:\n{log[-6000:]}"
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
    assert resumed, f"no resume in the job log:\n{log[-6000:]}"
    preempt_step = int(resumed.group(2))
    assert signalled_at <= preempt_step < STEPS, (signalled_at, preempt_step)
    assert (run_dir / "checkpoints" / f"step_{preempt_step:08d}").is_dir()
    assert f"stopping at step {preempt_step} (preempted)" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert not (run_dir / "PREEMPT").exists(), "the resumed run should clear the stale PREEMPT sentinel"

    # 6. Exact resume through SLURM: every step's loss equals the uninterrupted run's.
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-5 * max(1.0, abs(expected[step])), (step, got[step], expected[step])
    print(f"[test_slurm] preempted at step {preempt_step}, resumed, losses match; total {time.monotonic() - t_start:.1f} s")
