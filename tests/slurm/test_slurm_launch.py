"""slurm/launch.py renders the sbatch script from the Hydra config; slurm/submit_eval.py hands sbatch the job that
evaluates an export (no SLURM needed for these: a fake sbatch on PATH records what it is given)."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fake_sbatch import install_fake_sbatch, sbatch_calls
from repo_scripts import ROOT, load_script

launch = load_script("slurm/launch.py")


def _master_port(script: str, job_id: int) -> int:
    """Run the script's own MASTER_PORT line in bash with a given job id and read back the port."""
    line = next(ln for ln in script.splitlines() if ln.startswith("export MASTER_ADDR=") and "MASTER_PORT=" in ln)
    out = subprocess.run(["bash", "-euc", f'head_node=node0; {line}; echo "$MASTER_PORT"'],
                         env={"SLURM_JOB_ID": str(job_id), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_default_port_is_derived_from_the_job_id_below_the_ephemeral_range():
    script, _ = launch.render(["cluster=slurm"])
    ports = {job: _master_port(script, job) for job in (7, 12345, 99999, 10007)}
    assert ports == {7: 20007, 12345: 22345, 99999: 29999, 10007: 20007}
    # Linux's default ephemeral range starts at 32768: srun's own listening sockets live there.
    assert all(1024 <= p < 32768 for p in ports.values())


def test_explicit_port_is_used_as_given():
    script, _ = launch.render(["cluster=slurm", "cluster.port=31234"])
    assert _master_port(script, 5) == 31234


@pytest.mark.parametrize("port", [80, 70000])
def test_out_of_range_port_is_rejected(port):
    with pytest.raises(SystemExit, match="cluster.port"):
        launch.render(["cluster=slurm", f"cluster.port={port}"])


# --- slurm/submit_eval.py: the lm-eval of an export as its own job (a fake sbatch records what it gets) -------

submit_eval = load_script("slurm/submit_eval.py")


def _export_folder(tmp_path: Path) -> Path:
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")  # what the helper checks; the job is not run here
    return export


def test_submit_eval_hands_sbatch_a_standalone_evaluation_job(tmp_path, monkeypatch, capsys):
    log = install_fake_sbatch(tmp_path, monkeypatch)
    export = _export_folder(tmp_path)
    assert submit_eval.main([
        str(export), "cluster.partition=gpu", "cluster.account=proj", "cluster.qos=high", "eval.slurm_gpus=2",
        "eval.slurm_time=01:00:00", "eval.lm_eval_tasks=[piqa,arc_challenge:25]", "eval.lm_eval_limit=100",
        "model=paralstm", "size=400m"]) == 0
    [(argv, script)] = sbatch_calls(log)
    eval_dir = tmp_path / "run" / "evals" / "export"
    # the whole sbatch command line: no --dependency, nothing of a training job
    assert argv == ["--parsable", str(eval_dir / "lm_eval.sbatch")]
    assert script == (eval_dir / "lm_eval.sbatch").read_text()
    lines = script.splitlines()
    assert [ln for ln in lines if ln.startswith("#SBATCH")] == [
        "#SBATCH --job-name=paralstm-400m-lm-eval", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=96", "#SBATCH --time=01:00:00", f"#SBATCH --output={eval_dir / 'slurm-%j.out'}",
        "#SBATCH --gpus-per-node=2", "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high"]
    assert f"cd {ROOT}" in lines and f"source {ROOT / 'slurm' / 'env.sh'}" in lines
    command = shlex.split(next(ln for ln in lines if ln.startswith("exec ")))[1:]  # as bash splits it
    assert command == [
        sys.executable, "-m", "pararnn_lm.eval.lm_eval_tasks", "--model", str(export), "--tasks", "piqa:0",
        "arc_challenge:25", "--batch-size", "8", "--device", "cuda", "--arch", "paralstm", "--size", "400m",
        "--out", str(eval_dir / "lm_eval.json"), "--limit", "100"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    assert "submitted job 4242" in capsys.readouterr().out


def test_submit_eval_dry_run_submits_nothing_and_bad_settings_fail_before_sbatch(tmp_path, monkeypatch, capsys):
    log = install_fake_sbatch(tmp_path, monkeypatch)
    export = _export_folder(tmp_path)
    assert submit_eval.main(["--dry-run", str(export), "eval.slurm_gpus=0"]) == 0
    out = capsys.readouterr().out
    assert "--device cpu" in out and "--gpus-per-node" not in out
    assert submit_eval.main([str(export), "eval.lm_eval_tasks=[piqa:few]"]) == 1  # a task entry that is not task:shots
    assert "is not 'task' or 'task:shots'" in capsys.readouterr().err
    assert submit_eval.main([str(export), "cluster.env_file=/nonexistent/env.sh"]) == 1
    assert "/nonexistent/env.sh" in capsys.readouterr().err
    assert sbatch_calls(log) == []
