"""scripts/bench_scaling.py: real torchrun launches of train.py, weak scaling, honest summaries."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_scaling  # noqa: E402


def test_summary_skips_the_warm_up_interval_and_takes_medians():
    records = [
        {"step": 5, "loss": 9.0, "tokens_per_s": 10.0, "step_time_s": 9.0, "mfu": 0.01, "mem_peak_gib": 3.0},
        {"step": 10, "loss": 8.0, "tokens_per_s": 100.0, "step_time_s": 1.0, "mfu": 0.30, "mem_peak_gib": 4.0},
        {"step": 15, "loss": 7.0, "tokens_per_s": 120.0, "step_time_s": 0.9, "mfu": 0.36, "mem_peak_gib": 4.5},
        {"step": 20, "loss": 6.0, "tokens_per_s": 90.0, "step_time_s": 1.1, "mfu": 0.27, "mem_peak_gib": 4.5},
        {"step": 20, "val_loss": 6.5},
    ]
    s = bench_scaling.summarise(records, log_every=5)
    assert s["tokens_per_s"] == 100.0 and s["step_time_s"] == 1.0 and s["mfu"] == 0.30
    assert s["mem_peak_gib"] == 4.5 and s["log_steps"] == [10, 15, 20] and s["losses"] == [9.0, 8.0, 7.0, 6.0]
    with pytest.raises(ValueError, match="raise --steps"):
        bench_scaling.summarise(records[:1], log_every=5)


def test_efficiency_is_relative_to_n_times_the_single_gpu_run():
    rows = [{"arch": "a", "size": "1b", "gpus": 1, "tokens_per_s": 100.0},
            {"arch": "a", "size": "1b", "gpus": 4, "tokens_per_s": 360.0},
            {"arch": "b", "size": "1b", "gpus": 2, "tokens_per_s": 150.0},  # no 1-GPU run: no efficiency
            {"arch": "a", "size": "1b", "gpus": 8, "error": "out of memory"}]
    bench_scaling.add_efficiency(rows)
    assert rows[0]["scaling_efficiency"] == 1.0 and math.isclose(rows[1]["scaling_efficiency"], 0.9)
    assert "scaling_efficiency" not in rows[2] and "scaling_efficiency" not in rows[3]


def test_smoke_run_on_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    rows = bench_scaling.main(["--smoke", "--archs", "paragru", "--gpus", "1", "2", "--work-dir",
                               str(tmp_path / "work"), "--out", str(out), "--timeout", "600"])
    assert [(r["arch"], r["gpus"]) for r in rows] == [("paragru", 1), ("paragru", 2)]
    assert json.loads(out.read_text()) == rows
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert math.isclose(r["ms_per_sequence_per_gpu"], 1e3 * r["step_time_s"] / 2)
    # weak scaling: each rank keeps its micro-batch, the global batch grows with the ranks
    config = (tmp_path / "work" / "paragru-debug-2gpu" / "config.yaml").read_text()
    assert "global_batch_size: 4" in config and "micro_batch_size: 2" in config
    assert math.isclose(rows[1]["scaling_efficiency"], rows[1]["tokens_per_s"] / (2 * rows[0]["tokens_per_s"]))
    assert out.with_suffix(".png").stat().st_size > 1000
    table = bench_scaling.render(rows)
    assert "| paragru | debug | none | 2 | 2 |" in table and "100.0%" in table
