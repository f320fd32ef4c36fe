"""scripts/kernel_resources.py: compiling a kernel for sm_90 without a GPU reports its real register use.

Runs in a subprocess without TRITON_INTERPRET (conftest sets it on CPU machines, and interpreted kernels
cannot be compiled)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from repo_scripts import LOAD_SCRIPT_SOURCE

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "cuobjdump").exists() or not (TOOLS / "ptxas").exists(),
                                reason="this Triton has no bundled CUDA tools")

PROBE = LOAD_SCRIPT_SOURCE + r"""
import json, sys
exec(LOAD_SCRIPT_SOURCE)
kr = load_script("scripts/kernel_resources.py")
from pararnn_lm.kernels import conv
types = dict(X="*bf16", W="*fp32", BIAS="*fp32", POS="*i64", Y="*bf16")
out = {}
for name, bt in (("small", 8), ("big", 32)):
    u = kr.compile_usage(kr.KernelConfig(name, conv._conv_fwd_kernel, dict(K=4, BT=bt, BC=128, SILU=True), 4, types))
    out[name] = [u.registers, u.stack_bytes, u.programs_per_sm(4)]
try:
    kr.compile_usage(kr.KernelConfig("bad", conv._conv_fwd_kernel, dict(K=4, BT=8, BC=128, NOPE=1), 4, types))
except ValueError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_registers_grow_with_the_elements_each_thread_holds():
    got = json.loads(_run(PROBE).strip().splitlines()[-1])
    (small_regs, small_stack, small_fit), (big_regs, _, big_fit) = got["small"], got["big"]
    assert 16 <= small_regs < big_regs <= 255
    assert small_stack == 0
    assert small_fit > big_fit >= 1
    assert "no such kernel arguments ['NOPE']" in got["error"]


def test_command_prints_a_row_per_kernel():
    out = _run("import runpy, sys; sys.argv = ['kernel_resources.py', '--only', 'conv']; "
               "runpy.run_path('scripts/kernel_resources.py', run_name='__main__')")
    rows = [line for line in out.splitlines() if line.startswith("| conv")]
    assert len(rows) == 6
    for row in rows:
        regs = int(row.split("|")[3])
        assert 16 <= regs <= 255


DEFAULTS_PROBE = LOAD_SCRIPT_SOURCE + r"""
import json, sys
exec(LOAD_SCRIPT_SOURCE)
kr = load_script("scripts/kernel_resources.py")
from pararnn_lm.kernels import shooting
types = {p: "*fp32" for p in ("U", "P", "H0", "H", "START", "END", "PROD", "RES")}
types.update(U="*bf16", SMAP="*i32", CNT="*i32", PENDING="*i32", ITERS="*i32", tol="fp32", damping="fp32", tail_eps="fp32")
cfg = dict(LSTM=True, FIRST=False, WRITE=True, COARSE=True, BD=256, NB=4, DOCS=True)
regs = [kr.compile_usage(kr.KernelConfig("fwd", shooting._shoot_fwd_kernel, c, 4, types)).registers
        for c in (cfg, {**cfg, "HAS_BIAS": False})]
print(json.dumps(regs))
"""


def test_left_out_constexprs_compile_with_their_defaults():
    """A config that leaves out a defaulted constexpr (the shooting kernels' HAS_BIAS) compiles the kernel a
    launch would run, not one taking it as a runtime argument (which held 121 registers instead of 126)."""
    omitted, explicit = json.loads(_run(DEFAULTS_PROBE).strip().splitlines()[-1])
    assert omitted == explicit
