"""Render the sbatch script of a training run from its Hydra config and submit it.

    python slurm/launch.py cluster=slurm cluster.nodes=4 model=paragru size=1b deepspeed=zero2
    python slurm/launch.py --dry-run experiment=paper_7b_paragru    # print the script only

All arguments except the launcher's own flags are Hydra overrides, passed unchanged to train.py in
the job (which adds resume=auto, so a requeued job continues from its last checkpoint).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from training.config import TrainConfig, register_configs, validate  # noqa: E402
from training.signals import REQUEUE_EXIT_CODE  # noqa: E402


def render(overrides: list[str]) -> tuple[str, TrainConfig]:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg: TrainConfig = OmegaConf.to_object(compose("train", overrides=overrides))
    validate(cfg)
    cluster = cfg.cluster
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
        "extra_directives": "\n".join(extra), "workdir": shlex.quote(str(ROOT)),
        "env_file": shlex.quote(str(env_file if env_file.is_absolute() else ROOT / env_file)),
        "port": cluster.port, "python": shlex.quote(sys.executable), "procs_per_node": procs,
        "overrides": " ".join(shlex.quote(o) for o in overrides), "requeue_exit_code": REQUEUE_EXIT_CODE,
    }
    template = Template((ROOT / "slurm" / "train.sbatch").read_text())
    return template.substitute(fields), cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, do not submit")
    parser.add_argument("--sbatch-args", default="", help="extra arguments for sbatch itself, e.g. '--wait'")
    args, overrides = parser.parse_known_args(argv)
    script, cfg = render(overrides)
    if args.dry_run:
        print(script)
        return 0
    run_dir = Path(cfg.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "train.sbatch"
    path.write_text(script)
    command = ["sbatch", "--parsable", *shlex.split(args.sbatch_args), str(path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(f"sbatch failed ({result.returncode}): {result.stderr}\n")
        return result.returncode
    print(f"submitted job {result.stdout.strip()} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
