"""A fake ``sbatch`` for tests that check what is submitted, without SLURM: put first on PATH, it records
each call's arguments and the batch script it was given, and answers like ``sbatch --parsable``."""
from __future__ import annotations

import os
from pathlib import Path

FAKE_SBATCH = """#!/bin/bash
n=$(ls "$SBATCH_LOG" 2>/dev/null | wc -l)
mkdir -p "$SBATCH_LOG/$n"
printf '%s\\n' "$@" > "$SBATCH_LOG/$n/argv"
cp "${@: -1}" "$SBATCH_LOG/$n/script"
echo "$((4242 + n));cluster"
"""
FIRST_JOB_ID = 4242


def install_fake_sbatch(tmp_path: Path, monkeypatch) -> Path:
    """Puts the fake first on PATH (for this process and its children); returns the folder where call n
    (from 0) leaves ``n/argv`` (one argument a line) and ``n/script``; it answers job id 4242 + n."""
    bin_dir, log = tmp_path / "fake_sbatch_bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    return log


def sbatch_calls(log: Path) -> list[tuple[list[str], str]]:
    """(arguments, script) of every call, in order."""
    calls = sorted(int(p.name) for p in log.iterdir()) if log.is_dir() else []
    return [((log / str(n) / "argv").read_text().splitlines(), (log / str(n) / "script").read_text()) for n in calls]
