"""scripts/bench_scaling.py: real torchrun launches of train.py, weak scaling, honest summaries."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from repo_scripts import ROOT, load_script

bench_scaling = load_script("scripts/bench_scaling.py")


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
            {"arch": "a", "size": "1b", "gpus": 8, "error": "out of memory"},
            # another setting of the same model is its own curve, never divided by the other's 1-GPU run
            {"arch": "a", "size": "1b", "gpus": 1, "tokens_per_s": 50.0, "activation_checkpointing": True},
            {"arch": "a", "size": "1b", "gpus": 4, "tokens_per_s": 190.0, "activation_checkpointing": True},
            {"arch": "a", "size": "1b", "gpus": 4, "tokens_per_s": 500.0, "compile": True}]
    bench_scaling.add_efficiency(rows)
    assert rows[0]["scaling_efficiency"] == 1.0 and math.isclose(rows[1]["scaling_efficiency"], 0.9)
    assert "scaling_efficiency" not in rows[2] and "scaling_efficiency" not in rows[3]
    assert math.isclose(rows[5]["scaling_efficiency"], 0.95) and "scaling_efficiency" not in rows[6]


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
    assert "| paragru | debug | none | 2 | 2 | eager |" in table and "100.0%" in table


def test_merge_recomputes_efficiency_across_files(tmp_path):
    one = tmp_path / "one.json"
    many = tmp_path / "many.json"
    one.write_text(json.dumps([{"arch": "a", "size": "1b", "deepspeed": "zero2", "gpus": 1, "micro_batch": 8,
                                "tokens_per_s": 100.0, "ms_per_sequence_per_gpu": 10.0}]))
    many.write_text(json.dumps([{"arch": "a", "size": "1b", "deepspeed": "zero2", "gpus": 4, "micro_batch": 8,
                                 "tokens_per_s": 380.0, "ms_per_sequence_per_gpu": 10.5, "scaling_efficiency": 1.0}]))
    out = tmp_path / "merged.json"
    rows = bench_scaling.main(["--merge", str(many), str(one), "--out", str(out)])
    assert [r["gpus"] for r in rows] == [1, 4]
    assert math.isclose(rows[1]["scaling_efficiency"], 0.95)  # the stale 1.0 of its own file is replaced
    assert json.loads(out.read_text()) == rows


def test_a_timeout_kills_the_launcher_and_its_workers(tmp_path):
    import os
    import subprocess
    import time

    pid_file = tmp_path / "worker.pid"
    # a "launcher" that starts a long-lived worker and waits, as torchrun does
    code = ("import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        bench_scaling.run_group([sys.executable, "-c", code], dict(os.environ), timeout=3)
    assert time.monotonic() - started < 30  # a surviving worker would hold the pipes open for its 60 s
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.5)
    # gone, or a zombie waiting for a reaper (the container's init may not reap orphans at once)
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_timed_out_run_keeps_the_steps_it_logged(tmp_path, monkeypatch):
    import subprocess

    args = bench_scaling.argparse.Namespace(work_dir=str(tmp_path), smoke=True, port=29999, size="debug",
                                            deepspeed="none", micro_batch=2, seq_len=64, vocab_size=4096,
                                            steps=20, log_every=5, compile=False, activation_checkpointing=False,
                                            precision="fp32", cache_dir=None, extra=[], timeout=1.0)
    run_dir = tmp_path / "paragru-debug-1gpu"

    def slow_run(cmd, env, timeout):  # logs two intervals, then hangs past the limit
        run_dir.mkdir(parents=True, exist_ok=True)
        lines = [{"step": s, "loss": 5.0, "tokens_per_s": 50.0 * s, "step_time_s": 1.0 / s} for s in (5, 10)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(bench_scaling, "run_group", slow_run)
    row = bench_scaling.measure("paragru", 1, args)
    assert row["timed_out"] and "error" not in row and row["tokens_per_s"] == 500.0 and row["log_steps"] == [10]

    def silent_run(cmd, env, timeout):  # nothing logged before the limit
        raise subprocess.TimeoutExpired(cmd, timeout)

    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens_per_s": 1.0, "step_time_s": 1.0}) + "\n")
    monkeypatch.setattr(bench_scaling, "run_group", silent_run)
    row = bench_scaling.measure("paragru", 1, args)  # the stale file of the previous run is not read
    assert row["error"] == "timed out after 1 s" and "tokens_per_s" not in row


def test_waves_pack_configurations_that_fit_together():
    configs = [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2), ("a", 4)]
    assert bench_scaling.pack_waves(configs, 4) == [
        [("a", 1), ("b", 1), ("c", 1)], [("a", 2), ("b", 2)], [("c", 2)], [("a", 4)]]
    assert bench_scaling.pack_waves(configs[:2], 1) == [[("a", 1)], [("b", 1)]]


def test_side_by_side_runs_each_configuration_on_its_own_devices_and_port(tmp_path, monkeypatch):
    import threading
    seen, barrier = [], threading.Barrier(2, timeout=10)

    def fake_run(cmd, env, timeout):  # both launches must be running at the same time to pass the barrier
        barrier.wait()
        seen.append((env.get("CUDA_VISIBLE_DEVICES"), next(c for c in cmd if c.startswith("--master-port"))))
        raise OSError("not launched")

    monkeypatch.setattr(bench_scaling, "run_group", fake_run)
    args = bench_scaling.argparse.Namespace(work_dir=str(tmp_path), smoke=False, port=29500, size="1b",
                                            deepspeed="zero2", micro_batch=8, seq_len=2048, vocab_size=50277,
                                            steps=20, log_every=5, compile=False, activation_checkpointing=False,
                                            precision="auto", cache_dir=None, extra=[], timeout=60.0)
    rows = bench_scaling.run_wave([("paragru", 1), ("attention", 2)], args)
    assert sorted(seen) == [("0", "--master-port=29501"), ("1,2", "--master-port=29502")]
    assert [(r["arch"], r["devices"]) for r in rows] == [("paragru", "0"), ("attention", "1,2")]
    assert all("not launched" in r["error"] for r in rows)
