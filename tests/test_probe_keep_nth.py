"""scripts/probe_keep_nth.py --curriculum: stage parsing, refused flag mixes, and a short two-stage run
that reports the final length at every check of the earlier stage."""
from __future__ import annotations

import logging

import pytest

from scripts.probe_keep_nth import _stage, main


def test_stage_parsing_and_bad_input():
    assert _stage("12:20000") == (12, 20000)
    for bad in ("12", "12-300", "a:3", "12:3:4"):
        with pytest.raises(SystemExit, match="L:STEPS"):
            _stage(bad)
    with pytest.raises(SystemExit, match="drop --seq-len / --steps"):
        main(["--curriculum", "8:2", "--steps", "5"])


def test_two_stage_curriculum_reports_the_final_length(caplog):
    with caplog.at_level(logging.INFO, logger="probe_keep_nth"):
        acc = main(["--train-size", "0", "--batch-size", "4", "--curriculum", "8:2", "12:2"])
    lines = [r.getMessage() for r in caplog.records if "train loss" in r.getMessage()]
    # checks at the first and last step of each stage; the L=8 stage also reports L=12
    assert [line.split()[1] for line in lines] == ["L=8", "L=8", "L=12", "L=12"]
    assert all("test accuracy at L=12" in line for line in lines)
    assert all("test accuracy at L=8" not in line for line in lines[2:])
    assert [int(line.split()[3]) for line in lines] == [0, 1, 2, 3]  # one step count across stages
    assert 0.0 <= acc <= 1.0
