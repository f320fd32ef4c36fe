"""Correctness, then CUDA-event timings of the Triton ParaGRU / ParaLSTM kernels (issue 3).

    python scripts/bench_kernels.py                       # everything (several minutes on an H100)
    python scripts/bench_kernels.py --cells gru --shapes 0,1 --dtypes fp32 --no-sweep
    python scripts/bench_kernels.py --quick               # main shapes, 20 reps, no sweep

For each cell, shape (B, T, D, heads) and input dtype:
  1. correctness: the fused kernels vs the fp32 sequential recurrence (the sequential_triton kernel,
     itself checked against the PyTorch loop in fp64 at a small shape first): max |dy|, relative
     norm errors of du, dp, dh0; Newton iterations used and the final residual;
  2. kernel level: fused forward (u -> h) and backward (dh -> du, dp, dh0) of the default
     multiple-shooting kernels (mode 'fused'), the per-step Newton kernels (mode 'fused_stepwise',
     forward + backward), sequential_triton forward/backward; bandwidth = bytes that must move / GPU time (CUDA-graph replay), next to the measured copy bandwidth;
  3. module level: per-head input projection einsum(x (B,T,H,D/H), W (H,D/H,3,D/H)) -> u (B,T,3,D),
     the cell, loss = sum(y^2), all gradients (x, W, p): forward and forward+backward.
Median of --reps CUDA-event-timed runs after warm-up. Table on stdout, JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from pararnn_lm.kernels.cells.fused_common import compact_start_map, start_map_batch
from pararnn_lm.kernels.cells.paragru.fused import fused_paragru, fused_paragru_stepwise, paragru_fused_bwd
from pararnn_lm.kernels.cells.paralstm.fused import fused_paralstm, fused_paralstm_stepwise, paralstm_fused_bwd
from pararnn_lm.kernels.config import NewtonStats
from pararnn_lm.kernels.projection import head_projection
from pararnn_lm.kernels.sequential_triton import sequential_triton_rnn

SHAPES = [(8, 2048, 1024, 16), (16, 2048, 2048, 32), (2, 16384, 1024, 16), (4, 4096, 4096, 64),
          (32, 2048, 2048, 4), (1, 131072, 1024, 16)]
SWEEP_T = [512, 1024, 2048, 4096, 8192, 16384, 32768]
# Reference (public CUDA implementation, fp32, H100) module fwd / fwd+bwd ms, peer-benchmarks.md.
PEER = {
    ("gru", 8, 2048, 1024, 16): (1.888, 9.347), ("lstm", 8, 2048, 1024, 16): (2.964, 11.823),
    ("gru", 16, 2048, 2048, 32): (6.765, 34.923), ("lstm", 16, 2048, 2048, 32): (10.797, 43.217),
    ("gru", 2, 16384, 1024, 16): (2.866, 17.399), ("lstm", 2, 16384, 1024, 16): (5.741, 22.985),
    ("gru", 4, 4096, 4096, 64): (5.677, 33.828), ("lstm", 4, 4096, 4096, 64): (10.970, 42.846),
    ("gru", 32, 2048, 2048, 4): (19.7, 107.5), ("lstm", 32, 2048, 2048, 4): (27.7, 122.1),
    ("gru", 1, 131072, 1024, 16): (18.9, 95.5), ("lstm", 1, 131072, 1024, 16): (29.4, 116.1),
}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def timed_graph(fn, reps):
    """GPU time of ``fn`` alone: captured once in a CUDA graph, median of ``reps`` replays. Unlike
    ``timed`` (one synchronised eager call: the host's launch work is inside the window whenever it
    outlasts the kernels, as it does for sub-millisecond calls) this is the kernels' own time, the
    time they take inside a captured training step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocator) off the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = timed(graph.replay, reps)
    del graph
    return ms


def copy_bandwidth(reps):
    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), reps)
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s (read + write)


def make_inputs(cell, B, T, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    P = 3 if cell == "gru" else 5
    K = 1 if cell == "gru" else 2
    u = torch.randn(B, T, 3, D, device="cuda", generator=g).to(dtype)
    # Default-like init: small recurrent gains, |a| <= 0.5 (the paper clips their norm to 0.5).
    p = (torch.randn(P, D, device="cuda", generator=g) * 0.2).clamp(-0.5, 0.5)
    h0 = torch.randn(B, K, D, device="cuda", generator=g) * 0.5
    return u, p, h0, K


def fused_fn(cell):
    return fused_paragru if cell == "gru" else fused_paralstm


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_small():
    """sequential_triton vs the PyTorch loop in fp64 (so it can serve as the reference at scale)."""
    from pararnn_lm.kernels import ParaGRU, ParaLSTM, parallel_rnn
    out = {}
    for cell, obj in (("gru", ParaGRU()), ("lstm", ParaLSTM())):
        u, p, h0, K = make_inputs(cell, 2, 300, 200, torch.float32, seed=1)
        ud, pd, hd = (t.double().requires_grad_() for t in (u, p, h0))
        y, _ = parallel_rnn(obj, ud, pd, hd, mode="sequential")
        gy = torch.randn_like(y)
        gref = torch.autograd.grad((y * gy).sum(), (ud, pd, hd))
        uf, pf, hf = (t.clone().requires_grad_() for t in (u, p, h0))
        h = sequential_triton_rnn("paragru" if cell == "gru" else "paralstm", uf, pf, hf,
                                  start_map_batch(2, 300, "cuda"))
        g2 = torch.autograd.grad((h[:, :, -1] * gy.float()).sum(), (uf, pf, hf))
        out[cell] = {"y_max_abs": float((h[:, :, -1].double() - y).abs().max()),
                     **{f"d{n}_rel": rel(a, b) for n, a, b in zip("uph", g2, gref)}}
        print(f"[check] sequential_triton {cell} vs fp64 loop: {out[cell]}", flush=True)
        assert out[cell]["y_max_abs"] < 1e-4 and max(v for k, v in out[cell].items() if k != "y_max_abs") < 1e-4
    return out


def bench_shape(cell, B, T, D, H, dtype_name, reps, do_module, do_seq, copy_bw):
    dtype = DT[dtype_name]
    u, p, h0, K = make_inputs(cell, B, T, D, dtype)
    name = "paragru" if cell == "gru" else "paralstm"
    fused = fused_fn(cell)
    bwd_op = paragru_fused_bwd if cell == "gru" else paralstm_fused_bwd
    row = {"cell": cell, "B": B, "T": T, "D": D, "H": H, "dtype": dtype_name}
    # ---- correctness vs the fp32 sequential recurrence
    uf, pf, hf = (t.clone().requires_grad_() for t in (u, p, h0))
    st = NewtonStats()
    h = fused(uf, pf, hf, stats=st)
    gy = torch.randn(B, T, D, device="cuda")
    gf = torch.autograd.grad((h[:, :, -1] * gy).sum(), (uf, pf, hf))
    us, ps, hs = (t.clone().requires_grad_() for t in (u, p, h0))
    smap = start_map_batch(B, T, "cuda")
    href = sequential_triton_rnn(name, us, ps, hs, smap)
    gs = torch.autograd.grad((href[:, :, -1] * gy).sum(), (us, ps, hs))
    row.update(iters=st.iterations, residual=st.residual, fell_back=st.fell_back,
               y_max_abs=float((h - href).abs().max()),
               du_rel=rel(gf[0], gs[0]), dp_rel=rel(gf[1], gs[1]), dh0_rel=rel(gf[2], gs[2]))
    ok = row["y_max_abs"] < 1e-3 and max(row["du_rel"], row["dp_rel"], row["dh0_rel"]) < 1e-2
    row["correct"] = bool(ok)
    del uf, pf, hf, gf, us, ps, hs, gs, href
    # ---- kernel level
    with torch.no_grad():
        hstate = fused(u, p, h0)
        g = torch.randn(B, T, K, D, device="cuda")
        smap = start_map_batch(B, T, "cuda")
        cmap = compact_start_map(B, "cuda")  # what the op passes for a batch without documents
        h0r = h0.float().contiguous()
        row["fused_fwd_ms"] = timed(lambda: fused(u, p, h0), reps)
        row["fused_bwd_ms"] = timed(lambda: bwd_op(u, p, h0r, cmap, hstate, g), reps)
        row["fused_fwd_gpu_ms"] = timed_graph(lambda: fused(u, p, h0), reps)
        row["fused_bwd_gpu_ms"] = timed_graph(lambda: bwd_op(u, p, h0r, cmap, hstate, g), reps)
        if do_seq:
            stepwise = fused_paragru_stepwise if cell == "gru" else fused_paralstm_stepwise
            uu, pp, hh = (t.clone().requires_grad_() for t in (u, p, h0))
            with torch.enable_grad():
                hs_ = stepwise(uu, pp, hh)
                row["stepwise_fwdbwd_ms"] = timed(
                    lambda: torch.autograd.grad(stepwise(uu, pp, hh), (uu, pp, hh), g), reps)
            row["stepwise_fwd_ms"] = timed(lambda: stepwise(u, p, h0), reps)
            row["stepwise_bwd_ms"] = row["stepwise_fwdbwd_ms"] - row["stepwise_fwd_ms"]
            del uu, pp, hh, hs_
            row["seq_fwd_ms"] = timed(lambda: sequential_triton_rnn(name, u, p, h0r, smap), reps)
            from pararnn_lm.kernels.sequential_triton import sequential_triton_bwd
            row["seq_bwd_ms"] = timed(lambda: sequential_triton_bwd(u, p, h0r, smap, hstate, g, cell == "lstm"), reps)
    es = u.element_size()
    n = B * T * D
    fwd_bytes = n * (3 * es + 4 * K)  # read u, write h (fp32 states)
    bwd_bytes = n * (3 * es + 4 * K + 4 * K + 3 * es)  # read u, h, dh; write du
    # Bandwidth on the kernels' GPU time (graph replay); the eager ms include the host's launch work.
    row["fused_fwd_GBps"] = fwd_bytes / row["fused_fwd_gpu_ms"] / 1e6
    row["fused_bwd_GBps"] = bwd_bytes / row["fused_bwd_gpu_ms"] / 1e6
    row["fused_fwd_bw_frac"] = row["fused_fwd_GBps"] / copy_bw
    row["fused_bwd_bw_frac"] = row["fused_bwd_GBps"] / copy_bw
    del hstate, g
    # ---- module level
    if do_module:
        dh = D // H
        gen = torch.Generator(device="cuda").manual_seed(3)
        x = torch.randn(B, T, D, device="cuda", generator=gen).to(dtype).requires_grad_()
        W = (torch.randn(H, dh, 3, dh, device="cuda", generator=gen) / dh ** 0.5).to(dtype).requires_grad_()
        pm = p.clone().requires_grad_()

        def module_fwd():
            uu = head_projection(x, W)  # the layers' projection (kernels/projection.py)
            return fused(uu, pm, None)[:, :, -1]

        def module_fwd_bwd():
            y = module_fwd()
            (y.float().square().sum()).backward()

        def module_grads():  # for the CUDA graph: no accumulation into .grad across replays
            return torch.autograd.grad(module_fwd().float().square().sum(), (x, W, pm))

        with torch.no_grad():
            row["module_fwd_ms"] = timed(module_fwd, reps)
        row["module_fwdbwd_ms"] = timed(module_fwd_bwd, reps)
        # The same work without the host: where the eager call is launch-bound (small shapes), this
        # is the time a captured or compiled training step spends on it.
        row["module_fwdbwd_gpu_ms"] = timed_graph(module_grads, reps)
        peer = PEER.get((cell, B, T, D, H))
        if peer:
            row["peer_fwd_ms"], row["peer_fwdbwd_ms"] = peer
            row["speedup_fwdbwd"] = peer[1] / row["module_fwdbwd_ms"]
            row["speedup_fwd"] = peer[0] / row["module_fwd_ms"]
        del x, W, pm
    torch.cuda.empty_cache()
    return row


def fmt(row):
    keys = ["cell", "dtype", "B", "T", "D", "H", "iters", "y_max_abs", "du_rel", "fused_fwd_ms", "fused_bwd_ms",
            "fused_fwd_gpu_ms", "fused_bwd_gpu_ms",
            "fused_fwd_bw_frac", "fused_bwd_bw_frac", "stepwise_fwd_ms", "stepwise_bwd_ms", "seq_fwd_ms", "seq_bwd_ms", "module_fwd_ms",
            "module_fwdbwd_ms", "module_fwdbwd_gpu_ms", "peer_fwdbwd_ms", "speedup_fwdbwd"]
    out = []
    for k in keys:
        v = row.get(k, "")
        out.append(f"{v:.3g}" if isinstance(v, float) else str(v))
    return " | ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="gru,lstm")
    ap.add_argument("--shapes", default="all", help="comma list of indices into SHAPES, or 'all'/'none'")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-module", action="store_true")
    ap.add_argument("--no-seq", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--blocks", default="", help="override CT,BD,num_warps for both cells, e.g. 64,32,4")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json"))
    a = ap.parse_args()
    if a.quick:
        a.reps, a.no_sweep = 20, True
    if a.blocks:
        from pararnn_lm.kernels.cells.paragru import fused as fg
        from pararnn_lm.kernels.cells.paralstm import fused as fl
        ct, bd, nw = (int(v) for v in a.blocks.split(","))
        for mod in (fg, fl):
            mod._BLOCKS.update(CT=ct, BD=bd, num_warps=nw)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}", flush=True)
    t0 = time.time()
    copy_bw = copy_bandwidth(20)
    print(f"copy bandwidth (read+write): {copy_bw:.0f} GB/s", flush=True)
    result = {"device": dev, "torch": torch.__version__, "copy_GBps": copy_bw, "reps": a.reps,
              "command": " ".join(sys.argv), "check_small": check_small(), "rows": [], "sweep": []}
    shapes = [] if a.shapes == "none" else (SHAPES if a.shapes == "all" else [SHAPES[int(i)] for i in a.shapes.split(",")])
    print("cell | dtype | B | T | D | H | iters | y_err | du_rel | fwd ms | bwd ms | fwd gpu ms | bwd gpu ms | fwd bw | bwd bw | stepwise fwd | stepwise bwd | seq fwd | seq bwd | mod fwd | mod f+b | mod f+b gpu | peer f+b | speedup", flush=True)
    for cell in a.cells.split(","):
        for (B, T, D, H) in shapes:
            for dn in a.dtypes.split(","):
                row = bench_shape(cell, B, T, D, H, dn, a.reps, not a.no_module, not a.no_seq, copy_bw)
                result["rows"].append(row)
                print(fmt(row), flush=True)
                _save(result, a.out)
        if not a.no_sweep:
            for T in SWEEP_T:
                B = 65536 // T
                row = bench_shape(cell, B, T, 1024, 16, "bf16", max(a.reps // 2, 10), True, False, copy_bw)
                result["sweep"].append(row)
                print("sweep " + fmt(row), flush=True)
                _save(result, a.out)
    print(f"total {time.time() - t0:.0f} s", flush=True)
    _save(result, a.out)


def _save(result, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, os.path.basename(path)), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
