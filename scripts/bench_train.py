"""Training throughput of ``train.py`` itself: the real loop (data loader, sync-free optimiser step, logging).

    python scripts/bench_train.py --archs paragru attention --layouts packed rows --out $OUT/bench_train.json
    python scripts/bench_train.py --size tiny --steps 12 --no-compile --precision fp32   # CPU smoke run

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_train")


def measure(arch: str, layout: str, a: argparse.Namespace) -> dict:
    """One configuration, in this process (the ``--worker`` entry)."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    import train as train_script
    import training.factory as factory
    import training.metrics as metrics

    run_dir = Path(a.work_dir) / f"{arch}-{layout}"
    overrides = [
        f"model={arch}", f"size={a.size}", f"data.seq_len={a.seq_len}", f"train.micro_batch_size={a.micro_batch}",
        f"train.global_batch_size={a.micro_batch}", f"train.steps={a.steps}", f"train.log_every={a.log_every}",
        f"train.precision={a.precision}", f"train.compile={str(a.compile).lower()}", "eval.every=0",
        "eval.at_end=false", "export.at_end=false", "logging.wandb_mode=disabled", "logging.progress_bar=false",
        "checkpoint.every=0", "resume=none", f"run_dir={run_dir}",
    ] + ([f"data.cache_dir={a.cache_dir}"] if a.cache_dir else [])
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    if layout == "rows":
        to_device = factory.to_device
        factory.to_device = lambda batch, device: to_device(
            {k: v for k, v in batch.items() if k != "position_ids"}, device)
    cuda = torch.cuda.is_available()
    stamps: dict[int, float] = {}
    log_step = metrics.MetricsLogger.log

    def stamped(self, step, record):  # train.py already synchronised for its tokens/s at a log step
        if cuda:
            torch.cuda.synchronize()
        stamps.setdefault(step, time.perf_counter())
        return log_step(self, step, record)

    metrics.MetricsLogger.log = stamped
    train_script.train(cfg)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    first, last = a.log_every, a.steps
    tokens = (last - first) * a.micro_batch * a.seq_len
    return {
        "arch": arch, "layout": layout, "size": a.size, "seq_len": a.seq_len, "micro_batch": a.micro_batch,
        "compile": a.compile, "precision": a.precision,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "tokens_per_s": tokens / (stamps[last] - stamps[first]),
        "step_ms": 1e3 * (stamps[last] - stamps[first]) / (last - first),
        "mem_peak_gib": max((r.get("mem_peak_gib") or 0.0) for r in records),
        "logged_tokens_per_s": [r["tokens_per_s"] for r in records if "tokens_per_s" in r],
        "losses": [r["loss"] for r in records if "loss" in r],
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


if __name__ == "__main__":
    main()
