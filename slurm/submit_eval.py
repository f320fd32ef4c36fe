"""Submit the lm-eval of an export folder as its own SLURM job: the job the training loop submits at every
``eval.lm_eval_every`` steps with ``eval.submit_slurm=true``, for any export (a run's ``export/``, one of its
``evals/step_N/export`` snapshots, or one written by scripts/export_hf.py).

    python slurm/submit_eval.py runs/X/export cluster.partition=gpu 'eval.lm_eval_tasks=[piqa,hellaswag:10]'
    python slurm/submit_eval.py --dry-run runs/X/export model=paralstm size=400m    # print the job script only
    python slurm/submit_eval.py --eval-dir results/x runs/X/export ...

Arguments after the export folder are Hydra overrides of the training config, as for slurm/launch.py:
``eval.lm_eval_tasks/limit/batch_size/include_path``, ``eval.slurm_time``, ``eval.slurm_gpus`` and the
``cluster`` partition/account/qos/cpus_per_task/env_file shape the job; ``model``/``size`` name the model in
the results (``pararnn_meta``, read by ``pararnn_lm.eval.tables``). ``cluster=slurm`` is added when no cluster
is named. The job runs ``python -m pararnn_lm.eval.lm_eval_tasks`` in this checkout and writes
``<eval dir>/lm_eval.json`` (default eval dir: ``evals/<export name>`` beside the export), its log
``<eval dir>/slurm-<jobid>.out``. Prints ``submitted job <id>``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pararnn_lm.provenance import config_dir
from pararnn_lm.training.config import TrainConfig, register_configs, reject_unknown_keys, validate
from pararnn_lm.training.eval_jobs import lm_eval_job_script, submit_lm_eval_job

ROOT = Path(__file__).resolve().parents[1]  # the checkout the job runs in


def job_config(overrides: list[str]) -> TrainConfig:
    """The training config of these overrides (``cluster=slurm`` unless a cluster is named), checked as train.py does."""
    if not any(o.split("=", 1)[0].lstrip("+~") == "cluster" for o in overrides if "=" in o):
        overrides = ["cluster=slurm", *overrides]
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        composed = compose("train", overrides=overrides)
    reject_unknown_keys(composed)
    cfg: TrainConfig = OmegaConf.to_object(composed)
    validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="export folder (config.json + model.safetensors + tokenizer)")
    parser.add_argument("--eval-dir", type=Path, help="where the job writes lm_eval.json and its log")
    parser.add_argument("--dry-run", action="store_true", help="print the job script, do not submit")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; Hydra overrides look like key=value")
    if not (args.export / "config.json").is_file():
        parser.error(f"{args.export} is not an export folder (no config.json)")
    export = args.export.resolve()
    eval_dir = (args.eval_dir or export.parent / "evals" / export.name).resolve()
    try:
        cfg = job_config(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        sys.stderr.write(f"submit_eval.py: invalid configuration: {error}\n")
        return 2
    job_name = f"{cfg.run_name}-lm-eval"
    try:
        if args.dry_run:
            print(lm_eval_job_script(export, eval_dir, cfg, job_name, workdir=ROOT))
            return 0
        job = submit_lm_eval_job(export, eval_dir, cfg, job_name, workdir=ROOT)
    except (OSError, RuntimeError, ValueError) as error:  # no env file, no sbatch, a task entry it cannot read
        sys.stderr.write(f"submit_eval.py: {error}\n")
        return 1
    print(f"submitted job {job}: results {eval_dir / 'lm_eval.json'}, log {eval_dir / f'slurm-{job}.out'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
