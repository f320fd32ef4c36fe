"""Render the sbatch script of a training run from its Hydra config and submit it.

    python slurm/launch.py cluster=slurm cluster.nodes=4 model=paragru size=1b deepspeed=zero2
    python slurm/launch.py --dry-run experiment=paper_7b_paragru    # print the script only
    python slurm/launch.py --sbatch-args="--dependency=afterok:123 --begin=now+1hour" ...

All arguments except the launcher's own flags are Hydra overrides, passed unchanged to train.py in
the job. ``cluster=slurm`` is added when no cluster is named, and ``resume=auto`` when no resume is
given, so that a requeued job continues from its last checkpoint. The rendered script is written to
``<run_dir>/train.sbatch`` and the job log to ``<run_dir>/slurm-<jobid>.out`` (appended across
requeues). Prints ``submitted job <id>``.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pararnn_lm.provenance import config_dir
from pararnn_lm.training.config import TrainConfig, register_configs, reject_unknown_keys, validate
from pararnn_lm.training.signals import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]  # the checkout the job runs train.py in


def with_defaults(overrides: list[str]) -> list[str]:
    """Add ``cluster=slurm`` and ``resume=auto`` unless the command line names them."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    out = list(overrides)
    if "cluster" not in keys:
        out.insert(0, "cluster=slurm")
    if "resume" not in keys:
        out.append("resume=auto")
    return out


def render(overrides: list[str]) -> tuple[str, TrainConfig]:
    """The sbatch script for these Hydra overrides (already completed by ``with_defaults``)."""
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        composed = compose("train", overrides=overrides)
    reject_unknown_keys(composed)  # the same checks as train.py: fail here, not after hours in the queue
    cfg: TrainConfig = OmegaConf.to_object(composed)
    validate(cfg)
    cluster = cfg.cluster
    if cluster.name != "slurm":
        raise SystemExit(f"slurm/launch.py needs cluster=slurm (got cluster.name={cluster.name!r})")
    if cluster.nodes < 1 or cluster.cpus_per_task < 1 or cluster.gpus_per_node < 0:
        raise SystemExit("cluster.nodes and cluster.cpus_per_task must be >= 1, cluster.gpus_per_node >= 0")
    if cluster.port is not None and not 1024 <= cluster.port <= 65535:
        raise SystemExit(f"cluster.port must be in 1024..65535 or null (derived from the job id), got {cluster.port}")
    run_dir = Path(cfg.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    extra = [f"#SBATCH --gpus-per-node={cluster.gpus_per_node}"] if cluster.gpus_per_node > 0 else []
    for key in ("partition", "account", "qos"):
        if getattr(cluster, key):
            extra.append(f"#SBATCH --{key}={getattr(cluster, key)}")
    extra += [f"#SBATCH {line}" for line in cluster.extra_sbatch]
    procs = cluster.procs_per_node or max(cluster.gpus_per_node, 1)
    env_file = Path(cluster.env_file)
    fields = {
        "job_name": cfg.run_name, "nodes": cluster.nodes, "cpus_per_task": cluster.cpus_per_task,
        "time": cluster.time, "run_dir": shlex.quote(str(run_dir)), "signal_seconds": cluster.signal_seconds,
        "log_file": shlex.quote(str(run_dir / "slurm-%j.out")),
        "extra_directives": "\n".join(extra), "workdir": shlex.quote(str(ROOT)),
        "env_file": shlex.quote(str(env_file if env_file.is_absolute() else ROOT / env_file)),
        # substituted values are not re-scanned by Template: a single $ reaches bash
        "port": cluster.port if cluster.port is not None else "$((20000 + SLURM_JOB_ID % 10000))",
        "python": shlex.quote(sys.executable), "procs_per_node": procs,
        "overrides": " ".join(shlex.quote(o) for o in overrides), "requeue_exit_code": REQUEUE_EXIT_CODE,
    }
    template = Template((ROOT / "slurm" / "train.sbatch").read_text())
    return template.substitute(fields), cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, do not submit")
    parser.add_argument(
        "--sbatch-args", default="",
        help="extra arguments for sbatch itself, e.g. '--begin=now+60 --dependency=afterany:123' (a job that "
             "requeues itself should not be submitted with --wait: sbatch returns at the first requeue)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unknown launcher option(s) {unknown}; Hydra overrides look like key=value")
    overrides = with_defaults(overrides)
    try:
        script, cfg = render(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        sys.stderr.write(f"launch.py: invalid configuration: {error}{cause}\n")
        return 2
    if args.dry_run:
        print(script)
        return 0
    run_dir = Path(cfg.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "train.sbatch"
    path.write_text(script)
    command = ["sbatch", "--parsable", *shlex.split(args.sbatch_args), str(path)]
    if shutil.which("sbatch") is None:
        sys.stderr.write(f"sbatch not found: is this a SLURM login node? The script is at {path}\n")
        return 127
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(f"sbatch failed ({result.returncode}): {result.stderr}\n")
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: script {path}, log {run_dir / f'slurm-{job_id}.out'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
