"""A run folder (``runs/NAME/``) holds one run. Before a run writes anything into it:

* it takes the folder's lock (``LOCK``: pid, host, start time; released on exit). A lock whose process
  is gone (a dead pid on this host, or an earlier attempt of the same SLURM job) is taken over with a
  warning; a live one is a clear error for the second run;
* ``resume=none`` in a folder that already holds a run is refused, unless ``run.overwrite=true``,
  which deletes that run's checkpoints, metrics, config and export first (and says so);
* the checkpoint to resume from is verified (sizes and checksums), and the configuration is compared
  with the one the checkpoint recorded: another model or backend is refused, fields that change the
  training (optimiser, schedule, batch, data, precision, ...) are refused unless ``run.allow_changes``
  names them, operational fields (logging, evaluation, checkpointing, cluster, ...) may change freely.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .checkpoint import CheckpointManager, CheckpointError
from .config import FIXED_ON_RESUME, TrainConfig

logger = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
# What a run writes into its folder (hydra/ and wandb/ hold logs of every attempt and stay).
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "export", "PREEMPT")
# Fields that may differ from the checkpoint's when resuming: how the run is executed, observed and
# saved, not what it computes.
FREE_ON_RESUME = (
    "run_name", "run_dir", "resume", "init_from", "run", "logging", "profile", "eval", "checkpoint", "export", "cluster",
    "train.max_time_minutes", "train.log_every", "train.compile", "train.activation_checkpointing",
    "train.device", "train.on_nonfinite", "model.rnn_mode", "deepspeed.offload_optimizer",
    "deepspeed.offload_params", "data.num_workers", "data.pin_memory", "data.num_proc", "data.cache_dir",
    "data.prepared_dir", "data.verify_checksums",
)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: held by another run or process, or another configuration."""


# --- the lock ----------------------------------------------------------------------------------------

def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder: ``LOCK`` names the holder (pid, host, SLURM job, start time)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                   "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _why_stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is certainly gone, or None if it may still run."""
        if holder.get("slurm_job") and holder.get("slurm_job") == self.me["slurm_job"]:
            return f"an earlier attempt of SLURM job {holder['slurm_job']}"
        if holder.get("host") != self.me["host"] or not isinstance(holder.get("pid"), int):
            return None
        pid = holder["pid"]
        if not _alive(pid):
            return f"pid {pid} on this host is not running"
        if holder.get("process_start") and _process_start(pid) not in (None, holder["process_start"]):
            return f"pid {pid} on this host is another process now"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(f".{LOCK_FILE}.{self.me['host']}.{self.me['pid']}")
        staged.write_text(json.dumps(self.me))
        try:
            for _ in range(2):
                try:
                    os.link(staged, self.path)  # atomic: the lock appears with its content, or not at all
                    self.held = True
                    return
                except FileExistsError:
                    pass
                holder = self._holder()
                if holder is None:  # released meanwhile
                    continue
                stale = self._why_stale(holder)
                if stale is None:
                    who = (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
                           if holder else "an unreadable lock")
                    raise RunFolderError(
                        f"{self.path.parent} is in use by another training run ({who}): two runs in one folder "
                        f"would corrupt it. Wait for it to finish or stop it; if no such process runs any more, "
                        f"delete {self.path}.")
                logger.warning("taking over the stale lock %s (%s)", self.path, stale)
                self.path.unlink(missing_ok=True)
            raise RunFolderError(f"could not take the lock {self.path}: another run took it meanwhile")
        finally:
            staged.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and self._holder() == self.me:
            self.path.unlink(missing_ok=True)
        self.held = False


# --- what the folder holds, and the resume decision ----------------------------------------------------

def run_contents(run_dir: Path) -> list[str]:
    """What of a run the folder holds (empty: nothing; the lock, logs and W&B files do not count)."""
    held = []
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    if checkpoints:
        held.append(f"checkpoints {checkpoints[0].name}..{checkpoints[-1].name}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        held.append("metrics.jsonl")
    held += [name for name in ("config.yaml", "export") if (run_dir / name).exists()]
    return held


def clear_run(run_dir: Path) -> None:
    """Delete what an earlier run wrote into the folder (``run.overwrite=true``), saying what."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        logger.warning("run.overwrite=true: deleted %s of the earlier run", path)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of the leaves (an empty mapping has none: its keys are absent, i.e. None)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The configuration as plain data (what checkpoints record)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} of the fields that differ; a field the saved config
    lacks (written before it existed) counts as its default."""
    defaults = dataclasses.asdict(TrainConfig())
    before = {**_flatten(defaults), **_flatten(saved)}
    after = _flatten(now)
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key} (checkpoint {old!r}, now {new!r})" for key, (old, new) in changes.items())


def allowed_changes(changes: dict[str, tuple[Any, Any]], allow: list[str], checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """The changes that alter training and are allowed (to be recorded); raises for the others."""
    fixed = {k: v for k, v in changes.items() if _under(k, FIXED_ON_RESUME)}
    if fixed:
        raise RunFolderError(
            f"cannot resume {checkpoint}: it holds another model or backend: {_listed(fixed)}. Resume with the "
            "checkpoint's values, or start a new run (another run_name, or run.overwrite=true to replace this one).")
    training = {k: v for k, v in changes.items() if not _under(k, FREE_ON_RESUME)}
    refused = {k: v for k, v in training.items() if not _under(k, allow)}
    if refused:
        raise RunFolderError(
            f"cannot resume {checkpoint} unchanged: the configuration differs in fields that change training: "
            f"{_listed(refused)}. To apply them, add run.allow_changes=[{','.join(refused)}]; otherwise resume "
            "with the checkpoint's values.")
    return training


@dataclass
class RunPlan:
    """How a run starts: from which verified checkpoint (None: step 0), as which run, with which changes."""

    checkpoint: Path | None
    run_id: str
    clear_first: bool  # delete the earlier run's files before writing (run.overwrite=true)
    changes: dict[str, tuple[Any, Any]]


def plan_run(cfg: TrainConfig, checkpoints: CheckpointManager) -> RunPlan:
    """Decide, reading only, how the run starts; raises with the reason when the folder cannot be used."""
    run_dir = Path(cfg.run_dir)
    held = run_contents(run_dir)
    resume, clear_first = cfg.resume, False
    if cfg.run.overwrite:
        if resume not in ("auto", "none"):
            raise RunFolderError(f"run.overwrite=true starts the run over; it cannot be combined with resume={resume}")
        job = os.environ.get("SLURM_JOB_ID")
        newest = checkpoints.latest() if held else None
        if job and newest is not None and checkpoints.read_manifest(newest).get("slurm_job") == job:
            logger.warning("run.overwrite=true: the checkpoints in %s are this SLURM job's earlier attempt "
                           "(a requeue); resuming them instead", run_dir)
            resume = "auto"
        else:
            resume, clear_first = "none", bool(held)
    elif held and resume == "none":
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(held)}). Resume it with resume=auto, start over with "
            "run.overwrite=true (deletes its checkpoints and metrics), or give the new run another run_name or run_dir.")
    elif held and resume != "auto" and Path(resume).resolve().parent != (run_dir / "checkpoints").resolve():
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(held)}); resume={resume} is a checkpoint of another "
            "folder. Give this run another run_name or run_dir, or replace the run here with run.overwrite=true.")
    checkpoint = checkpoints.verified(resume)
    if checkpoint is None:
        if held and not clear_first:
            logger.warning("%s holds no checkpoint: the run starts at step 0 (metrics of the earlier attempt "
                           "are dropped)", run_dir)
        return RunPlan(None, uuid.uuid4().hex, clear_first, {})
    manifest = checkpoints.read_manifest(checkpoint)
    if not isinstance(manifest.get("config"), dict) or "run_id" not in manifest:
        raise CheckpointError(f"{checkpoint} records no run configuration; it was not written by train.py")
    changes = allowed_changes(config_changes(manifest["config"], config_dict(cfg)), cfg.run.allow_changes, checkpoint)
    return RunPlan(checkpoint, manifest["run_id"], False, changes)
