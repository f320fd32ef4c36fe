"""Glue between the typed config and the project's packages: builds data, model and exports.

Kept apart from ``train.py`` so the loop reads as the algorithm, and apart from ``models/`` and
``data/`` so those packages know nothing about training configs.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointManager
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_mean

logger = logging.getLogger(__name__)


def setup_logging(rank: int) -> None:
    """INFO on the main rank, warnings only elsewhere (Hydra configures handlers for the main process)."""
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x ranks ({world_size})"
        )
    return cfg.train.global_batch_size // per_step


def resume_path(cfg: TrainConfig, checkpoints: CheckpointManager) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return checkpoints.latest()
    path = Path(cfg.resume)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r} is not a complete checkpoint directory (no COMPLETE marker)")
    return path


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def newton_stats(model: nn.Module) -> dict[str, Any]:
    """Newton iterations and final residual of every parallel-RNN layer's last forward."""
    from kernels import ParaRNNLayer

    out: dict[str, Any] = {}
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, ParaRNNLayer)):
        out[f"newton/iters/{index}"] = layer.last_stats.iterations
        out[f"newton/residual/{index}"] = layer.last_stats.residual
    return out


@torch.no_grad()
def mean_loss(model: nn.Module, batches, device: torch.device, max_batches: int, bf16: bool) -> tuple[float, float]:
    """(sum of token NLL, token count) over up to ``max_batches`` batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for index, batch in enumerate(batches):
        if index >= max_batches:
            break
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss.float()
        n = float((batch["labels"] != -100).sum())
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total, count


def validation_loss(model: nn.Module, validation, cfg: TrainConfig, info: DistInfo) -> float:
    from .backends import _use_bf16

    total, count = mean_loss(model, validation, info.device, cfg.eval.max_batches, _use_bf16(cfg, info))
    summed = all_reduce_mean(torch.tensor([total, count], dtype=torch.float64, device=info.device), info)
    if summed[1] == 0:
        raise RuntimeError("the validation split produced no tokens; check data.validation settings")
    return float(summed[0] / summed[1])
