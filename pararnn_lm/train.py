"""Pretrain a language model: ``python train.py [group=option ...] [key=value ...]``.

    python train.py                                   # tiny ParaGRU on the bundled corpus (CPU ok)
    python train.py model=paralstm size=400m data=slimpajama deepspeed=zero3
    python train.py experiment=paper_400m_paragru
    torchrun --nproc-per-node 8 train.py ...          # also: the deepspeed launcher and srun (slurm/)

``python -m pararnn_lm.train`` and the ``pararnn-train`` command are the same entry point for an
installed package (the Hydra configs ship inside it). This file is the training loop; the pieces it
composes live in ``pararnn_lm.training`` (one module per concern: build, backends, checkpoint, metrics,
evaluation, export, ...), ``pararnn_lm.models`` and ``pararnn_lm.data``.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pararnn_lm.provenance import config_dir
from pararnn_lm.training.backends import BACKENDS
from pararnn_lm.training.build import build_data, build_model, checkpoint_activations, compile_blocks, grad_accum_steps
from pararnn_lm.training.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from pararnn_lm.training.config import TrainConfig, register_configs, reject_unknown_keys, validate
from pararnn_lm.training.distributed import (
    DistInfo, all_reduce_max, all_reduce_mean, init_distributed, setup_rank_logging, to_device)
from pararnn_lm.training.evaluation import downstream_evaluation, validation_loss
from pararnn_lm.training.export import export_trained_model
from pararnn_lm.training.faults import inject_fault, poison_loss
from pararnn_lm.training.init_from import InitSource, load_initial_weights, locate, verified
from pararnn_lm.training.metrics import (
    MetricsLogger, StepTimer, flops_per_token, flops_terms, memory_stats, newton_stats, peak_flops)
from pararnn_lm.training.optim import build_scheduler, parameter_groups
from pararnn_lm.training.profiling import StepProfiler
from pararnn_lm.training.progress import Progress
from pararnn_lm.training.run_folder import RunLock, clear_run, config_dict, plan_run
from pararnn_lm.training.signals import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, PreemptionFlag

logger = logging.getLogger("train")
register_configs()


def train(cfg: TrainConfig) -> dict:
    """Run or resume training. Returns a summary (losses, steps, tokens, paths, exit code)."""
    validate(cfg)  # before anything is prepared or written
    init_source = locate(cfg.init_from) if cfg.init_from else None  # so is a missing init_from
    info = init_distributed(cfg.train.device, process_group=cfg.deepspeed.enabled)
    setup_rank_logging(info.rank)
    run_dir = Path(cfg.run_dir).resolve()
    lock = RunLock(run_dir)
    agree(info, lambda: lock.acquire() if info.is_main else None)
    preempted = None
    try:
        preempted = PreemptionFlag(sentinel=run_dir / "PREEMPT")
        return _train(cfg, info, run_dir, preempted, init_source)
    finally:
        if preempted is not None:
            preempted.restore()
        lock.release()


def agree(info: DistInfo, action: Callable[[], Any]) -> Any:
    """Run ``action`` on every rank; if it fails on one, fail on all (instead of leaving the others
    waiting in the next collective). The failing rank raises its own error."""
    error: BaseException | None = None
    try:
        result = action()
    except Exception as err:  # noqa: BLE001 - re-raised below, after every rank knows
        error, result = err, None
    if bool(all_reduce_max(torch.tensor(float(error is not None), device=info.device), info)):
        raise error if error is not None else RuntimeError("another rank could not start the run (see its log)")
    return result


def _train(cfg: TrainConfig, info: DistInfo, run_dir: Path, preempted: PreemptionFlag,
           init_source: InitSource | None) -> dict:
    def any_rank(flag: bool) -> bool:
        return bool(all_reduce_max(torch.tensor(float(flag), device=info.device), info))

    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, info.rank, info.barrier,
                                    info.world_size, any_rank)
    plan = agree(info, lambda: plan_run(cfg, checkpoints))  # reads only: nothing is written before this
    init_weights = None  # a run with a checkpoint of its own resumes it: init_from is not applied again
    if init_source is not None and plan.checkpoint is None:
        init_weights = agree(info, lambda: verified(init_source, checkpoints))
    elif init_source is not None:
        logger.info("init_from=%s is not applied: the run resumes from its own checkpoint", cfg.init_from)
    if info.is_main:
        if plan.clear_first:
            clear_run(run_dir)
        preempted.clear_sentinel()
    info.barrier()
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    # --- data, model, optimiser ---------------------------------------------------------------
    data = build_data(cfg, info)
    model = build_model(cfg, vocab_size=data.vocab_size).to(info.device)
    if init_weights is not None:
        load_initial_weights(model, init_weights)
    if cfg.train.activation_checkpointing:
        checkpoint_activations(model)
    if cfg.train.compile:
        compile_blocks(model, zero3=cfg.deepspeed.zero3)
    grad_accum = grad_accum_steps(cfg, info.world_size)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        fused=not cfg.deepspeed.enabled,  # lets TorchBackend skip a non-finite step on the device
    )
    warmup = int(cfg.optim.warmup_fraction * cfg.train.steps)
    scheduler = build_scheduler(optimizer, cfg.train.steps, warmup, cfg.optim.min_lr_ratio)
    backend = BACKENDS[cfg.deepspeed.enabled](model, optimizer, scheduler, cfg, info, grad_accum)

    # --- resume ---------------------------------------------------------------------------------
    step, tokens, wandb_id, nonfinite_steps = 0, 0, None, []
    if plan.checkpoint is not None:
        checkpoints.check_layout(plan.checkpoint, cfg.train.micro_batch_size, grad_accum)
        meta = backend.load(checkpoints, plan.checkpoint)  # DeepSpeed on other ranks: via its universal checkpoint
        rank_state = checkpoints.load_rank_state(plan.checkpoint)  # on other ranks: every rank's data cursor
        data.train.load_state_dict(rank_state["data"])
        restore_rng_state(rank_state["rng"])
        step, tokens, wandb_id = meta["step"], meta["tokens"], meta.get("wandb_id")
        nonfinite_steps = meta.get("nonfinite_steps", [])
        logger.info("resumed from %s at step %d (%d tokens)", plan.checkpoint, step, tokens)
    for key, (old, new) in plan.changes.items():
        logger.warning("resuming with %s=%r (the checkpoint has %r): run.allow_changes names it", key, new, old)
    record = {"run_id": plan.run_id, "config": config_dict(cfg), "slurm_job": os.environ.get("SLURM_JOB_ID")}
    if info.is_main:  # the configuration this run trains with, once it has loaded
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")

    metrics = MetricsLogger(run_dir, enabled=info.is_main, start_step=step, tensorboard=cfg.logging.tensorboard)
    metrics.event(step, "start", run_id=plan.run_id,
                  resumed_from=None if plan.checkpoint is None else str(plan.checkpoint),
                  init_from=None if init_weights is None else str(init_weights),
                  changed={key: {"checkpoint": old, "now": new} for key, (old, new) in plan.changes.items()})
    wandb_id = metrics.start_wandb(
        cfg.logging.wandb_mode, cfg.logging.wandb_project, cfg.run_name, wandb_id,
        OmegaConf.to_container(OmegaConf.structured(cfg)), run_dir,
    )
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    flops_token = flops_per_token(*flops_terms(model), cfg.data.seq_len)
    peak = peak_flops(torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None)

    def evaluate() -> dict[str, float]:
        loss = validation_loss(backend.module, data.validation, cfg, info)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def tokens_by_source() -> dict[str, int]:
        """A stream's training tokens per source (``tokens/<name>``), summed over the ranks (each reads its own streams)."""
        if not hasattr(data.train, "source_tokens"):
            return {}
        names, counts = zip(*data.train.source_tokens().items())
        summed = all_reduce_mean(torch.tensor(counts, dtype=torch.float64, device=info.device), info) * info.world_size
        return {f"tokens/{name}": round(value) for name, value in zip(names, summed.tolist())}

    # --- the loop -------------------------------------------------------------------------------
    # A step reads nothing back from the device: a read waits for the queued work, and the host then
    # has to rebuild its lead. Loss, grad norm and whether the update was applied stay on the device
    # in `pending` until a log step, a checkpoint or the end reads them all at once.
    train_iter = iter(data.train)
    progress = Progress(cfg.train.steps, initial=step, enabled=info.is_main and cfg.logging.progress_bar)
    timer = StepTimer(info.device)
    profiler = StepProfiler(cfg.profile.steps, run_dir / "profile", info, start_step=step, pause=timer.paused)
    losses: list[float] = []
    pending: list[tuple[int, Any, Any, Any]] = []  # (step, loss, grad norm, applied): tensors or numbers
    started, exit_code = time.perf_counter(), 0

    def report_nonfinite(at: int) -> None:
        nonfinite_steps.append(at)
        logger.warning("step %d: non-finite loss or gradient (%s)", at, cfg.train.on_nonfinite)

    def read_pending() -> dict[int, tuple[float, float, bool]]:
        """{step: (loss, grad norm, skipped)} of the steps not read yet: one device-to-host transfer,
        and one all-reduce of their losses over the ranks."""
        if not pending:
            return {}
        steps_read, *columns = zip(*pending)
        pending.clear()
        loss, norm, applied = (torch.stack([torch.as_tensor(v, dtype=torch.float32, device=info.device) for v in c])
                               for c in columns)
        rows = torch.stack([all_reduce_mean(loss, info), norm, applied]).T.tolist()
        out = {}
        for at, (loss_at, norm_at, applied_at) in zip(steps_read, rows):
            losses.append(loss_at)
            if not applied_at:
                report_nonfinite(at)
            out[at] = (loss_at, norm_at, not applied_at)
        return out

    def save() -> Path:
        read_pending()  # the checkpoint's list of non-finite steps is complete
        meta = {"step": step, "tokens": tokens, "wandb_id": wandb_id, "nonfinite_steps": nonfinite_steps}
        rank_state = {"data": data.train.state_dict(), "rng": capture_rng_state()}
        return backend.save(checkpoints, step, rank_state, meta, record)

    def stop_reason() -> str | None:
        """Ctrl-C, preemption or the time limit. Every rank must stop at the same step, so with several
        ranks the flags go through an all-reduce that is read on the host: one sync per step there."""
        out_of_time = cfg.train.max_time_minutes is not None and time.perf_counter() - started > 60 * cfg.train.max_time_minutes
        flags = [preempted.interrupted, bool(preempted), out_of_time]
        if info.world_size > 1:
            flags = [bool(f) for f in all_reduce_max(torch.tensor(flags, dtype=torch.float32, device=info.device), info).tolist()]
        return "interrupted" if flags[0] else "preempted" if flags[1] else "time limit" if flags[2] else None

    while step < cfg.train.steps:
        profiler.advance(step)  # a profiled step's range is its whole iteration (log, eval, checkpoint)
        step_losses = []
        for _ in range(grad_accum):
            batch = to_device(next(train_iter), info.device)
            loss, _ = backend.forward_backward(batch, poison=poison_loss(step + 1))
            step_losses.append(torch.as_tensor(loss).float())
        grad_norm, applied = backend.step()  # skips the update if a loss or the grad norm is not finite
        step += 1
        tokens += tokens_per_step
        timer.step()
        if cfg.train.on_nonfinite == "stop" and not bool(applied):  # "stop" reads the flag every step
            read_pending()
            report_nonfinite(step)
            save()
            raise FloatingPointError(f"non-finite loss/gradient at step {step}; checkpoint saved, see metrics.jsonl")
        pending.append((step, torch.stack(step_losses).mean(), grad_norm, applied))
        progress.update(step)
        inject_fault(step)  # tests only: PARARNN_TEST_FAULT=sigkill@N / sigterm@N
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            step_time = timer.read()  # waits for the device: the one sync of a log interval
            loss, grad_norm, skipped = read_pending()[step]
            tok_s = tokens_per_step / step_time
            metrics.log(step, {
                "loss": loss, "lr": backend.lr(), "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tok_s,
                "step_time_s": step_time, "mfu": tok_s * flops_token / (peak * info.world_size) if peak else None,
                "skipped": skipped, **memory_stats(info), **newton_stats(backend.module),
                **tokens_by_source(),
            })
            progress.show(loss, tok_s)
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
            with timer.paused():
                metrics.log(step, evaluate())
        if cfg.eval.lm_eval_every and step % cfg.eval.lm_eval_every == 0 and step < cfg.train.steps:
            with timer.paused():
                downstream_evaluation(backend, data.tokenizer, cfg, run_dir, info, step, tokens, metrics)
        stop = stop_reason()
        if stop or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            with timer.paused():
                save()
        if stop:
            logger.warning("stopping at step %d (%s); resume with resume=auto", step, stop)
            exit_code = {"preempted": REQUEUE_EXIT_CODE, "interrupted": INTERRUPT_EXIT_CODE}.get(stop, 0)
            break
    read_pending()
    profiler.close(step)
    progress.close()

    summary = {"step": step, "tokens": tokens, "losses": losses, "run_dir": str(run_dir), "exit_code": exit_code}
    if step >= cfg.train.steps:
        if not (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            save()
        final: dict[str, Any] = {}
        if cfg.eval.at_end:
            final = evaluate()
            metrics.log(step, final)
            summary.update(final)
            if info.is_main:
                logger.info("validation loss %.4f, perplexity %.2f", final["val_loss"], final["val_ppl"])
        if cfg.eval.lm_eval_every and not cfg.eval.submit_slurm:  # before the export, whose card shows the results
            final.update(downstream_evaluation(backend, data.tokenizer, cfg, run_dir, info, step, tokens, metrics) or {})
        if cfg.export.at_end:
            summary["export_dir"] = export_trained_model(backend, data, cfg, run_dir, info, tokens, results=final)
        if cfg.eval.lm_eval_every and cfg.eval.submit_slurm:  # a job evaluates the final export
            downstream_evaluation(backend, data.tokenizer, cfg, run_dir, info, step, tokens, metrics,
                                  export_dir=run_dir / "export" if cfg.export.at_end else None)
    metrics.close()
    info.barrier()
    return summary


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(dict_cfg: DictConfig) -> None:
    reject_unknown_keys(dict_cfg)
    cfg: TrainConfig = OmegaConf.to_object(dict_cfg)
    summary = train(cfg)
    if summary["exit_code"]:
        sys.exit(summary["exit_code"])


def _accept_deepspeed_launcher_args() -> None:
    """The ``deepspeed`` launcher appends ``--local_rank=N``; Hydra takes only overrides, so move it
    to the environment (where torchrun and srun put it too)."""
    for arg in list(sys.argv[1:]):
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)


def cli() -> None:
    """Console entry point (``pararnn-train``, ``python -m pararnn_lm.train``, the repository's ``train.py``)."""
    _accept_deepspeed_launcher_args()
    main()


if __name__ == "__main__":
    cli()
