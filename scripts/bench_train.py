"""Training throughput of ``train.py`` itself: the real loop (data loader, sync-free optimiser step, logging).

    python scripts/bench_train.py --archs paragru attention --layouts packed rows --out $OUT/bench_train.json
    python scripts/bench_train.py --size tiny --steps 12 --no-compile --precision fp32   # CPU smoke run
    python scripts/bench_train.py --archs paragru attention --layouts packed --profile   # + GPU time by kernel kind

Each (architecture, layout) runs ``train.train`` in its own process (a fresh torch.compile cache and
allocator) with ``train.global_batch_size = train.micro_batch_size`` (one micro-batch per step), checkpoints
and evaluation off. Layouts:

  packed  the data pipeline's batches as they are: documents packed into rows, ``position_ids`` restart
          at every document (RNN states reset there, attention masked to the document);
  rows    the same batches with ``position_ids`` dropped: one document per row (the layout of
          ``scripts/bench_models.py``).

tokens/s = tokens of the steps after the first logged step (compilation and warm-up excluded) / the wall
time between the two log steps, with ``torch.cuda.synchronize()`` at each (train.py logs every
``--log-every`` steps; nothing else syncs in between). The data is the bundled corpus (vocabulary 4096, so
the LM head is smaller than the paper's ~50k one): compare architectures with each other, not with the
50k-vocabulary numbers of ``bench_models.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import re
import time
from collections import defaultdict
from pathlib import Path

from pararnn_lm.provenance import config_dir

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_train")

# Kind of a CUDA kernel, from its name: the first pattern that matches wins (order matters: inductor's
# template kernels - FlexAttention - before its other kernels; GEMMs before the generic elementwise ones).
KERNEL_KINDS: dict[str, str] = {
    "paraRNN cell (Triton)": r"_shoot_|_coarse_update|_scan_",
    "attention": r"flash|fmha|flex|attention|triton_tem_",
    "GEMM": r"gemm|nvjet|cutlass|xmma|cublas|splitk|sm90_",
    "optimizer": r"adam|multi_tensor|foreach",
    "inductor fused": r"triton_(poi|red|per)_",
    "NCCL": r"nccl",
    "copy / fill / elementwise (eager)": r"elementwise|copy|fill|memcpy|memset|cat_|index",
    "reduction (eager)": r"reduce|softmax|norm|cross_entropy|nll",
}


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS.items() if re.search(pattern, low)), "other")


def summarise_kernels(events: list[tuple[str, float]], steps: int, top: int = 25) -> dict:
    """(kernel name, GPU microseconds) events of ``steps`` steps -> ms per step by kind and the busiest kernels."""
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in events:
        by_kind[kernel_kind(name)] += us
        by_name[name][0] += us
        by_name[name][1] += 1
    busiest = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "gpu_ms_per_step": sum(by_kind.values()) / 1e3 / steps,
        "by_kind_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "kind": kernel_kind(n), "ms_per_step": t / 1e3 / steps,
                         "calls_per_step": c / steps} for n, (t, c) in busiest],
    }


def measure(arch: str, layout: str, a: argparse.Namespace) -> dict:
    """One configuration, in this process (the ``--worker`` entry)."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pararnn_lm.train as train_script
    import pararnn_lm.training.factory as factory
    import pararnn_lm.training.metrics as metrics

    run_dir = Path(a.work_dir) / f"{arch}-{layout}"
    overrides = [
        f"model={arch}", f"size={a.size}", f"data.seq_len={a.seq_len}", f"train.micro_batch_size={a.micro_batch}",
        f"train.global_batch_size={a.micro_batch}", f"train.steps={a.steps}", f"train.log_every={a.log_every}",
        f"train.precision={a.precision}", f"train.compile={str(a.compile).lower()}", "eval.every=0",
        "eval.at_end=false", "export.at_end=false", "logging.wandb_mode=disabled", "logging.progress_bar=false",
        "checkpoint.every=0", "resume=none", f"run_dir={run_dir}",
    ] + ([f"data.cache_dir={a.cache_dir}"] if a.cache_dir else [])
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    if layout == "rows":
        to_device = factory.to_device
        factory.to_device = lambda batch, device: to_device(
            {k: v for k, v in batch.items() if k != "position_ids"}, device)
    cuda = torch.cuda.is_available()
    stamps: dict[int, float] = {}
    log_step = metrics.MetricsLogger.log

    first, last = a.log_every, a.steps
    profiler = None

    def stamped(self, step, record):  # train.py already synchronised for its tokens/s at a log step
        nonlocal profiler
        if cuda:
            torch.cuda.synchronize()
        stamps.setdefault(step, time.perf_counter())
        if a.profile and cuda and step == first:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            profiler.__enter__()
        if profiler is not None and step == last:
            profiler.__exit__(None, None, None)
        return log_step(self, step, record)

    metrics.MetricsLogger.log = stamped
    train_script.train(cfg)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    tokens = (last - first) * a.micro_batch * a.seq_len
    kernels = {}
    if profiler is not None:
        events = [(e.name, e.device_time) for e in profiler.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
        kernels = {"profiled": True, "kernels": summarise_kernels(events, last - first)}
    return {
        "arch": arch, "layout": layout, "size": a.size, "seq_len": a.seq_len, "micro_batch": a.micro_batch,
        "compile": a.compile, "precision": a.precision,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "tokens_per_s": tokens / (stamps[last] - stamps[first]),
        "step_ms": 1e3 * (stamps[last] - stamps[first]) / (last - first),
        "mem_peak_gib": max((r.get("mem_peak_gib") or 0.0) for r in records),
        "logged_tokens_per_s": [r["tokens_per_s"] for r in records if "tokens_per_s" in r],
        "losses": [r["loss"] for r in records if "loss" in r],
        **kernels,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["paragru", "attention"])
    p.add_argument("--layouts", nargs="+", default=["packed", "rows"], choices=["packed", "rows"])
    p.add_argument("--size", default="400m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=10, help="the first log step ends the warm-up")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "auto"])
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--cache-dir", default=None, help="data cache (tokenizer + token shards); default: data's")
    p.add_argument("--work-dir", default="/tmp/bench_train")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--out", default=None, help="JSON of every configuration")
    p.add_argument("--profile", action="store_true",
                   help="GPU time per step by kind of kernel (torch.profiler; tokens/s then not a throughput)")
    p.add_argument("--worker", nargs=2, metavar=("ARCH", "LAYOUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.steps <= a.log_every:
        p.error("--steps must exceed --log-every (the first log step ends the warm-up)")
    if a.worker:
        print("RESULT " + json.dumps(measure(*a.worker, a)), flush=True)
        return []

    forwarded = list(argv if argv is not None else sys.argv[1:])
    results: list[dict] = []
    for arch in a.archs:
        for layout in a.layouts:
            cmd = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--worker", arch, layout]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if lines else {
                    "arch": arch, "layout": layout, "error": (proc.stderr or proc.stdout)[-1500:]}
            except subprocess.TimeoutExpired:
                row = {"arch": arch, "layout": layout, "error": f"timed out after {a.timeout:.0f} s"}
            results.append(row)
            if "error" in row:
                log.error("%s / %s failed: %s", arch, layout, row["error"])
            else:
                log.info("%s / %s: %.0f tokens/s (%.1f ms/step, peak %.1f GiB)", arch, layout,
                         row["tokens_per_s"], row["step_ms"], row["mem_peak_gib"])
            if a.out:
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(results, indent=1))
    print(render(results))
    if any("kernels" in r for r in results):
        print(render_kernels(results))
    return results


def render(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    ref = {r["layout"]: r["tokens_per_s"] for r in ok if r["arch"] == "attention"}
    lines = ["| arch | layout | tokens/s | ms/step | vs attention (same layout) | peak GiB |", "|---|---|---|---|---|---|"]
    for r in ok:
        rel = f"{r['tokens_per_s'] / ref[r['layout']]:.2f}x" if r["layout"] in ref else "-"
        lines.append(f"| {r['arch']} | {r['layout']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {rel} "
                     f"| {r['mem_peak_gib']:.1f} |")
    return "\n".join(lines)



def render_kernels(results: list[dict]) -> str:
    """GPU ms per step by kind of kernel, one column per profiled configuration."""
    rows = [r for r in results if "kernels" in r]
    kinds = list(dict.fromkeys(k for r in rows for k in r["kernels"]["by_kind_ms_per_step"]))
    head = "| GPU ms / step | " + " | ".join(f"{r['arch']} ({r['layout']})" for r in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for kind in kinds + ["total"]:
        cells = [r["kernels"]["gpu_ms_per_step"] if kind == "total" else r["kernels"]["by_kind_ms_per_step"].get(kind, 0.0)
                 for r in rows]
        lines.append(f"| {kind} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    for r in rows:
        lines.append(f"\n{r['arch']} ({r['layout']}), busiest kernels (ms / step, calls / step):")
        lines += [f"  {k['ms_per_step']:7.2f} {k['calls_per_step']:6.0f}  [{k['kind']}] {k['name'][:110]}"
                  for k in r["kernels"]["top_kernels"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
