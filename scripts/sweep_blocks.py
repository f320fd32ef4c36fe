"""Tile-shape sweep of the fused kernels (CT, BD, num_warps) at one shape: time, registers, spills.

    python scripts/sweep_blocks.py --shape 8,2048,1024 --configs 64,16,4 32,16,1 ...
"""
import argparse
import os
import sys

import torch

from bench_kernels import make_inputs, timed  # noqa: E402

from pararnn_lm.kernels.cells.fused_common import start_map_batch
from pararnn_lm.kernels.cells.paragru import fused as fg
from pararnn_lm.kernels.cells.paralstm import fused as fl
from pararnn_lm.kernels.sequential_triton import sequential_triton_rnn

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="8,2048,1024")
ap.add_argument("--cells", default="gru,lstm")
ap.add_argument("--dtype", default="fp32")
ap.add_argument("--configs", nargs="+", default=["64,16,4", "64,32,4", "32,16,1", "32,32,1", "64,16,2", "16,32,1", "32,16,2", "128,16,4"])
a = ap.parse_args()
B, T, D = (int(v) for v in a.shape.split(","))
for cell in a.cells.split(","):
    mod = fg if cell == "gru" else fl
    fn = fg.fused_paragru if cell == "gru" else fl.fused_paralstm
    u, p, h0, K = make_inputs(cell, B, T, D, {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype])
    smap = start_map_batch(B, T, "cuda")
    href = sequential_triton_rnn("paragru" if cell == "gru" else "paralstm", u, p, h0.float(), smap)
    g = torch.randn(B, T, K, D, device="cuda")
    bwd = fg.paragru_fused_bwd if cell == "gru" else fl.paralstm_fused_bwd
    for cfg in a.configs:
        ct, bd, nw = (int(v) for v in cfg.split(","))
        mod._BLOCKS.clear()
        mod._BLOCKS.update(CT=ct, BD=bd, num_warps=nw)
        try:
            with torch.no_grad():
                h = fn(u, p, h0)
                err = float((h - href).abs().max())
                tf = timed(lambda: fn(u, p, h0), 20)
                tb = timed(lambda: bwd(u, p, h0.float().contiguous(), smap, h, g), 20)
            kf, kb = mod.LAST["fwd"], mod.LAST["bwd"]
            print(f"{cell} {a.dtype} B{B} T{T} D{D} CT{ct} BD{bd} nw{nw}: fwd {tf:.3f} ms (regs {kf.n_regs}, spills {kf.n_spills}) "
                  f"bwd {tb:.3f} ms (regs {kb.n_regs}, spills {kb.n_spills}) err {err:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{cell} CT{ct} BD{bd} nw{nw}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    mod._BLOCKS.clear()
