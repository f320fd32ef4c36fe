"""lm-eval of an export as its own SLURM job: the batch script and the ``sbatch`` call that submits it.

The job runs ``python -m pararnn_lm.eval.lm_eval_tasks`` (the standalone evaluation) on an export folder and
writes its results JSON; it needs nothing of the training run that submitted it, so it is submitted without
a ``--dependency`` and the run does not wait for it. Used by the training loop (``eval.submit_slurm=true``)
and by ``slurm/submit_eval.py`` (any export folder).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

from .config import TrainConfig, lm_eval_task_shots

JOB_SCRIPT = Template("""#!/bin/bash
# lm-eval of one export (pararnn_lm.training.eval_jobs); results: $out
#SBATCH --job-name=$job_name
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=$cpus
#SBATCH --time=$time
#SBATCH --output=$log
$directives
set -euo pipefail
cd $workdir
source $env_file
exec $command
""")


def lm_eval_command(export_dir: Path, out: Path, cfg: TrainConfig) -> list[str]:
    """The standalone evaluation of ``export_dir`` with the run's ``eval.lm_eval_*`` settings."""
    e = cfg.eval
    command = [sys.executable, "-m", "pararnn_lm.eval.lm_eval_tasks", "--model", str(Path(export_dir).resolve()),
               "--tasks", *(f"{task}:{shots}" for task, shots in lm_eval_task_shots(e.lm_eval_tasks).items()),
               "--batch-size", str(e.lm_eval_batch_size), "--device", "cuda" if e.slurm_gpus > 0 else "cpu",
               "--arch", cfg.model.arch, "--size", cfg.model.size, "--out", str(Path(out).resolve())]
    if e.lm_eval_limit is not None:
        command += ["--limit", str(e.lm_eval_limit)]
    if e.lm_eval_include_path:
        command += ["--include-path", *(str(Path(p).resolve()) for p in e.lm_eval_include_path)]
    return command


def lm_eval_job_script(export_dir: Path, eval_dir: Path, cfg: TrainConfig, job_name: str,
                       workdir: Path | None = None) -> str:
    """The batch script evaluating ``export_dir`` into ``eval_dir/lm_eval.json`` (log: ``eval_dir/slurm-<id>.out``)
    on one node with ``eval.slurm_gpus`` GPUs, the ``cluster`` partition/account/qos and its env file (relative:
    to ``workdir``) sourced, in ``workdir`` (default: the current folder, the checkout a training job runs in)."""
    cluster, eval_dir = cfg.cluster, Path(eval_dir).resolve()
    workdir = Path(workdir or Path.cwd()).resolve()
    env_file = workdir / cluster.env_file  # an absolute env_file stays as it is
    if not env_file.is_file():
        raise FileNotFoundError(f"cluster.env_file {env_file} does not exist (the evaluation job sources it)")
    directives = [f"#SBATCH --gpus-per-node={cfg.eval.slurm_gpus}"] if cfg.eval.slurm_gpus > 0 else []
    directives += [f"#SBATCH --{key}={getattr(cluster, key)}" for key in ("partition", "account", "qos")
                   if getattr(cluster, key)]
    out = eval_dir / "lm_eval.json"
    return JOB_SCRIPT.substitute(
        job_name=job_name, cpus=cluster.cpus_per_task, time=cfg.eval.slurm_time, out=out,
        log=shlex.quote(str(eval_dir / "slurm-%j.out")), directives="\n".join(directives),
        env_file=shlex.quote(str(env_file)), workdir=shlex.quote(str(workdir)), command=shlex.join(lm_eval_command(export_dir, out, cfg)))


def submit_lm_eval_job(export_dir: Path, eval_dir: Path, cfg: TrainConfig, job_name: str,
                       workdir: Path | None = None) -> str:
    """Write ``eval_dir/lm_eval.sbatch`` (:func:`lm_eval_job_script`) and submit it with ``sbatch --parsable``;
    returns the job id."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    script = eval_dir / "lm_eval.sbatch"
    script.write_text(lm_eval_job_script(export_dir, eval_dir, cfg, job_name, workdir))
    if shutil.which("sbatch") is None:
        raise RuntimeError(f"sbatch not found: cannot submit {script}")
    result = subprocess.run(["sbatch", "--parsable", str(script.resolve())], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}) for {script}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
