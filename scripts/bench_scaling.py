"""Data-parallel scaling of ``train.py``: tokens/s, MFU, peak memory per GPU and scaling efficiency
over 1 .. N GPUs of one host, each configuration a real ``torchrun`` launch of train.py.

    python scripts/bench_scaling.py --archs paragru attention --size 1b --deepspeed zero2 --gpus 1 2 4 8 \\
        --micro-batch 8 --compile --out scripts/results/scaling_1b.json
    python scripts/bench_scaling.py --archs paragru attention --size 7b --deepspeed zero3 --gpus 8 \\
        --micro-batch 2 --out scripts/results/step_7b.json
    python scripts/bench_scaling.py --smoke --out /tmp/scaling.json      # CPU check (debug size, gloo)

Weak scaling, as data-parallel pretraining runs: every rank keeps ``--micro-batch`` sequences per step
(``train.global_batch_size = micro-batch x GPUs``, no gradient accumulation), so the ideal is N times the
one-GPU tokens/s and ``efficiency = tokens/s(N) / (N x tokens/s(1))``. tokens/s, step time and MFU are
medians over the log steps after the first (compilation and warm-up excluded); each log step reads the
device once (train.py makes no other host sync). ``ms/seq/GPU`` = GPU-milliseconds per sequence of
``--seq-len`` tokens (step time / micro-batch): the paper's per-sequence normalisation of its step times.
Peak memory is the largest over the ranks. The data is the bundled corpus with the model's vocabulary set
to ``--vocab-size`` (default 50,277, the paper's GPT-NeoX size, so the LM head costs what it costs there).
A configuration that fails (e.g. out of memory) is recorded with its error and the others still run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_scaling")


def launch_command(nproc: int, port: int) -> list[str]:
    """One process per GPU through torchrun (also for one GPU: DeepSpeed wants a process group anyway)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--master-port={port}", "train.py"]


def overrides(arch: str, nproc: int, run_dir: Path, a: argparse.Namespace) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model={arch}", f"size={a.size}", f"deepspeed={a.deepspeed}",
        f"data.seq_len={a.seq_len}", f"+model.overrides.vocab_size={a.vocab_size}",
        f"train.micro_batch_size={a.micro_batch}", f"train.global_batch_size={a.micro_batch * nproc}",
        f"train.steps={a.steps}", f"train.log_every={a.log_every}", f"train.compile={str(a.compile).lower()}",
        f"train.activation_checkpointing={str(a.activation_checkpointing).lower()}",
        f"train.precision={a.precision}", "eval.every=0", "eval.at_end=false", "export.at_end=false",
        "checkpoint.every=0", "resume=none", "logging.wandb_mode=disabled", "logging.progress_bar=false",
        *([f"data.cache_dir={a.cache_dir}"] if a.cache_dir else []), *a.extra,
    ]


def summarise(records: list[dict], log_every: int) -> dict:
    """Medians over the log steps after the first (that interval holds compilation and warm-up)."""
    steps = [r for r in records if "tokens_per_s" in r and r["step"] > log_every]
    if not steps:
        raise ValueError(f"no log step after step {log_every}: raise --steps")
    mfu = [r["mfu"] for r in steps if r.get("mfu") is not None]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "step_time_s": statistics.median(r["step_time_s"] for r in steps),
        "mfu": statistics.median(mfu) if mfu else None,
        "mem_peak_gib": max((r.get("mem_peak_gib") or 0.0) for r in records) or None,
        "losses": [r["loss"] for r in records if "loss" in r],
        "log_steps": [r["step"] for r in steps],
    }


def run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group: a timeout kills torchrun AND its workers, which would
    otherwise keep their GPUs busy during the next configuration."""
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def measure(arch: str, nproc: int, a: argparse.Namespace, devices: str | None = None, port: int | None = None) -> dict:
    """One torchrun launch of train.py; ``devices`` (CUDA_VISIBLE_DEVICES) and ``port`` when several
    configurations share the machine (--side-by-side)."""
    run_dir = Path(a.work_dir) / f"{arch}-{a.size}-{nproc}gpu"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    if a.smoke:
        env["DS_ACCELERATOR"] = "cpu"
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    cmd = launch_command(nproc, port or a.port) + overrides(arch, nproc, run_dir, a)
    row = {"arch": arch, "size": a.size, "gpus": nproc, "deepspeed": a.deepspeed, "micro_batch": a.micro_batch,
           "seq_len": a.seq_len, "vocab_size": a.vocab_size, "compile": a.compile,
           "activation_checkpointing": a.activation_checkpointing, "command": " ".join(cmd[1:])}
    if devices is not None:
        row["devices"] = devices  # ran beside other configurations, on these GPUs only
    started = time.perf_counter()
    try:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # no stale steps from an earlier run
        proc = run_group(cmd, env, a.timeout)
        row["wall_s"] = time.perf_counter() - started
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-3000:]
            row["error"] = ("out of memory: " if "out of memory" in tail.lower() else "") + f"exit {proc.returncode}: {tail}"
            return row
        row.update(summarise(read_metrics(run_dir), a.log_every))
    except subprocess.TimeoutExpired:
        row["wall_s"] = time.perf_counter() - started
        try:  # keep the log steps written before the limit: a slow run still gives its step time
            row.update(summarise(read_metrics(run_dir), a.log_every), timed_out=True)
        except (OSError, ValueError):
            row["error"] = f"timed out after {a.timeout:.0f} s"
    except (OSError, ValueError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    if "tokens_per_s" in row:
        row["ms_per_sequence_per_gpu"] = 1e3 * row["step_time_s"] / a.micro_batch
    return row


def pack_waves(configs: list[tuple[str, int]], slots: int) -> list[list[tuple[str, int]]]:
    """Consecutive configurations grouped so that each group's GPU counts fit the machine together."""
    waves: list[list[tuple[str, int]]] = []
    used = slots
    for arch, nproc in configs:
        if used + nproc > slots:
            waves.append([])
            used = 0
        waves[-1].append((arch, nproc))
        used += nproc
    return waves


def run_wave(wave: list[tuple[str, int]], a: argparse.Namespace) -> list[dict]:
    """Run the configurations of one wave at once, each on its own GPUs and rendezvous port."""
    if len(wave) == 1:
        return [measure(*wave[0], a)]
    jobs, first = [], 0
    for i, (arch, nproc) in enumerate(wave):
        devices = None if a.smoke else ",".join(str(g) for g in range(first, first + nproc))
        jobs.append((arch, nproc, devices, a.port + 1 + i))
        first += nproc
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: measure(job[0], job[1], a, devices=job[2], port=job[3]), jobs))


def _setting(r: dict) -> tuple:
    """Rows are comparable (one scaling curve) when they share architecture, size and how they ran."""
    return r["arch"], r["size"], bool(r.get("compile")), bool(r.get("activation_checkpointing"))


def _setting_label(r: dict) -> str:
    return ("compiled" if r.get("compile") else "eager") + (" + ckpt" if r.get("activation_checkpointing") else "")


def add_efficiency(rows: list[dict]) -> list[dict]:
    """efficiency = tokens/s(N) / (N x tokens/s(1)) per (arch, size, compile, checkpointing), where the 1-GPU
    run of the same setting succeeded."""
    single = {_setting(r): r["tokens_per_s"] for r in rows if r["gpus"] == 1 and "tokens_per_s" in r}
    for r in rows:
        base = single.get(_setting(r))
        if base and "tokens_per_s" in r:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * base)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| arch | size | ZeRO | GPUs | micro-batch | mode | tokens/s | per GPU | efficiency | MFU | ms/seq/GPU "
             "| peak GiB/GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['arch']} | {r['size']} | {r['deepspeed']} | {r['gpus']} | {r['micro_batch']} "
                f"| {_setting_label(r)} ")
        if "error" in r:
            lines.append(head + f"| failed: {r['error'][:60].splitlines()[0]} | | | | | |")
            continue
        eff = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        mem = f"{r['mem_peak_gib']:.1f}" if r.get("mem_peak_gib") else "-"
        lines.append(head + f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / r['gpus']:,.0f} | {eff} | {mfu} "
                     f"| {r['ms_per_sequence_per_gpu']:.0f} | {mem} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    """tokens/s against GPUs per architecture, with the ideal (linear) line from each 1-GPU point."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key in dict.fromkeys(_setting(r) for r in rows):
        runs = [r for r in rows if _setting(r) == key and "tokens_per_s" in r]
        if not runs:
            continue
        gpus, tps = zip(*sorted((r["gpus"], r["tokens_per_s"]) for r in runs))
        line, = ax.plot(gpus, tps, "o-", label=f"{key[0]} {key[1]} ({_setting_label(runs[0])})")
        if gpus[0] == 1:
            ax.plot(gpus, [tps[0] * g for g in gpus], ":", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("GPUs (data parallel)")
    ax.set_ylabel("training tokens/s")
    ax.set_title("train.py scaling (dotted: linear)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


def merge(paths: list[Path], out: Path | None) -> list[dict]:
    """Rows of several result files in one table; efficiency recomputed against the merged 1-GPU rows."""
    rows = [row for path in paths for row in json.loads(Path(path).read_text())]
    for row in rows:
        row.pop("scaling_efficiency", None)
    rows.sort(key=lambda r: (r["size"], *_setting(r), r["gpus"]))
    add_efficiency(rows)
    print(render(rows))
    if out:
        save(rows, out)
        plot(rows, out.with_suffix(".png"))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["paragru", "attention"])
    p.add_argument("--size", default="1b")
    p.add_argument("--deepspeed", default="zero2", help="configs/deepspeed option: none, zero2, zero3, ...")
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8],
                   help="process counts; on a GPU machine those above its GPU count are skipped")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=50277)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=5, help="the first log interval is warm-up")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--cache-dir", default=None, help="data cache (tokenizer + token shards)")
    p.add_argument("--work-dir", default="/tmp/bench_scaling")
    p.add_argument("--port", type=int, default=29511)
    p.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
    p.add_argument("--out", type=Path, default=None, help="JSON of every configuration (+ a .png plot beside it)")
    p.add_argument("--side-by-side", action="store_true",
                   help="run configurations that fit the machine together at once (e.g. four 1-GPU baselines "
                        "on four GPUs), each on its own GPUs; saves time, shares the host's CPUs and PCIe")
    p.add_argument("--smoke", action="store_true", help="CPU check: debug size, T=64, no DeepSpeed, gloo")
    p.add_argument("extra", nargs="*", help="more train.py overrides, e.g. optim.lr=1e-3")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="no runs: combine result files (e.g. one job per GPU count), recompute efficiency, "
                        "print, and write --out + plot")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.merge:
        return merge(a.merge, a.out)
    if a.smoke:
        a.size, a.deepspeed, a.micro_batch, a.seq_len, a.vocab_size, a.precision = "debug", "none", 2, 64, 4096, "fp32"
        a.steps, a.log_every = min(a.steps, 6), min(a.log_every, 2)
    if a.steps <= a.log_every:
        p.error("--steps must exceed --log-every (the first log interval is warm-up)")
    gpus = a.gpus
    available = os.cpu_count() or 1  # --smoke: CPU processes
    if not a.smoke:
        import torch
        available = torch.cuda.device_count()
        if available == 0:
            p.error("no GPU here: use --smoke for the CPU check")
        skipped = [n for n in gpus if n > available]
        if skipped:
            log.warning("skipping %s GPUs: this machine has %d", skipped, available)
        gpus = [n for n in gpus if n <= available]
    configs = [(arch, nproc) for arch in a.archs for nproc in gpus]
    if a.side_by_side:  # fewest waves: the smallest configurations together first
        waves = pack_waves(sorted(configs, key=lambda c: c[1]), available)
    else:
        waves = [[c] for c in configs]
    rows: list[dict] = []
    for wave in waves:
        for row in run_wave(wave, a):
            rows.append(row)
            if "error" in row:
                log.error("%s %s on %d: %s", row["arch"], a.size, row["gpus"], row["error"][-800:])
            else:
                log.info("%s %s on %d GPU(s): %.0f tokens/s, %.1f ms/step, peak %s GiB", row["arch"], a.size,
                         row["gpus"], row["tokens_per_s"], 1e3 * row["step_time_s"], row.get("mem_peak_gib"))
        add_efficiency(rows)
        if a.out:  # after every wave: a later crash or timeout keeps what was measured
            save(rows, a.out)
    print(render(rows))
    if a.out:
        plot(rows, a.out.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
