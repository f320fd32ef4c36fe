"""What a run measures and where it goes: FLOPs per token and MFU, step time, peak memory, Newton
statistics; ``metrics.jsonl`` in the run directory, mirrored to Weights & Biases (offline unless configured)
and, with ``logging.tensorboard=true``, to TensorBoard event files in ``run_dir/tensorboard``."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_text
from .distributed import DistInfo, all_reduce_max

logger = logging.getLogger(__name__)

# Dense bf16 peak of common training GPUs (TFLOP/s), for MFU; unknown devices report no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def flops_per_token(num_params_non_embedding: int, num_attention_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls, plus 6 * 2 * L_attn * d * T / 2 for causal attention."""
    return 6.0 * num_params_non_embedding + 6.0 * num_attention_layers * hidden_size * seq_len


def _full_numel(param: torch.Tensor) -> int:
    # ZeRO-3 leaves each rank an empty placeholder (numel 0); DeepSpeed keeps the full size in ds_numel.
    return int(getattr(param, "ds_numel", param.numel()))


def flops_terms(model: nn.Module) -> tuple[int, int, int]:
    """(non-embedding parameters, attention layers, hidden size) of a model, for :func:`flops_per_token`."""
    config = model.config
    embedding = _full_numel(model.get_input_embeddings().weight)
    non_embedding = sum(_full_numel(p) for p in model.parameters()) - embedding
    return non_embedding, sum(m == "attention" for m in config.mixers), config.hidden_size


def memory_stats(info: DistInfo) -> dict[str, float]:
    """Peak GPU memory allocated so far, the largest over the ranks (one all-reduce at a log step)."""
    if info.device.type != "cuda":
        return {}
    peak = torch.tensor(torch.cuda.max_memory_allocated(info.device) / 2**30, device=info.device)
    return {"mem_peak_gib": float(all_reduce_max(peak, info))}


def newton_stats(model: nn.Module) -> dict[str, Any]:
    """Newton iterations and final residual of every parallel-RNN layer's last forward."""
    from pararnn_lm.kernels import ParaRNNLayer

    out: dict[str, Any] = {}
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, ParaRNNLayer)):
        out[f"newton/iters/{index}"] = layer.last_stats.iterations
        out[f"newton/residual/{index}"] = layer.last_stats.residual
    return out


class StepTimer:
    """Wall time per training step, averaged over the steps since the last reading.

    Steps are not timed one by one: that would need a device sync per step. The device is synchronised
    only when the timer is read (at log steps) and around pauses (evaluation and checkpoints, which wait
    for the device anyway and are not counted as step time).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.elapsed, self.steps = 0.0, 0
        self.started = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        self.steps += 1

    def read(self) -> float:
        """Seconds per step since the last read, then start a new interval."""
        self._sync()
        now = time.perf_counter()
        per_step = (self.elapsed + now - self.started) / max(1, self.steps)
        self.elapsed, self.steps, self.started = 0.0, 0, now
        return per_step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._sync()
        self.elapsed += time.perf_counter() - self.started
        try:
            yield
        finally:
            self.started = time.perf_counter()


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    A run that starts at step N (0 for a fresh start) first drops the records past N (written by an
    attempt that got further than its last checkpoint) and, with a warning, a half-written line (a
    crash mid-write); that rewrite replaces the file atomically, so a crash during it leaves the old
    file or the new one. After that, records are only appended.

    ``tensorboard``: the numeric values of every record also go to ``run_dir/tensorboard`` (scalars
    under the same names). Event files are only appended to, so the writer marks the start step: the
    scalars an earlier attempt logged past it (or an earlier run, when this one starts at 0) are hidden
    from TensorBoard as the records past it are dropped from metrics.jsonl.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.wandb_run = None
        self.tensorboard = None
        if enabled and self.path.exists():
            self._keep_until(start_step)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def _keep_until(self, step: int) -> None:
        text = self.path.read_text(errors="replace")
        lines = text.splitlines()
        kept, dropped = [], 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                what = "half-written last line" if number == len(lines) else "unreadable line"
                logger.warning("%s:%d: dropped a %s: %.80s", self.path, number, what, line)
                continue
            if isinstance(record, dict) and record.get("step", -1) > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            logger.info("%s: dropped %d records past step %d (the run continues from there)", self.path, dropped, step)
        new = "".join(line + "\n" for line in kept)
        if new != text:
            atomic_write_text(self.path, new)

    def event(self, step: int, name: str, **fields: Any) -> None:
        """A record of something that happened to the run (a start, a resume and what changed there)."""
        if self.enabled:
            self._append({"step": step, "event": name, **fields})

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def start_wandb(self, mode: str, project: str, run_name: str, run_id: str | None, config: dict, run_dir: Path) -> str | None:
        """Start (or resume, by id) a W&B run; returns its id, kept in checkpoints across resumes."""
        if not self.enabled or mode == "disabled":
            return run_id
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a declared dependency
            logger.warning("wandb is not installed; metrics go to metrics.jsonl only")
            return run_id
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run = wandb.init(
            project=project, name=run_name, id=run_id, resume="allow", mode=mode, config=config, dir=str(run_dir)
        )
        return self.wandb_run.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._append(record)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                value = value.item() if hasattr(value, "item") else value
                if isinstance(value, (int, float)):  # a non-finite loss too: TensorBoard plots it
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
