"""scripts/probe_keep_nth.py --curriculum: stage parsing, refused flag mixes, and a short two-stage run
that reports the final length at every check of the earlier stage."""
from __future__ import annotations

import json
import logging
import math

import pytest

from pararnn_lm.eval.synthetic.train import parse_curriculum
from repo_scripts import load_script

probe_keep_nth = load_script("scripts/probe_keep_nth.py")
lr_factor, main = probe_keep_nth.lr_factor, probe_keep_nth.main


def test_stage_parsing_and_bad_input():
    assert parse_curriculum(["12:20000", "25:3"]) == ((12, 20000), (25, 3))
    for bad in ("12", "12-300", "a:3", "12:3:4"):
        with pytest.raises(ValueError, match="L:STEPS"):
            parse_curriculum([bad])
    for bad in ("0:5", "12:0", "12:-1"):
        with pytest.raises(ValueError, match="L >= 1 and STEPS >= 1"):
            parse_curriculum([bad])
    with pytest.raises(SystemExit, match="--curriculum: a curriculum stage is L:STEPS"):
        main(["--curriculum", "8:2", "12"])
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


def test_cosine_schedule_spans_every_stage():
    assert [lr_factor(s, 100, "constant") for s in (0, 50, 100)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.55)  # halfway: floor + (1 - floor) / 2
    assert lr_factor(100, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(25, 100, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_json_holds_every_check_and_the_best(tmp_path):
    out = tmp_path / "curve.json"
    acc = main(["--train-size", "0", "--batch-size", "4", "--test-size", "50", "--log-every", "2",
                "--schedule", "cosine", "--lr", "1e-2", "--curriculum", "8:4", "12:4", "--json", str(out)])
    d = json.loads(out.read_text())
    assert [c["step"] for c in d["checks"]] == [0, 2, 3, 4, 6, 7]
    assert [c["seq_len"] for c in d["checks"]] == [8, 8, 8, 12, 12, 12]
    assert all("12" in c["accuracy"] for c in d["checks"])  # the final length at every check
    finals = [c["accuracy"]["12"] for c in d["checks"]]
    assert d["best"]["accuracy"] == max(finals) and d["final_accuracy"] == finals[-1] == acc
    lrs = [c["lr"] for c in d["checks"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(1e-3)  # one cosine over both stages


def test_plot_draws_json_curves(tmp_path):
    run = tmp_path / "run.json"
    main(["--train-size", "0", "--batch-size", "4", "--test-size", "20", "--log-every", "1",
          "--curriculum", "8:2", "12:2", "--json", str(run)])
    png = tmp_path / "curves.png"
    main(["--plot", str(png), str(run), str(run)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="at least one --json"):
        main(["--plot", str(png)])


def test_time_budget_stops_with_a_last_check(tmp_path):
    out = tmp_path / "run.json"
    main(["--train-size", "0", "--batch-size", "4", "--test-size", "20", "--log-every", "100",
          "--curriculum", "8:50", "12:50", "--time-budget-min", "0", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["stopped_at_step"] == 0 and [c["step"] for c in d["checks"]] == [0]


def test_per_token_accuracy_splits_by_the_kept_token():
    import torch

    from pararnn_lm.eval.synthetic.tasks import keep_nth
    per_token_accuracy = probe_keep_nth.per_token_accuracy

    data = keep_nth(400, 12, 8, 5, seed=0)

    class Always3(torch.nn.Module):  # predicts token 3 everywhere
        def forward(self, ids):
            return torch.nn.functional.one_hot(torch.full_like(ids, 3), 8).float()

    class Oracle(torch.nn.Module):  # reads the 5th token
        def forward(self, ids):
            return torch.nn.functional.one_hot(ids[:, 4:5].expand_as(ids), 8).float()

    assert per_token_accuracy(Always3(), data, 8) == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert per_token_accuracy(Oracle(), data, 8, chunk=150) == [1.0] * 8
    few = keep_nth(3, 12, 8, 5, seed=0)  # at most 3 tokens kept: the others are None, not 0
    acc = per_token_accuracy(Oracle(), few, 8)
    assert sum(a is None for a in acc) == 8 - len(set(few.targets[:, -1].tolist()))
