"""scripts/bench_train.py runs train.py per configuration in a subprocess and reports honest numbers."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_train  # noqa: E402


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench_train.main([
        "--archs", "paragru", "--layouts", "packed", "rows", "--size", "tiny", "--seq-len", "512",
        "--micro-batch", "2", "--steps", "4", "--log-every", "2", "--no-compile", "--precision", "fp32",
        "--work-dir", str(tmp_path / "work"), "--out", str(out), "--timeout", "600",
    ])
    assert [(r["arch"], r["layout"]) for r in rows] == [("paragru", "packed"), ("paragru", "rows")]
    assert json.loads(out.read_text()) == rows
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        # tokens/s is (steps after the first log step) x tokens per step / their wall time
        assert math.isclose(r["tokens_per_s"] * r["step_ms"] / 1e3, 2 * 512, rel_tol=1e-6)
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    # same batches, same seed: the packed run resets states at document starts, the rows run does not
    assert rows[0]["losses"] != rows[1]["losses"]
    table = bench_train.render(rows)
    assert "| paragru | packed |" in table and "| paragru | rows |" in table


def test_bench_train_reports_a_failed_configuration(tmp_path):
    rows = bench_train.main(["--archs", "no_such_arch", "--layouts", "rows", "--size", "tiny", "--steps", "4",
                             "--log-every", "2", "--no-compile", "--work-dir", str(tmp_path), "--timeout", "300"])
    assert len(rows) == 1 and "error" in rows[0] and "no_such_arch" in rows[0]["error"]
