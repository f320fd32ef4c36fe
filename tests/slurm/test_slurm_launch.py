"""slurm/launch.py renders the sbatch script from the Hydra config (no SLURM needed for these)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
