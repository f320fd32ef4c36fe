"""Evaluation during training: validation loss (the same definition as ``python -m pararnn_lm.eval.perplexity``)
and downstream lm-eval tasks (the same as ``python -m pararnn_lm.eval.lm_eval_tasks`` on an export)."""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import uses_bf16
from .checkpoint import capture_rng_state, restore_rng_state
from .config import TrainConfig, lm_eval_task_shots
from .distributed import DistInfo, all_reduce_mean

logger = logging.getLogger(__name__)


def validation_loss(model: nn.Module, validation, cfg: TrainConfig, info: DistInfo) -> float:
    """Token-weighted validation NLL over ``eval.max_batches`` batches per rank, averaged over ranks.

    Packed documents: a document's first token, which nothing in that document predicts, is not scored.
    """
    from pararnn_lm.eval.perplexity import evaluate_batches

    with torch.no_grad(), torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, info)):
        acc = evaluate_batches(model, itertools.islice(validation, cfg.eval.max_batches), info.device)
    sums = torch.tensor([acc.total_nll, float(acc.total_tokens)], dtype=torch.float64, device=info.device)
    sums = all_reduce_mean(sums, info)
    if sums[1] == 0:
        raise RuntimeError("the validation split produced no tokens; check the data.validation_* settings")
    return float(sums[0] / sums[1])


def lm_eval_in_process(model: nn.Module, tokenizer, cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """``eval.lm_eval_tasks`` on ``model`` as it is (lm-eval's HFLM around the live model, no export), in the
    training precision. The model goes back to its train/eval mode afterwards, and the Python/NumPy/torch
    generators to their states (lm-eval seeds them), so the run continues as it would have without it."""
    from pararnn_lm.eval.lm_eval_tasks import evaluate

    was_training, rng = model.training, capture_rng_state()
    try:
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, info)):
            return evaluate(model, lm_eval_task_shots(cfg.eval.lm_eval_tasks), tokenizer=tokenizer,
                            batch_size=cfg.eval.lm_eval_batch_size, include_path=cfg.eval.lm_eval_include_path or None,
                            limit=cfg.eval.lm_eval_limit, meta={"arch": cfg.model.arch, "size": cfg.model.size})
    finally:
        model.train(was_training)
        restore_rng_state(rng)


def lm_eval_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's results as flat scalars for metrics.jsonl / W&B: ``lm_eval/<task>/<metric>`` for its
    ``<metric>,<filter>`` entries (filter ``none`` dropped from the name; standard errors kept as
    ``<metric>_stderr``)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"lm_eval/{task}/{metric}" + ("" if filt == "none" else f",{filt}")] = float(value)
    return out


def downstream_evaluation(backend, tokenizer, cfg: TrainConfig, run_dir: Path, info: DistInfo, step: int,
                          tokens: int, metrics, export_dir: Path | None = None) -> dict[str, Any] | None:
    """The lm-eval point of ``step``; every rank calls it.

    In process (default): rank 0 evaluates the live model (under ZeRO-3 a gathered copy) while the others
    wait at a barrier, which must not outlast the process group's timeout (30 minutes; ``eval.lm_eval_limit``
    bounds the work, and ``eval.submit_slurm`` takes it out of the run). The metrics are logged at ``step``
    and the lm-eval results returned on rank 0.

    ``eval.submit_slurm``: ``export_dir`` (the run's final export) or a new export of the model in
    ``run_dir/evals/step_<N>/export`` is evaluated by its own SLURM job, writing ``run_dir/evals/step_<N>/
    lm_eval.json``; the submission is recorded in metrics.jsonl (event ``lm_eval_submitted``). A failed
    submission is logged and recorded (``lm_eval_submit_failed``) and training goes on. Returns None."""
    from .eval_jobs import submit_lm_eval_job
    from .export import export_snapshot, main_rank_model

    eval_dir = run_dir / "evals" / f"step_{step:08d}"
    if cfg.eval.submit_slurm:
        if export_dir is None:
            export_dir = export_snapshot(backend, tokenizer, cfg, eval_dir / "export", info, tokens)
        if info.is_main:
            try:
                job = submit_lm_eval_job(export_dir, eval_dir, cfg, job_name=f"{cfg.run_name}-lm-eval-{step}")
                logger.info("step %d: submitted the lm-eval of %s as job %s", step, export_dir, job)
                metrics.event(step, "lm_eval_submitted", job_id=job, export=str(export_dir),
                              results=str(eval_dir / "lm_eval.json"))
            except (OSError, RuntimeError) as err:
                logger.error("step %d: could not submit the lm-eval job: %s", step, err)
                metrics.event(step, "lm_eval_submit_failed", error=str(err), export=str(export_dir))
        info.barrier()
        return None
    model = main_rank_model(backend, cfg, info)
    results = None
    if model is not None:
        started = time.perf_counter()
        results = lm_eval_in_process(model.to(info.device), tokenizer, cfg, info)
        metrics.log(step, {**lm_eval_metrics(results), "lm_eval/seconds": time.perf_counter() - started})
    info.barrier()
    return results
