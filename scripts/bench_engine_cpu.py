"""Time the reference modes of the engine on the CPU: sequential loop vs newton_torch.

    python scripts/bench_engine_cpu.py --batch 4 --length 1024 --dim 256 --heads 4

Prints a markdown table and writes JSON to scripts/results/. Module level: per-head projection +
cell (+ all gradients for fwd+bwd, loss = sum(y^2)). Also reports the Newton iterations used at the
paper's initialisation and at larger, "trained-like" recurrent gains.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from pararnn_lm.kernels import NewtonStats, ParaGRULayer, ParaLSTMLayer

logger = logging.getLogger("bench_engine_cpu")
LAYERS = {"paragru": ParaGRULayer, "paralstm": ParaLSTMLayer}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=list(LAYERS), default="paragru")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trained-gain", type=float, default=0.9,
                        help="per-channel recurrent gains drawn from U(-g, g) without the norm bound")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    layer = LAYERS[args.cell](args.dim, args.heads)
    x = torch.randn(args.batch, args.length, args.dim, requires_grad=True)

    rows = []
    for mode in ("sequential", "newton_torch"):
        layer.mode = mode

        def forward():
            with torch.no_grad():
                layer(x)

        def forward_backward():
            y, _ = layer(x)
            y.square().sum().backward()

        rows.append({"mode": mode, "fwd_ms": timed(forward, args.repeats), "fwd_bwd_ms": timed(forward_backward, args.repeats)})

    layer.mode = "newton_torch"
    convergence = {}
    for label in ("default_init", "trained_like"):
        if label == "trained_like":
            layer.gain_bound = None
            with torch.no_grad():
                layer.recurrent.uniform_(-args.trained_gain, args.trained_gain)
        with torch.no_grad():
            layer(x)
        stats: NewtonStats = layer.last_stats
        convergence[label] = {"iterations": stats.iterations, "residual": stats.residual, "converged": stats.converged}

    result = {
        "cell": args.cell, "batch": args.batch, "length": args.length, "dim": args.dim, "heads": args.heads,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "rows": rows, "newton": convergence, "trained_gain": args.trained_gain,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    seq = rows[0]
    lines = ["| mode | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['fwd_ms']:.1f} | {row['fwd_bwd_ms']:.1f} | "
            f"{seq['fwd_ms'] / row['fwd_ms']:.1f}x | {seq['fwd_bwd_ms'] / row['fwd_bwd_ms']:.1f}x |"
        )
    for label, c in convergence.items():
        lines.append(f"\nNewton ({label}): {c['iterations']} iterations, residual {c['residual']:.2e}, converged={c['converged']}")
    logger.info("\n".join(lines))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
