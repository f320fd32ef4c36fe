"""Registers and spills of the project's Triton kernels on a GPU architecture, without a GPU.

Compiles each kernel configuration for the target (default sm_90, Hopper) with the local Triton and the
ptxas / cuobjdump it bundles, and prints a table: registers per thread, spill stack bytes, and how many
programs of that size fit an SM by registers alone. A lead for tuning, not a verdict: the causal conv's
tiles holding 32 elements per thread compile to ~255 registers with stack spills, 8 elements to 47-141
without (session 11), yet on an H200 the 32-element tiles were the fastest (session 12,
`kernels/NOTES-perf.md`). Numbers are the local Triton's; the GPU machine's version may allocate
differently, so confirm timings there.

    python scripts/kernel_resources.py                      # the built-in set (conv, shooting fwd/bwd)
    python scripts/kernel_resources.py --only conv --arch 90
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences triton >= 3.9's notice

import triton  # noqa: E402

REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048


@dataclass
class KernelConfig:
    label: str
    kernel: object  # a @triton.jit function
    constexprs: dict
    num_warps: int
    types: dict = field(default_factory=dict)  # argument -> Triton type; others "i32"
    maxnreg: int | None = None


@dataclass
class Usage:
    registers: int
    stack_bytes: int

    def programs_per_sm(self, num_warps: int) -> int:
        threads = 32 * num_warps
        by_regs = REGS_PER_SM // max(self.registers * threads, 1)
        return min(by_regs, MAX_THREADS_PER_SM // threads)


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this Triton has no bundled CUDA tools")
    return str(path)


def compile_usage(cfg: KernelConfig, arch: int = 90) -> Usage:
    """Compile ``cfg`` for sm_<arch> and read its resource usage from the cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(cfg.kernel.fn).parameters)
    unknown = set(cfg.constexprs) - set(params)
    if unknown:
        raise ValueError(f"{cfg.label}: no such kernel arguments {sorted(unknown)}")
    # constexpr parameters the config leaves out take their defaults, as a launch would (not i32 arguments:
    # that would compile their branches as runtime code)
    given = {p.name: p.default for p in cfg.kernel.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    given.update(cfg.constexprs)
    signature = {p: "constexpr" if p in given else cfg.types.get(p, "i32") for p in params}
    constexprs = {(params.index(k),): v for k, v in given.items()}
    options = {"num_warps": cfg.num_warps}
    if cfg.maxnreg:
        options["maxnreg"] = cfg.maxnreg
    compiled = triton.compile(ASTSource(cfg.kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
    if m is None:
        raise RuntimeError(f"{cfg.label}: no resource usage in cuobjdump's output:\n{out}")
    return Usage(int(m.group(1)), int(m.group(2)))


def builtin_configs() -> dict[str, list[KernelConfig]]:
    from pararnn_lm.kernels import conv, shooting

    conv_types = dict(X="*bf16", W="*fp32", BIAS="*fp32", POS="*i64", DY="*bf16", G="*bf16", DWP="*fp32",
                      DBP="*fp32", Y="*bf16", DX="*bf16")
    groups: dict[str, list[KernelConfig]] = {"conv": []}
    for name, tile in (("fwd", conv._FWD_TILE), ("fwd 8/thread", (8, 128, 4))):
        bt, bc, w = tile
        groups["conv"].append(KernelConfig(f"conv {name} {tile}", conv._conv_fwd_kernel,
                                           dict(K=4, BT=bt, BC=bc, SILU=True), w, conv_types))
    for name, tile in (("bwd pass 1", conv._BWD_G_TILE), ("bwd pass 1 8/thread", (8, 128, 4, 16))):
        bt, bc, w, tb = tile
        groups["conv"].append(KernelConfig(f"conv {name} {tile}", conv._conv_bwd_g_kernel,
                                           dict(K=4, KP=4, BT=bt, BC=bc, TB=tb, SILU=True), w, conv_types))
    for name, tile in (("bwd pass 2", conv._BWD_DX_TILE), ("bwd pass 2 8/thread", (8, 128, 4))):
        bt, bc, w = tile
        groups["conv"].append(KernelConfig(f"conv {name} {tile}", conv._conv_bwd_dx_kernel,
                                           dict(K=4, BT=bt, BC=bc), w, conv_types))
    shoot_types = {p: "*fp32" for p in ("U", "P", "H0", "H", "G", "DP", "DH0", "CARRY", "CM", "START", "END",
                                        "PROD", "RES")}
    shoot_types.update(U="*bf16", DU="*bf16", SMAP="*i32", CNT="*i32", PENDING="*i32", ITERS="*i32", tol="fp32",
                       damping="fp32", tail_eps="fp32")
    groups["shooting"] = [
        # (BD, NB) as plan() picks them: several segments 256 / 4 (ParaLSTM backward 128), one segment 128 / 8.
        # ParaGRU as it runs in the layers: with the gates' input bias in the kernels (HAS_BIAS).
        KernelConfig("ParaGRU fwd, segments", shooting._shoot_fwd_kernel,
                     dict(LSTM=False, FIRST=False, WRITE=True, COARSE=True, BD=256, NB=4, DOCS=True, HAS_BIAS=True), 4, shoot_types),
        KernelConfig("ParaLSTM fwd, segments", shooting._shoot_fwd_kernel,
                     dict(LSTM=True, FIRST=False, WRITE=True, COARSE=True, BD=256, NB=4, DOCS=True), 4, shoot_types),
        KernelConfig("ParaGRU bwd pass A, segments", shooting._shoot_bwd_kernel,
                     dict(LSTM=False, PASS_A=True, BD=256, NB=4, DOCS=True, HAS_BIAS=True), 4, shoot_types),
        KernelConfig("ParaGRU bwd pass B, segments", shooting._shoot_bwd_kernel,
                     dict(LSTM=False, PASS_A=False, BD=256, NB=4, DOCS=True, HAS_BIAS=True), 4, shoot_types),
        KernelConfig("ParaGRU bwd, one segment, maxnreg 128", shooting._shoot_bwd_kernel,
                     dict(LSTM=False, PASS_A=False, BD=128, NB=8, DOCS=True, HAS_BIAS=True), 4, shoot_types, maxnreg=128),
        KernelConfig("ParaLSTM bwd pass B, segments", shooting._shoot_bwd_kernel,
                     dict(LSTM=True, PASS_A=False, BD=128, NB=4, DOCS=True), 4, shoot_types),
        KernelConfig("ParaLSTM bwd, one segment", shooting._shoot_bwd_kernel,
                     dict(LSTM=True, PASS_A=False, BD=128, NB=8, DOCS=True), 4, shoot_types),
    ]
    return groups


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = Hopper)")
    ap.add_argument("--only", choices=["conv", "shooting"], help="one group of kernels")
    a = ap.parse_args(argv)
    groups = builtin_configs()
    print(f"triton {triton.__version__}, sm_{a.arch}")
    print("| kernel | warps | registers | spill stack bytes | programs per SM (registers) |")
    print("|---|---|---|---|---|")
    for name, configs in groups.items():
        if a.only and name != a.only:
            continue
        for cfg in configs:
            u = compile_usage(cfg, a.arch)
            print(f"| {cfg.label} | {cfg.num_warps} | {u.registers} | {u.stack_bytes} | "
                  f"{u.programs_per_sm(cfg.num_warps)} |")


if __name__ == "__main__":
    main()
