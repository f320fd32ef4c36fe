"""Training throughput of ``train.py`` itself: the real loop (data loader, sync-free optimiser step, logging),
one ``torchrun`` launch per configuration, on one GPU or data-parallel over several.

    # 400M, T=2048, micro-batch 16, packed documents, compiled blocks, one GPU
    python scripts/bench_train.py --archs paragru attention paralstm --size 400m --seq-len 2048 \\
        --micro-batch 16 --layouts packed
    # the same, also against revision 016a20d: one side-by-side table (tokens/s, ratio)
    python scripts/bench_train.py --archs paragru attention paralstm --layouts packed --base 016a20d
    # weak scaling over 1..8 GPUs of one host (ZeRO-2); --side-by-side runs small configurations at once
    python scripts/bench_train.py --archs paragru attention --size 1b --deepspeed zero2 --gpus 1 2 4 8 --micro-batch 8
    # the largest micro-batch that fits, and its throughput (1, 2, 4, 8, 16, 24, 32, 48 until out of memory)
    python scripts/bench_train.py --archs paragru attention --micro-batch-search 48
    # exact resume: the same run killed (SIGKILL) after --kill-after steps and resumed; largest loss difference
    python scripts/bench_train.py --archs paragru --check-resume --checkpoint-every 20 --kill-after 25
    # GPU time per step by kind of kernel (torch.profiler; tokens/s then not a throughput)
    python scripts/bench_train.py --archs paragru attention --profile
    # several result files (e.g. one job per GPU count) in one table, efficiency recomputed
    python scripts/bench_train.py --merge a.json b.json --out merged.json
    # long context: T = 2048 .. 32768 at 32,768 tokens per step and GPU (micro-batch 16, 4, 2, 1), one
    # sequence per row (SDPA flash for attention), tokens/s and peak memory per token against T
    python scripts/bench_train.py --archs paragru paralstm attention mamba2 --seq-lens 2048 8192 16384 32768 \
        --tokens-per-step 32768
    # CPU check
    python scripts/bench_train.py --size debug --seq-len 64 --micro-batch 2 --steps 6 --log-every 2 --no-compile --vocab-size 0

What runs: ``python -m pararnn_lm.train`` with checkpoints, evaluation, export and W&B off, one process per GPU
(CPU processes on a machine without GPUs). Weak scaling, as data-parallel pretraining runs: every rank keeps
``--micro-batch`` sequences per step (``train.global_batch_size = micro-batch x GPUs``, no gradient
accumulation), so ``efficiency = tokens/s(N) / (N x tokens/s(1))`` of the same setting. Layouts:

  packed  the data pipeline's batches as they are: documents packed into rows, ``position_ids`` restart
          at every document (RNN states reset there, attention masked to the document);
  rows    the same batches without ``position_ids``: each row one sequence, nothing reset.

Long context (``--tokens-per-step N``, with ``--seq-lens`` or ``--seq-len``): the tokens per step and GPU stay N,
the micro-batch of sequence length T is N / T (an error unless T divides N). The layout defaults to ``rows``:
one sequence of T tokens per row, so attention takes SDPA's causal flash kernel (forced there on CUDA: every
other SDPA backend is switched off, a run that cannot use flash fails instead of measuring another kernel)
and Mamba2 must run a Triton SSD kernel (``models.ssd.SSD_KERNELS``; the chunked PyTorch SSD is refused on
CUDA). The table has one line per architecture and one column per T (tokens/s; peak memory per token = peak
allocated bytes / tokens of a micro-step); a configuration that runs out of memory reads ``OOM`` there and
the sweep goes on. The plot beside ``--out`` shows both against T.

Numbers come from the run's metrics.jsonl. The first log interval (compilation, warm-up) is excluded;
``step_ms`` = the wall time of the later intervals / their steps (train.py synchronises the device once per
log step and nowhere else), ``tokens_per_s`` = tokens per step / step time, MFU = tokens/s x FLOPs per token
(6 N_non-embedding + 6 L_attn d T) / (GPUs x peak bf16 FLOP/s of the card). ``ms/seq/GPU`` = step time /
micro-batch: GPU-milliseconds per sequence of ``--seq-len`` tokens. Peak memory is the largest over ranks.
The text is the bundled corpus; the model's vocabulary is ``--vocab-size`` (default 50,277, the paper's
GPT-NeoX size, so the LM head costs what it costs there; 0: the corpus tokenizer's 4,096).

``--base REV`` checks REV out in a temporary ``git worktree`` and runs every configuration there too (next to
the same configuration of this checkout), with ``PYTHONPATH`` pointing at that tree; REV must have the
``pararnn_lm`` package layout (016a20d or later). A configuration that fails (e.g. out of memory) is recorded
with its error and the others still run. Results go to ``--out`` (default ``runs/bench/train/<time>.json``,
with a tokens/s-against-GPUs plot beside it when several GPU counts ran).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "runs" / "bench" / "train"
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


def micro_batch_grid(most: int) -> list[int]:
    """1, 2, 4, 8, then steps of about 1.5x (16, 24, 32, 48, 64, 96, ...) up to ``most``: "the largest
    micro-batch that fits" without the factor-2 cliff of a powers-of-two search (a 400M ParaGRU fits
    24 x 2048 tokens on an 80 GB H100 but not 32)."""
    grid, mb = [], 1
    while mb <= most:
        grid.append(mb)
        if mb < 16:
            mb *= 2
        else:  # a power of two x 1.5, then up to the next power of two
            mb = mb * 3 // 2 if mb & (mb - 1) == 0 else mb * 4 // 3
    return grid


# ----------------------------------------------------------------------------- the training process
def worker(spec: dict) -> None:
    """One rank of one configuration: ``python -m pararnn_lm.train OVERRIDES`` of the ``pararnn_lm`` on
    ``sys.path`` (this checkout, or the ``--base`` worktree), with the benchmark's hooks installed.

    The hooks touch only what every revision with the ``pararnn_lm`` layout has: the data loader's
    ``PackedLoader`` and the loop's ``MetricsLogger``.
    """
    if spec["layout"] == "rows":
        drop_document_positions()
    if spec.get("sdpa_flash_only"):
        sdpa_flash_only()
    if spec.get("require_ssd_kernel"):
        require_ssd_kernel(Path(spec["run_dir"]) / "ssd_backend.json")
    if spec.get("profile"):
        profile_between_log_steps(spec["log_every"], spec["steps"], Path(spec["run_dir"]) / "kernels.json")
    if os.environ.get("RANK", "0") == "0":  # what ran: which package (this checkout's or the worktree's), where
        import pararnn_lm
        import torch

        (Path(spec["run_dir"]) / "worker.json").write_text(json.dumps({
            "package_dir": str(Path(pararnn_lm.__file__).parent), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))
    sys.argv = ["pararnn_lm.train", *spec["overrides"]]
    runpy.run_module("pararnn_lm.train", run_name="__main__", alter_sys=True)


def drop_document_positions() -> None:
    """The ``rows`` layout: the loader's batches without ``position_ids`` (no document resets)."""
    from pararnn_lm.data.loader import PackedLoader

    batches = PackedLoader.__iter__

    def rows(self):
        for batch in batches(self):
            yield {k: v for k, v in batch.items() if k != "position_ids"}

    PackedLoader.__iter__ = rows


def sdpa_flash_only() -> None:
    """SDPA with the flash kernel or not at all: attention of a long-context run that would fall back to
    the memory-efficient or the math kernel fails instead (the global flags are what torch.compile reads)."""
    import torch

    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_math_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def require_ssd_kernel(out: Path) -> None:
    """Mamba2 layers on CUDA must run a Triton SSD kernel (``SSD_KERNELS``): the chunked PyTorch SSD is the
    CPU reference, and timing it would not measure Mamba2. Checked as each layer is built (eagerly, outside
    the compiled blocks) for this rank's GPU; the backend is written to ``out``."""
    import torch
    from pararnn_lm.models.mixers import Mamba2Mixer
    from pararnn_lm.models.ssd import resolve_ssd_backend

    build = Mamba2Mixer.__init__
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def checked(self, config, layer_idx):
        build(self, config, layer_idx)
        backend = resolve_ssd_backend(self.backend, device)
        if backend == "torch":
            raise RuntimeError(f"Mamba2 would run the chunked PyTorch SSD on CUDA (ssd_backend={self.backend!r}): "
                               "install a Triton SSD kernel (fla-core: pip install 'pararnn-lm[mamba]'; or mamba-ssm)")
        if os.environ.get("RANK", "0") == "0":
            out.write_text(json.dumps({"ssd_backend": backend}))

    Mamba2Mixer.__init__ = checked


def profile_between_log_steps(first: int, last: int, out: Path) -> None:
    """CUDA kernels of the steps between the first and the last log step (each log step has just
    synchronised the device), summarised into ``out`` by the main rank."""
    import torch
    from pararnn_lm.training.metrics import MetricsLogger

    log_step = MetricsLogger.log
    profiler = None

    def profiled(self, step, record):
        nonlocal profiler
        if self.enabled and torch.cuda.is_available():
            if step == first:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                profiler.__enter__()
            elif step == last and profiler is not None:
                profiler.__exit__(None, None, None)
                events = [(e.name, e.device_time) for e in profiler.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
                out.write_text(json.dumps(summarise_kernels(events, last - first)))
                profiler = None
        return log_step(self, step, record)

    MetricsLogger.log = profiled


# ----------------------------------------------------------------------------- revisions
@dataclasses.dataclass(frozen=True)
class Revision:
    """The code a configuration runs: this checkout (``tree`` None) or a ``--base`` worktree."""

    label: str  # as the table shows it: "this" or the REV argument
    commit: str
    tree: Path | None = None

    @property
    def root(self) -> Path:
        return self.tree or ROOT


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def this_checkout() -> Revision:
    try:
        commit = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return Revision("this", commit)


@contextlib.contextmanager
def base_worktree(rev: str) -> Iterator[Revision]:
    """REV as a source tree: a temporary worktree of a git revision, or a folder holding one."""
    from pararnn_lm.provenance import revision_tree  # this checkout's (workers import the tree they measure)

    try:
        with revision_tree(rev, ROOT) as (commit, tree):
            yield Revision(rev, commit, tree)
    except ValueError as err:
        raise SystemExit(f"--base {rev}: {err}") from None


# ----------------------------------------------------------------------------- one configuration
@dataclasses.dataclass(frozen=True)
class Config:
    revision: Revision
    arch: str
    layout: str
    gpus: int
    micro_batch: int
    seq_len: int

    @property
    def name(self) -> str:
        label = re.sub(r"[^A-Za-z0-9._-]", "_", self.revision.label)
        return f"{label}-{self.arch}-{self.layout}-T{self.seq_len}-{self.gpus}gpu-mb{self.micro_batch}"


def overrides(c: Config, run_dir: Path, a: argparse.Namespace, resume: bool = False) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model={c.arch}", f"size={a.size}", f"deepspeed={a.deepspeed}",
        f"data.seq_len={c.seq_len}", *([f"+model.overrides.vocab_size={a.vocab_size}"] if a.vocab_size else []),
        f"train.micro_batch_size={c.micro_batch}", f"train.global_batch_size={c.micro_batch * c.gpus}",
        f"train.steps={a.steps}", f"train.log_every={a.log_every}", f"train.compile={str(a.compile).lower()}",
        f"train.activation_checkpointing={str(a.activation_checkpointing).lower()}",
        f"train.precision={a.precision}", "eval.every=0", "eval.at_end=false", "export.at_end=false",
        f"checkpoint.every={a.checkpoint_every if a.check_resume else 0}", f"resume={'auto' if resume else 'none'}",
        "logging.wandb_mode=disabled", "logging.progress_bar=false",
        *([f"data.cache_dir={a.cache_dir}"] if a.cache_dir else []), *a.extra,
    ]


def launch_command(nproc: int, port: int, spec: dict) -> list[str]:
    """One process per GPU through torchrun (also for one: DeepSpeed wants a process group anyway)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--master-port={port}", str(Path(__file__).resolve()), "--worker", json.dumps(spec)]


def run_group(cmd: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group: a timeout kills torchrun AND its workers, which would
    otherwise keep their GPUs busy during the next configuration."""
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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


def summarise(records: list[dict], log_every: int) -> dict:
    """Throughput of the log intervals after the first (which holds compilation and warm-up): their
    wall time over their steps; MFU at that rate (train.py's MFU is proportional to its tokens/s)."""
    logged = sorted((r for r in records if "step_time_s" in r), key=lambda r: r["step"])
    timed = [(r, r["step"] - prev["step"]) for prev, r in zip(logged, logged[1:]) if r["step"] > log_every]
    if not timed:
        raise ValueError(f"no log step after step {log_every}: raise --steps")
    step_s = sum(r["step_time_s"] * n for r, n in timed) / sum(n for _, n in timed)
    last = timed[-1][0]
    tokens_per_s = last["tokens_per_s"] * last["step_time_s"] / step_s  # tokens per step / step time
    return {
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * step_s,
        "mfu": last["mfu"] * tokens_per_s / last["tokens_per_s"] if last.get("mfu") is not None else None,
        "mem_peak_gib": max((r.get("mem_peak_gib") or 0.0) for r in records) or None,
        "losses": [r["loss"] for r in records if "loss" in r],
        "log_steps": [r["step"] for r, _ in timed],
    }


def run_train(c: Config, run_dir: Path, a: argparse.Namespace, *, devices: str | None, port: int,
              fault: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    """One launch of train.py for configuration ``c`` (fresh unless ``resume``)."""
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # no stale steps or checkpoints of an earlier run
    run_dir.mkdir(parents=True, exist_ok=True)
    long_context_on_cuda = bool(a.tokens_per_step) and a.cuda
    spec = {"overrides": overrides(c, run_dir, a, resume), "layout": c.layout, "profile": a.profile, "run_dir": str(run_dir),
            "log_every": a.log_every, "steps": a.steps,
            "sdpa_flash_only": long_context_on_cuda and c.layout == "rows",
            "require_ssd_kernel": long_context_on_cuda and c.arch == "mamba2"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, min(4, (os.cpu_count() or 1) // c.gpus))))}
    env.pop("PARARNN_TEST_FAULT", None)
    if fault:
        env["PARARNN_TEST_FAULT"] = fault
    # the revision's own package first on the path, whichever checkout is installed
    env["PYTHONPATH"] = os.pathsep.join([str(c.revision.root), *filter(None, [os.environ.get("PYTHONPATH")])])
    if not a.cuda:
        env["DS_ACCELERATOR"] = "cpu"
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return run_group(launch_command(c.gpus, port, spec), env, a.timeout, cwd=c.revision.root)


def failure(proc: subprocess.CompletedProcess) -> str:
    """The exit status, the exception a worker died of, and the end of the output; marked ``out of memory:``
    when any rank's output says so. torchrun's own error report follows the worker's traceback and can be
    longer than the kept tail, so the worker's exception line is found in the whole output first."""
    output = (proc.stderr or "") + (proc.stdout or "")
    tail = (proc.stderr or proc.stdout)[-3000:]
    exception = worker_exception(output)
    return (("out of memory: " if is_out_of_memory(output) else "")
            + f"exit {proc.returncode}: " + (f"{exception}\n" if exception else "") + tail)


def is_out_of_memory(text: str) -> bool:
    low = text.lower()
    return "out of memory" in low or "outofmemoryerror" in low


def measure(c: Config, a: argparse.Namespace, devices: str | None = None, port: int | None = None) -> dict:
    """One configuration; ``devices`` (CUDA_VISIBLE_DEVICES) and ``port`` when several configurations
    share the machine (--side-by-side). With --check-resume, then the killed and the resumed run."""
    run_dir = Path(a.work_dir) / c.name
    port = port or a.port
    row = {"revision": c.revision.label, "commit": c.revision.commit, "arch": c.arch, "layout": c.layout,
           "size": a.size, "gpus": c.gpus, "micro_batch": c.micro_batch, "seq_len": c.seq_len,
           "tokens_per_step_per_gpu": c.micro_batch * c.seq_len, "long_context": bool(a.tokens_per_step),
           "vocab_size": a.vocab_size or None, "deepspeed": a.deepspeed, "compile": a.compile,
           "activation_checkpointing": a.activation_checkpointing, "precision": a.precision,
           "command": " ".join(["python -m pararnn_lm.train", *overrides(c, run_dir, a)])}
    if devices is not None:
        row["devices"] = devices  # ran beside other configurations, on these GPUs only
    started = time.perf_counter()
    try:
        proc = run_train(c, run_dir, a, devices=devices, port=port)
        row["wall_s"] = time.perf_counter() - started
        if proc.returncode != 0:
            row["error"] = failure(proc)
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
    for written in ("worker.json", "ssd_backend.json"):  # what ran: package, device, Mamba2's SSD kernel
        with contextlib.suppress(OSError):
            row.update(json.loads((run_dir / written).read_text()))
    if "tokens_per_s" in row:
        row["ms_per_sequence_per_gpu"] = row["step_ms"] / c.micro_batch
        if row.get("mem_peak_gib"):
            row["peak_bytes_per_token"] = row["mem_peak_gib"] * 2**30 / row["tokens_per_step_per_gpu"]
        kernels = run_dir / "kernels.json"
        if kernels.is_file():
            row["kernels"] = json.loads(kernels.read_text())
        if a.check_resume and "timed_out" not in row:
            row["resume"] = check_resume(c, run_dir, read_metrics(run_dir), a, devices, port)
    return row


def check_resume(c: Config, reference_dir: Path, reference: list[dict], a: argparse.Namespace,
                 devices: str | None, port: int) -> dict:
    """The configuration again, SIGKILLed after --kill-after steps, then resumed from its last checkpoint
    to the end: the largest loss difference to the uninterrupted run at the log steps after that checkpoint."""
    run_dir = reference_dir.with_name(reference_dir.name + "-resumed")
    out: dict = {"kill_after": a.kill_after, "checkpoint_every": a.checkpoint_every}
    try:
        run_train(c, run_dir, a, devices=devices, port=port, fault=f"sigkill@{a.kill_after}")  # dies, by design
        latest = run_dir / "checkpoints" / "latest"
        if not latest.is_file():
            return {**out, "error": "the killed run left no checkpoint"}
        out["resumed_from"] = int(latest.read_text().strip().split("_")[1])
        proc = run_train(c, run_dir, a, devices=devices, port=port, resume=True)
        if proc.returncode != 0:
            return {**out, "error": failure(proc)}
    except subprocess.TimeoutExpired:
        return {**out, "error": f"timed out after {a.timeout:.0f} s"}
    expected = {r["step"]: r["loss"] for r in reference if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    compared = sorted(s for s in expected if s > out["resumed_from"])
    if sorted(got) != sorted(expected):
        return {**out, "error": f"logged steps differ: {sorted(got)} vs {sorted(expected)}"}
    out["compared_steps"] = compared
    out["max_abs_loss_diff"] = max(abs(got[s] - expected[s]) for s in compared)
    return out


# ----------------------------------------------------------------------------- many configurations
def pack_waves(configs: list, slots: int, gpus=lambda c: c.gpus) -> list[list]:
    """Consecutive configurations grouped so that each group's GPU counts fit the machine together."""
    waves: list[list] = []
    used = slots
    for c in configs:
        if used + gpus(c) > slots:
            waves.append([])
            used = 0
        waves[-1].append(c)
        used += gpus(c)
    return waves


def run_wave(wave: list[Config], a: argparse.Namespace) -> list[dict]:
    """Run the configurations of one wave at once, each on its own GPUs and rendezvous port."""
    if len(wave) == 1:
        return [measure(wave[0], a)]
    jobs, first = [], 0
    for i, c in enumerate(wave):
        devices = ",".join(str(g) for g in range(first, first + c.gpus)) if a.cuda else None
        jobs.append((c, devices, a.port + 1 + i))
        first += c.gpus
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: measure(job[0], a, devices=job[1], port=job[2]), jobs))


def shapes(a: argparse.Namespace) -> list[tuple[int, int]]:
    """The (sequence length, micro-batch) of each round: --tokens-per-step / T for every T of --seq-lens
    (long context), else the micro-batches of --micro-batch or --micro-batch-search at --seq-len."""
    if a.tokens_per_step:
        return [(t, a.tokens_per_step // t) for t in a.seq_lens]
    micro_batches = micro_batch_grid(a.micro_batch_search) if a.micro_batch_search else a.micro_batch
    return [(a.seq_len, mb) for mb in micro_batches]


def run_all(revisions: list[Revision], gpus: list[int], slots: int, a: argparse.Namespace) -> list[dict]:
    """Every (revision, arch, layout, GPUs) series over its shapes (see :func:`shapes`), in rounds: round k
    runs the k-th shape of every series still going (a --micro-batch-search series stops at its first
    failure; other series go on past one, e.g. out of memory at one T). Within a round the revisions of one
    configuration run one after the other."""
    series = [(arch, layout, n, rev) for arch in a.archs for layout in a.layouts for n in gpus for rev in revisions]
    stopped: set = set()
    rows: list[dict] = []
    for seq_len, mb in shapes(a):
        round_ = [Config(rev, arch, layout, n, mb, seq_len) for arch, layout, n, rev in series
                  if (arch, layout, n, rev) not in stopped]
        if not round_:
            break
        waves = pack_waves(sorted(round_, key=lambda c: c.gpus), slots) if a.side_by_side else [[c] for c in round_]
        for wave in waves:
            for c, row in zip(wave, run_wave(wave, a)):
                rows.append(row)
                if "error" in row:
                    log.error("%s failed: %s", c.name, row["error"][-800:])
                    if a.micro_batch_search:
                        stopped.add((c.arch, c.layout, c.gpus, c.revision))
                else:
                    log.info("%s: %.0f tokens/s, %.1f ms/step, peak %s GiB", c.name, row["tokens_per_s"],
                             row["step_ms"], row.get("mem_peak_gib"))
            add_efficiency(rows)
            save(rows, a.out)  # after every wave: a later crash or timeout keeps what was measured
    return rows


# ----------------------------------------------------------------------------- tables
def _setting(r: dict) -> tuple:
    """Rows are one scaling curve when only their GPU count differs."""
    return (r.get("revision", "this"), r["arch"], r["size"], r.get("layout", "packed"), r.get("micro_batch"),
            r.get("seq_len"), r.get("deepspeed"), bool(r.get("compile")), bool(r.get("activation_checkpointing")))


def _mode(r: dict) -> str:
    return ("compiled" if r.get("compile") else "eager") + (" + ckpt" if r.get("activation_checkpointing") else "")


def add_efficiency(rows: list[dict]) -> list[dict]:
    """efficiency = tokens/s(N) / (N x tokens/s(1)) of the same setting, where its 1-GPU run succeeded."""
    single = {_setting(r): r["tokens_per_s"] for r in rows if r["gpus"] == 1 and "tokens_per_s" in r}
    for r in rows:
        base = single.get(_setting(r))
        if base and "tokens_per_s" in r:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * base)
    return rows


def _pct(v) -> str:
    return f"{v:.1%}" if v is not None else "-"


def render(rows: list[dict]) -> str:
    """One line per configuration; ``vs attention``: tokens/s over the attention run of the same setting."""
    attention = {_setting({**r, "arch": "-"}) + (r["gpus"],): r["tokens_per_s"]
                 for r in rows if r["arch"] == "attention" and "tokens_per_s" in r}
    resume = any("resume" in r for r in rows)
    lines = ["| rev | arch | size | layout | T | ZeRO | GPUs | micro-batch | mode | tokens/s | per GPU | vs attention "
             "| efficiency | MFU | ms/step | ms/seq/GPU | peak GiB/GPU |" + (" resume max abs dloss |" if resume else ""),
             "|---" * (17 + resume) + "|"]
    for r in rows:
        head = (f"| {r.get('revision', 'this')} | {r['arch']} | {r['size']} | {r.get('layout', 'packed')} "
                f"| {r.get('seq_len', '-')} | {r.get('deepspeed', '-')} | {r['gpus']} | {r['micro_batch']} | {_mode(r)} ")
        if "error" in r:
            lines.append(head + f"| failed: {r['error'][:60].splitlines()[0]} |" + " |" * (7 + resume))
            continue
        ref = attention.get(_setting({**r, "arch": "-"}) + (r["gpus"],))
        mem = f"{r['mem_peak_gib']:.1f}" if r.get("mem_peak_gib") else "-"
        versus = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        line = (head + f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / r['gpus']:,.0f} "
                f"| {versus} | {_pct(r.get('scaling_efficiency'))} "
                f"| {_pct(r.get('mfu'))} | {r['step_ms']:.1f} | {r['ms_per_sequence_per_gpu']:.0f} | {mem} |")
        if resume:
            res = r.get("resume", {})
            if "max_abs_loss_diff" in res:
                line += f" {res['max_abs_loss_diff']:.2e} |"
            else:
                line += f" {res['error'][:40].splitlines()[0] if 'error' in res else '-'} |"
        lines.append(line)
    return "\n".join(lines)


def render_versus(rows: list[dict], base: str) -> str:
    """This checkout against --base REV, configuration by configuration."""
    def key(r: dict) -> tuple:
        return r["arch"], r.get("layout"), r["gpus"], r["micro_batch"]

    by_rev: dict[str, dict[tuple, dict]] = defaultdict(dict)
    for r in rows:
        by_rev[r["revision"]][key(r)] = r
    this, other = by_rev.get("this", {}), by_rev.get(base, {})
    commits = {rev: next((r["commit"] for r in rows if r["revision"] == rev), "?") for rev in ("this", base)}

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        return f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else f"failed: {r['error'][:40].splitlines()[0]}"

    lines = [f"| arch | layout | GPUs | micro-batch | tokens/s this ({commits['this']}) "
             f"| tokens/s {base} ({commits[base]}) | ratio |", "|---" * 7 + "|"]
    for k in dict.fromkeys([*this, *other]):
        mine, theirs = this.get(k), other.get(k)
        ratio = (f"{mine['tokens_per_s'] / theirs['tokens_per_s']:.3f}x"
                 if mine and theirs and "tokens_per_s" in mine and "tokens_per_s" in theirs else "-")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {cell(mine)} | {cell(theirs)} | {ratio} |")
    return "\n".join(lines)


def render_best_micro_batch(rows: list[dict]) -> str:
    """--micro-batch-search: per series, the micro-batch of the highest tokens/s and the largest that ran."""
    series: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        series[(r.get("revision", "this"), r["arch"], r.get("layout"), r["gpus"])].append(r)
    lines = ["| rev | arch | layout | GPUs | largest that ran | best micro-batch | tokens/s | MFU | peak GiB/GPU |",
             "|---" * 9 + "|"]
    for (rev, arch, layout, gpus), runs in series.items():
        ok = [r for r in runs if "tokens_per_s" in r]
        if not ok:
            lines.append(f"| {rev} | {arch} | {layout} | {gpus} | none | - | - | - | - |")
            continue
        best = max(ok, key=lambda r: r["tokens_per_s"])
        mem = f"{best['mem_peak_gib']:.1f}" if best.get("mem_peak_gib") else "-"
        lines.append(f"| {rev} | {arch} | {layout} | {gpus} | {max(r['micro_batch'] for r in ok)} "
                     f"| {best['micro_batch']} | {best['tokens_per_s']:,.0f} | {_pct(best.get('mfu'))} | {mem} |")
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


LAYOUT_MEANING = {
    "rows": "one sequence of T tokens per row, no document resets (attention: SDPA is_causal, flash kernel forced on CUDA)",
    "packed": "documents packed into rows, states reset at each (attention: FlexAttention document mask)",
}


def _curve(r: dict) -> tuple:
    """Rows of one long-context curve differ only in their sequence length (and micro-batch)."""
    return (r.get("revision", "this"), r["arch"], r["size"], r.get("layout", "rows"), r["gpus"], _mode(r),
            r.get("tokens_per_step_per_gpu"))


def _curve_label(key: tuple) -> str:
    rev, arch, size, layout, gpus, mode, _ = key
    return f"{arch} {size} {layout} {gpus} GPU {mode}" + (f" @{rev}" if rev != "this" else "")


EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.*)$", re.M)


def worker_exception(output: str) -> str | None:
    """The last ``NameError: message`` line of a run's output that is not torchrun's own report."""
    found = [f"{name}: {message}" for name, message in EXCEPTION_LINE.findall(output) if name != "ChildFailedError"]
    return found[-1] if found else None


def exception_line(error: str) -> str:
    """The exception a failed run died of: the one ``failure`` put on the error's first line, else the
    output's last exception line (``worker_exception``), else the error's first line."""
    first = error.splitlines()[0] if error else ""
    status = re.match(r"(?:out of memory: )?exit -?\d+: (.*)$", first)
    if status and EXCEPTION_LINE.match(status.group(1)):
        return status.group(1)
    return worker_exception(error) or first


def _long_context_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "OOM" if r["error"].startswith("out of memory") else f"failed: {exception_line(r['error'])[:80]}"
    cell = f"{r['tokens_per_s']:,.0f}"
    if r.get("peak_bytes_per_token"):
        cell += f" / {r['peak_bytes_per_token'] / 2**10:,.1f} KiB"
    return cell + (" (timed out)" if r.get("timed_out") else "")


def render_long_context(rows: list[dict]) -> str:
    """One line per (revision, arch, layout, GPUs, mode), one column per sequence length: tokens/s and peak
    memory per token (peak allocated bytes / tokens of a micro-step), ``OOM`` where it ran out of memory."""
    rows = [r for r in rows if r.get("long_context")]
    seq_lens = sorted({r["seq_len"] for r in rows})
    tokens = sorted({r["tokens_per_step_per_gpu"] for r in rows})
    layouts = list(dict.fromkeys(r.get("layout", "rows") for r in rows))

    def header(t: int) -> str:
        mbs = sorted({r["micro_batch"] for r in rows if r["seq_len"] == t})
        return f"T={t} (mb {'/'.join(map(str, mbs))})"

    lines = [f"long context: {' / '.join(f'{n:,}' for n in tokens)} tokens per step and GPU (micro-batch = "
             f"tokens / T); " + "; ".join(f"layout {lay}: {LAYOUT_MEANING.get(lay, lay)}" for lay in layouts),
             "cells: tokens/s / peak allocated memory per token (OOM: out of memory)", "",
             "| rev | arch | size | layout | GPUs | mode | " + " | ".join(header(t) for t in seq_lens) + " |",
             "|---" * (6 + len(seq_lens)) + "|"]
    for key in dict.fromkeys(_curve(r) for r in rows):
        by_t = {r["seq_len"]: r for r in rows if _curve(r) == key}
        rev, arch, size, layout, gpus, mode, _ = key
        lines.append(f"| {rev} | {arch} | {size} | {layout} | {gpus} | {mode} | "
                     + " | ".join(_long_context_cell(by_t.get(t)) for t in seq_lens) + " |")
    return "\n".join(lines)


def plot_long_context(rows: list[dict], path: Path) -> Path:
    """tokens/s and peak memory per token against T (log2 axis), one line per architecture (curve)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("long_context")]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for key in dict.fromkeys(_curve(r) for r in rows):
        ran = sorted((r for r in rows if _curve(r) == key and "tokens_per_s" in r), key=lambda r: r["seq_len"])
        if not ran:
            continue
        line, = speed.plot([r["seq_len"] for r in ran], [r["tokens_per_s"] for r in ran], "o-", label=_curve_label(key))
        measured = [r for r in ran if r.get("peak_bytes_per_token")]
        if measured:
            memory.plot([r["seq_len"] for r in measured], [r["peak_bytes_per_token"] / 2**10 for r in measured], "o-",
                        color=line.get_color(), label=_curve_label(key))
    seq_lens = sorted({r["seq_len"] for r in rows})
    for ax, ylabel in ((speed, "training tokens/s"), (memory, "peak allocated KiB per token")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seq_lens, [str(t) for t in seq_lens])
        ax.set_xlabel("sequence length T (tokens per step held)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    speed.set_title("train.py throughput against T")
    memory.set_title("peak memory / tokens per micro-step")
    speed.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows: list[dict], path: Path) -> Path | None:
    """tokens/s against GPUs per setting, with the ideal (linear) line from each 1-GPU point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key in dict.fromkeys(_setting(r) for r in rows):
        runs = [r for r in rows if _setting(r) == key and "tokens_per_s" in r]
        if not runs:
            continue
        gpus, tps = zip(*sorted((r["gpus"], r["tokens_per_s"]) for r in runs))
        label = f"{key[1]} {key[2]} {key[3]} mb{key[4]} ({_mode(runs[0])})" + (f" @{key[0]}" if key[0] != "this" else "")
        line, = ax.plot(gpus, tps, "o-", label=label)
        if gpus[0] == 1:
            ax.plot(gpus, [tps[0] * g for g in gpus], ":", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("GPUs (data parallel)")
    ax.set_ylabel("training tokens/s")
    ax.set_title("train.py scaling (dotted: linear)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


def report(rows: list[dict], a: argparse.Namespace) -> None:
    print(render(rows))
    if a.base:
        print(f"\nthis checkout against {a.base}:")
        print(render_versus(rows, a.base))
    if a.micro_batch_search:
        print("\nlargest micro-batch:")
        print(render_best_micro_batch(rows))
    if any("kernels" in r for r in rows):
        print(render_kernels(rows))
    if any(r.get("long_context") for r in rows):
        print()
        print(render_long_context(rows))
        plot_long_context(rows, a.out.with_suffix(".png"))
    elif len({r["gpus"] for r in rows}) > 1:
        plot(rows, a.out.with_suffix(".png"))
    print(f"\nresults: {a.out}")


def merge(paths: list[Path], out: Path) -> list[dict]:
    """Rows of several result files in one table; efficiency recomputed against the merged 1-GPU rows."""
    rows = [row for path in paths for row in json.loads(Path(path).read_text())]
    for row in rows:
        row.pop("scaling_efficiency", None)
    rows.sort(key=lambda r: (*map(str, _setting(r)), r["gpus"]))
    add_efficiency(rows)
    save(rows, out)
    return rows


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--archs", nargs="+", default=["paragru", "attention"])
    p.add_argument("--layouts", nargs="+", default=None, choices=["packed", "rows"],
                   help="default: packed; rows with --tokens-per-step (one sequence per row: attention's flash path)")
    p.add_argument("--size", default="400m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, nargs="+", default=None, help="sequences per GPU per step (default 16)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, metavar="T",
                   help="long context: one round per sequence length T, with --tokens-per-step")
    p.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                   help="long context: tokens per step and GPU held at N, micro-batch = N / T (T: --seq-lens, "
                        "else --seq-len)")
    p.add_argument("--micro-batch-search", type=int, default=None, metavar="MAX",
                   help="instead of --micro-batch: 1, 2, 4, 8, 16, 24, ... up to MAX, each series stopping at its "
                        "first failure (out of memory)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1],
                   help="processes per configuration (torchrun); counts above this machine's GPUs are skipped")
    p.add_argument("--deepspeed", default="none", help="configs/deepspeed option: none, zero2, zero3, ...")
    p.add_argument("--vocab-size", type=int, default=50277, help="model vocabulary; 0: the corpus tokenizer's")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=10, help="the first log interval is warm-up")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="train.compile: torch.compile every decoder block (default on)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--base", default=None, metavar="REV",
                   help="also run every configuration at git revision REV (a temporary worktree; or a folder "
                        "holding a tree of the project, e.g. where there is no .git) and compare")
    p.add_argument("--check-resume", action="store_true",
                   help="also kill each configuration after --kill-after steps, resume it, compare the losses")
    p.add_argument("--checkpoint-every", type=int, default=20, help="--check-resume: checkpoint interval")
    p.add_argument("--kill-after", type=int, default=25, help="--check-resume: SIGKILL after this step")
    p.add_argument("--profile", action="store_true",
                   help="GPU time per step by kind of kernel (torch.profiler; tokens/s then not a throughput)")
    p.add_argument("--side-by-side", action="store_true",
                   help="run configurations that fit the machine together at once (e.g. four 1-GPU runs on four "
                        "GPUs), each on its own GPUs; saves time, shares the host's CPUs and PCIe")
    p.add_argument("--cache-dir", default=None, help="data cache (tokenizer + token shards); default: data's")
    p.add_argument("--work-dir", type=Path, default=BENCH_DIR / "work", help="run directories")
    p.add_argument("--port", type=int, default=29511)
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--out", type=Path, default=None, help="JSON of every configuration (+ a .png scaling plot)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="no runs: combine result files, recompute efficiency, print, and write --out (+ plot)")
    p.add_argument("--override", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="one more train.py override (repeatable), e.g. --override optim.lr=1e-3")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.out is None:
        a.out = BENCH_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}{'-merged' if a.merge else ''}.json"
    if not a.merge and not a.worker:
        if a.steps <= a.log_every:
            p.error("--steps must exceed --log-every (the first log interval is warm-up)")
        if a.check_resume and not 0 < a.checkpoint_every < a.kill_after < a.steps:
            p.error("--check-resume needs 0 < --checkpoint-every < --kill-after < --steps")
        check_long_context(p, a)
    a.micro_batch = a.micro_batch or [16]
    a.layouts = a.layouts or (["rows"] if a.tokens_per_step else ["packed"])
    return a


def check_long_context(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--tokens-per-step N: every T divides N (micro-batch N / T >= 1); the micro-batch is not also given."""
    if a.tokens_per_step is None:
        if a.seq_lens:
            p.error("--seq-lens needs --tokens-per-step (the micro-batch of each T is tokens-per-step / T)")
        return
    if a.micro_batch or a.micro_batch_search:
        p.error("--tokens-per-step sets the micro-batch (tokens-per-step / T): drop --micro-batch / --micro-batch-search")
    a.seq_lens = a.seq_lens or [a.seq_len]
    for t in a.seq_lens:
        if t < 1 or a.tokens_per_step % t or a.tokens_per_step < t:
            p.error(f"--tokens-per-step {a.tokens_per_step} is not a positive multiple of sequence length {t} "
                    f"(micro-batch = tokens-per-step / T must be a whole number >= 1)")


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return []
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.merge:
        rows = merge(a.merge, a.out)
        a.base, a.micro_batch_search = None, None
        report(rows, a)
        return rows

    import torch

    a.cuda = torch.cuda.is_available()  # (no CUDA context here: the GPUs stay free for the runs)
    slots = torch.cuda.device_count() if a.cuda else (os.cpu_count() or 1)
    skipped = [n for n in a.gpus if n > slots]
    if skipped:
        log.warning("skipping %s processes: this machine has %d %s", skipped, slots, "GPUs" if a.cuda else "CPUs")
    gpus = [n for n in a.gpus if n <= slots]
    with contextlib.ExitStack() as stack:
        revisions = [this_checkout()]
        if a.base:
            revisions.append(stack.enter_context(base_worktree(a.base)))
        rows = run_all(revisions, gpus, slots, a)
    report(rows, a)
    return rows


if __name__ == "__main__":
    main()
