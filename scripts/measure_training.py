"""Measure training throughput and exact resume of train.py on this machine (GPU or CPU).

    python scripts/measure_training.py --out results/                       # 400M ParaGRU, ZeRO-2, T=2048
    python scripts/measure_training.py --smoke --out /tmp/m                 # CPU check at the debug size

Runs train.py three times in subprocesses: (1) N steps uninterrupted, (2) the same run killed with
SIGKILL after step K (checkpoints every C steps), (3) its resume to N. Reports tokens/s and MFU (median
over the steps after warm-up, from metrics.jsonl), peak memory, and the largest loss difference between
the resumed and the uninterrupted run. Writes measure_training.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(run_dir: Path, overrides: list[str], fault: str | None = None, nproc: int = 1) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PARARNN_TEST_FAULT", None)
    if fault:
        env["PARARNN_TEST_FAULT"] = fault
    started = time.perf_counter()
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run([*launcher, "train.py", f"run_dir={run_dir}", *overrides], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    # torchrun reports a SIGKILLed worker as exit code 1 after tearing the others down
    if result.returncode not in (0, -9) and not (fault and nproc > 1):
        sys.stderr.write(result.stderr[-8000:])
        raise SystemExit(f"train.py failed with exit code {result.returncode}")
    return time.perf_counter() - started


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="paragru")
    parser.add_argument("--size", default="400m")
    parser.add_argument("--deepspeed", default="zero2")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--kill-after", type=int, default=25)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=50277, help="model vocabulary (paper: GPT-NeoX 50,277)")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (processes) through torchrun")
    parser.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile each block)")
    parser.add_argument("--smoke", action="store_true", help="debug size on the CPU, to test this script")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.smoke:
        args.size, args.deepspeed, args.micro_batch, args.seq_len, args.vocab_size = "debug", "none", 2, 64, 4096
        args.steps, args.kill_after, args.checkpoint_every = 8, 6, 4
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"model={args.arch}", f"size={args.size}", f"deepspeed={args.deepspeed}", f"train.steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch * args.nproc}",
        f"data.seq_len={args.seq_len}", f"+model.overrides.vocab_size={args.vocab_size}",
        f"checkpoint.every={args.checkpoint_every}", "eval.every=0", "eval.at_end=false", "export.at_end=false",
        "logging.wandb_mode=disabled", "logging.progress_bar=false", "train.log_every=1",
        f"train.compile={str(args.compile).lower()}",
    ]
    reference, resumed = args.out / "reference", args.out / "resumed"
    wall = {"reference": run(reference, overrides, nproc=args.nproc)}
    wall["killed"] = run(resumed, overrides, fault=f"sigkill@{args.kill_after}", nproc=args.nproc)
    wall["resume"] = run(resumed, overrides, nproc=args.nproc)

    ref = {r["step"]: r for r in records(reference) if "loss" in r}
    res = {r["step"]: r for r in records(resumed) if "loss" in r}
    warm = [ref[s] for s in sorted(ref) if s > min(5, args.steps // 2)]
    resumed_steps = [s for s in range(args.checkpoint_every + 1, args.steps + 1)]
    summary = {
        "arch": args.arch, "size": args.size, "deepspeed": args.deepspeed, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "steps": args.steps, "gpus": args.nproc, "compile": args.compile,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in warm),
        "mfu": statistics.median(r["mfu"] for r in warm) if warm[0].get("mfu") is not None else None,
        "peak_memory_gib": max((r.get("mem_peak_gib", 0.0) for r in warm), default=None),
        "max_abs_loss_diff_after_resume": max(abs(res[s]["loss"] - ref[s]["loss"]) for s in resumed_steps),
        "loss_first_last": [ref[min(ref)]["loss"], ref[max(ref)]["loss"]],
        "wall_s": wall,
    }
    (args.out / "measure_training.json").write_text(json.dumps(summary, indent=2))
    print("| arch | size | ZeRO | micro-batch x T | tokens/s | MFU | peak GiB | resume max |dloss| |")
    print("|---|---|---|---|---|---|---|---|")
    mfu = f"{summary['mfu']:.1%}" if summary["mfu"] is not None else "-"
    print(f"| {args.arch} | {args.size} | {args.deepspeed} | {args.micro_batch} x {args.seq_len} | "
          f"{summary['tokens_per_s']:,.0f} | {mfu} | {summary['peak_memory_gib'] or 0:.1f} | "
          f"{summary['max_abs_loss_diff_after_resume']:.2e} |")


if __name__ == "__main__":
    main()
