"""scripts/bench_kernels.py on the CPU: every subcommand at tiny sizes (Triton's interpreter for the fused
kernels), the correctness gate before timing, and --base against a real git worktree."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from repo_scripts import LOAD_SCRIPT_SOURCE, load_script

REPO = Path(__file__).resolve().parents[2]
TIMING = ["--reps", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def bk():
    return load_script("scripts/bench_kernels.py")


def _run(bk, tmp_path, *argv):
    out = tmp_path / "bench.json"
    result = bk.main([*argv, *TIMING, "--out", str(out)])
    assert json.loads(out.read_text())["subcommand"] == result["subcommand"]
    return result


# ----------------------------------------------------------------------------- cells, sweep
def test_cells_check_then_time_the_fused_kernels(bk, tmp_path):
    result = _run(bk, tmp_path, "cells", "--shape", "1,12,16,2", "--dtypes", "fp32,bf16", "--check-steps", "8",
                  "--device", "cpu")
    rows = {(r["cell"], r["dtype"]): r for r in result["rows"]}
    assert set(rows) == {(c, d) for c in ("gru", "lstm") for d in ("fp32", "bf16")}
    for r in rows.values():
        assert r["correct"] and r["mode"] == "fused" and r["check_steps"] == 8
        assert r["y_rel"] < (1e-6 if r["dtype"] == "fp32" else 4e-3) and r["du_rel"] < 1e-2
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["module_fwdbwd_ms"] > 0
        assert "fwd_gpu_ms" not in r  # CUDA graphs only on the GPU
    assert result["meta"]["package"] == str(REPO / "pararnn_lm" / "__init__.py")


def test_the_correctness_gate_catches_a_wrong_mode(bk, tmp_path):
    """A mode 1% off the recurrence is reported wrong against the fp64 loop and is not timed."""
    from pararnn_lm.kernels import MODES, register_mode
    from pararnn_lm.kernels.sequential import sequential_mode

    register_mode("off_by_one_percent", lambda *args: sequential_mode(*args) * 1.01)
    try:
        result = _run(bk, tmp_path, "cells", "--cells", "gru", "--shape", "2,9,4,2", "--dtypes", "fp32",
                      "--modes", "sequential,off_by_one_percent", "--no-module", "--device", "cpu")
    finally:
        MODES.pop("off_by_one_percent")
    good, bad = result["rows"]
    assert good["correct"] and good["y_rel"] < 1e-6 and good["fwd_ms"] > 0
    assert not bad["correct"] and 5e-3 < bad["y_rel"] < 2e-2 and "fwd_ms" not in bad


def test_sweep_runs_each_shooting_setting_and_restores_the_plan(bk, tmp_path):
    from pararnn_lm.kernels import shooting

    result = _run(bk, tmp_path, "sweep", "--cells", "lstm", "--shape", "2,40,16", "--dtype", "fp32",
                  "--config", "", "--config", "segments=4,BD=16", "--config", "segments=1,NB=2", "--check-steps", "40",
                  "--device", "cpu")
    assert [r["config"] for r in result["rows"]] == ["shipped", "segments=4,BD=16", "segments=1,NB=2"]
    for r in result["rows"]:
        assert r["correct"] and r["fwd_ms"] > 0 and "error" not in r
    assert result["rows"][2]["iters"] == 0  # one segment: the exact walk, no Newton iteration
    assert shooting.TUNING == {}


def test_parse_tuning(bk):
    assert bk.parse_tuning("segments=8, tail_eps=1e-6,NB=4") == {"segments": 8, "tail_eps": 1e-6, "NB": 4}
    assert bk.parse_tuning("") == {}
    with pytest.raises(Exception, match="KEY=VALUE"):
        bk.parse_tuning("segments")


# ----------------------------------------------------------------------------- layers, decode
def test_layers_smoke(bk, tmp_path):
    result = _run(bk, tmp_path, "layers", "--smoke")
    layers = {r["layer"]: r for r in result["rows"]}
    assert set(layers) == {"paragru", "paralstm", "mamba2", "mamba2_ref"}
    for name in ("paragru", "paralstm", "mamba2"):
        r = layers[name]
        assert "error" not in r and r["correct"] and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
    for name in ("paragru", "paralstm"):  # the mixer against itself with its cells in the loop over time
        assert layers[name]["vs_sequential_rel"] < 1e-4  # Newton tol 1e-5 in fp32
    ref = layers["mamba2_ref"]
    assert "fwdbwd_ms" in ref or "skipped" in ref


def test_layer_selection(bk):
    assert bk.layer_rows(["paragru", "paragru_compiled", "mamba2_ref_compiled"], False) == ["paragru"]
    picked = bk.layer_rows(["paragru_compiled", "mamba2_ref", "mamba2_ref_compiled"], True)
    assert picked == ["paragru_compiled", "mamba2_ref", "mamba2_ref_compiled"]
    with pytest.raises(SystemExit):
        bk.build_parser().parse_args(["layers", "--layers", "paragru,mamba3"])


def test_reference_mamba2_import_survives_a_missing_cuda_extension(bk, tmp_path, monkeypatch):
    """mamba-ssm built without CUDA (MAMBA_SKIP_CUDA_BUILD) imports Mamba-1's selective_scan_cuda in its
    __init__: the loader stands in for it, and anything that touches the stand-in still fails clearly."""
    pkg = tmp_path / "mamba_ssm"
    (pkg / "modules").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import selective_scan_cuda\nfrom mamba_ssm.modules.mamba2 import Mamba2\n")
    (pkg / "modules" / "__init__.py").write_text("")
    (pkg / "modules" / "mamba2.py").write_text("class Mamba2:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] in ("mamba_ssm", "selective_scan_cuda")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        cls = bk.import_reference_mamba2()
        assert cls.__name__ == "Mamba2" and cls.__module__ == "mamba_ssm.modules.mamba2"
        import selective_scan_cuda

        with pytest.raises(AttributeError, match="without its CUDA extensions"):
            selective_scan_cuda.fwd
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in ("mamba_ssm", "selective_scan_cuda")]:
            del sys.modules[name]


def test_decode_smoke(bk, tmp_path):
    """Every arch x batch x prompt length x variant (CPU: generate, generate_static, the eager StaticDecoder),
    each checked against generate()'s greedy tokens before it is timed; the divergence check reports none."""
    result = _run(bk, tmp_path, "decode", "--smoke", "--batch-sizes", "1,2", "--prompt-lens", "6",
                  "--check-divergence")
    rows = {(r["arch"], r["batch"], r["prompt"], r["variant"]): r for r in result["rows"]}
    variants = ("generate", "generate_static", "static_eager")
    assert set(rows) == {(a, b, 6, v) for a in bk.DECODE_ARCHS for b in (1, 2) for v in variants}
    for (arch, batch, _, variant), r in rows.items():
        assert "error" not in r, r
        assert r["correct"] is True and r["decode_tok_s"] > 0 and r["end_to_end_tok_s"] > 0 and r["ms_per_step"] > 0
        assert r["peak_GiB"] is None  # CUDA only
        if variant != "generate":
            assert r["tokens_match_generate"] is True
    assert [d["arch"] for d in result["divergence"]] == bk.DECODE_ARCHS
    assert all(d["first_mismatch"] is None and d["verdict"] == "same tokens" for d in result["divergence"])
    assert "batch" in bk.KEYS["decode"] and "prompt" in bk.KEYS["decode"]


def test_check_divergence_reports_the_first_differing_token_with_the_margins(bk):
    """A decoder on slightly perturbed head weights parts from generate(): the report's step, tokens,
    margins and logit difference equal those of independent full forwards of the two models."""
    import copy

    from pararnn_lm.models import ParaRNNLMForCausalLM, StaticDecoder, config_for

    torch.manual_seed(0)
    model = ParaRNNLMForCausalLM(config_for("paragru", "debug", rnn_mode="sequential")).eval()
    other = copy.deepcopy(model)
    with torch.no_grad():
        noise = torch.randn(other.lm_head.weight.shape, generator=torch.Generator().manual_seed(1))
        other.lm_head.weight.add_(0.02 * other.lm_head.weight.std() * noise)
    prompt = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    report = bk.check_divergence(model, StaticDecoder(other, batch_size=1, max_length=64), prompt, 16)
    i = report["first_mismatch"]
    assert i is not None
    with torch.no_grad():
        ref = model.generate(prompt, **bk.greedy_kwargs(16))
        prefix = ref[:, : 6 + i]
        la, lb = model(prefix, use_cache=False).logits[0, -1], other(prefix, use_cache=False).logits[0, -1]
    a, b = int(la.argmax()), int(lb.argmax())
    assert (report["ref_token"], report["other_token"]) == (a, b) and a != b and a == int(ref[0, 6 + i])
    assert report["ref_margin"] == pytest.approx(float(la[a] - la[b]), abs=1e-4)
    assert report["other_margin"] == pytest.approx(float(lb[b] - lb[a]), abs=1e-4)
    assert report["max_abs_logit_diff"] == pytest.approx(float((la - lb).abs().max()), abs=1e-4)
    assert report["ref_top2_margin"] == pytest.approx(report["ref_margin"], abs=1e-4)  # b is its runner-up


def test_divergence_verdict_separates_a_near_tie_from_a_real_difference(bk):
    tokens, other_tokens = torch.tensor([3, 1, 2]), torch.tensor([3, 1, 4])
    ref = torch.zeros(3, 5)
    ref[0, 3] = ref[1, 1] = ref[2, 2] = 5.0
    drift = ref + 0.01 * torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0])  # the two paths drift apart by 0.01
    tied_ref, tied_other = ref.clone(), drift.clone()
    tied_ref[2, 4], tied_other[2, 4] = 4.995, 5.012  # step 2: token 4 within the drift of token 2 in both paths
    report = bk.divergence_at(tokens, tied_ref, other_tokens, tied_other)
    assert report["first_mismatch"] == 2 and report["verdict"].startswith("numerics")
    assert report["max_abs_logit_diff_before"] == pytest.approx(0.01, abs=1e-6)
    assert report["ref_margin"] == pytest.approx(0.005, abs=1e-6)
    assert report["other_margin"] == pytest.approx(0.007, abs=1e-6)
    real = drift.clone()
    real[2, 4] = 8.0  # the reference prefers token 2 by 5 logits where the paths otherwise agree to 0.01
    report = bk.divergence_at(tokens, ref, other_tokens, real)
    assert report["verdict"].startswith("bug") and report["ref_margin"] == pytest.approx(5.0)


# ----------------------------------------------------------------------------- engine-cpu, --base
def test_engine_cpu(bk, tmp_path):
    result = _run(bk, tmp_path, "engine-cpu", "--batch", "2", "--length", "24", "--dim", "8", "--heads", "2")
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["sequential"]["fwd_ms"] > 0 and rows["newton_torch"]["fwdbwd_ms"] > 0
    assert rows["newton_torch, default_init"]["converged"] and result["max_abs_diff"] < 1e-4


def test_base_runs_the_same_benchmark_on_a_worktree_of_the_revision(bk, tmp_path):
    result = _run(bk, tmp_path, "engine-cpu", "--batch", "1", "--length", "12", "--dim", "8", "--heads", "2",
                  "--base", "HEAD")
    assert result["base_rev"] == "HEAD" and result["base_commit"] == bk.git("rev-parse", "--short", "HEAD")
    this, base = result["this"], result["base"]
    assert Path(this["meta"]["package"]).parent == REPO / "pararnn_lm"
    worktree = Path(base["meta"]["package"]).parents[1]
    assert worktree != REPO and not worktree.exists()  # a temporary worktree, removed afterwards
    assert str(worktree) not in bk.git("worktree", "list")
    compared = {(c["mode"], c["quantity"]): c for c in result["comparison"]}
    for key in (("sequential", "fwd_ms"), ("newton_torch", "fwdbwd_ms"), ("newton_torch, default_init", "iterations")):
        c = compared[key]
        assert c["this"] > 0 and c["base"] > 0 and math.isfinite(c["ratio"]) and c["ratio"] > 0
    assert compared["newton_torch, default_init", "iterations"]["ratio"] == 1.0  # same code, same count


def test_base_refuses_a_revision_without_the_package(bk, tmp_path):
    root = bk.git("rev-list", "--max-parents=0", "HEAD").split()[0]
    if subprocess.run(["git", "cat-file", "-e", f"{root}:pararnn_lm/__init__.py"], cwd=REPO).returncode == 0:
        pytest.skip("this repository's first commit already has the package")
    with pytest.raises(SystemExit, match="016a20d or later"):
        bk.main(["engine-cpu", "--base", root, "--out", str(tmp_path / "x.json")])


def test_side_by_side_and_default_out(bk):
    this = {"rows": [{"cell": "paragru", "mode": "fused", "fwd_ms": 2.0, "y_max_abs": 1e-7, "correct": True}]}
    base = {"rows": [{"cell": "paragru", "mode": "fused", "fwd_ms": 4.0}]}
    text, pairs = bk.side_by_side("engine-cpu", this, base, "abc")
    assert pairs == [{"cell": "paragru", "mode": "fused", "quantity": "fwd_ms", "this": 2.0, "base": 4.0, "ratio": 0.5}]
    assert "this / abc" in text and "0.5" in text
    out = bk.default_out("cells")
    assert out.parent == REPO / "runs" / "bench"
    assert subprocess.run(["git", "check-ignore", "-q", str(out)], cwd=REPO).returncode == 0


# ----------------------------------------------------------------------------- resources (compiles for sm_90)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
needs_tools = pytest.mark.skipif(not (TOOLS / "cuobjdump").exists() or not (TOOLS / "ptxas").exists(),
                                 reason="this Triton has no bundled CUDA tools")

RESOURCES_PROBE = LOAD_SCRIPT_SOURCE + r"""
import json
bk = load_script("scripts/bench_kernels.py")
from pararnn_lm.kernels import conv, shooting
types = dict(X="*bf16", W="*fp32", BIAS="*fp32", POS="*i64", Y="*bf16")
out = {}
for name, bt in (("small", 8), ("big", 32)):
    regs, stack = bk.compile_usage(conv._conv_fwd_kernel, dict(K=4, BT=bt, BC=128, SILU=True), 4, types)
    out[name] = [regs, stack, bk.programs_per_sm(regs, 4)]
try:
    bk.compile_usage(conv._conv_fwd_kernel, dict(K=4, BT=8, BC=128, NOPE=1), 4, types)
except ValueError as err:
    out["error"] = str(err)
types = {p: "*fp32" for p in ("U", "P", "H0", "H", "START", "END", "PROD", "RES")}
types.update(U="*bf16", SMAP="*i32", CNT="*i32", PENDING="*i32", ITERS="*i32", tol="fp32", damping="fp32", tail_eps="fp32")
cfg = dict(LSTM=True, FIRST=False, WRITE=True, COARSE=True, BD=256, NB=4, DOCS=True)
out["defaults"] = [bk.compile_usage(shooting._shoot_fwd_kernel, c, 4, types)[0] for c in (cfg, {**cfg, "HAS_BIAS": False})]
print(json.dumps(out))
"""


def _without_interpreter(args: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels cannot compile
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@needs_tools
def test_registers_grow_with_the_elements_each_thread_holds():
    got = json.loads(_without_interpreter(["-c", RESOURCES_PROBE]).strip().splitlines()[-1])
    (small_regs, small_stack, small_fit), (big_regs, _, big_fit) = got["small"], got["big"]
    assert 16 <= small_regs < big_regs <= 255
    assert small_stack == 0 and small_fit > big_fit >= 1
    assert "no such kernel arguments ['NOPE']" in got["error"]
    # a left-out defaulted constexpr (HAS_BIAS) compiles the kernel a launch runs, not a runtime argument
    omitted, explicit = got["defaults"]
    assert omitted == explicit


@needs_tools
def test_resources_prints_a_row_per_kernel(tmp_path):
    out = tmp_path / "res.json"
    _without_interpreter(["scripts/bench_kernels.py", "resources", "--only", "conv", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"].split(" (")[0] for r in rows] == ["conv fwd", "conv bwd pass 1", "conv bwd pass 2"]
    for r in rows:
        assert 16 <= r["registers"] <= 255 and r["programs_per_sm"] >= 1


def test_mismatch_margins_measure_the_reference_margin_where_each_row_parts(bk):
    """Rows 0 and 2 part from the reference at steps 1 and 0; the evidence is the reference's top-2 margin
    there (0.01 and 0.5: the larger decides), against bf16's rounding at the logits' magnitude (4 * 2^-7)."""
    reference = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6]])
    other = torch.tensor([[1, 0, 0], [1, 2, 3], [0, 5, 6]])
    logits = torch.zeros(3, 3, 8)
    logits[0, 1, 2], logits[0, 1, 0] = 1.0, 0.99  # row 0, step 1: a near-tie
    logits[2, 0, 4], logits[2, 0, 0] = 4.0, 3.5  # row 2, step 0: margin 0.5, |logit| 4
    logits[1, :, 7] = 100.0  # an agreeing row never counts
    out = bk.mismatch_margins(reference, logits, other, torch.bfloat16)
    assert out["mismatch_rows"] == 2
    assert out["max_mismatch_margin"] == pytest.approx(0.5)
    assert out["logit_rounding"] == pytest.approx(4 * 2**-7)
    assert out["near_tie"] is False  # 0.5 > 2 * 0.03125
    near = bk.mismatch_margins(reference[:1], logits[:1], other[:1], torch.bfloat16)
    assert near["max_mismatch_margin"] == pytest.approx(0.01, abs=1e-6) and near["near_tie"] is True
