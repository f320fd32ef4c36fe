"""scripts/bench_train.py runs train.py per configuration in a subprocess and reports honest numbers."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from repo_scripts import load_script

bench_train = load_script("scripts/bench_train.py")


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


def test_kernel_kinds_and_per_step_summary():
    names = {
        "_shoot_fwd_kernel": "paraRNN cell (Triton)",
        "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>": "attention",
        "triton_tem_fused_flex_attention_0": "attention",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "GEMM",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_3": "inductor fused",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float>>": "optimizer",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "NCCL",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copy / fill / elementwise (eager)",
        "some_unknown_kernel": "other",
    }
    for name, kind in names.items():
        assert bench_train.kernel_kind(name) == kind, name
    events = [("_shoot_fwd_kernel", 300.0), ("_shoot_fwd_kernel", 100.0), ("nvjet_tst_x", 1000.0),
              ("triton_poi_fused_silu_0", 50.0)]
    summary = bench_train.summarise_kernels(events, steps=2, top=2)
    assert math.isclose(summary["gpu_ms_per_step"], 1450.0 / 1e3 / 2)
    assert summary["by_kind_ms_per_step"] == {"GEMM": 0.5, "paraRNN cell (Triton)": 0.2, "inductor fused": 0.025}
    assert [k["name"] for k in summary["top_kernels"]] == ["nvjet_tst_x", "_shoot_fwd_kernel"]
    assert summary["top_kernels"][1]["calls_per_step"] == 1.0
    row = {"arch": "paragru", "layout": "packed", "kernels": summary}
    table = bench_train.render_kernels([row])
    assert "| GEMM | 0.5 |" in table and "| total | 0.7 |" in table
