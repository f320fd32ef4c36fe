"""How a step is executed: plain PyTorch (single process or DDP) or DeepSpeed ZeRO.

Both expose the same small surface to the loop (``pararnn_lm/train.py``): ``forward_backward`` per
micro-batch, ``step`` per optimiser step, and checkpoint ``save``/``load``. Chosen by ``deepspeed.enabled``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, CheckpointManager
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_max
from .optim import apply_group_settings, group_settings

logger = logging.getLogger(__name__)


def zero_loss(model: nn.Module) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every parameter (replaces a non-finite loss)."""
    return sum((p.reshape(-1)[:1] * 0).sum() for p in model.parameters() if p.requires_grad)


class TorchBackend:
    """AdamW on fp32 weights, bf16 autocast on GPU, DDP when several ranks.

    A step makes no host sync: losses, grad norm and the skip decision stay on the device (the loop
    reads them at log steps). A non-finite step is skipped on the device by fused AdamW, which leaves
    weights, moments and its step count untouched when its ``found_inf`` attribute is 1 (the
    mechanism of ``torch.amp.GradScaler``). An optimiser without that (not ``fused=True``) is skipped
    from the host, which reads the flag: one sync per step.
    """

    def __init__(self, model: nn.Module, optimizer, scheduler, cfg: TrainConfig, info: DistInfo, grad_accum: int):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.info, self.grad_accum, self.grad_clip = info, grad_accum, cfg.optim.grad_clip
        self.bf16 = uses_bf16(cfg, info)
        self.model: nn.Module = model
        if info.world_size > 1:
            device_ids = [info.local_rank] if info.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self._micro = 0
        self._finite: torch.Tensor | None = None  # all micro-batch objectives of this step finite (device bool)
        self._settings = group_settings(optimizer)

    def forward_backward(self, batch: dict[str, torch.Tensor], poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of one micro-batch (detached; the objective where that is not finite) and
        whether the objective was finite, both device tensors.

        The objective (cross-entropy + z-loss) is back-propagated as it is; gradients accumulate. A
        non-finite one poisons the gradients, and ``step`` then skips the update.
        """
        last_micro = self._micro == self.grad_accum - 1
        sync = contextlib.nullcontext() if last_micro or self.info.world_size == 1 else self.model.no_sync()
        with sync, torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(**batch)
            loss = out.loss * float("nan") if poison else out.loss
            (loss / self.grad_accum).backward()
        self._micro = (self._micro + 1) % self.grad_accum
        loss = loss.detach()
        finite = torch.isfinite(loss)
        self._finite = finite if self._finite is None else self._finite & finite
        return torch.where(finite, out.ce_loss.detach(), loss), finite

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step the optimiser and the schedule. Returns (grad norm, whether the update was
        applied) as device tensors.

        The update is skipped if any micro-batch objective of this step or the grad norm is not
        finite. The schedule advances either way.
        """
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        found_inf = (~(self._finite & torch.isfinite(norm))).float()
        self._finite = None
        # The norm is the same on every rank (gradients are all-reduced), the objectives are per rank.
        found_inf = all_reduce_max(found_inf, self.info)
        if self.skips_on_device():
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not found_inf.item():  # host sync: this optimiser cannot skip on the device
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm.detach(), found_inf == 0

    def skips_on_device(self) -> bool:
        """Whether the optimiser honours ``found_inf`` (fused Adam/AdamW in every parameter group)."""
        return getattr(self.optimizer, "_step_supports_amp_scaling", False) and all(
            group.get("fused") for group in self.optimizer.param_groups)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, manager: CheckpointManager, step: int, rank_state: dict, meta: dict, record: dict | None = None) -> Path:
        state = {
            "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), **meta,
        }
        return manager.save(step, rank_state, global_state=state, record=record)

    def load(self, manager: CheckpointManager, path: Path) -> dict:
        """Load checkpoint ``path``; the optimiser state is replicated, so it loads on any number of ranks."""
        state = manager.load_global_state(path)
        self.module.load_state_dict(state.pop("model"))
        optimizer = state.pop("optimizer")
        for group, saved in zip(self.optimizer.param_groups, optimizer["param_groups"]):
            # How the update is computed is this run's choice, not the checkpoint's (whose step
            # counters are then moved to where this implementation keeps them).
            saved["fused"], saved["foreach"] = group.get("fused"), group.get("foreach")
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state.pop("scheduler"))
        apply_group_settings(self.optimizer, self.scheduler, self._settings)
        return state

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


class DeepSpeedBackend:
    """DeepSpeed ZeRO 0-3 (+ CPU offload) with our AdamW and schedule as client objects.

    Precision is the torch backend's: fp32 parameters (the masters: no bf16 copy, so the per-channel
    recurrent parameters and the norms stay fp32 too) and the forward under bf16 autocast (DeepSpeed's
    ``torch_autocast``), gradients reduced in fp32. DeepSpeed's own ``bf16`` mode would cast every
    parameter to bf16, which it cannot do for some parameters only.
    """

    def __init__(self, model: nn.Module, optimizer, scheduler, cfg: TrainConfig, info: DistInfo, grad_accum: int):
        if info.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.info = info
        self.module = model
        self.ds_config = deepspeed_json(cfg, info, grad_accum)
        self._settings = group_settings(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,
        )
        self.zero_stage = cfg.deepspeed.stage
        self._finite = True  # all micro-batch objectives of this step finite

    def forward_backward(self, batch: dict[str, torch.Tensor], poison: bool = False) -> tuple[torch.Tensor, bool]:
        """As :meth:`TorchBackend.forward_backward`, but a non-finite objective is replaced by a zero
        loss (a host sync) and the other micro-batches' gradients are still applied."""
        out = self.engine(**batch)
        loss = out.loss * float("nan") if poison else out.loss
        finite = bool(torch.isfinite(loss))
        self._finite &= finite
        self.engine.backward(loss if finite else zero_loss(self.engine.module))  # DeepSpeed divides by grad_accum
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # advances DeepSpeed's micro-step counter; no update off the boundary
        return out.ce_loss.detach() if finite else loss.detach(), finite

    def step(self) -> tuple[float, bool]:
        """Returns (grad norm, whether every micro-batch was finite) as host values."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied, self._finite = self._finite, True
        return norm, applied

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, manager: CheckpointManager, step: int, rank_state: dict, meta: dict, record: dict | None = None) -> Path:
        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="ds", client_state=meta, save_latest=False)

        return manager.save(step, rank_state, write_sharded=write, record=record)

    def load(self, manager: CheckpointManager, path: Path) -> dict:
        """Load checkpoint ``path``. On another number of ranks than the saving run's, ZeRO's partitioned
        state is loaded through DeepSpeed's universal checkpoint (one file per parameter and state,
        unpartitioned), made from the saved one on the first such resume (``to_universal``)."""
        from pararnn_lm.models.export import deepspeed_weights_only

        saved_ranks = manager.saved_world_size(path)
        universal = saved_ranks != self.info.world_size
        folder = path / "deepspeed"
        if universal and self.engine.zero_nvme_offload_optimizer():
            # DeepSpeed's load_checkpoint restores NVMe-offloaded optimiser state by copying each rank's
            # swap files, never from a universal checkpoint, which also skips the module's weights.
            raise CheckpointError(
                f"{path} was saved by {saved_ranks} rank(s); this run has {self.info.world_size}. With the optimiser "
                "state offloaded to NVMe, DeepSpeed cannot load a universal checkpoint (it restores the swap files "
                f"of each rank): resume on {saved_ranks} rank(s), or offload to the CPU instead")
        if universal:
            folder = manager.converted(path, "deepspeed_universal", lambda out: to_universal(path / "deepspeed", out),
                                       "DeepSpeed's universal checkpoint")
            if self.info.is_main:
                logger.warning("ZeRO-%d state of %d rank(s) loads on %d rank(s) from the universal checkpoint %s",
                               self.zero_stage, saved_ranks, self.info.world_size, folder)
        try:
            with deepspeed_weights_only(), self._loading_universal(universal):
                _, client_state = self.engine.load_checkpoint(str(folder), tag="ds")
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{folder} holds Python objects other than tensors, plain containers "
                                  f"and DeepSpeed's own records, which are not loaded (unpickling them could run code): "
                                  f"{str(err).strip().splitlines()[-1]}") from err
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
        if universal:
            unshare_step_counters(self.optimizer.optimizer)
        apply_group_settings(self.optimizer, self.scheduler, self._settings)
        return client_state

    @contextlib.contextmanager
    def _loading_universal(self, universal: bool):
        """DeepSpeed's ``checkpoint.load_universal`` for one ``load_checkpoint``: the engine reads the flag
        only there, and whether a resume needs it is known only once the checkpoint is chosen."""
        config = self.engine._config
        previous = config.load_universal_checkpoint
        config.load_universal_checkpoint = universal
        try:
            yield
        finally:
            config.load_universal_checkpoint = previous

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0: the fp32 masters (ZeRO-3 gathers the shards)."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return self.engine.module.state_dict()


def unshare_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter's optimiser state its own ``step`` tensor. DeepSpeed's ZeRO-3 universal load
    puts one tensor into the state of every parameter group, and AdamW advances it in place, once per
    group: with two groups (decayed, not decayed) the bias correction would count two steps per step."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def to_universal(folder: Path, out: Path) -> None:
    """Convert the DeepSpeed checkpoint ``folder`` (tag ``ds``) to DeepSpeed's universal checkpoint in
    ``out`` (tag ``ds``), with DeepSpeed's own converter, ``deepspeed.checkpoint.ds_to_universal``.

    Its files are read weights-only, like every checkpoint file. ``inject_missing_state`` adds the
    universal-checkpoint version record that DeepSpeed expects from clients such as Megatron (this model
    has no tensor-parallel layout to describe). One worker: more would be forked from this training
    process, with its process group and threads. Its console output goes to the debug log, and into the
    error if it fails."""
    from deepspeed.checkpoint import ds_to_universal

    from pararnn_lm.models.export import deepspeed_weights_only

    args = argparse.Namespace(input_folder=str(folder / "ds"), output_folder=str(out / "ds"), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    console = io.StringIO()
    try:
        with deepspeed_weights_only(), contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            ds_to_universal.main(args)
    except Exception as err:
        raise RuntimeError(f"DeepSpeed's ds_to_universal failed ({type(err).__name__}: {err}); its output:\n"
                           f"{console.getvalue()[-4000:]}") from err
    logger.debug("ds_to_universal %s -> %s:\n%s", folder, out, console.getvalue())


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
        # fp32 parameters, bf16 autocast: the torch backend's precision (see DeepSpeedBackend)
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": uses_bf16(cfg, info), "dtype": "bfloat16", "lower_precision_safe_modules": []},
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


def uses_bf16(cfg: TrainConfig, info: DistInfo) -> bool:
    """Whether forward passes run under bf16 autocast: ``train.precision``, where ``auto`` means on GPU."""
    if cfg.train.precision == "auto":
        return info.device.type == "cuda"
    return cfg.train.precision == "bf16"


BACKENDS: dict[bool, Callable[..., Any]] = {False: TorchBackend, True: DeepSpeedBackend}
