"""Typed configuration of a training run (Hydra structured configs).

The dataclasses below are the schema: ``configs/train.yaml`` composes groups onto it, and a key that
is not declared here, or a value of the wrong type, fails at start with a message naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from pararnn_lm.data.config import DataConfig


@dataclass
class ModelConfig:
    arch: str = "paragru"  # mixer registry name: paragru | paralstm | mamba2 | attention
    size: str = "tiny"  # preset name (configs/size): debug | tiny | 400m | 1b | 2.9b | 7b
    overrides: dict[str, Any] = field(default_factory=dict)  # any model-config field, e.g. {num_hidden_layers: 4}
    rnn_mode: str = "auto"  # parallel_rnn mode of the ParaRNN mixers


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_fraction: float = 0.1  # of the total steps, linear from 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio (paper: to zero)
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    z_loss: float = 1e-4  # coefficient of log(Z)^2 on the output logits


@dataclass
class TrainerConfig:
    steps: int = 300  # optimiser steps
    global_batch_size: int = 16  # sequences per optimiser step, over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward per rank
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    compile: bool = False  # torch.compile every decoder block (fuses norms, gates, conv, MLP); any ZeRO stage
    # Recompute each decoder block in the backward instead of keeping its activations (~1/3 more
    # compute, activation memory of one block per layer boundary): for 7B-size micro-batches.
    activation_checkpointing: bool = False
    # What a NaN/Inf loss or grad norm does; the step is recorded in metrics.jsonl and the checkpoints
    # either way. skip: the whole optimiser step is skipped (weights and AdamW state unchanged; the LR
    # schedule advances) if any micro-batch loss or the grad norm is not finite; decided on the device,
    # the step is reported at the next log step. stop: checkpoint and raise at that step (which reads the
    # flag every step: a host sync). DeepSpeed instead zeroes a non-finite micro-batch's loss and
    # applies the others.
    on_nonfinite: str = "skip"  # skip | stop
    log_every: int = 10
    max_time_minutes: Optional[float] = None  # stop (with a checkpoint) after this wall time


@dataclass
class DeepSpeedConfig:
    enabled: bool = False  # False: plain PyTorch (DDP when several ranks)
    stage: int = 0  # ZeRO stage 0..3
    offload_optimizer: bool = False
    offload_params: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed JSON

    @property
    def zero3(self) -> bool:
        """Parameters are partitioned: each rank holds shards, not the module's full weights."""
        return self.enabled and self.stage == 3


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; 0 disables periodic checkpoints (signals and the end still save)
    keep_last: int = 2


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "pararnn-lm"
    progress_bar: bool = True
    tensorboard: bool = False  # also write the logged scalars to run_dir/tensorboard


@dataclass
class ProfileConfig:
    # [first, last]: a torch.profiler trace of these steps (as numbered in metrics.jsonl) into
    # run_dir/profile/, plus a CUDA memory snapshot on GPU; [] profiles nothing.
    steps: list[int] = field(default_factory=list)


@dataclass
class EvalConfig:
    every: int = 100  # steps; 0: only at the end
    max_batches: int = 20  # validation batches per evaluation (per rank)
    at_end: bool = True
    # lm-eval tasks on the live model (rank 0; the other ranks wait) every N steps and at the end; 0: never.
    lm_eval_every: int = 0
    # "task" (0-shot) or "task:shots"; default: three tasks of the paper's 0-shot setting (arXiv 2510.21450, Table 5)
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["piqa", "hellaswag", "winogrande"])
    lm_eval_limit: Optional[int] = None  # examples per task (None: all)
    lm_eval_batch_size: int = 8
    lm_eval_include_path: list[str] = field(default_factory=list)  # folders of extra lm-eval task YAMLs
    # Instead of evaluating in the loop: export the model and submit its lm-eval as a SLURM job (sbatch)
    submit_slurm: bool = False
    slurm_time: str = "04:00:00"  # time limit of each evaluation job
    slurm_gpus: int = 1  # GPUs of each evaluation job (0: CPU)


@dataclass
class ClusterConfig:
    name: str = "local"  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 1
    procs_per_node: Optional[int] = None  # training processes per node; default: gpus_per_node (1 on CPU)
    cpus_per_task: int = 16
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit -> checkpoint -> requeue
    env_file: str = "slurm/env.sh"
    # c10d rendezvous port on the first node. None: 20000 + job id % 10000, below the kernel's ephemeral
    # range (so srun's own sockets cannot already hold it), distinct for jobs sharing a node unless their
    # ids differ by a multiple of 10000, and the same after a requeue (same job id).
    port: Optional[int] = None
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH ..." lines, e.g. ["--exclusive"]


@dataclass
class ExportConfig:
    at_end: bool = True  # write an HF directory (safetensors + config + tokenizer + code) when training ends
    dtype: str = "fp32"  # weights of the export: fp32 (the training masters) | bf16 (half the size, for the hub)


@dataclass
class RunConfig:
    # resume=none in a folder that already holds a run is refused; true deletes that run's checkpoints,
    # metrics, config and export first and starts over (an earlier attempt of the same SLURM job, i.e.
    # a requeue, is resumed instead).
    overwrite: bool = False
    # Fields that may differ from the checkpoint's configuration on resume, by key or section (e.g.
    # [optim.lr, train.steps] or [optim]); other changes to what the run computes are refused.
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    run_name: str = "default"
    run_dir: str = "runs/${run_name}"
    resume: str = "auto"  # auto (newest checkpoint of run_dir that verifies, if any) | none | a checkpoint path
    # A new run's initial weights: a checkpoint (step_N), a run folder (its newest checkpoint that
    # verifies) or an HF export; optimiser, schedule and step start fresh. Not applied on resume.
    init_from: Optional[str] = None
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


CHOICES = {
    "train.precision": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.on_nonfinite": ("skip", "stop"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "cluster.name": ("local", "slurm"),
    "export.dtype": ("fp32", "bf16"),
}
# Fields a resumed run cannot change: the checkpoint holds this model, written by this backend.
FIXED_ON_RESUME = ("model.arch", "model.size", "model.overrides", "deepspeed.enabled", "deepspeed.stage")


def validate(cfg: TrainConfig) -> None:
    """Checks a schema cannot express: choices and relations between values."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ValueError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
    t = cfg.train
    if t.steps < 1 or t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ValueError("train.steps, train.micro_batch_size and train.global_batch_size must be >= 1")
    if not 0 <= cfg.deepspeed.stage <= 3:
        raise ValueError(f"deepspeed.stage must be 0..3, got {cfg.deepspeed.stage}")
    if not 0 <= cfg.optim.warmup_fraction < 1:
        raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {cfg.optim.warmup_fraction}")
    profiled = list(cfg.profile.steps)
    if profiled:
        problem = ("it needs two steps" if len(profiled) != 2 else "steps are numbered from 1" if min(profiled) < 1
                   else "they are not ascending" if profiled[0] > profiled[1]
                   else f"the run has {t.steps} steps" if profiled[1] > t.steps else None)
        if problem:
            raise ValueError(f"profile.steps={profiled}: {problem}; give [first, last] with 1 <= first <= last <= "
                             "train.steps, or [] for no profile")
    if cfg.eval.lm_eval_every < 0 or (cfg.eval.lm_eval_limit is not None and cfg.eval.lm_eval_limit < 1):
        raise ValueError("eval.lm_eval_every must be >= 0 and eval.lm_eval_limit >= 1 or null")
    if cfg.eval.lm_eval_every and not lm_eval_task_shots(cfg.eval.lm_eval_tasks):
        raise ValueError("eval.lm_eval_every is set but eval.lm_eval_tasks is empty")
    if cfg.eval.submit_slurm and not cfg.eval.lm_eval_every:
        raise ValueError("eval.submit_slurm submits the evaluations of eval.lm_eval_every: set it (> 0)")
    fixed = [key for key in cfg.run.allow_changes
             if any(key == f or key.startswith(f + ".") or f.startswith(key + ".") for f in FIXED_ON_RESUME)]
    if fixed:
        raise ValueError(f"run.allow_changes cannot include {', '.join(fixed)}: a checkpoint holds one model, "
                         "written by one backend; start a new run instead")
    from pararnn_lm.models import config_for  # the model must exist before any data is prepared

    try:
        config_for(cfg.model.arch, cfg.model.size, **cfg.model.overrides)
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.arch={cfg.model.arch!r} / model.size={cfg.model.size!r}: {err}") from err


def lm_eval_task_shots(entries: list[str]) -> dict[str, int]:
    """``eval.lm_eval_tasks`` as {task: num_fewshot}: "task" is 0-shot, "task:k" k-shot."""
    out = {}
    for entry in entries:
        task, _, shots = str(entry).partition(":")
        if not task or not (shots or "0").isdigit():
            raise ValueError(f"eval.lm_eval_tasks entry {entry!r} is not 'task' or 'task:shots'")
        out[task] = int(shots or 0)
    return out


def reject_unknown_keys(node: Any, path: str = "") -> None:
    """Hydra lets ``+key=value`` add keys even to a typed config; refuse keys the schema lacks."""
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(schema):
        return
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        dotted = f"{path}{key}"
        if key not in known:
            raise ValueError(f"unknown config key {dotted!r}: {schema.__name__} has {', '.join(known)}")
        reject_unknown_keys(node._get_node(key), dotted + ".")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
