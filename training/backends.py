"""How a step is executed: plain PyTorch (single process or DDP) or DeepSpeed ZeRO.

Both expose the same small surface to ``train.py``: ``forward_backward`` per micro-batch, ``step``
per optimiser step, and checkpoint ``save``/``load``. Chosen by ``deepspeed.enabled``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import CheckpointManager
from .config import TrainConfig
from .distributed import DistInfo

logger = logging.getLogger(__name__)


def zero_loss(model: nn.Module) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every parameter (replaces a non-finite loss)."""
    return sum((p.reshape(-1)[:1] * 0).sum() for p in model.parameters() if p.requires_grad)


class TorchBackend:
    """AdamW on fp32 weights, bf16 autocast on GPU, DDP when several ranks."""

    def __init__(self, model: nn.Module, optimizer, scheduler, cfg: TrainConfig, info: DistInfo, grad_accum: int):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.info, self.grad_accum, self.grad_clip = info, grad_accum, cfg.optim.grad_clip
        self.bf16 = _use_bf16(cfg, info)
        self.model: nn.Module = model
        if info.world_size > 1:
            device_ids = [info.local_rank] if info.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self._micro = 0

    def forward_backward(self, batch: dict[str, torch.Tensor], poison: bool = False) -> tuple[torch.Tensor, bool]:
        """Cross-entropy of one micro-batch (detached) and whether the objective was finite.

        The objective (cross-entropy + z-loss) is back-propagated; gradients accumulate.
        """
        last_micro = self._micro == self.grad_accum - 1
        sync = contextlib.nullcontext() if last_micro or self.info.world_size == 1 else self.model.no_sync()
        with sync, torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(**batch)
            loss = out.loss * float("nan") if poison else out.loss
            finite = bool(torch.isfinite(loss))
            ((loss if finite else zero_loss(self.module)) / self.grad_accum).backward()
        self._micro = (self._micro + 1) % self.grad_accum
        return out.ce_loss.detach() if finite else loss.detach(), finite

    def step(self) -> tuple[float, bool]:
        """Clip, step the optimiser and the schedule. Returns (grad norm, whether the update was applied)."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        applied = bool(torch.isfinite(norm))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm), applied

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, manager: CheckpointManager, step: int, rank_state: dict, meta: dict) -> Path:
        state = {
            "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), **meta,
        }
        return manager.save(step, rank_state, global_state=state)

    def load(self, path: Path) -> dict:
        state = CheckpointManager.load_global_state(path)
        self.module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        return state

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


class DeepSpeedBackend:
    """DeepSpeed ZeRO 0-3 (+ CPU offload) with our AdamW and schedule as client objects."""

    def __init__(self, model: nn.Module, optimizer, scheduler, cfg: TrainConfig, info: DistInfo, grad_accum: int):
        if info.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.info = info
        self.module = model
        self.ds_config = deepspeed_json(cfg, info, grad_accum)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,
        )
        self.zero_stage = cfg.deepspeed.stage

    def forward_backward(self, batch: dict[str, torch.Tensor], poison: bool = False) -> tuple[torch.Tensor, bool]:
        out = self.engine(**batch)
        loss = out.loss * float("nan") if poison else out.loss
        finite = bool(torch.isfinite(loss))
        self.engine.backward(loss if finite else zero_loss(self.engine.module))  # DeepSpeed divides by grad_accum
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # advances DeepSpeed's micro-step counter; no update off the boundary
        return out.ce_loss.detach() if finite else loss.detach(), finite

    def step(self) -> tuple[float, bool]:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, True

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, manager: CheckpointManager, step: int, rank_state: dict, meta: dict) -> Path:
        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="ds", client_state=meta, save_latest=False)

        return manager.save(step, rank_state, write_sharded=write)

    def load(self, path: Path) -> dict:
        _, client_state = self.engine.load_checkpoint(str(path / "deepspeed"), tag="ds")
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / 'deepspeed'}")
        return client_state

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32-gathered weights on rank 0 (ZeRO-3 gathers the shards)."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return self.engine.module.state_dict()


def deepspeed_json(cfg: TrainConfig, info: DistInfo, grad_accum: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 1:
        zero.update({"overlap_comm": info.device.type == "cuda", "contiguous_gradients": True})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": info.device.type == "cuda"}
    if ds.offload_params:
        if ds.stage != 3:
            raise ValueError("deepspeed.offload_params needs ZeRO stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": info.device.type == "cuda"}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * grad_accum * info.world_size,
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 0.0,
        "bf16": {"enabled": _use_bf16(cfg, info)},
        "zero_optimization": zero,
        # Our torch AdamW is the client optimiser: no DeepSpeed op has to be compiled.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, dict(ds.extra))


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _deep_merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
    return base


def _use_bf16(cfg: TrainConfig, info: DistInfo) -> bool:
    if cfg.train.precision == "auto":
        return info.device.type == "cuda"
    return cfg.train.precision == "bf16"


BACKENDS: dict[bool, Callable[..., Any]] = {False: TorchBackend, True: DeepSpeedBackend}
