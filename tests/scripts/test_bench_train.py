"""scripts/bench_train.py: real torchrun launches of train.py per configuration, honest summaries, weak
scaling, exact-resume checks and the comparison against another revision (CPU, tiny configurations)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from repo_scripts import ROOT, load_script

bench_train = load_script("scripts/bench_train.py")

# debug preset, the corpus tokenizer's vocabulary, eager: a configuration takes seconds on a CPU
TINY = ["--size", "debug", "--seq-len", "256", "--micro-batch", "2", "--steps", "4", "--log-every", "2",
        "--no-compile", "--precision", "fp32", "--vocab-size", "0", "--timeout", "600"]


def args(tmp_path: Path, *extra: str, cuda: bool = False):
    a = bench_train.parse_args([*TINY, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out.json"),
                                *extra])
    a.cuda = cuda
    return a


# --- summaries and tables ---------------------------------------------------------------------------------


def test_summary_excludes_the_warm_up_interval_and_weights_intervals_by_their_steps():
    records = [
        {"step": 5, "loss": 9.0, "tokens_per_s": 10.0, "step_time_s": 10.0, "mfu": 0.001, "mem_peak_gib": 3.0},
        {"step": 10, "loss": 8.0, "tokens_per_s": 100.0, "step_time_s": 1.0, "mfu": 0.01, "mem_peak_gib": 4.0},
        {"step": 15, "loss": 7.0, "tokens_per_s": 50.0, "step_time_s": 2.0, "mfu": 0.005, "mem_peak_gib": 4.5},
        {"step": 17, "loss": 6.0, "tokens_per_s": 25.0, "step_time_s": 4.0, "mfu": 0.0025, "mem_peak_gib": 4.5},
        {"step": 17, "val_loss": 6.5},
    ]
    s = bench_train.summarise(records, log_every=5)
    # (5 x 1 s + 5 x 2 s + 2 x 4 s) / 12 steps; 100 tokens per step
    assert math.isclose(s["step_ms"], 1e3 * 23 / 12) and math.isclose(s["tokens_per_s"], 100 / (23 / 12))
    assert math.isclose(s["mfu"], s["tokens_per_s"] * 1e-4)
    assert s["mem_peak_gib"] == 4.5 and s["log_steps"] == [10, 15, 17] and s["losses"] == [9.0, 8.0, 7.0, 6.0]
    with pytest.raises(ValueError, match="raise --steps"):
        bench_train.summarise(records[:1], log_every=5)


def test_efficiency_is_relative_to_n_times_the_single_gpu_run_of_the_same_setting():
    common = {"size": "1b", "layout": "packed", "micro_batch": 8}
    rows = [{"arch": "a", "gpus": 1, "tokens_per_s": 100.0, **common},
            {"arch": "a", "gpus": 4, "tokens_per_s": 360.0, **common},
            {"arch": "b", "gpus": 2, "tokens_per_s": 150.0, **common},  # no 1-GPU run: no efficiency
            {"arch": "a", "gpus": 8, "error": "out of memory", **common},
            # another setting of the same model is its own curve, never divided by the other's 1-GPU run
            {"arch": "a", "gpus": 1, "tokens_per_s": 50.0, "activation_checkpointing": True, **common},
            {"arch": "a", "gpus": 4, "tokens_per_s": 190.0, "activation_checkpointing": True, **common},
            {"arch": "a", "gpus": 4, "tokens_per_s": 500.0, "compile": True, **common},
            {"arch": "a", "gpus": 4, "tokens_per_s": 500.0, **common, "revision": "016a20d"}]
    bench_train.add_efficiency(rows)
    assert rows[0]["scaling_efficiency"] == 1.0 and math.isclose(rows[1]["scaling_efficiency"], 0.9)
    assert "scaling_efficiency" not in rows[2] and "scaling_efficiency" not in rows[3]
    assert math.isclose(rows[5]["scaling_efficiency"], 0.95) and "scaling_efficiency" not in rows[6]
    assert "scaling_efficiency" not in rows[7]


def test_merge_recomputes_efficiency_across_files(tmp_path):
    row = {"arch": "a", "size": "1b", "layout": "packed", "deepspeed": "zero2", "micro_batch": 8, "step_ms": 80.0}
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    one.write_text(json.dumps([{**row, "gpus": 1, "tokens_per_s": 100.0, "ms_per_sequence_per_gpu": 10.0}]))
    many.write_text(json.dumps([{**row, "gpus": 4, "tokens_per_s": 380.0, "ms_per_sequence_per_gpu": 10.5,
                                 "scaling_efficiency": 1.0}]))
    out = tmp_path / "merged.json"
    rows = bench_train.main(["--merge", str(many), str(one), "--out", str(out)])
    assert [r["gpus"] for r in rows] == [1, 4]
    assert math.isclose(rows[1]["scaling_efficiency"], 0.95)  # the stale 1.0 of its own file is replaced
    assert json.loads(out.read_text()) == rows
    assert out.with_suffix(".png").stat().st_size > 1000


def test_versus_table_pairs_configurations_of_the_two_revisions():
    common = {"layout": "packed", "gpus": 1, "micro_batch": 16}
    rows = [{"revision": "this", "commit": "abc1234", "arch": "paragru", "tokens_per_s": 150.0, **common},
            {"revision": "016a20d", "commit": "016a20d", "arch": "paragru", "tokens_per_s": 100.0, **common},
            {"revision": "this", "commit": "abc1234", "arch": "attention", "tokens_per_s": 90.0, **common},
            {"revision": "016a20d", "commit": "016a20d", "arch": "attention", "error": "out of memory: exit 1", **common}]
    table = bench_train.render_versus(rows, "016a20d")
    assert "tokens/s this (abc1234) | tokens/s 016a20d (016a20d) | ratio |" in table
    assert "| paragru | packed | 1 | 16 | 150 | 100 | 1.500x |" in table
    assert "| attention | packed | 1 | 16 | 90 | failed: out of memory: exit 1 | - |" in table


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


# --- scheduling of configurations --------------------------------------------------------------------------


def test_waves_pack_configurations_that_fit_together():
    configs = [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2), ("a", 4)]
    gpus = lambda c: c[1]  # noqa: E731
    assert bench_train.pack_waves(configs, 4, gpus) == [
        [("a", 1), ("b", 1), ("c", 1)], [("a", 2), ("b", 2)], [("c", 2)], [("a", 4)]]
    assert bench_train.pack_waves(configs[:2], 1, gpus) == [[("a", 1)], [("b", 1)]]


def test_side_by_side_runs_each_configuration_on_its_own_devices_and_port(tmp_path, monkeypatch):
    seen, barrier = [], threading.Barrier(2, timeout=10)

    def fake_run(cmd, env, timeout, cwd):  # both launches must be running at the same time to pass the barrier
        barrier.wait()
        seen.append((env.get("CUDA_VISIBLE_DEVICES"), next(c for c in cmd if c.startswith("--master-port"))))
        raise OSError("not launched")

    monkeypatch.setattr(bench_train, "run_group", fake_run)
    a = args(tmp_path, "--port", "29500", cuda=True)
    this = bench_train.this_checkout()
    wave = [bench_train.Config(this, "paragru", "packed", 1, 8, 256), bench_train.Config(this, "attention", "packed", 2, 8, 256)]
    rows = bench_train.run_wave(wave, a)
    assert sorted(seen) == [("0", "--master-port=29501"), ("1,2", "--master-port=29502")]
    assert [(r["arch"], r["devices"]) for r in rows] == [("paragru", "0"), ("attention", "1,2")]
    assert all("not launched" in r["error"] for r in rows)


def test_micro_batch_search_stops_each_series_at_its_first_failure(tmp_path, monkeypatch):
    ran = []

    def fake_measure(c, a, devices=None, port=None):
        ran.append((c.arch, c.micro_batch))
        fits = {"paragru": 4, "attention": 1}[c.arch]
        row = {"revision": "this", "arch": c.arch, "layout": c.layout, "size": a.size, "gpus": c.gpus,
               "micro_batch": c.micro_batch}
        if c.micro_batch > fits:
            return {**row, "error": "out of memory: exit 1"}
        return {**row, "tokens_per_s": 100.0 * c.micro_batch ** 0.5, "step_ms": 1.0, "ms_per_sequence_per_gpu": 1.0}

    monkeypatch.setattr(bench_train, "measure", fake_measure)
    a = args(tmp_path, "--archs", "paragru", "attention", "--micro-batch-search", "16")
    rows = bench_train.run_all([bench_train.this_checkout()], [1], 1, a)
    # round by round: each series grows until it fails, then stops while the other goes on
    assert ran == [("paragru", 1), ("attention", 1), ("paragru", 2), ("attention", 2), ("paragru", 4), ("paragru", 8)]
    assert len(rows) == 6 and json.loads(a.out.read_text()) == rows
    best = bench_train.render_best_micro_batch(rows)
    assert "| this | paragru | packed | 1 | 4 | 4 | 200 |" in best and "| this | attention | packed | 1 | 1 | 1 | 100 |" in best
    assert bench_train.micro_batch_grid(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96]


def test_long_context_holds_the_tokens_per_step_and_an_oom_cell_does_not_stop_the_sweep(tmp_path, monkeypatch):
    ran = []

    def fake_measure(c, a, devices=None, port=None):
        ran.append((c.arch, c.seq_len, c.micro_batch, c.layout))
        row = {"revision": "this", "arch": c.arch, "layout": c.layout, "size": a.size, "gpus": c.gpus,
               "micro_batch": c.micro_batch, "seq_len": c.seq_len, "long_context": True,
               "tokens_per_step_per_gpu": c.micro_batch * c.seq_len, "compile": False}
        if (c.arch, c.seq_len) == ("attention", 1024):
            return {**row, "error": "out of memory: exit 1: torch.OutOfMemoryError: CUDA out of memory"}
        peak = 2**30 * (1.0 + c.seq_len / 1024)
        return {**row, "tokens_per_s": 1e6 / c.seq_len, "step_ms": 1.0, "ms_per_sequence_per_gpu": 1.0,
                "mem_peak_gib": peak / 2**30, "peak_bytes_per_token": peak / 4096}

    monkeypatch.setattr(bench_train, "measure", fake_measure)
    a = bench_train.parse_args(["--archs", "paragru", "attention", "--seq-lens", "256", "1024", "4096",
                                "--tokens-per-step", "4096", "--out", str(tmp_path / "out.json")])
    a.cuda = True
    rows = bench_train.run_all([bench_train.this_checkout()], [1], 1, a)
    # one round per T, micro-batch = 4096 / T, one sequence per row by default; the OOM at T=1024 is one cell
    assert ran == [(arch, t, 4096 // t, "rows") for t in (256, 1024, 4096) for arch in ("paragru", "attention")]
    assert len(rows) == 6 and json.loads(a.out.read_text()) == rows
    table = bench_train.render_long_context(rows)
    assert "4,096 tokens per step and GPU" in table and "layout rows: one sequence of T tokens per row" in table
    assert "| T=256 (mb 16) | T=1024 (mb 4) | T=4096 (mb 1) |" in table
    assert "| this | paragru | 400m | rows | 1 | eager | 3,906 / 320.0 KiB | 977 / 512.0 KiB | 244 / 1,280.0 KiB |" in table
    assert "| this | attention | 400m | rows | 1 | eager | 3,906 / 320.0 KiB | OOM | 244 / 1,280.0 KiB |" in table
    path = bench_train.plot_long_context(rows, tmp_path / "long.png")
    assert path.stat().st_size > 1000


def test_long_context_arguments_must_give_whole_micro_batches(tmp_path, capsys):
    def parse(*extra):
        return bench_train.parse_args(["--out", str(tmp_path / "o.json"), *extra])

    a = parse("--seq-lens", "64", "128", "--tokens-per-step", "256")
    assert bench_train.shapes(a) == [(64, 4), (128, 2)] and a.layouts == ["rows"]
    assert bench_train.shapes(parse("--seq-len", "512", "--tokens-per-step", "1024")) == [(512, 2)]
    assert bench_train.shapes(parse("--seq-len", "512", "--micro-batch", "3")) == [(512, 3)]
    for extra, message in [
        (["--seq-lens", "64", "96", "--tokens-per-step", "256"], "not a positive multiple of sequence length 96"),
        (["--seq-lens", "512", "--tokens-per-step", "256"], "not a positive multiple of sequence length 512"),
        (["--seq-lens", "64"], "--seq-lens needs --tokens-per-step"),
        (["--seq-lens", "64", "--tokens-per-step", "0"], "not a positive multiple of sequence length 64"),
        (["--seq-lens", "64", "--tokens-per-step", "256", "--micro-batch", "2"], "drop --micro-batch"),
    ]:
        with pytest.raises(SystemExit):
            parse(*extra)
        assert message in capsys.readouterr().err


def test_out_of_memory_is_found_before_torchrun_s_own_report():
    proc = subprocess.CompletedProcess([], 1, "", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried "
                                       "to allocate 2.00 GiB\n" + "E torchrun: ChildFailedError\n" * 200)
    assert bench_train.failure(proc).startswith("out of memory: exit 1: ")
    assert not bench_train.failure(subprocess.CompletedProcess([], 1, "", "ValueError: bad")).startswith("out of memory")
    # a failed cell names the worker's exception, not torchrun's report after it
    error = ("exit 1: Error executing job with overrides: [...]\nTraceback (most recent call last):\n  ...\n"
             "RuntimeError: Mamba2 would run the chunked PyTorch SSD on CUDA\n  ...\n"
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\n")
    assert bench_train.exception_line(error) == "RuntimeError: Mamba2 would run the chunked PyTorch SSD on CUDA"
    # ... also when torchrun's report is longer than the tail a row keeps
    worker = "Traceback (most recent call last):\n  ...\nValueError: seq_len 8192 is not a multiple of 3\n"
    proc = subprocess.CompletedProcess([], 1, "", worker + "E torchrun: ChildFailedError report line\n" * 400)
    row_error = bench_train.failure(proc)
    assert "ValueError: seq_len 8192" not in row_error.split("\n", 1)[1]  # the tail alone would have lost it
    assert bench_train.exception_line(row_error) == "ValueError: seq_len 8192 is not a multiple of 3"
    assert bench_train.exception_line("exit 1: In 'train': Could not find 'model/x'\n") == \
        "exit 1: In 'train': Could not find 'model/x'"
    cell = bench_train._long_context_cell({"error": error})
    assert cell == "failed: RuntimeError: Mamba2 would run the chunked PyTorch SSD on CUDA"


def test_long_context_kernel_guards(tmp_path, monkeypatch):
    import torch

    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for
    from pararnn_lm.models.mixers import Mamba2Mixer

    cuda = torch.backends.cuda
    setters = {"flash": cuda.enable_flash_sdp, "mem_efficient": cuda.enable_mem_efficient_sdp,
               "math": cuda.enable_math_sdp}
    before = {kind: getattr(cuda, f"{kind}_sdp_enabled")() for kind in setters}
    try:
        bench_train.sdpa_flash_only()
        assert cuda.flash_sdp_enabled() and not cuda.mem_efficient_sdp_enabled() and not cuda.math_sdp_enabled()
    finally:
        for kind, on in before.items():
            setters[kind](on)
    # no Triton SSD kernel serves a CUDA device here: building a Mamba2 layer is refused, naming the fix
    monkeypatch.setattr(Mamba2Mixer, "__init__", Mamba2Mixer.__init__)  # restored after the test
    bench_train.require_ssd_kernel(tmp_path / "ssd_backend.json")
    with pytest.raises(RuntimeError, match="chunked PyTorch SSD on CUDA"):
        ParaRNNLMForCausalLM(config_for("mamba2", "debug"))
    ParaRNNLMForCausalLM(config_for("paragru", "debug"))  # other architectures are untouched


def test_a_timeout_kills_the_launcher_and_its_workers(tmp_path):
    pid_file = tmp_path / "worker.pid"
    # a "launcher" that starts a long-lived worker and waits, as torchrun does
    code = ("import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        bench_train.run_group([sys.executable, "-c", code], dict(os.environ), timeout=3)
    assert time.monotonic() - started < 30  # a surviving worker would hold the pipes open for its 60 s
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.5)
    # gone, or a zombie waiting for a reaper (the container's init may not reap orphans at once)
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_timed_out_run_keeps_the_steps_it_logged(tmp_path, monkeypatch):
    a = args(tmp_path, "--steps", "20", "--log-every", "5", "--timeout", "1")
    config = bench_train.Config(bench_train.this_checkout(), "paragru", "packed", 1, 2, 256)
    run_dir = a.work_dir / config.name

    def slow_run(cmd, env, timeout, cwd):  # logs two intervals, then hangs past the limit
        lines = [{"step": s, "loss": 5.0, "tokens_per_s": 50.0 * s, "step_time_s": 1.0 / s} for s in (5, 10)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(bench_train, "run_group", slow_run)
    row = bench_train.measure(config, a)
    assert row["timed_out"] and "error" not in row and row["tokens_per_s"] == 500.0 and row["log_steps"] == [10]

    def silent_run(cmd, env, timeout, cwd):  # nothing logged before the limit
        raise subprocess.TimeoutExpired(cmd, timeout)

    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens_per_s": 1.0, "step_time_s": 1.0}) + "\n")
    monkeypatch.setattr(bench_train, "run_group", silent_run)
    row = bench_train.measure(config, a)  # the stale file of the previous run is not read
    assert row["error"] == "timed out after 1 s" and "tokens_per_s" not in row


# --- real runs of train.py ---------------------------------------------------------------------------------


def test_packed_and_rows_layouts(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench_train.main([*TINY, "--archs", "paragru", "--layouts", "packed", "rows",
                             "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert [(r["arch"], r["layout"]) for r in rows] == [("paragru", "packed"), ("paragru", "rows")]
    assert json.loads(out.read_text()) == rows
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["log_steps"] == [4]
        # tokens/s is tokens per step (micro-batch 2 x 256) over the step time of the steps after the warm-up
        assert math.isclose(r["tokens_per_s"] * r["step_ms"] / 1e3, 2 * 256, rel_tol=1e-9)
        records = [json.loads(line) for line in (tmp_path / "work" / f"this-paragru-{r['layout']}-T256-1gpu-mb2" /
                                                  "metrics.jsonl").read_text().splitlines()]
        assert math.isclose(r["step_ms"], 1e3 * records[-1]["step_time_s"])  # one timed interval: its step time
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert r["package_dir"] == str(ROOT / "pararnn_lm") and r["device"] == "cpu"
    # same batches, same seed: the packed run resets states at document starts, the rows run does not
    assert rows[0]["losses"] != rows[1]["losses"]
    table = bench_train.render(rows)
    assert "| this | paragru | debug | packed | 256 | none | 1 | 2 | eager |" in table and "| rows |" in table


def test_long_context_sweep_of_every_architecture(tmp_path):
    out = tmp_path / "long.json"
    rows = bench_train.main(["--size", "debug", "--archs", "paragru", "paralstm", "attention", "mamba2",
                             "--seq-lens", "64", "128", "--tokens-per-step", "256", "--steps", "3", "--log-every", "1",
                             "--no-compile", "--precision", "fp32", "--vocab-size", "0", "--timeout", "600",
                             "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    archs = ["paragru", "paralstm", "attention", "mamba2"]
    assert [(r["arch"], r["seq_len"], r["micro_batch"]) for r in rows] == \
        [(arch, t, 256 // t) for t in (64, 128) for arch in archs]
    assert json.loads(out.read_text()) == rows
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["layout"] == "rows" and r["long_context"] and r["tokens_per_step_per_gpu"] == 256
        # tokens/s is the 256 tokens of a step over the step time of steps 2-3
        assert math.isclose(r["tokens_per_s"] * r["step_ms"] / 1e3, 256, rel_tol=1e-9) and r["log_steps"] == [2, 3]
        config = (tmp_path / "work" / f"this-{r['arch']}-rows-T{r['seq_len']}-1gpu-mb{r['micro_batch']}" /
                  "config.yaml").read_text()
        assert f"seq_len: {r['seq_len']}" in config and f"micro_batch_size: {r['micro_batch']}" in config
    table = bench_train.render_long_context(rows)
    assert "| T=64 (mb 4) | T=128 (mb 2) |" in table
    for arch in archs:
        by_t = {r["seq_len"]: r for r in rows if r["arch"] == arch}
        assert f"| this | {arch} | debug | rows | 1 | eager | {by_t[64]['tokens_per_s']:,.0f} | " \
               f"{by_t[128]['tokens_per_s']:,.0f} |" in table
    assert out.with_suffix(".png").stat().st_size > 1000


def test_a_failed_configuration_is_reported_and_the_others_run(tmp_path):
    rows = bench_train.main([*TINY, "--archs", "no_such_arch", "--steps", "4", "--work-dir", str(tmp_path),
                             "--out", str(tmp_path / "out.json")])
    assert len(rows) == 1 and "error" in rows[0] and "no_such_arch" in rows[0]["error"]
    assert "failed:" in bench_train.render(rows)


def test_weak_scaling_on_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    rows = bench_train.main([*TINY, "--archs", "paragru", "--gpus", "1", "2", "--seq-len", "64",
                             "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert [(r["arch"], r["gpus"]) for r in rows] == [("paragru", 1), ("paragru", 2)]
    assert json.loads(out.read_text()) == rows
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert math.isclose(r["ms_per_sequence_per_gpu"], r["step_ms"] / 2)
    # weak scaling: each rank keeps its micro-batch, the global batch grows with the ranks
    config = (tmp_path / "work" / "this-paragru-packed-T64-2gpu-mb2" / "config.yaml").read_text()
    assert "global_batch_size: 4" in config and "micro_batch_size: 2" in config
    assert math.isclose(rows[1]["tokens_per_s"] * rows[1]["step_ms"] / 1e3, 2 * 2 * 64, rel_tol=1e-9)
    assert math.isclose(rows[1]["scaling_efficiency"], rows[1]["tokens_per_s"] / (2 * rows[0]["tokens_per_s"]))
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| this | paragru | debug | packed | 64 | none | 2 | 2 | eager |" in bench_train.render(rows)


def test_check_resume_reproduces_the_uninterrupted_losses(tmp_path):
    rows = bench_train.main([*TINY, "--archs", "paragru", "--seq-len", "64", "--steps", "8", "--log-every", "1",
                             "--check-resume", "--checkpoint-every", "4", "--kill-after", "6",
                             "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out.json")])
    (row,) = rows
    assert "error" not in row, row.get("error")
    resume = row["resume"]
    assert "error" not in resume, resume.get("error")
    assert resume["resumed_from"] == 4 and resume["compared_steps"] == [5, 6, 7, 8]
    assert resume["max_abs_loss_diff"] <= 1e-6 * max(abs(x) for x in row["losses"])
    # the killed run's last checkpoint was step 4; the resumed run went on from there to the end
    resumed = tmp_path / "work" / "this-paragru-packed-T64-1gpu-mb2-resumed"
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, 4]  # each process's start
    assert "resume max abs dloss" in bench_train.render(rows)


def test_base_revision_runs_in_its_own_worktree(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    rows = bench_train.main([*TINY, "--archs", "paragru", "--seq-len", "64", "--base", "HEAD",
                             "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out.json")])
    assert [(r["revision"], r["arch"]) for r in rows] == [("this", "paragru"), ("HEAD", "paragru")]
    this, base = rows
    assert "error" not in this and "error" not in base, (this.get("error"), base.get("error"))
    assert base["commit"] == head and this["commit"].startswith(head)
    # each ran its own code: the base run imported pararnn_lm from the temporary worktree
    assert this["package_dir"] == str(ROOT / "pararnn_lm")
    worktree = Path(base["package_dir"]).parent
    assert worktree != ROOT and worktree.name == head
    assert not worktree.exists()  # removed afterwards
    assert str(worktree) not in subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                                               text=True).stdout
    table = bench_train.render_versus(rows, "HEAD")
    ratio = this["tokens_per_s"] / base["tokens_per_s"]
    assert f"| paragru | packed | 1 | 2 | {this['tokens_per_s']:,.0f} | {base['tokens_per_s']:,.0f} | {ratio:.3f}x |" in table


def test_base_revision_must_have_the_package_layout(tmp_path):
    root = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()[0]
    with pytest.raises(SystemExit, match="pararnn_lm package layout"):
        bench_train.main([*TINY, "--base", root, "--work-dir", str(tmp_path), "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit, match="not a revision"):
        bench_train.main([*TINY, "--base", "no-such-revision", "--work-dir", str(tmp_path),
                          "--out", str(tmp_path / "o.json")])
