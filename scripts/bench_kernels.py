"""Benchmarks of the parallel-RNN engine, its kernels, the mixer layers built on them and decoding.

    python scripts/bench_kernels.py cells        # fused kernels + cell module (projection + cell + grads)
    python scripts/bench_kernels.py layers       # mixer layers (ours, eager / --compile) vs mamba_ssm's Mamba2
    python scripts/bench_kernels.py decode       # greedy decoding: generate() (default / static) vs StaticDecoder
    python scripts/bench_kernels.py sweep        # the shooting kernels under other launch plans (shooting.TUNING)
    python scripts/bench_kernels.py resources    # registers / spills per kernel for sm_90, no GPU needed
    python scripts/bench_kernels.py engine-cpu   # the reference modes on the CPU: sequential vs newton_torch

Every subcommand checks correctness before it times: the modes against the fp64 ``sequential`` mode
(the loop over time) on the same inputs, compiled layers against eager ones, decoded tokens against
``generate()``'s. Timings are medians of --reps runs after --warmup runs: CUDA events on the GPU (plus the
GPU time of a CUDA-graph replay for the kernels: their time without the host's launch work),
perf_counter on the CPU. A table goes to the log (stdout), JSON to --out (default: runs/bench/, ignored).

--base REV runs the same subcommand with the same options a second time against git revision REV: a
``git worktree`` of REV in a temporary folder (or REV names a folder holding such a tree, for machines
without the repository's .git), the benchmark in a subprocess whose PYTHONPATH puts that tree first, so
``pararnn_lm`` is REV's while this script stays the same. Both runs are subprocesses;
the log then shows one table with this checkout, REV and their ratio. REV must have the ``pararnn_lm``
package layout (commit 016a20d or later).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import contextlib
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("bench_kernels")
REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- what is measured
CELL_SHAPES = [(8, 2048, 1024, 16), (16, 2048, 2048, 32), (2, 16384, 1024, 16), (4, 4096, 4096, 64),
               (32, 2048, 2048, 4), (1, 131072, 1024, 16)]  # B, T, D, heads
T_SWEEP = [512, 1024, 2048, 4096, 8192, 16384, 32768]  # at B x T = 65536, D = 1024, 16 heads, bf16
# The paper's public CUDA implementation (arXiv 2510.21450), cell module fwd / fwd+bwd ms, fp32 inputs (it
# rejects bf16), measured on an H100 outside this repository; the cells table shows our module beside it.
REFERENCE_CELL_MS = {
    ("gru", 8, 2048, 1024, 16): (1.888, 9.347), ("lstm", 8, 2048, 1024, 16): (2.964, 11.823),
    ("gru", 16, 2048, 2048, 32): (6.765, 34.923), ("lstm", 16, 2048, 2048, 32): (10.797, 43.217),
    ("gru", 2, 16384, 1024, 16): (2.866, 17.399), ("lstm", 2, 16384, 1024, 16): (5.741, 22.985),
    ("gru", 4, 4096, 4096, 64): (5.677, 33.828), ("lstm", 4, 4096, 4096, 64): (10.970, 42.846),
    ("gru", 32, 2048, 2048, 4): (19.7, 107.5), ("lstm", 32, 2048, 2048, 4): (27.7, 122.1),
    ("gru", 1, 131072, 1024, 16): (18.9, 95.5), ("lstm", 1, 131072, 1024, 16): (29.4, 116.1),
}
LAYER_SHAPES = [(8, 2048, 1024), (16, 2048, 2048), (2, 16384, 1024)]  # B, T, d_model
# layer rows, in order; "mamba2_ref" is mamba_ssm's Mamba2 module (optional); NAME_compiled with --compile
LAYERS = tuple(f"{n}{c}" for n in ("paragru", "paralstm", "mamba2", "mamba2_ref") for c in ("", "_compiled"))
# mamba_ssm 2.3.2's Mamba2 layer, bf16, fwd / fwd+bwd ms on an H100, measured outside this repository:
# shown when mamba_ssm cannot be imported here.
REFERENCE_MAMBA2_MS = {(8, 2048, 1024): (2.50, 12.56), (16, 2048, 2048): (7.00, 27.67),
                       (2, 16384, 1024): (3.21, 14.67)}
DECODE_ARCHS = ["paragru", "paralstm", "mamba2", "attention"]
# shooting.TUNING settings the sweep tries by default, beside the shipped plan ({}).
SWEEP_CONFIGS = ["", "segments=1", "NB=8,NB_bwd=8", "NB=4,NB_bwd=4", "BD=128", "tail=48", "threads_per_sm=1024"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CELL_NAMES = {"gru": "paragru", "lstm": "paralstm"}
# Relative norm error allowed against the fp64 reference: fp32 inputs (the kernels' fp32 arithmetic is
# ~1e-6 off); 16-bit inputs, whose y and du come back rounded to 16 bits (~1e-3). A 1% error fails both.
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-3, torch.float16: 4e-3}


# ----------------------------------------------------------------------------- timing
class Clock:
    """Medians of synchronised calls: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.cuda = device.type == "cuda"
        self.reps, self.warmup = reps, warmup

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        """ms of one synchronised call."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def median(self, fn, reps: int | None = None) -> float:
        for _ in range(self.warmup):
            fn()
        self.sync()
        return statistics.median(self.once(fn) for _ in range(reps or self.reps))

    def gpu(self, fn) -> float | None:
        """GPU time of ``fn`` alone: captured once in a CUDA graph, median of replays (None off CUDA). The
        eager median includes the host's launch work whenever it outlasts the kernels; this is the time
        the kernels take inside a captured or compiled training step. ``fn`` must not sync the host."""
        if not self.cuda:
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, allocator) off the capture
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = self.median(graph.replay)
        del graph
        return ms


def wall(fn, device: torch.device) -> tuple[float, object]:
    """Seconds of one call, synchronised on both ends, and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_bandwidth(clock: Clock) -> float | None:
    """Read + write GB/s of a 1 GiB device copy: the ceiling the kernels' bandwidth is compared with."""
    if not clock.cuda:
        return None
    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms = clock.median(lambda: y.copy_(x))
    del x, y
    return 2 * (1 << 28) * 4 / ms / 1e6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- cells
def cell_problem(cell: str, B: int, T: int, D: int, dtype, device, seed: int = 0):
    """u (B, T, 3, D) in ``dtype``, p with the paper's small recurrent gains (|a| <= 0.5), h0 (B, K, D)."""
    from pararnn_lm.kernels import ParaGRU, ParaLSTM

    obj = ParaGRU() if cell == "gru" else ParaLSTM()
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(B, T, 3, D, device=device, generator=g).to(dtype)
    p = (torch.randn(obj.num_params, D, device=device, generator=g) * 0.2).clamp(-0.5, 0.5)
    h0 = torch.randn(B, obj.state_size, D, device=device, generator=g) * 0.5
    return obj, u, p, h0


def check_mode(obj, mode: str, u, p, h0, check_steps: int) -> dict:
    """``mode`` at the full shape against the fp64 ``sequential`` mode on the first ``check_steps`` steps
    (the recurrence is causal, so outputs there must agree; the loss weights only those steps, so every
    gradient must agree too, du being zero after them). Same (rounded) inputs for both."""
    from pararnn_lm.kernels import NewtonStats, parallel_rnn

    T = u.shape[1]
    Tc = min(T, check_steps)
    g = torch.Generator(device=u.device).manual_seed(1)
    gy = torch.zeros(u.shape[0], T, u.shape[-1], device=u.device)
    gy[:, :Tc] = torch.randn(u.shape[0], Tc, u.shape[-1], device=u.device, generator=g)
    leaves = [u.clone().requires_grad_(), p.clone().requires_grad_(), h0.clone().requires_grad_()]
    stats = NewtonStats()
    y, _ = parallel_rnn(obj, *leaves, mode=mode, stats=stats)
    grads = torch.autograd.grad((y.float() * gy).sum(), leaves)
    ref = [u[:, :Tc].double().requires_grad_(), p.double().requires_grad_(), h0.double().requires_grad_()]
    y_ref, _ = parallel_rnn(obj, *ref, mode="sequential")
    grads_ref = torch.autograd.grad((y_ref * gy[:, :Tc].double()).sum(), ref)
    du_ref = torch.zeros(u.shape, dtype=torch.float64, device=u.device)
    du_ref[:, :Tc] = grads_ref[0]
    y = y.detach()[:, :Tc]
    out = {"check_steps": Tc, "iters": stats.iterations, "residual": stats.residual,
           "y_max_abs": float((y.double() - y_ref.detach()).abs().max()), "y_rel": rel(y, y_ref.detach()),
           "du_rel": rel(grads[0], du_ref), "dp_rel": rel(grads[1], grads_ref[1]), "dh0_rel": rel(grads[2], grads_ref[2])}
    out["correct"] = max(out["y_rel"], out["du_rel"], out["dp_rel"], out["dh0_rel"]) < CHECK_TOL[u.dtype]
    return out


def cell_timings(obj, mode: str, u, p, h0, clock: Clock) -> dict:
    """Eager fwd and fwd+bwd of ``parallel_rnn``; their GPU time (CUDA graph) for the fused mode."""
    from pararnn_lm.kernels import NewtonConfig, parallel_rnn

    newton = NewtonConfig(validate=False)  # no host sync: the fused mode can be captured
    leaves = [u.clone().requires_grad_(), p.clone().requires_grad_(), h0.clone().requires_grad_()]
    gy = torch.randn(u.shape[0], u.shape[1], u.shape[-1], device=u.device, dtype=u.dtype)

    def fwd():
        with torch.no_grad():
            return parallel_rnn(obj, u, p, h0, mode=mode, newton=newton)

    def fwd_bwd():
        y, _ = parallel_rnn(obj, *leaves, mode=mode, newton=newton)
        return torch.autograd.grad(y, leaves, gy)

    out = {"fwd_ms": clock.median(fwd), "fwdbwd_ms": clock.median(fwd_bwd)}
    out["bwd_ms"] = out["fwdbwd_ms"] - out["fwd_ms"]
    if mode == "fused" and clock.cuda:
        out["fwd_gpu_ms"] = clock.gpu(fwd)
        out["fwdbwd_gpu_ms"] = clock.gpu(fwd_bwd)
        out["bwd_gpu_ms"] = out["fwdbwd_gpu_ms"] - out["fwd_gpu_ms"]
    return out


def module_timings(cell: str, mode: str, B: int, T: int, D: int, H: int, dtype, device, clock: Clock) -> dict:
    """The cell module as the layers run it: per-head input projection + cell + all gradients (x, W, p),
    loss = sum(y^2); eager, and its GPU time for the fused mode."""
    from pararnn_lm.kernels import NewtonConfig, ParaGRULayer, ParaLSTMLayer

    torch.manual_seed(3)
    layer_cls = ParaGRULayer if cell == "gru" else ParaLSTMLayer
    layer = layer_cls(D, H, bias=False, mode=mode).to(device=device, dtype=dtype)
    layer.newton = NewtonConfig(validate=False)
    x = torch.randn(B, T, D, device=device).to(dtype).requires_grad_()
    params = [x, *layer.parameters()]

    def fwd():
        with torch.no_grad():
            return layer(x)

    def fwd_bwd():
        return torch.autograd.grad(layer(x)[0].float().square().sum(), params)

    out = {"module_fwd_ms": clock.median(fwd), "module_fwdbwd_ms": clock.median(fwd_bwd)}
    if mode == "fused" and clock.cuda:
        out["module_fwdbwd_gpu_ms"] = clock.gpu(fwd_bwd)
    return out


def bench_cells(a, device: torch.device, clock: Clock) -> dict:
    copy_gbps = copy_bandwidth(clock)
    if copy_gbps:
        log.info("copy bandwidth (read + write): %.0f GB/s", copy_gbps)
    shapes = [(s, False) for s in a.shapes] + ([((65536 // T, T, 1024, 16), True) for T in T_SWEEP] if a.t_sweep else [])
    rows = []
    for cell in a.cells:
        for (B, T, D, H), in_sweep in shapes:
            for dtype_name in (["bf16"] if in_sweep else a.dtypes):
                dtype = DTYPES[dtype_name]
                for mode in a.modes:
                    row = {"cell": cell, "mode": mode, "dtype": dtype_name, "B": B, "T": T, "D": D, "H": H}
                    obj, u, p, h0 = cell_problem(cell, B, T, D, dtype, device)
                    row.update(check_mode(obj, mode, u, p, h0, a.check_steps))
                    if not row["correct"]:
                        log.error("WRONG RESULT, not timed: %s", row)
                        rows.append(row)
                        continue
                    if not in_sweep:
                        row.update(cell_timings(obj, mode, u, p, h0, clock))
                        if row.get("fwd_gpu_ms") and copy_gbps:
                            K, es = obj.state_size, u.element_size()
                            n = B * T * D
                            fwd_bytes = n * (3 * es + 4 * K)  # read u, write h (fp32 states)
                            bwd_bytes = n * (3 * es + 8 * K + 3 * es)  # read u, h, dh; write du
                            row["fwd_bw_frac"] = fwd_bytes / row["fwd_gpu_ms"] / 1e6 / copy_gbps
                            row["bwd_bw_frac"] = bwd_bytes / row["bwd_gpu_ms"] / 1e6 / copy_gbps
                    del u, p, h0
                    if a.module:
                        row.update(module_timings(cell, mode, B, T, D, H, dtype, device, clock))
                        reference = REFERENCE_CELL_MS.get((cell, B, T, D, H))
                        if reference:
                            row["reference_fwdbwd_ms"] = reference[1]
                            row["vs_reference"] = reference[1] / row["module_fwdbwd_ms"]
                    free_memory()
                    rows.append(row)
                    log.info("[cells] %s", _fmt_row(row, CELL_COLUMNS))
    return {"rows": rows, "copy_GBps": copy_gbps}


CELL_COLUMNS = ["cell", "mode", "dtype", "B", "T", "D", "H", "iters", "y_rel", "du_rel", "fwd_ms", "bwd_ms",
                "fwd_gpu_ms", "bwd_gpu_ms", "fwd_bw_frac", "bwd_bw_frac", "module_fwd_ms", "module_fwdbwd_ms",
                "module_fwdbwd_gpu_ms", "reference_fwdbwd_ms", "vs_reference"]


# ----------------------------------------------------------------------------- layers
def layer_config(a, d: int):
    from pararnn_lm.models import ParaRNNLMConfig

    return ParaRNNLMConfig(
        vocab_size=128, hidden_size=d, num_hidden_layers=1, intermediate_size=0, num_attention_heads=a.rnn_heads,
        mamba_d_state=a.mamba_d_state, mamba_headdim=a.mamba_headdim, mamba_expand=2, rnn_mode="auto",
        mamba_chunk_size=a.mamba_chunk,
    )


def import_reference_mamba2():
    """mamba_ssm's Mamba2 class (optional; import errors reach the caller)."""
    from pararnn_lm.models.ssd import import_mamba_ssm

    return import_mamba_ssm("modules.mamba2").Mamba2


def _with_sequential_cells(module):
    """A copy of ``module`` whose cell layers run the reference loop over time."""
    from pararnn_lm.kernels import ParaRNNLayer

    ref = copy.deepcopy(module)
    for m in ref.modules():
        if isinstance(m, ParaRNNLayer):
            m.mode = "sequential"
    return ref


def check_layer(base: str, mod, call, x, positions, eager_call=None) -> dict:
    """ParaRNN mixers: the mixer with its cells in the fp64 ``sequential`` mode on a prefix of the input
    (fp32 copies, so the comparison sees the engine's error, not bf16 rounding). Compiled rows: the
    compiled call against the eager one at the full shape. Everything: finite output."""
    from pararnn_lm.models.packing import SequenceInfo

    out = {}
    with torch.no_grad():
        y = call(x)
        out["finite"] = bool(torch.isfinite(y).all())
        if eager_call is not None:
            out["vs_eager_rel"] = rel(y, eager_call(x))
        if base in ("paragru", "paralstm"):
            Tc = min(x.shape[1], 128)
            fast = copy.deepcopy(mod).float()
            ref = _with_sequential_cells(fast).double()
            seq = SequenceInfo(positions[:, :Tc])
            out["vs_sequential_rel"] = rel(fast(x[:, :Tc].float(), seq), ref(x[:, :Tc].double(), seq))
    out["correct"] = out["finite"] and out.get("vs_eager_rel", 0.0) < 2e-2 and out.get("vs_sequential_rel", 0.0) < 1e-3
    return out


def measure_layer(a, name: str, B: int, T: int, d: int, device, clock: Clock) -> dict:
    """Correctness, then fwd and fwd+bwd ms (and peak memory on CUDA) of one bf16 mixer layer; ``NAME_compiled``:
    the same mixer under ``torch.compile`` (as ``train.compile`` runs it). Loss-free backward."""
    from pararnn_lm.models import build_mixer
    from pararnn_lm.models.packing import SequenceInfo

    out = {}
    torch.manual_seed(0)
    base, compiled = name.removesuffix("_compiled"), name.endswith("_compiled")
    if compiled:
        # Every shape, width and grad mode recompiles the same forward code; past dynamo's recompile
        # limit (8) it would silently run eager. A fresh cache per measured layer keeps it compiled.
        torch._dynamo.reset()
    positions = torch.arange(T, device=device).expand(B, T)
    if base == "mamba2_ref":  # mamba_ssm's module takes x only
        mod = import_reference_mamba2()(d_model=d, d_state=a.mamba_d_state, headdim=a.mamba_headdim, expand=2,
                                        use_mem_eff_path=False)
        extra = ()
    else:
        mod, extra = build_mixer(base, layer_config(a, d), 0), (SequenceInfo(positions),)
    mod = mod.to(device=device, dtype=torch.bfloat16)
    fn = torch.compile(mod) if compiled else mod

    def call(x):
        return fn(x, *extra)

    out["params"] = sum(p.numel() for p in mod.parameters())
    x = torch.randn(B, T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    out.update(check_layer(base, mod, call, x, positions, (lambda x: mod(x, *extra)) if compiled else None))
    if not out["correct"]:
        return out
    params = list(mod.parameters())
    with torch.no_grad():
        gy = torch.randn_like(call(x))

    def fwd_bwd():
        for p in params:
            p.grad = None
        x.grad = None
        call(x).backward(gy)

    with torch.no_grad():
        out["fwd_ms"] = clock.median(lambda: call(x))
    out["fwdbwd_ms"] = clock.median(fwd_bwd)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if base == "mamba2":
        out["ssd_backend"] = mod.kernel_backend(x)
    return out


def bench_layers(a, device: torch.device, clock: Clock, budget) -> dict:
    notes, rows = [], []
    ref_error = None
    try:
        import_reference_mamba2()
    except Exception as err:  # not installed, or broken against this torch
        ref_error = f"{type(err).__name__}: {err}"[:300]
        notes.append(f"mamba_ssm not importable ({ref_error}); reference Mamba2 rows show the numbers measured "
                     "outside this repository instead")
    for (B, T, d) in a.shapes:
        for name in a.layer_names:
            if budget.over(f"layers {name} {(B, T, d)}"):
                return {"rows": rows, "notes": notes}
            row = {"layer": name, "B": B, "T": T, "d_model": d, "dtype": "bf16"}
            if name.startswith("mamba2_ref"):
                row["outside_fwdbwd_ms"] = REFERENCE_MAMBA2_MS.get((B, T, d), (None, None))[1]
                if ref_error is not None:
                    row["skipped"] = ref_error
                    rows.append(row)
                    continue
            try:
                row.update(measure_layer(a, name, B, T, d, device, clock))
                if not row["correct"]:
                    log.error("WRONG RESULT, not timed: %s", row)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"[:500]
                log.error("layer %s %s: %s", name, (B, T, d), row["error"])
            free_memory()
            rows.append(row)
            log.info("[layers] %s", row)
        # ratios against the reference Mamba2 layer (measured here, else the number measured outside)
        here = {r["layer"]: r for r in rows if (r["B"], r["T"], r["d_model"]) == (B, T, d)}
        ref = here.get("mamba2_ref", {})
        base = ref.get("fwdbwd_ms") or ref.get("outside_fwdbwd_ms")
        ref_compiled = here.get("mamba2_ref_compiled", {}).get("fwdbwd_ms")
        for r in here.values():
            if base and r.get("fwdbwd_ms"):
                r["vs_mamba2_ref"] = r["fwdbwd_ms"] / base
            if ref_compiled and r.get("fwdbwd_ms"):
                r["vs_mamba2_ref_compiled"] = r["fwdbwd_ms"] / ref_compiled
    return {"rows": rows, "notes": notes}


def layer_rows(names: list[str], compile: bool) -> list[str]:
    """The layer rows to run, in the given order: ``NAME_compiled`` rows only with --compile."""
    return [n for n in names if compile or not n.endswith("_compiled")]


LAYER_COLUMNS = ["layer", "B", "T", "d_model", "fwd_ms", "fwdbwd_ms", "peak_GiB", "vs_mamba2_ref",
                 "vs_mamba2_ref_compiled", "outside_fwdbwd_ms", "vs_sequential_rel", "vs_eager_rel"]


# ----------------------------------------------------------------------------- decode
DECODE_VARIANTS = ("generate", "generate_static", "static_eager", "static_graph", "static_graph_compiled")


def decode_model(a, arch: str, device):
    """The preset ``a.size`` of ``arch`` (random weights, seed 0) in bf16 (fp32 with --fp32), eval mode."""
    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for

    cfg = config_for(arch, a.size, rnn_mode="auto")
    torch.manual_seed(0)
    with torch.device(device):
        model = ParaRNNLMForCausalLM(cfg)
    return model.to(torch.float32 if a.fp32 else torch.bfloat16).eval()


def greedy_kwargs(n: int, **extra) -> dict:
    """generate() arguments for exactly ``n`` greedy tokens (no EOS)."""
    return dict(do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=n, max_new_tokens=n, **extra)


def static_decoder(model, variant: str, batch: int, max_length: int, new_tokens: int):
    from pararnn_lm.models import StaticDecoder

    return StaticDecoder(model, batch_size=batch, max_length=max_length, cuda_graph=variant.startswith("static_graph"),
                         compile="block" if variant.endswith("compiled") else False, max_new_tokens=new_tokens)


def uses_static_generate(model) -> bool:
    """Whether this revision's generate(cache_implementation="static") ran on a StaticDecoder (older
    revisions ignore the option and decode through the model's cache)."""
    slot = getattr(model, "static_decoder_slot", None)
    return slot is not None and slot.decoder is not None


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def mismatch_margins(reference: torch.Tensor, reference_logits: torch.Tensor, other: torch.Tensor,
                     dtype: torch.dtype) -> dict:
    """Evidence for tokens that differ from the reference's: for every row (B, k) that parts from it, the
    reference's top-2 logit margin (B, k, V) at the first differing step, where both paths had seen the same
    tokens. ``near_tie``: every such margin is within two rounding steps of the model's ``dtype`` at the
    logits' magnitude - a choice between near-equal logits that rounding can flip - rather than a real difference."""
    differ = reference != other
    rows = differ.any(1).nonzero().flatten()
    first = differ.int().argmax(1)[rows]
    logits = reference_logits[rows, first].double()
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).max().item()
    rounding = torch.finfo(dtype).eps * logits.abs().amax().item()
    return {"mismatch_rows": len(rows), "max_mismatch_margin": margin, "logit_rounding": rounding,
            "near_tie": margin <= 2 * rounding}


def bench_decode_case(a, model, arch: str, batch: int, prompt_len: int, variants: list[str], device,
                      budget) -> list[dict]:
    """One row per variant at one (batch, prompt length). ``generate`` / ``generate_static`` time
    model.generate (decode rate = (n-1) steps / (total - a separate prefill)); the StaticDecoder variants
    (``static_eager``, ``static_graph``: one CUDA graph per token, ``static_graph_compiled``: its block
    step torch.compile'd) time n-1 ``decode_one`` after a prefill directly. tokens/s counts every row.

    Before timing, each variant's first ``--check-steps`` greedy tokens are compared with the model's
    default generate() (the eager cache path): ``correct``. After timing, all n tokens are compared with
    generate()'s where it ran: ``tokens_match_generate`` / ``first_mismatch`` (bf16 may part late, see
    --check-divergence)."""
    cfg = model.config
    n, check = a.new_tokens, min(a.check_steps, a.new_tokens)
    prompt = torch.randint(1, cfg.vocab_size, (batch, prompt_len), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    max_length = prompt_len + n + 8
    common = {"arch": arch, "size": a.size, "batch": batch, "prompt": prompt_len, "new_tokens": n,
              "dtype": "fp32" if a.fp32 else "bf16", "params": sum(p.numel() for p in model.parameters())}
    rows, generated = [], None
    try:
        with torch.no_grad():
            out = model.generate(prompt, **greedy_kwargs(check, output_logits=True, return_dict_in_generate=True))
            reference, reference_logits = out.sequences[:, prompt_len:], torch.stack(out.logits, 1)
    except Exception as err:  # e.g. out of memory at this size: every variant of the case reports it
        error = f"reference generate(): {type(err).__name__}: {err}"[:500]
        log.error("decode %s B=%d T=%d: %s", arch, batch, prompt_len, error)
        return [{**common, "variant": v, "error": error} for v in variants]
    for variant in variants:
        if budget.over(f"decode {arch} B={batch} T={prompt_len} {variant}"):
            break
        row = {**common, "variant": variant}
        dec = None
        free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            # each decoder compiles its own step: without a reset, dynamo's recompile limit would make the
            # later compiled variants of a long table run uncompiled
            torch._dynamo.reset()
        try:
            with torch.no_grad():
                t_build = time.time()
                if variant.startswith("generate"):
                    kw = {"cache_implementation": "static"} if variant == "generate_static" else {}
                    first = model.generate(prompt, **greedy_kwargs(check, **kw))[:, prompt_len:]  # warm-up, check
                    if variant == "generate_static" and not uses_static_generate(model):
                        raise RuntimeError("this revision's generate() has no static path (cache_implementation "
                                           "is ignored)")
                    row["setup_s"] = time.time() - t_build
                    row["correct"] = bool(torch.equal(first, reference))
                    t_prefill, _ = wall(lambda: model(prompt, use_cache=True, logits_to_keep=1), device)
                    t_total, out = wall(lambda: model.generate(prompt, **greedy_kwargs(n, **kw)), device)
                    t_decode = max(t_total - t_prefill, 1e-9)
                else:
                    dec = static_decoder(model, variant, batch, max_length, n)
                    first = dec.generate(prompt, max_new_tokens=check)[:, prompt_len:]  # + compile + capture
                    row["setup_s"] = time.time() - t_build
                    row["correct"] = bool(torch.equal(first, reference))
                    t_total, out = wall(lambda: dec.generate(prompt, max_new_tokens=n), device)
                    t_prefill, _ = wall(lambda: dec.prefill(prompt), device)
                    t_decode, _ = wall(lambda: [dec.decode_one() for _ in range(n - 1)], device)
                if not row["correct"]:
                    row.update(mismatch_margins(reference, reference_logits, first, next(model.parameters()).dtype))
                    log.error("decode %s B=%d T=%d %s: the first %d tokens differ from generate()'s in %d rows; the "
                              "largest top-2 logit margin where they part is %.3g (logit rounding %.3g): %s", arch,
                              batch, prompt_len, variant, check, row["mismatch_rows"], row["max_mismatch_margin"],
                              row["logit_rounding"], "near-ties" if row["near_tie"] else "not near-ties")
                if variant == "generate":
                    generated = out
                elif generated is not None:
                    same = (out == generated)[:, prompt_len:].all(0)
                    row["tokens_match_generate"] = bool(same.all())
                    if not row["tokens_match_generate"]:
                        row["first_mismatch"] = int((~same).nonzero()[0])
                row.update(prefill_s=t_prefill, decode_tok_s=batch * (n - 1) / t_decode,
                           ms_per_step=t_decode / (n - 1) * 1e3, total_s=t_total,
                           end_to_end_tok_s=batch * n / t_total, peak_GiB=peak_gib(device))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:500]
            log.error("decode %s B=%d T=%d %s: %s", arch, batch, prompt_len, variant, row["error"])
        dec = None  # frees its buffers and graph pool before the next variant (and generate()'s decoder)
        if hasattr(model, "static_decoder_slot"):
            model.static_decoder_slot.clear()
        rows.append(row)
        log.info("[decode] %s", _fmt_row(row, DECODE_COLUMNS))
    return rows


# ----------------------------------------------------------------------------- decode: divergence
def divergence_at(ref_tokens: torch.Tensor, ref_logits: torch.Tensor, other_tokens: torch.Tensor,
                  other_logits: torch.Tensor) -> dict:
    """Where two greedy decodes of the same prompt part, and whether rounding explains it.

    ``*_tokens`` (n,) the greedy tokens of each path, ``*_logits`` (k, V) each path's logits at steps
    0..k-1 (k > the first differing step; both paths fed the same tokens up to there). At the first
    differing step i (tokens a = reference's, b = other's): each path's margin between the two tokens
    (``ref_margin`` = ref[a] - ref[b], ``other_margin`` = other[b] - other[a]), each path's top-2 margin,
    the largest logit difference between the paths at i and at the agreeing steps before it
    (``noise``: how far the two numerics drift apart). A flip whose margins are within that noise
    (or within one rounding step of the logits' dtype) is a near-tie decided by rounding ("numerics");
    a margin well above it means the paths compute different things ("bug suspected").
    """
    differ = (ref_tokens != other_tokens).nonzero()
    if len(differ) == 0:
        diff = (ref_logits.double() - other_logits.double()).abs().amax().item()
        return {"first_mismatch": None, "steps": len(ref_tokens), "max_abs_logit_diff": diff, "verdict": "same tokens"}
    i = int(differ[0])
    ref, other = ref_logits[i].double(), other_logits[i].double()
    a, b = int(ref_tokens[i]), int(other_tokens[i])
    top_ref, top_other = ref.topk(2).values, other.topk(2).values
    before = (ref_logits[:i].double() - other_logits[:i].double()).abs().amax().item() if i else 0.0
    rounding = torch.finfo(ref_logits.dtype).eps * ref.abs().max().item()
    noise = max(before, rounding)
    out = {
        "first_mismatch": i, "steps": len(ref_tokens), "ref_token": a, "other_token": b,
        "ref_margin": (ref[a] - ref[b]).item(), "other_margin": (other[b] - other[a]).item(),
        "ref_top2_margin": (top_ref[0] - top_ref[1]).item(), "other_top2_margin": (top_other[0] - top_other[1]).item(),
        "max_abs_logit_diff": (ref - other).abs().max().item(), "max_abs_logit_diff_before": before,
        "logit_rounding": rounding,
    }
    tie = max(out["ref_margin"], out["other_margin"]) <= noise
    out["verdict"] = "numerics (near-tie)" if tie else "bug suspected (margin above the paths' logit noise)"
    return out


def check_divergence(model, dec, prompt: torch.Tensor, new_tokens: int) -> dict:
    """generate()'s greedy tokens and logits (batch 1) against a StaticDecoder's: the decoder's logits at
    every step up to the first difference come from teacher-forcing it with its own tokens."""
    prompt_len = prompt.shape[1]
    with torch.no_grad():
        out = model.generate(prompt, **greedy_kwargs(new_tokens, output_logits=True, return_dict_in_generate=True))
        ref_tokens = out.sequences[0, prompt_len:]
        ref_logits = torch.stack([step[0] for step in out.logits]).float()
        other_tokens = dec.generate(prompt, max_new_tokens=new_tokens)[0, prompt_len:].clone()
        differ = (ref_tokens != other_tokens).nonzero()
        k = int(differ[0]) + 1 if len(differ) else new_tokens
        logits = [dec.prefill(prompt)[0].float().clone()]
        for t in range(k - 1):
            logits.append(dec.step(other_tokens[t : t + 1])[0].float().clone())
    return divergence_at(ref_tokens, ref_logits[:k], other_tokens, torch.stack(logits))


def bench_decode(a, device, clock: Clock, budget) -> dict:
    """Every arch x batch size x prompt length x variant (``--variants``; default: generate, generate_static
    and the StaticDecoder in a CUDA graph, compiled for --compile-archs, on CUDA; generate, generate_static
    and the eager StaticDecoder on the CPU). --check-divergence adds, per arch at batch 1 and the first
    prompt length, where the StaticDecoder's greedy tokens part from generate()'s and why."""
    cuda = device.type == "cuda"
    rows, divergence = [], []
    for arch in a.archs:
        if budget.over(f"decode {arch}"):
            break
        variants = a.variants or (["generate", "generate_static", "static_graph"] if cuda
                                  else ["generate", "generate_static", "static_eager"])
        if not a.variants and cuda and arch in a.compile_archs:
            variants.append("static_graph_compiled")
        model = decode_model(a, arch, device)
        for batch in a.batch_sizes:
            for prompt_len in a.prompt_lens:
                rows += bench_decode_case(a, model, arch, batch, prompt_len, variants, device, budget)
        if a.check_divergence:
            variant = "static_graph_compiled" if cuda and arch in a.compile_archs else \
                "static_graph" if cuda else "static_eager"
            prompt = torch.randint(1, model.config.vocab_size, (1, a.prompt_lens[0]), device=device,
                                   generator=torch.Generator(device).manual_seed(0))
            try:
                dec = static_decoder(model, variant, 1, a.prompt_lens[0] + a.new_tokens + 8, a.new_tokens)
                report = {"arch": arch, "variant": variant, **check_divergence(model, dec, prompt, a.new_tokens)}
            except Exception as err:
                report = {"arch": arch, "variant": variant, "error": f"{type(err).__name__}: {err}"[:500]}
            dec = None
            divergence.append(report)
            log.info("[divergence] %s", " | ".join(f"{k}={_fmt(v)}" for k, v in report.items()))
        model = None
        free_memory()
    return {"rows": rows, "divergence": divergence}


DECODE_COLUMNS = ["arch", "size", "batch", "prompt", "variant", "decode_tok_s", "ms_per_step", "end_to_end_tok_s",
                  "prefill_s", "setup_s", "peak_GiB", "correct", "tokens_match_generate", "first_mismatch"]


# ----------------------------------------------------------------------------- sweep
def parse_tuning(text: str) -> dict:
    """'segments=8,NB=4' -> {'segments': 8, 'NB': 4} (numbers as int where they are integers)."""
    out = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {part!r}")
        number = float(value)
        out[key.strip()] = int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return out


def _compiled_kernels(kernels) -> dict:
    """What ``launch`` keeps per shooting kernel: {(kernel name, signature key): compiled kernel}."""
    from pararnn_lm.kernels import launch

    found = {}
    for kernel in kernels:
        launcher = getattr(launch, "_LAUNCHERS", {}).get(kernel)
        for key, (compiled, _) in (launcher.entries.items() if launcher else ()):
            found[(kernel.fn.__name__, key)] = compiled
    return found


def bench_sweep(a, device, clock: Clock) -> dict:
    """The fused mode under each shooting.TUNING setting at one shape: correctness, GPU and eager times,
    and the registers / spills of the kernels the setting compiled (CUDA; '-' when none was new)."""
    from pararnn_lm.kernels import shooting

    B, T, D = a.shape
    kernels = (shooting._shoot_fwd_kernel, shooting._shoot_bwd_kernel)
    rows = []
    for cell in a.cells:
        obj, u, p, h0 = cell_problem(cell, B, T, D, DTYPES[a.dtype], device)
        for text in a.configs:
            tuning = parse_tuning(text)
            row = {"cell": cell, "config": text or "shipped", "dtype": a.dtype, "B": B, "T": T, "D": D}
            shooting.TUNING.clear()
            shooting.TUNING.update(tuning)
            try:
                seen = _compiled_kernels(kernels)
                row.update(check_mode(obj, "fused", u, p, h0, a.check_steps))
                if row["correct"]:
                    row.update(cell_timings(obj, "fused", u, p, h0, clock))
                else:
                    log.error("WRONG RESULT, not timed: %s", row)
                new = {k: c for k, c in _compiled_kernels(kernels).items() if k not in seen}
                for which, kernel in (("fwd", kernels[0]), ("bwd", kernels[1])):
                    mine = [c for (name, _), c in new.items() if name == kernel.fn.__name__ and hasattr(c, "n_regs")]
                    if mine:
                        row[f"{which}_regs"] = max(c.n_regs for c in mine)
                        row[f"{which}_spills"] = max(c.n_spills for c in mine)
            except Exception as err:  # a setting the kernels cannot compile or run
                row["error"] = f"{type(err).__name__}: {err}"[:300]
                log.error("sweep %s %s: %s", cell, text, row["error"])
            finally:
                shooting.TUNING.clear()
            rows.append(row)
            log.info("[sweep] %s", _fmt_row(row, SWEEP_COLUMNS))
        del u, p, h0
        free_memory()
    return {"rows": rows}


SWEEP_COLUMNS = ["cell", "config", "iters", "y_rel", "fwd_gpu_ms", "bwd_gpu_ms", "fwd_ms", "bwd_ms",
                 "fwd_regs", "fwd_spills", "bwd_regs", "bwd_spills"]


# ----------------------------------------------------------------------------- resources
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048


def compile_usage(kernel, constexprs: dict, num_warps: int, types: dict, arch: int = 90,
                  maxnreg: int | None = None) -> tuple[int, int]:
    """(registers per thread, spill stack bytes) of ``kernel`` compiled for sm_<arch> by the local Triton
    and read from the cubin with the cuobjdump it bundles. Arguments not in ``types`` are i32; constexprs
    not given take their defaults, as a launch would."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    unknown = set(constexprs) - set(params)
    if unknown:
        raise ValueError(f"{kernel.fn.__name__}: no such kernel arguments {sorted(unknown)}")
    given = {p.name: p.default for p in kernel.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    given.update(constexprs)
    signature = {p: "constexpr" if p in given else types.get(p, "i32") for p in params}
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in given.items()}),
                              target=GPUTarget("cuda", arch, 32), options=options)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        raise FileNotFoundError(f"{tool} not found: this Triton has no bundled CUDA tools")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", text, re.S)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    return int(m.group(1)), int(m.group(2))


def programs_per_sm(registers: int, num_warps: int) -> int:
    threads = 32 * num_warps
    return min(REGS_PER_SM // max(registers * threads, 1), MAX_THREADS_PER_SM // threads)


def resource_configs() -> list[tuple[str, str, object, dict, int, dict, int | None]]:
    """(group, label, kernel, constexprs, num_warps, argument types, maxnreg) as the launch functions pick them."""
    from pararnn_lm.kernels import conv, shooting

    conv_types = dict(X="*bf16", W="*fp32", BIAS="*fp32", POS="*i64", DY="*bf16", G="*bf16", DWP="*fp32",
                      DBP="*fp32", Y="*bf16", DX="*bf16")
    (fbt, fbc, fw), (gbt, gbc, gw, gtb), (dbt, dbc, dw) = conv._FWD_TILE, conv._BWD_G_TILE, conv._BWD_DX_TILE
    shoot = {p: "*fp32" for p in ("P", "H0", "H", "G", "DP", "DH0", "CARRY", "CM", "START", "END", "PROD", "RES")}
    shoot.update(U="*bf16", DU="*bf16", SMAP="*i32", CNT="*i32", PENDING="*i32", ITERS="*i32", tol="fp32",
                 damping="fp32", tail_eps="fp32")
    fwd, bwd = shooting._shoot_fwd_kernel, shooting._shoot_bwd_kernel
    # (BD, NB) as plan() picks them: segments 256 / 4 (ParaLSTM backward 128), one segment 128 / 8. ParaGRU
    # as the layers run it: with the gates' input bias in the kernels.
    return [
        ("conv", f"conv fwd {conv._FWD_TILE}", conv._conv_fwd_kernel, dict(K=4, BT=fbt, BC=fbc, SILU=True), fw, conv_types, None),
        ("conv", f"conv bwd pass 1 {conv._BWD_G_TILE}", conv._conv_bwd_g_kernel,
         dict(K=4, KP=4, BT=gbt, BC=gbc, TB=gtb, SILU=True), gw, conv_types, None),
        ("conv", f"conv bwd pass 2 {conv._BWD_DX_TILE}", conv._conv_bwd_dx_kernel, dict(K=4, BT=dbt, BC=dbc), dw, conv_types, None),
        ("shooting", "ParaGRU fwd, segments", fwd,
         dict(LSTM=False, FIRST=False, WRITE=True, COARSE=True, BD=256, NB=4, DOCS=True, HAS_BIAS=True), 4, shoot, None),
        ("shooting", "ParaLSTM fwd, segments", fwd,
         dict(LSTM=True, FIRST=False, WRITE=True, COARSE=True, BD=256, NB=4, DOCS=True), 4, shoot, None),
        ("shooting", "ParaGRU bwd pass A, segments", bwd,
         dict(LSTM=False, PASS_A=True, BD=256, NB=4, DOCS=True, HAS_BIAS=True), 4, shoot, None),
        ("shooting", "ParaGRU bwd pass B, segments", bwd,
         dict(LSTM=False, PASS_A=False, BD=256, NB=4, DOCS=True, HAS_BIAS=True), 4, shoot, None),
        ("shooting", "ParaGRU bwd, one segment, maxnreg 128", bwd,
         dict(LSTM=False, PASS_A=False, BD=128, NB=8, DOCS=True, HAS_BIAS=True), 4, shoot, 128),
        ("shooting", "ParaLSTM bwd pass B, segments", bwd, dict(LSTM=True, PASS_A=False, BD=128, NB=4, DOCS=True), 4, shoot, None),
        ("shooting", "ParaLSTM bwd, one segment", bwd, dict(LSTM=True, PASS_A=False, BD=128, NB=8, DOCS=True), 4, shoot, None),
    ]


def bench_resources(a) -> dict:
    """Registers and spills of the project's kernels compiled for a GPU architecture, without a GPU: a lead
    for tuning, not a verdict (the conv's 32-element tiles spill yet were the fastest on an H200)."""
    import triton

    rows = []
    for group, label, kernel, constexprs, warps, types, maxnreg in resource_configs():
        if a.only and group != a.only:
            continue
        regs, stack = compile_usage(kernel, constexprs, warps, types, a.arch, maxnreg)
        row = {"kernel": label, "warps": warps, "registers": regs, "spill_stack_bytes": stack,
               "programs_per_sm": programs_per_sm(regs, warps)}
        rows.append(row)
        log.info("[resources] %s", _fmt_row(row, RESOURCE_COLUMNS))
    return {"rows": rows, "arch": a.arch, "triton": triton.__version__}


RESOURCE_COLUMNS = ["kernel", "warps", "registers", "spill_stack_bytes", "programs_per_sm"]


# ----------------------------------------------------------------------------- engine on the CPU
def bench_engine_cpu(a, clock: Clock) -> dict:
    """The reference modes at module level (per-head projection + cell, + all gradients for fwd+bwd, loss
    = sum(y^2)), and the Newton iterations newton_torch needs at the paper's initialisation and at larger,
    trained-like recurrent gains. Both modes first agree on the output."""
    from pararnn_lm.kernels import ParaGRULayer, ParaLSTMLayer

    torch.manual_seed(0)
    layer = (ParaGRULayer if a.cell == "paragru" else ParaLSTMLayer)(a.dim, a.heads)
    x = torch.randn(a.batch, a.length, a.dim, requires_grad=True)
    rows = []
    outputs = {}
    for mode in ("sequential", "newton_torch"):
        layer.mode = mode
        with torch.no_grad():
            outputs[mode] = layer(x)[0]

        def fwd():
            with torch.no_grad():
                layer(x)

        def fwd_bwd():
            y, _ = layer(x)
            y.square().sum().backward()

        rows.append({"cell": a.cell, "mode": mode, "fwd_ms": clock.median(fwd), "fwdbwd_ms": clock.median(fwd_bwd)})
    err = float((outputs["newton_torch"] - outputs["sequential"]).abs().max())
    if err > 1e-4:
        raise SystemExit(f"newton_torch differs from the sequential loop by {err:.2e}")
    layer.mode = "newton_torch"
    for label in ("default_init", "trained_like"):
        if label == "trained_like":
            layer.gain_bound = None
            with torch.no_grad():
                layer.recurrent.uniform_(-a.trained_gain, a.trained_gain)
        with torch.no_grad():
            layer(x)
        stats = layer.last_stats
        rows.append({"cell": a.cell, "mode": f"newton_torch, {label}", "iterations": stats.iterations,
                     "residual": stats.residual, "converged": stats.converged})
    for row in rows:
        log.info("[engine-cpu] %s", _fmt_row(row, ENGINE_COLUMNS))
    return {"rows": rows, "max_abs_diff": err, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine()}


ENGINE_COLUMNS = ["cell", "mode", "fwd_ms", "fwdbwd_ms", "iterations", "residual", "converged"]


# ----------------------------------------------------------------------------- results and --base
# Per subcommand: the fields that identify a row, the table's columns.
KEYS = {"cells": ("cell", "mode", "dtype", "B", "T", "D", "H"), "layers": ("layer", "B", "T", "d_model"),
        "decode": ("arch", "size", "batch", "prompt", "variant"), "sweep": ("cell", "config", "dtype", "B", "T", "D"),
        "resources": ("kernel",), "engine-cpu": ("cell", "mode")}
COLUMNS = {"cells": CELL_COLUMNS, "layers": LAYER_COLUMNS, "decode": DECODE_COLUMNS, "sweep": SWEEP_COLUMNS,
           "resources": RESOURCE_COLUMNS, "engine-cpu": ENGINE_COLUMNS}
# measured quantities the --base table compares (times: lower is better; tok_s, frac, vs_reference: higher)
COMPARED = re.compile(r"(_ms|_s|_GiB|_frac|_regs|_spills)$|^vs_(reference|mamba2_ref|mamba2_ref_compiled)$"
                      r"|^(registers|spill_stack_bytes|iters|iterations)$")


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _fmt_row(row: dict, columns: list[str]) -> str:
    return " | ".join(f"{c}={_fmt(row.get(c))}" for c in columns if c in row)


def table(sub: str, result: dict) -> str:
    cols = [c for c in COLUMNS[sub] if any(c in r for r in result["rows"])]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(_fmt(r.get(c)) for c in cols) for r in result["rows"]]
    return "\n".join(lines)


def side_by_side(sub: str, this: dict, base: dict, rev: str) -> tuple[str, list[dict]]:
    """One line per (row, measured quantity) present in both runs: this checkout, REV, this / REV."""
    keys = KEYS[sub]
    base_rows = {tuple(r.get(k) for k in keys): r for r in base["rows"]}
    lines = [" | ".join([*keys, "quantity", "this", rev, f"this / {rev}"]), " | ".join("---" for _ in range(len(keys) + 4))]
    pairs = []
    for row in this["rows"]:
        key = tuple(row.get(k) for k in keys)
        other = base_rows.get(key)
        for name, value in row.items():
            if name in keys or not COMPARED.search(name) or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            b = other.get(name) if other else None
            ratio = value / b if isinstance(b, (int, float)) and not isinstance(b, bool) and b else None
            pairs.append({**dict(zip(keys, key)), "quantity": name, "this": value, "base": b, "ratio": ratio})
            lines.append(" | ".join([*(_fmt(k) for k in key), name, _fmt(value), _fmt(b), _fmt(ratio)]))
    return "\n".join(lines), pairs


def default_out(sub: str) -> Path:
    return REPO / "runs" / "bench" / f"kernels-{sub}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def run_child(argv: list[str], out: Path, package_root: Path) -> dict:
    """This script in a subprocess whose ``pararnn_lm`` is the one under ``package_root``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--out", str(out)], env=env,
                          cwd=package_root)
    if done.returncode != 0:
        raise SystemExit(f"the benchmark under {package_root} failed (exit {done.returncode})")
    result = json.loads(out.read_text())
    package = Path(result["meta"]["package"]).resolve()
    if package_root.resolve() not in package.parents:
        raise SystemExit(f"the run meant for {package_root} imported pararnn_lm from {package}")
    return result


def run_against_base(sub: str, argv: list[str], rev: str, out: Path) -> dict:
    """The subcommand on this checkout and on a tree of ``rev`` (a temporary git worktree, or a folder that
    holds one), each in its own subprocess."""
    from pararnn_lm.provenance import revision_tree

    with contextlib.ExitStack() as stack:
        try:
            sha, tree = stack.enter_context(revision_tree(rev, REPO))
        except ValueError as err:
            raise SystemExit(f"--base {rev}: {err}") from None
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-base-")))
        log.info("== this checkout (%s)", REPO)
        this = run_child(argv, tmp / "this.json", REPO)
        log.info("== %s (%s, tree %s)", rev, sha, tree)
        base = run_child(argv, tmp / "base.json", tree)
    text, pairs = side_by_side(sub, this, base, rev)
    log.info("\n== %s: this checkout vs %s (%s); ms and s: lower is better, tok_s / frac / vs_: see the "
             "quantity\n%s", sub, rev, sha, text)
    result = {"subcommand": sub, "base_rev": rev, "base_commit": sha, "this": this, "base": base, "comparison": pairs}
    save(out, result)
    log.info("JSON: %s", out)
    return result


# ----------------------------------------------------------------------------- command line
class Budget:
    """Stops starting new items after ``seconds``; what was skipped is listed in the result."""

    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds, self.skipped = time.time(), seconds, []

    def over(self, what: str) -> bool:
        if time.time() - self.t0 > self.seconds:
            self.skipped.append(what)
            log.warning("skipped %s: time budget of %.0f s used up", what, self.seconds)
            return True
        return False


def _shape(n: int):
    def parse(text: str) -> tuple[int, ...]:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated integers, got {text!r}")
        return values
    return parse


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(allowed):
    def parse(text: str) -> list[str]:
        names = [s for s in text.split(",") if s]
        bad = sorted(set(names) - set(allowed))
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help="JSON file (default: runs/bench/kernels-SUBCOMMAND-TIME.json)")
    common.add_argument("--base", metavar="REV", help="also run against git revision REV (a worktree; REV must have "
                        "the pararnn_lm package: commit 016a20d or later) and print both side by side")
    common.add_argument("--device", help="default: cuda if available, else cpu")
    common.add_argument("--reps", type=int, default=30, help="timed runs per measurement (median)")
    common.add_argument("--warmup", type=int, default=3)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="subcommand", required=True)

    p = sub.add_parser("cells", parents=[common], help="fused kernels and the cell module vs the CUDA reference")
    p.add_argument("--cells", type=_names(CELL_NAMES), default=list(CELL_NAMES))
    p.add_argument("--shape", dest="shapes", type=_shape(4), action="append", metavar="B,T,D,HEADS",
                   help=f"repeatable (default: {' '.join(','.join(map(str, s)) for s in CELL_SHAPES)})")
    p.add_argument("--dtypes", type=_names(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--modes", default="fused", help="comma list of parallel_rnn modes (default: fused)")
    p.add_argument("--no-module", dest="module", action="store_false", help="skip the module (projection + cell)")
    p.add_argument("--t-sweep", action="store_true", help=f"also the module at T in {T_SWEEP}, B x T = 65536, bf16")
    p.add_argument("--check-steps", type=int, default=4096, help="steps the fp64 reference checks (a prefix)")

    p = sub.add_parser("layers", parents=[common], help="one mixer layer, bf16, fwd and fwd+bwd")
    p.add_argument("--layers", dest="layer_names", type=_names(LAYERS), default=list(LAYERS),
                   help="rows; NAME_compiled ones run with --compile only")
    p.add_argument("--compile", action="store_true", help="also each layer under torch.compile")
    p.add_argument("--shape", dest="shapes", type=_shape(3), action="append", metavar="B,T,D_MODEL",
                   help=f"repeatable (default: {' '.join(','.join(map(str, s)) for s in LAYER_SHAPES)})")
    p.add_argument("--rnn-heads", type=int, default=4, help="ParaRNN heads (the presets: 4)")
    p.add_argument("--mamba-d-state", type=int, default=128)
    p.add_argument("--mamba-headdim", type=int, default=64)
    p.add_argument("--mamba-chunk", type=int, default=64)
    p.add_argument("--time-budget", type=float, default=600.0, help="seconds after which no new row starts")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, few reps")

    p = sub.add_parser("decode", parents=[common], help="greedy decoding: generate() vs StaticDecoder, tokens/s")
    p.add_argument("--archs", type=_names(DECODE_ARCHS), default=list(DECODE_ARCHS))
    p.add_argument("--size", default="1b", help="model preset")
    p.add_argument("--fp32", action="store_true", help="fp32 weights (default bf16)")
    p.add_argument("--batch-sizes", type=_ints, default=[1], help="comma list (e.g. 1,8,64; default 1)")
    p.add_argument("--prompt-lens", type=_ints, help="comma list (e.g. 128,4096,16384; default 128, --smoke 8)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--variants", type=_names(DECODE_VARIANTS), help=f"comma list of {','.join(DECODE_VARIANTS)} "
                   "(default: generate, generate_static, static_graph [+ static_graph_compiled for --compile-archs] "
                   "on CUDA; generate, generate_static, static_eager on the CPU)")
    p.add_argument("--compile-archs", type=_names(DECODE_ARCHS), default=["paragru"],
                   help="archs also decoded with the torch.compile'd block step (CUDA, default variants)")
    p.add_argument("--check-steps", type=int, default=8, help="greedy tokens checked against generate() before timing")
    p.add_argument("--check-divergence", action="store_true",
                   help="per arch (batch 1, first prompt length): where the StaticDecoder's greedy tokens part from "
                        "generate()'s, each path's top-2 logit margin there and the logit differences")
    p.add_argument("--time-budget", type=float, default=600.0, help="seconds after which no new variant starts")
    p.add_argument("--smoke", action="store_true", help="debug preset, short prompt, on the CPU")

    p = sub.add_parser("sweep", parents=[common], help="the fused mode under shooting.TUNING settings")
    p.add_argument("--cells", type=_names(CELL_NAMES), default=list(CELL_NAMES))
    p.add_argument("--shape", type=_shape(3), default=(8, 2048, 1024), metavar="B,T,D")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--config", dest="configs", action="append", metavar="KEY=VALUE,...",
                   help="repeatable; keys of shooting.TUNING: segments, BD, num_warps, threads_per_sm, single_tps, "
                        f"NB, NB_bwd, tail, tail_eps, maxnreg_bwd ('' = the shipped plan; default: {SWEEP_CONFIGS})")
    p.add_argument("--check-steps", type=int, default=4096)

    p = sub.add_parser("resources", parents=[common], help="registers / spills for a GPU architecture, no GPU needed")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = Hopper)")
    p.add_argument("--only", choices=["conv", "shooting"])

    p = sub.add_parser("engine-cpu", parents=[common], help="sequential vs newton_torch on the CPU")
    p.add_argument("--cell", choices=["paragru", "paralstm"], default="paragru")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--trained-gain", type=float, default=0.9,
                   help="recurrent gains drawn from U(-g, g) without the bound for the trained-like Newton count")
    return ap


def _argv_without(argv: list[str], *options: str) -> list[str]:
    """argv without the given options and their values (``--opt v`` and ``--opt=v``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in options:
            skip = True
            continue
        if any(arg.startswith(o + "=") for o in options):
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    out = a.out or default_out(a.subcommand)
    if a.base:
        return run_against_base(a.subcommand, _argv_without(argv, "--base", "--out"), a.base, out)
    if a.subcommand == "resources":
        # compiles for a GPU: Triton's CPU interpreter (the tests set it) must be off before triton loads
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences triton's notice
    if getattr(a, "smoke", False):
        a.device, a.reps, a.warmup = a.device or "cpu", min(a.reps, 3), 1
        if a.subcommand == "layers":
            a.shapes, a.rnn_heads, a.mamba_d_state, a.mamba_headdim, a.mamba_chunk = [(2, 32, 64)], 2, 16, 16, 8
        else:
            a.size, a.new_tokens = "debug", 8
            a.prompt_lens = a.prompt_lens or [8]
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.subcommand == "engine-cpu":
        device = torch.device("cpu")
    clock = Clock(device, a.reps, a.warmup)
    import pararnn_lm

    meta = {"command": " ".join(["bench_kernels.py", *argv]), "package": pararnn_lm.__file__,
            "commit": _describe(Path(pararnn_lm.__file__).parents[1]), "torch": torch.__version__,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "reps": a.reps, "warmup": a.warmup}
    log.info("bench_kernels %s on %s (torch %s), pararnn_lm from %s", a.subcommand, meta["device_name"],
             torch.__version__, Path(pararnn_lm.__file__).parent)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    budget = Budget(getattr(a, "time_budget", math.inf))
    if a.subcommand == "cells":
        a.shapes = a.shapes or CELL_SHAPES
        a.modes = [m for m in a.modes.split(",") if m]
        result = bench_cells(a, device, clock)
    elif a.subcommand == "layers":
        a.shapes = a.shapes or LAYER_SHAPES
        a.layer_names = layer_rows(a.layer_names, a.compile)
        result = bench_layers(a, device, clock, budget)
    elif a.subcommand == "decode":
        a.prompt_lens = a.prompt_lens or [128]
        result = bench_decode(a, device, clock, budget)
    elif a.subcommand == "sweep":
        a.configs = a.configs if a.configs is not None else SWEEP_CONFIGS
        result = bench_sweep(a, device, clock)
    elif a.subcommand == "resources":
        result = bench_resources(a)
    else:
        result = bench_engine_cpu(a, clock)
    meta["elapsed_s"] = round(time.time() - t0, 1)
    result = {"subcommand": a.subcommand, "meta": meta, **result, "skipped": budget.skipped}
    log.info("\n== %s\n%s", a.subcommand, table(a.subcommand, result))
    for note in result.get("notes", []):
        log.info("note: %s", note)
    save(out, result)
    log.info("JSON: %s", out)
    return result


def _describe(root: Path) -> str | None:
    try:
        return git("describe", "--always", "--dirty", cwd=root)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


if __name__ == "__main__":
    main()
