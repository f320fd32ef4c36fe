"""Train one-layer models on the paper's synthetic tasks (arXiv 2510.21450, Table 6) and write JSON results.

    python -m pararnn_lm.synthetic --task parity --arch paragru                    # one cell, 3 seeds
    python -m pararnn_lm.synthetic --grid --config table6 --out runs/synthetic/table6   # 4 archs x 5 tasks x 3 seeds
    python -m pararnn_lm.synthetic --grid --tasks mqar --sweep lr=5e-4,2e-3 --out runs/synthetic/mqar_lr
    python -m pararnn_lm.synthetic --grid --archs paragru --tasks keep_nth --curriculum 12:30000 25:15000 \\
        --out runs/synthetic/keep_nth_curriculum      # shorter sequences first (not the paper's recipe)
    python -m pararnn_lm.synthetic --grid --config table6 --devices all --concurrent-runs 15 \\
        --time-budget-min 60 --out runs/synthetic/table6     # every GPU; the same call with --resume continues

``--config`` takes a YAML of SyntheticTrainConfig fields or the name of one shipped in configs/synthetic
(``table6``: the paper's recipe; ``quick``: a reduced smoke grid); explicit flags override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any, Sequence

import torch

from pararnn_lm.eval.synthetic.models import ARCHS
from pararnn_lm.eval.synthetic.tasks import TASKS
from pararnn_lm.eval.tables import render_sweep, render_table6

from .config import SyntheticTrainConfig, load_config, parse_curriculum, parse_sweep
from .devices import resolve_devices
from .grid import run_grid, run_task


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pararnn_lm.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML of SyntheticTrainConfig fields, or a shipped config's name (table6, quick); "
                        "explicit flags override it")
    p.add_argument("--task", choices=sorted(TASKS), help="one task (omit with --grid)")
    p.add_argument("--arch", default="paragru", help=f"one of {ARCHS}")
    p.add_argument("--grid", action="store_true", help="run archs x tasks (default: all) and render Table 6")
    p.add_argument("--archs", nargs="+", default=None, help=f"default: all of {ARCHS}")
    p.add_argument("--tasks", nargs="+", default=None, help=f"default: all of {tuple(TASKS)}")
    p.add_argument("--cells", nargs="+", default=None, metavar="ARCH:TASK",
                   help="with --grid: exactly these cells (e.g. transformer:hop1 paragru:hop2) instead of archs x tasks")
    p.add_argument("--sweep", nargs="+", default=None, metavar="FIELD=V1,V2",
                   help="with --grid: train the grid under every combination of these settings at once, e.g. "
                        "lr=5e-4,1e-3,2e-3 d_model=64,128 model_kwargs.gain_bound=none,0.9 (one folder each under --out)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2")
    p.add_argument("--out", default="runs/synthetic", help="output folder (default runs/synthetic)")
    p.add_argument("--seq-len", type=int, default=None, help="default 100")
    p.add_argument("--n-train", type=int, default=None, help="default 10000")
    p.add_argument("--n-test", type=int, default=None, help="default 100000")
    p.add_argument("--n-val", type=int, default=None, help="default 2000")
    p.add_argument("--max-epochs", type=int, default=None, help="default 3000")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on the main stage's steps (with --curriculum, the stages' steps come on top)")
    p.add_argument("--eval-every", type=int, default=None, help="default 1")
    p.add_argument("--lr", type=float, default=None, help="default 5e-4")
    p.add_argument("--batch-size", type=int, default=None, help="default 16")
    p.add_argument("--retain-gate-bias", type=float, default=None,
                   help="initial retention-gate bias of the ParaGRU/ParaLSTM cells (default 0, the paper's); "
                        "B > 0 starts each channel keeping sigmoid(B) of its state per step")
    p.add_argument("--curriculum", nargs="+", default=None, metavar="L:STEPS",
                   help="train these (length, steps) stages first, e.g. 12:30000 25:15000 50:15000, then the main "
                        "stage at --seq-len; validation always at --seq-len (ours: the paper states no curriculum)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--devices", nargs="+", default=None, metavar="DEV",
                   help="train on several devices, one worker process each, the runs dealt round-robin "
                        "(e.g. cuda:0 cuda:1; 'all' = every visible GPU); --concurrent-runs counts per device")
    p.add_argument("--concurrent-runs", type=int, default=None,
                   help="runs trained at once, each on its own CUDA stream (default 1; the whole grid on a GPU: e.g. 60)")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="wall-clock cap; unfinished runs save their state and report their best-validation weights")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager steps on CUDA (default: one graph per run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs a previous call (same --out, same settings) stopped at its time budget")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sweep = parse_sweep(a.sweep) if a.sweep else None
    if sweep and not a.grid:
        raise SystemExit("--sweep needs --grid")
    cfg = load_config(a.config) if a.config else SyntheticTrainConfig()
    try:
        curriculum = parse_curriculum(a.curriculum) if a.curriculum else None
        devices = resolve_devices(a.devices) if a.devices else None
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    flags = dict(seeds=tuple(a.seeds) if a.seeds else None, seq_len=a.seq_len, n_train=a.n_train, n_test=a.n_test,
                 n_val=a.n_val, max_epochs=a.max_epochs, max_steps=a.max_steps, eval_every=a.eval_every, lr=a.lr,
                 batch_size=a.batch_size, retain_gate_bias=a.retain_gate_bias, concurrent_runs=a.concurrent_runs,
                 curriculum=curriculum, devices=devices,
                 time_budget_s=None if a.time_budget_min is None else 60 * a.time_budget_min,
                 cuda_graph=False if a.no_cuda_graph else None, resume=True if a.resume else None)
    both = sorted(k for k in sweep or {} if flags.get(k) is not None)
    if both:
        raise SystemExit(f"{both} given both as a flag and in --sweep")
    cfg = dataclasses.replace(cfg, task=a.task or cfg.task, arch=a.arch, device=a.device, progress=not a.no_progress,
                              **{k: v for k, v in flags.items() if v is not None})
    if a.grid:
        cells = None
        if a.cells:
            if a.archs or a.tasks:
                raise SystemExit("give --cells or --archs/--tasks, not both")
            bad = [c for c in a.cells if c.count(":") != 1]
            if bad:
                raise SystemExit(f"--cells takes ARCH:TASK pairs, got {bad}")
            cells = [tuple(c.split(":")) for c in a.cells]
        grid = run_grid(cfg, a.archs or list(ARCHS), a.tasks or list(TASKS), a.out, cells=cells, sweep=sweep)
        print(render_sweep(grid) if sweep else render_table6(grid["results"]))  # the command's output
        return grid
    if not a.task:
        raise SystemExit("give --task or --grid")
    res = run_task(cfg, out_dir=a.out)
    print(json.dumps({k: res[k] for k in ("task", "arch", "accuracy", "best_seed")}))
    return res
