"""Train single-layer models on the paper's synthetic tasks (Table 6) and write JSON results.

Paper recipe (method.md Sec. 5): one layer, d=64, 4 heads, AdamW (0.9, 0.999), cosine decay from 5e-4,
weight decay 1e-6, batch 16, up to 3000 epochs over 10k training sequences, best of 3 seeds, accuracy
on a 100k-sequence test set. We stop a seed early once its validation accuracy reaches
``target_acc`` (the cosine horizon stays the full budget, so early stopping never changes the schedule
of the steps that did run), and evaluate the best-validation weights on the test set.

CLI (one task / the whole grid):
    python -m pararnn_lm.eval.synthetic.train --task parity --arch paragru --out results/synthetic
    python -m pararnn_lm.eval.synthetic.train --grid --out results/synthetic          # 4 archs x 5 tasks x 3 seeds
    python -m pararnn_lm.eval.synthetic.train --grid --tasks mqar --sweep lr=5e-4,2e-3 --out results/mqar_lr
    python -m pararnn_lm.eval.synthetic.train --grid --archs paragru --tasks keep_nth --curriculum 12:30000 25:15000 \
        --out results/keep_nth_curriculum      # shorter sequences first (not the paper's recipe)
    python -m pararnn_lm.eval.synthetic.train --grid --devices all --concurrent-runs 15 --out results/synthetic  # every GPU

With several ``devices`` each gets one worker process and every len(devices)-th run (so each device trains a
mix of architectures), up to ``concurrent_runs`` at once; the runs, their saved states and the table are the
same as in one process. One GPU is the limit for a single process: a d=64 step is a chain of tiny kernels,
so more runs per GPU overlap only so far, and a second GPU needs a second host thread to feed it.

A length curriculum (``curriculum``, ours - the paper states none) trains each (L, steps) stage on its own
``n_train`` sequences of length L before the main stage at ``seq_len``; the cosine spans every stage, and
validation, best weights and the target-accuracy stop always use ``seq_len``; ``patience`` counts main-stage
validations only (the accuracy at ``seq_len`` can sit flat through a short stage and still rise later).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import operator
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import ARCHS, RNN_ARCHS, build_model, logits_of, register_arch, registered_archs
from .tasks import IGNORE_INDEX, TASKS, SyntheticBatch, make_splits

log = logging.getLogger(__name__)


@dataclass
class SyntheticTrainConfig:
    task: str = "parity"
    arch: str = "paragru"
    seeds: tuple[int, ...] = (0, 1, 2)
    seq_len: int = 100
    n_train: int = 10_000
    n_test: int = 100_000
    n_val: int = 2_000
    batch_size: int = 16
    lr: float = 5e-4
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-6
    max_epochs: int = 3000
    max_steps: int | None = None  # optional cap on the main stage's steps (the cosine spans the curriculum too)
    eval_every: int = 1  # epochs between validation passes
    target_acc: float = 1.0  # stop a seed once validation accuracy reaches this
    patience: int | None = None  # stop after this many main-stage evaluations without improvement
    grad_clip: float | None = None  # the paper states none
    d_model: int = 64
    num_heads: int = 4
    eval_batch_size: int = 1000
    device: str = "cpu"
    devices: tuple[str, ...] = ()  # several: one worker process each, the runs dealt round-robin (overrides device)
    cuda_graph: bool = True  # on CUDA: capture each training step once, replay it (launch-bound otherwise)
    concurrent_runs: int = 1  # seeds/cells advanced together (each on its own CUDA stream); 1 = one after another
    time_budget_s: float | None = None  # wall-clock cap of one train call; unfinished runs report their best so far
    resume: bool = False  # continue the runs saved in OUT/runs by an earlier call (finished ones are read back)
    progress: bool = True
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # generator overrides (e.g. dense=False)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # ours, a diagnostic (the paper's biases are 0): initial retention-gate bias of the RNN cells
    # (eval/synthetic/models.py: init_retain_gate); Transformer and Mamba2 runs ignore it.
    retain_gate_bias: float = 0.0
    # ours, a diagnostic (the paper states none): (seq_len, steps) stages trained, in order, before the main
    # stage at seq_len, each on n_train sequences of its length (:func:`parse_curriculum`); see the module doc.
    curriculum: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:  # every way in (YAML, flags, dataclasses.replace, the API) is checked
        self.curriculum = parse_curriculum(self.curriculum)


def cosine_lr(step: float, horizon: int, lr: float, min_lr: float = 0.0) -> float:
    """Cosine from ``lr`` at step 0 to ``min_lr`` at ``horizon`` (held there after), no warm-up."""
    frac = min(step / max(horizon, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


def parse_curriculum(specs: str | Sequence[str | Sequence[int]] | None) -> tuple[tuple[int, int], ...]:
    """``["12:30000", "25:15000"]``, ``"12:30000 25:15000"`` or ``[[12, 30000], [25, 15000]]`` ->
    ``((12, 30000), (25, 15000))``; ``None`` -> no curriculum; anything else is refused with the form."""
    if specs is None:
        return ()
    if isinstance(specs, str):
        specs = specs.split()
    stages = []
    for spec in specs:
        try:  # integers only: a float step count or length is a typo, not something to round
            parts = spec.split(":") if isinstance(spec, str) else list(spec)
            if len(parts) != 2 or any(isinstance(v, (bool, float)) for v in parts):
                raise ValueError
            seq_len, steps = (int(v) if isinstance(v, str) else operator.index(v) for v in parts)
        except (TypeError, ValueError):
            raise ValueError(f"a curriculum stage is L:STEPS such as 12:30000, got {spec!r}") from None
        if seq_len < 1 or steps < 1:
            raise ValueError(f"a curriculum stage needs L >= 1 and STEPS >= 1, got {spec!r}")
        stages.append((seq_len, steps))
    return tuple(stages)


@torch.no_grad()
def evaluate(model: nn.Module, data: SyntheticBatch, batch_size: int = 1000, device: str = "cpu") -> float:
    """Fraction of scored positions whose argmax logit equals the target."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(0, len(data), batch_size):
        b = data[i : i + batch_size].to(device)
        pred = logits_of(model(b.input_ids)).argmax(-1)
        correct += int((pred == b.targets)[b.loss_mask].sum())
        total += int(b.loss_mask.sum())
    model.train(was_training)
    return correct / max(total, 1)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored positions; 0 (no gradient) for a batch without any - short k-hop
    sequences can have none, and the plain mean would be NaN and poison the weights. No host sync."""
    total = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def build_run_model(cfg: SyntheticTrainConfig, model_factory: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The model a run of ``cfg`` trains (on the CPU, initialised from the current torch seed): its task's
    vocabulary, mixer and gain bound, ``cfg``'s width and model settings."""
    spec = TASKS[cfg.task]
    model_kwargs = {"gain_bound": spec.gain_bound, **cfg.model_kwargs}
    if cfg.retain_gate_bias and cfg.arch in RNN_ARCHS:
        model_kwargs["retain_gate_bias"] = cfg.retain_gate_bias
    return (model_factory or build_model)(cfg.arch, spec.vocab_size, bare_mixer=spec.bare_mixer,
                                          d_model=cfg.d_model, num_heads=cfg.num_heads, **model_kwargs)


class SeedRun:
    """One seed of one (arch, task): its data, model, optimiser and schedule, advanced one step at a time.

    ``advance()`` enqueues one optimiser step and, at an epoch end, validates (the only host sync) and
    decides whether to stop. With ``cuda_graph`` the whole step (forward, backward, AdamW with a device-side
    learning rate) is captured once after ``GRAPH_WARMUP`` eager steps and replayed on the run's own CUDA
    stream, so many runs advanced round-robin (:func:`train_runs`) overlap on one GPU: a
    one-layer d=64 model is far too small to fill an H100, and without graphs every step is launch bound.
    A graph needs equal batches, so the last partial batch of an epoch is dropped in graph mode; if the
    capture fails (an op that syncs the host), the run logs why and continues eagerly.
    """

    GRAPH_WARMUP = 3

    def __init__(self, cfg: SyntheticTrainConfig, seed: int,
                 model_factory: Callable[..., nn.Module] | None = None) -> None:
        self.cfg, self.seed = cfg, seed
        spec = TASKS[cfg.task]
        self.splits = make_splits(spec, seed=seed, seq_len=cfg.seq_len, n_train=cfg.n_train, n_test=cfg.n_test,
                                  n_val=cfg.n_val, **cfg.task_kwargs)
        torch.manual_seed(seed)
        self.model = build_run_model(cfg, model_factory)
        self.device = torch.device(cfg.device)
        self.model.to(self.device).train()
        self.graphed = bool(cfg.cuda_graph) and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Graph mode keeps the learning rate in a device tensor the captured AdamW reads (no re-capture).
        self.lr_tensor = torch.tensor(cfg.lr, device=self.device) if self.graphed else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr_tensor if self.graphed else cfg.lr,
                                     betas=cfg.betas, weight_decay=cfg.weight_decay,
                                     **({"capturable": True} if self.graphed else {}))
        self.batches_per_epoch = batches_per_epoch(cfg)
        if self.batches_per_epoch < 1:
            raise ValueError(f"n_train={cfg.n_train} < batch_size={cfg.batch_size} in graph mode")
        self.horizon = planned_steps(cfg)
        # curriculum stages, then the main one; a stage ends at its cumulative step count
        self.stages = [*cfg.curriculum, (cfg.seq_len, self.horizon - sum(n for _, n in cfg.curriculum))]
        self.stage_ends = list(itertools.accumulate(n for _, n in self.stages))
        # epochs the curriculum takes (its last partial epoch ends at the stage boundary): max_epochs counts after
        self.curriculum_epochs = sum(math.ceil(n / self.batches_per_epoch) for _, n in cfg.curriculum)
        for seq_len, _ in cfg.curriculum:  # a length the task cannot take fails now, not stages later
            spec.generate(1, seq_len, seed=0, **cfg.task_kwargs)
        self.val = self.splits.get("val", self.splits["train"])
        self.shuffler = torch.Generator().manual_seed(seed)
        self.best_val, self.best_state, self.evals_since_best = -1.0, None, 0
        # one entry per validation: the learning curve the result file carries (plotted as curves.png)
        self.val_history: list[dict[str, float]] = []
        self.epoch_loss_sum = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        self.step = self.epoch = self.batch_in_epoch = 0
        self.done, self.stop_reason = False, ""
        self.perm: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_ids = self.static_targets = self.static_loss = None
        self.last_loss: torch.Tensor | None = None  # the latest step's loss, still on the device
        self.warmup_steps = 0
        self.stage = 0
        self.train = self._stage_data(0)  # the whole set is a few MB: resident, no per-step copies
        if self.stream is not None:  # the model and data were made on the current stream
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.t0 = time.time()

    # -- curriculum stages --------------------------------------------------------------------------
    def _stage_data(self, k: int) -> SyntheticBatch:
        """Stage ``k``'s training sequences on the device (the main stage's are the train split)."""
        if k == len(self.stages) - 1:
            return self.splits["train"].to(self.device)
        spec = TASKS[self.cfg.task]
        # a seed stream of its own per stage, apart from make_splits' train / test / val streams
        return spec.generate(self.cfg.n_train, self.stages[k][0], seed=1_000_003 * self.seed + 10 + k,
                             **self.cfg.task_kwargs).to(self.device)

    def _stage_of(self, step: int) -> int:
        return next((k for k, end in enumerate(self.stage_ends) if step < end), len(self.stages) - 1)

    def _enter_stage(self, k: int) -> None:
        """Switch to stage ``k``'s sequences: a fresh epoch, and (other shapes) new graph buffers and capture."""
        if self.graph is not None and self.stream is not None:
            self.stream.synchronize()  # the old graph's last replay is done before its memory pool is released
        self.stage, self.train = k, self._stage_data(k)
        self.perm, self.batch_in_epoch = None, 0
        self.graph = self.static_ids = self.static_targets = self.static_loss = None
        self.warmup_steps = 0

    # -- one step ----------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:  # cosine from lr to min_lr over the full budget, no warm-up
        return cosine_lr(step, self.horizon, self.cfg.lr, self.cfg.min_lr)

    def _eager_step(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = masked_loss(logits_of(self.model(ids)), targets)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.epoch_loss_sum += loss.detach()  # part of the captured graph too: no extra launch per replay
        return loss

    def _graph_step(self, idx: torch.Tensor) -> None:
        if self.static_ids is None:  # the graph's input buffers, filled in place before every replay
            self.static_ids = torch.empty_like(self.train.input_ids[:len(idx)])
            self.static_targets = torch.empty_like(self.train.targets[:len(idx)])
        torch.index_select(self.train.input_ids, 0, idx, out=self.static_ids)
        torch.index_select(self.train.targets, 0, idx, out=self.static_targets)
        self.lr_tensor.fill_(self.lr_at(self.step))
        if self.graph is not None:
            self.graph.replay()
            self.last_loss = self.static_loss  # the graph's output, refreshed by every replay
            return
        self.last_loss = self._eager_step(self.static_ids, self.static_targets)
        self.warmup_steps += 1  # counted from this process's start: a resumed run warms up again
        if self.warmup_steps == self.GRAPH_WARMUP:
            self._capture()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                static_loss = self._eager_step(self.static_ids, self.static_targets)
        except Exception as err:  # an op that cannot be captured: keep training eagerly
            log.warning("%s/%s seed %d: CUDA graph capture failed (%s); running eagerly",
                        self.cfg.arch, self.cfg.task, self.seed, err)
            self.graph = None
            self.graphed = False
            return
        # self.last_loss stays this step's eager loss: the captured output holds nothing until a replay
        self.graph, self.static_loss = graph, static_loss

    def advance(self) -> None:
        """Enqueue one training step; validate and decide stopping at an epoch end."""
        if self.done:
            return
        cfg = self.cfg
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            if self.step >= self.stage_ends[self.stage] and self.stage < len(self.stages) - 1:
                self._enter_stage(self.stage + 1)
            if self.batch_in_epoch == 0:
                self.perm = torch.randperm(len(self.train), generator=self.shuffler).to(self.device)
            idx = self.perm[self.batch_in_epoch * cfg.batch_size:(self.batch_in_epoch + 1) * cfg.batch_size]
            if self.graphed:
                self._graph_step(idx)
            else:
                for group in self.opt.param_groups:
                    group["lr"] = self.lr_at(self.step)
                b = self.train[idx]
                self.last_loss = self._eager_step(b.input_ids, b.targets)
            self.step += 1
            self.batch_in_epoch += 1
            if self.batch_in_epoch == self.batches_per_epoch or self.step >= self.stage_ends[self.stage]:
                self._end_epoch()  # the last stage ends at the horizon

    def _end_epoch(self) -> None:
        cfg = self.cfg
        batches, self.batch_in_epoch = self.batch_in_epoch, 0
        self.epoch += 1
        mean_loss = float(self.epoch_loss_sum) / max(batches, 1)
        self.epoch_loss_sum.zero_()
        last = self.step >= self.horizon or self.epoch - self.curriculum_epochs >= cfg.max_epochs
        if self.epoch % cfg.eval_every and not last:
            return
        acc = evaluate(self.model, self.val, cfg.eval_batch_size, cfg.device)
        self.val_history.append({"epoch": self.epoch, "step": self.step, "val_acc": acc,
                                 "train_loss": round(mean_loss, 5)})  # mean over the epoch's batches
        if cfg.curriculum:  # the length this epoch trained at (validation is always at seq_len)
            self.val_history[-1]["train_seq_len"] = self.stages[self.stage][0]
        if acc > self.best_val:
            self.best_val, self.evals_since_best = acc, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        elif self.stage == len(self.stages) - 1:  # flat validation during a short stage is no reason to stop
            self.evals_since_best += 1
        log.debug("%s/%s seed %d epoch %d step %d val %.4f", cfg.arch, cfg.task, self.seed, self.epoch, self.step, acc)
        if acc >= cfg.target_acc:
            self.finish_early("target accuracy")
        elif cfg.patience is not None and self.evals_since_best >= cfg.patience:
            self.finish_early("patience")
        elif last:
            self.finish_early("budget")

    def finish_early(self, reason: str) -> None:
        self.done, self.stop_reason = True, reason

    # -- checkpoint (to continue after a time budget, e.g. a SLURM time limit) ------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue this run exactly: weights, AdamW, schedule position, epoch order."""
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "perm": None if self.perm is None else self.perm.cpu(), "shuffler": self.shuffler.get_state(),
                "best_val": self.best_val, "best_state": self.best_state, "evals_since_best": self.evals_since_best,
                "val_history": self.val_history, "epoch_loss_sum": self.epoch_loss_sum.cpu(),
                "elapsed": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:  # this run's mode wins over the saved one (graphed or not)
            group["capturable"] = self.graphed
            if self.graphed:
                group["lr"] = self.lr_tensor
        if self.graphed:  # a captured AdamW reads its step counters on the device
            for st in self.opt.state.values():
                if "step" in st:
                    st["step"] = st["step"].to(self.device, torch.float32)
        self.step, self.epoch = state["step"], state["epoch"]
        stage = self._stage_of(self.step)
        if stage != self.stage:  # stopped in a later curriculum stage
            self._enter_stage(stage)
        self.batch_in_epoch = state["batch_in_epoch"]
        self.perm = None if state["perm"] is None else state["perm"].to(self.device)
        self.shuffler.set_state(state["shuffler"])
        self.best_val, self.evals_since_best = state["best_val"], state["evals_since_best"]
        self.val_history = list(state.get("val_history", []))  # absent in states saved before it existed
        self.epoch_loss_sum.copy_(state.get("epoch_loss_sum", torch.zeros(())))
        self.best_state = None if state["best_state"] is None else {
            k: v.to(self.device) for k, v in state["best_state"].items()}
        self.t0 = time.time() - state["elapsed"]
        if self.stream is not None:  # the state was copied in on the current stream
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def elapsed(self) -> float:
        return time.time() - self.t0

    # -- result ------------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        """Test accuracy of the best-validation weights (validates first if no epoch has ended)."""
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return self._result()

    def _result(self) -> dict[str, Any]:
        if self.best_state is None:
            self.best_val = evaluate(self.model, self.val, self.cfg.eval_batch_size, self.cfg.device)
        else:
            self.model.load_state_dict(self.best_state)
        test_acc = evaluate(self.model, self.splits["test"], self.cfg.eval_batch_size, self.cfg.device)
        cfg = self.cfg
        res = {"seed": self.seed, "test_acc": test_acc, "best_val_acc": self.best_val, "epochs": self.epoch,
               "steps": self.step, "stopped": self.stop_reason or "time budget", "cuda_graph": self.graph is not None,
               "final_train_loss": None if self.last_loss is None else float(self.last_loss.detach()),
               "train_seconds": round(self.elapsed(), 2),
               "params": sum(p.numel() for p in self.model.parameters()), "val_history": self.val_history}
        log.info("%s/%s seed %d: test acc %.4f (val %.4f, %d epochs, %d steps, stopped: %s)", cfg.arch, cfg.task,
                 self.seed, test_acc, self.best_val, self.epoch, self.step, res["stopped"])
        return res


def batches_per_epoch(cfg: SyntheticTrainConfig) -> int:
    """Optimiser steps per epoch; a CUDA graph needs equal batches, so graph mode drops the last partial one."""
    graphed = cfg.cuda_graph and torch.device(cfg.device).type == "cuda"
    return cfg.n_train // cfg.batch_size if graphed else math.ceil(cfg.n_train / cfg.batch_size)


def planned_steps(cfg: SyntheticTrainConfig) -> int:
    """The step budget (cosine horizon) of one seed under ``cfg``: the curriculum's steps, then the main
    stage's (``max_steps``, else ``max_epochs`` epochs)."""
    main = cfg.max_steps or cfg.max_epochs * max(batches_per_epoch(cfg), 1)
    return sum(steps for _, steps in cfg.curriculum) + main


def _run_key(cfg: SyntheticTrainConfig, seed: int) -> str:
    return f"{cfg.arch}__{cfg.task}__s{seed}"


# Fields that only say how a call runs (where, how many at once, for how long), not what a run computes.
_OPERATIONAL_FIELDS = frozenset({"seeds", "device", "devices", "cuda_graph", "concurrent_runs", "time_budget_s", "resume",
                                 "progress", "eval_batch_size"})


def run_identity(cfg: SyntheticTrainConfig) -> dict[str, Any]:
    """The settings that define a run's trajectory and result; saved with its state so ``--resume``
    continues a run only under the settings it started with (JSON-normalised: tuples become lists)."""
    ident = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OPERATIONAL_FIELDS}
    return json.loads(json.dumps(ident, default=str))


def _check_resumable(jobs: Sequence[tuple[SyntheticTrainConfig, int]], state: Path) -> None:
    """Refuse, before anything trains, to resume a saved run under different settings (it would mix two
    trajectories under one key). Files from before identities were saved are accepted with a warning."""
    clashes = []
    defaults = run_identity(SyntheticTrainConfig())  # a setting added later is at its default in older files
    for cfg, seed in jobs:
        key, want = _run_key(cfg, seed), run_identity(cfg)
        saved = None
        if (state / f"{key}.result.json").exists():
            saved = json.loads((state / f"{key}.result.json").read_text()).get("run_config")
        elif (state / f"{key}.pt").exists():
            saved = torch.load(state / f"{key}.pt", map_location="cpu", weights_only=False).get("run_config")
        else:
            continue
        if saved is None:
            log.warning("%s: saved without its settings (older file); resuming it as it is", key)
            continue
        diff = {k: (saved.get(k, defaults.get(k)), want.get(k)) for k in sorted(set(saved) | set(want))
                if saved.get(k, defaults.get(k)) != want.get(k)}
        if diff:
            clashes.append(f"{key}: " + ", ".join(f"{k} saved {a!r} now {b!r}" for k, (a, b) in diff.items()))
    if clashes:
        raise ValueError(f"--resume: {len(clashes)} saved run(s) in {state} were started with other settings - "
                         "pass the same settings or a new --out:\n  " + "\n  ".join(clashes))


def _state_folders(state_dir: str | Path | Sequence[str | Path | None] | None, num_jobs: int) -> list[Path | None]:
    """One state folder (or None) per job: a sequence gives each job its own, a single folder is shared."""
    if isinstance(state_dir, (list, tuple)):
        if len(state_dir) != num_jobs:
            raise ValueError(f"{len(state_dir)} state folders for {num_jobs} jobs")
        return [None if d is None else Path(d) for d in state_dir]
    return [None if state_dir is None else Path(state_dir)] * num_jobs


def train_runs(jobs: Sequence[tuple[SyntheticTrainConfig, int]],
               model_factory: Callable[..., nn.Module] | None = None, *, concurrent_runs: int = 1,
               time_budget_s: float | None = None, progress: bool = True,
               state_dir: str | Path | Sequence[str | Path | None] | None = None,
               resume: bool = False, progress_position: int | None = None) -> list[dict[str, Any]]:
    """Train ``(cfg, seed)`` jobs, at most ``concurrent_runs`` at a time, advanced round-robin.

    On a GPU each run enqueues on its own stream, so graphed runs overlap; on a CPU interleaving gains
    nothing, so use ``concurrent_runs=1`` there. A run is built when it starts and freed once its test
    accuracy is measured (a 100k-sequence test set per run would not fit 60 times in host memory).
    Returns one result per job, in order; a job that raised records ``error`` instead of ``test_acc``.
    When the wall-clock budget ends, running jobs report their best weights so far and queued jobs
    report ``error: "not started (time budget)"``.

    ``state_dir``: each finished run writes ``KEY.result.json`` there and a run stopped by the budget
    writes ``KEY.pt`` (weights, AdamW, position in the schedule and the epoch order); with ``resume``
    finished runs are read back and stopped runs continue exactly where they were, so the paper's long
    budget can be spread over several jobs (SLURM time limits, the device's 10-minute calls). A sequence
    gives each job its own folder (a sweep keeps each setting's runs apart under the same keys).
    """
    t0 = time.time()
    states = _state_folders(state_dir, len(jobs))
    for folder in dict.fromkeys(d for d in states if d is not None):
        folder.mkdir(parents=True, exist_ok=True)
        if resume:
            _check_resumable([job for job, d in zip(jobs, states) if d == folder], folder)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    queue = list(range(len(jobs)))
    active: list[tuple[int, SeedRun]] = []
    where = "" if progress_position is None or not jobs else f"{jobs[0][0].device}: "
    bar = tqdm(total=sum(planned_steps(cfg) for cfg, _ in jobs), desc=f"{where}{len(jobs)} run(s)",
               disable=not progress, position=progress_position)

    def fail(i: int, err: BaseException | str) -> None:
        cfg, seed = jobs[i]
        if isinstance(err, BaseException):
            log.error("%s/%s seed %d failed: %r", cfg.arch, cfg.task, seed, err, exc_info=err)
        results[i] = {"seed": seed, "test_acc": None, "error": err if isinstance(err, str) else repr(err)}

    def finish(i: int, run: SeedRun) -> None:
        bar.update(run.horizon - run.step)  # the unused remainder of its budget
        key, state = _run_key(*jobs[i]), states[i]
        try:
            if state is not None and not run.done:  # before result(), which loads the best weights
                torch.save({**run.state_dict(), "run_config": run_identity(jobs[i][0])}, state / f"{key}.pt")
            results[i] = run.result()
            if state is not None and run.done:
                saved = {**results[i], "run_config": run_identity(jobs[i][0])}
                (state / f"{key}.result.json").write_text(json.dumps(saved, indent=2))
                (state / f"{key}.pt").unlink(missing_ok=True)
        except Exception as err:
            fail(i, err)

    def start(i: int) -> SeedRun | None:
        cfg, seed = jobs[i]
        key, state = _run_key(cfg, seed), states[i]
        if resume and state is not None and (state / f"{key}.result.json").exists():
            results[i] = json.loads((state / f"{key}.result.json").read_text())
            results[i].pop("run_config", None)
            bar.update(planned_steps(cfg))
            log.info("%s: finished earlier (test acc %.4f)", key, results[i]["test_acc"])
            return None
        run = SeedRun(cfg, seed, model_factory)
        if resume and state is not None and (state / f"{key}.pt").exists():
            run.load_state_dict(torch.load(state / f"{key}.pt", map_location="cpu", weights_only=False))
            bar.update(run.step)
            log.info("%s: resumed at epoch %d, step %d", key, run.epoch, run.step)
        return run

    rounds, out_of_time, steps_done, last_log = 0, False, 0, t0
    while queue or active:
        while queue and len(active) < max(concurrent_runs, 1) and not out_of_time:
            i = queue.pop(0)
            try:
                run = start(i)
            except Exception as err:
                fail(i, err)
                continue
            if run is not None:
                active.append((i, run))
        if out_of_time or not active:
            break
        still = []
        for i, run in active:
            try:
                run.advance()
            except Exception as err:
                fail(i, err)
                continue
            bar.update(1)
            steps_done += 1
            if run.done:
                finish(i, run)
            else:
                still.append((i, run))
        active = still
        rounds += 1
        if rounds % 64 == 0:
            bar.set_postfix(running=len(active), queued=len(queue))
            if time.time() - last_log > 60:  # a line for batch logs, where the bar is off
                last_log = time.time()
                log.info("%.0f s: %d steps (%.0f steps/s), %d running, %d queued, %d finished", last_log - t0,
                         steps_done, steps_done / (last_log - t0), len(active), len(queue),
                         sum(r is not None for r in results))
            if time_budget_s is not None and time.time() - t0 > time_budget_s:
                log.warning("time budget of %.0f s reached: %d run(s) stop early, %d not started",
                            time_budget_s, len(active), len(queue))
                out_of_time = True
                for i, run in active:
                    finish(i, run)
                active = []
    for i in queue:
        fail(i, "not started (time budget)")
    bar.close()
    return [r for r in results if r is not None]


def train_runs_on_devices(jobs: Sequence[tuple[SyntheticTrainConfig, int]],
                          model_factory: Callable[..., nn.Module] | None = None, *, devices: Sequence[str] = (),
                          state_dir: str | Path | Sequence[str | Path | None] | None = None,
                          **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`train_runs` spread over ``devices``: one worker process per device (spawned: CUDA cannot be
    used in a forked child), each training every len(devices)-th job with the same ``kwargs`` (concurrency,
    time budget, resume); the state folders are shared, a run's files being named by its key. Results come
    back in job order. A worker that dies records its own jobs as failed and keeps the others' results.
    ``model_factory`` and factories registered with ``register_arch`` must be picklable (module-level)."""
    if len(devices) <= 1:
        if devices:
            jobs = [(dataclasses.replace(cfg, device=devices[0]), seed) for cfg, seed in jobs]
        return train_runs(jobs, model_factory, state_dir=state_dir, **kwargs)
    states = _state_folders(state_dir, len(jobs))
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    context = torch.multiprocessing.get_context("spawn")
    # one single-process pool per device: a worker that dies breaks its own pool only
    threads = max(1, (os.cpu_count() or 1) // len(devices))  # the host's cores shared, not oversubscribed
    pools = [concurrent.futures.ProcessPoolExecutor(1, mp_context=context) for _ in devices]
    try:
        shards = {}
        for rank, (device, pool) in enumerate(zip(devices, pools)):
            shard = list(range(rank, len(jobs), len(devices)))
            if shard:
                own = [(dataclasses.replace(jobs[i][0], device=device), jobs[i][1]) for i in shard]
                future = pool.submit(_device_worker, device, rank, own, [states[i] for i in shard], model_factory,
                                     registered_archs(), logging.getLogger().getEffectiveLevel(), threads, kwargs)
                shards[future] = (device, shard)
        for future in concurrent.futures.as_completed(shards):
            device, shard = shards[future]
            try:
                out = future.result()
            except Exception as err:  # the worker process itself failed (a run's own error is in its result)
                log.error("worker on %s failed: %r", device, err)
                out = [{"seed": jobs[i][1], "test_acc": None, "error": f"worker on {device} failed: {err!r}"}
                       for i in shard]
            for i, res in zip(shard, out):
                results[i] = res
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
    return [r for r in results if r is not None]


def _device_worker(device: str, rank: int, jobs: list[tuple[SyntheticTrainConfig, int]],
                   states: list[Path | None], model_factory: Callable[..., nn.Module] | None,
                   registered: dict[str, Callable[..., nn.Module]], log_level: int, threads: int,
                   kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """One device's share of :func:`train_runs_on_devices`, in its own process."""
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s [{device}]: %(message)s")
    torch.set_num_threads(threads)  # workers each taking every core spin against each other (100x slower)
    for name, factory in registered.items():
        register_arch(name, factory)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # streams, graphs and allocations default to it
    return train_runs(jobs, model_factory, state_dir=states, progress_position=rank, **kwargs)


def train_seed(cfg: SyntheticTrainConfig, seed: int,
               model_factory: Callable[..., nn.Module] | None = None) -> dict[str, Any]:
    """Train one seed; returns its metrics (test accuracy of the best-validation weights)."""
    res = train_runs([(cfg, seed)], model_factory, time_budget_s=cfg.time_budget_s, progress=cfg.progress)[0]
    if res.get("error"):
        raise RuntimeError(f"{cfg.arch}/{cfg.task} seed {seed}: {res['error']}")
    return res


def _cell_result(cfg: SyntheticTrainConfig, runs: list[dict[str, Any]], out_dir: str | Path | None) -> dict[str, Any]:
    """One Table-6 cell: ``accuracy`` is the best test accuracy over its seeds (the paper's protocol)."""
    ok = [r for r in runs if r.get("test_acc") is not None]
    result: dict[str, Any] = {"kind": "synthetic", "task": cfg.task, "arch": cfg.arch,
                              "accuracy": max(r["test_acc"] for r in ok) if ok else None,
                              "best_seed": max(ok, key=lambda r: r["test_acc"])["seed"] if ok else None,
                              "seeds": runs, "config": _jsonable(dataclasses.asdict(cfg))}
    if not ok:
        result["error"] = "; ".join(str(r.get("error")) for r in runs)
    if out_dir is not None:
        path = Path(out_dir) / f"{cfg.arch}__{cfg.task}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        log.info("wrote %s", path)
    return result


def run_task(cfg: SyntheticTrainConfig, model_factory: Callable[..., nn.Module] | None = None,
             out_dir: str | Path | None = None) -> dict[str, Any]:
    """All seeds of one (arch, task); ``accuracy`` is the best test accuracy over seeds (paper)."""
    runs = train_runs_on_devices([(cfg, s) for s in cfg.seeds], model_factory, devices=cfg.devices,
                                 concurrent_runs=cfg.concurrent_runs, time_budget_s=cfg.time_budget_s,
                                 progress=cfg.progress, resume=cfg.resume,
                                 state_dir=None if out_dir is None else Path(out_dir) / "runs")
    errors = [r["error"] for r in runs if r.get("error")]
    if len(errors) == len(runs):
        raise RuntimeError(f"{cfg.arch}/{cfg.task}: every seed failed: {errors}")
    return _cell_result(cfg, runs, out_dir)


# -- sweeps: the grid under several settings at once ------------------------------------------------
# Any field that changes what a run computes may be swept, and one key of model_kwargs / task_kwargs as
# "model_kwargs.KEY"; arch, task and how a call runs are not settings of a run.
_NOT_SWEPT = _OPERATIONAL_FIELDS | {"task", "arch"}
_KWARG_GROUPS = ("model_kwargs", "task_kwargs")


def _parse_scalar(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def _coerce(key: str, value: Any) -> Any:
    """``value`` as the type of config field ``key`` (free for model_kwargs / task_kwargs entries)."""
    if "." in key:
        return value
    kind = {f.name: str(f.type) for f in dataclasses.fields(SyntheticTrainConfig)}[key]
    optional = "None" in kind
    if value is None:
        if not optional:
            raise ValueError(f"--sweep {key}: none is not allowed ({kind})")
        return None
    if kind.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind.startswith("int") and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind.startswith("bool") and isinstance(value, bool):
        return value
    raise ValueError(f"--sweep {key}: {value!r} is not a {kind}")


def parse_sweep(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=5e-4,1e-3", "model_kwargs.gain_bound=none,0.9"]`` -> ``{"lr": [0.0005, 0.001], ...}``.

    Unknown fields, fields that are not settings of a run, tuples, repeated keys and values of the wrong
    type are refused here, before anything trains."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(SyntheticTrainConfig)}
    sweep: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ValueError(f"--sweep takes FIELD=V1,V2,..., got {spec!r}")
        group = key.split(".", 1)[0]
        if "." in key and group not in _KWARG_GROUPS:
            raise ValueError(f"--sweep {key}: only {' / '.join(_KWARG_GROUPS)} take a dotted KEY")
        if "." not in key and (key not in fields or key in _NOT_SWEPT or key in _KWARG_GROUPS
                               or fields[key].startswith("tuple")):
            sweepable = sorted(k for k, t in fields.items()
                               if k not in _NOT_SWEPT and k not in _KWARG_GROUPS and not t.startswith("tuple"))
            raise ValueError(f"--sweep {key}: not a sweepable setting; sweepable: {sweepable} and "
                             f"{' / '.join(g + '.KEY' for g in _KWARG_GROUPS)}")
        if key in sweep:
            raise ValueError(f"--sweep {key} given twice")
        parsed = [_coerce(key, _parse_scalar(v)) for v in values.split(",")]
        if len(set(map(repr, parsed))) != len(parsed):
            raise ValueError(f"--sweep {key}: repeated value in {values!r}")
        sweep[key] = parsed
    return sweep


def sweep_variants(sweep: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the swept values (the first key varies slowest)."""
    return [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]


def variant_name(overrides: dict[str, Any]) -> str:
    """A folder name for one combination, e.g. ``lr=0.001,d_model=128``."""
    def fmt(v: Any) -> str:
        return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={fmt(v)}" for k, v in overrides.items()) or "base"


def with_overrides(cfg: SyntheticTrainConfig, overrides: dict[str, Any]) -> SyntheticTrainConfig:
    plain = {k: v for k, v in overrides.items() if "." not in k}
    for key, value in overrides.items():
        if "." in key:
            group, sub = key.split(".", 1)
            plain[group] = {**plain.get(group, getattr(cfg, group)), sub: value}
    return dataclasses.replace(cfg, **plain)


def describe_devices(devices: Sequence[str]) -> str:
    """``"NVIDIA H200"``, ``"4 x NVIDIA H200"``, ``"cpu"``: where a grid ran, for its result file."""
    names = [torch.cuda.get_device_name(torch.device(d)) if torch.device(d).type == "cuda" else torch.device(d).type
             for d in devices]
    return " + ".join(f"{names.count(n)} x {n}" if names.count(n) > 1 else n for n in dict.fromkeys(names))


def run_grid(base: SyntheticTrainConfig, archs: Sequence[str] = ARCHS, tasks: Sequence[str] = tuple(TASKS),
             out_dir: str | Path | None = None,
             model_factory: Callable[..., nn.Module] | None = None, *,
             cells: Sequence[tuple[str, str]] | None = None,
             sweep: dict[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """The Table-6 grid; writes one JSON per cell and ``table6.json`` (+ ``table6.md``) in ``out_dir``.

    ``cells``: an explicit list of ``(arch, task)`` pairs instead of ``archs`` x ``tasks`` - e.g. only the
    cells an earlier budget left unfinished, still trained together by one scheduler.

    ``sweep`` (:func:`parse_sweep`): the grid under every combination of the swept settings, e.g. a
    learning-rate sweep, each combination in its own folder ``out_dir/NAME`` (:func:`variant_name`) laid
    out as a plain grid, plus ``sweep.json`` / ``sweep.md`` / ``sweep.png`` (accuracy per cell and setting)
    in ``out_dir``.

    All (setting, arch, task, seed) runs share one scheduler, so with ``base.concurrent_runs`` > 1 on a GPU
    the whole grid trains at once and a failing cell is recorded in the table without stopping the others.
    """
    pairs = list(cells) if cells is not None else [(arch, task) for arch in archs for task in tasks]
    unknown = sorted({task for _, task in pairs} - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {sorted(TASKS)}")
    out = None if out_dir is None else Path(out_dir)
    variants = []  # (overrides, folder, cell configs)
    for overrides in sweep_variants(sweep) if sweep else [{}]:
        folder = None if out is None else out / variant_name(overrides) if sweep else out
        varied = with_overrides(base, overrides)
        variants.append((overrides, folder, [dataclasses.replace(varied, arch=a, task=t) for a, t in pairs]))
    jobs, states = [], []
    for _, folder, cfgs in variants:
        for cfg in cfgs:
            jobs += [(cfg, seed) for seed in cfg.seeds]
            states += [None if folder is None else folder / "runs"] * len(cfg.seeds)
    t0 = time.time()
    runs = train_runs_on_devices(jobs, model_factory, devices=base.devices, concurrent_runs=base.concurrent_runs,
                                 time_budget_s=base.time_budget_s, progress=base.progress, state_dir=states,
                                 resume=base.resume)
    device = describe_devices(base.devices or (base.device,))
    from pararnn_lm.eval.tables import grid_curves, plot_curves, render_table6, write_sweep

    k, grids = 0, []
    for overrides, folder, cfgs in variants:
        results = []
        for cfg in cfgs:
            results.append(_cell_result(cfg, runs[k:k + len(cfg.seeds)], folder))
            k += len(cfg.seeds)
        grid = {"kind": "synthetic_grid", "results": results, "wall_seconds": round(time.time() - t0, 1),
                "device": device}
        if overrides:
            grid["overrides"] = _jsonable(overrides)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "table6.json").write_text(json.dumps(grid, indent=2))
            (folder / "table6.md").write_text(render_table6(results))
            plot_curves(grid_curves(grid), folder / "curves.png")
        grids.append(grid)
    if not sweep:
        return grids[0]
    swept = {"kind": "synthetic_sweep", "sweep": _jsonable(dict(sweep)), "variants": grids,
             "results": [r for g in grids for r in g["results"]], "wall_seconds": round(time.time() - t0, 1),
             "device": device}
    if out is not None:
        (out / "sweep.json").write_text(json.dumps(swept, indent=2))
        write_sweep(swept, out)
    return swept


def load_config(path: str | Path) -> SyntheticTrainConfig:
    """SyntheticTrainConfig from a YAML of its fields; unknown keys fail loudly."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(SyntheticTrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown SyntheticTrainConfig keys {sorted(unknown)}")
    for k in ("seeds", "betas", "devices"):
        if k in raw:
            raw[k] = tuple(raw[k])
    return SyntheticTrainConfig(**raw)  # a curriculum of "12:30000" strings or [12, 30000] pairs: __post_init__


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def resolve_devices(names: Sequence[str]) -> tuple[str, ...]:
    """``["all"]`` -> every visible GPU; otherwise the names as given (each a valid torch device; a GPU
    index must exist). Repeats are allowed (two workers on one device)."""
    if list(names) == ["all"]:
        count = torch.cuda.device_count()
        if not count:
            raise ValueError("--devices all: no GPU is visible")
        return tuple(f"cuda:{i}" for i in range(count))
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--devices: {name!r} is not a device (e.g. cuda:0, cpu)") from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--devices: {name} is not visible ({torch.cuda.device_count()} GPU(s))")
    return tuple(names)


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML of SyntheticTrainConfig fields (e.g. configs/synthetic/table6.yaml); "
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
    p.add_argument("--out", default="results/synthetic")
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
                   help="wall-clock cap; unfinished runs report their best-validation weights")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager steps on CUDA (default: one graph per run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs a previous call (same --out) stopped at its time budget")
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
        from pararnn_lm.eval.tables import render_sweep, render_table6

        print(render_sweep(grid) if sweep else render_table6(grid["results"]))
        return grid
    if not a.task:
        raise SystemExit("give --task or --grid")
    res = run_task(cfg, out_dir=a.out)
    print(json.dumps({k: res[k] for k in ("task", "arch", "accuracy", "best_seed")}))
    return res


if __name__ == "__main__":
    # the importable module's main, not this __main__ copy: spawned --devices workers then unpickle the same
    # classes and functions (and log under the module's name)
    from pararnn_lm.eval.synthetic.train import main as _main

    _main()
