"""One seed's training run on a synthetic task: its data, model, optimiser and schedule, evaluation, and the
state files that let a run stopped by its time budget continue exactly.

A run trains until validation accuracy reaches ``target_acc``, ``patience`` runs out or its step budget
ends (the cosine horizon is always the full budget, so stopping early never changes the schedule of the
steps that did run), and reports the test accuracy of its best-validation weights.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pararnn_lm.eval.synthetic.models import RNN_ARCHS, build_model, logits_of
from pararnn_lm.eval.synthetic.results import run_key
from pararnn_lm.eval.synthetic.tasks import IGNORE_INDEX, TASKS, SyntheticBatch, make_splits
from pararnn_lm.training.checkpoint import atomic_torch_save, atomic_write_text
from pararnn_lm.training.optim import warmup_cosine

from .config import RECORDED_CHOICES, SyntheticTrainConfig, run_identity

log = logging.getLogger(__name__)


@torch.no_grad()
def accuracies(model: nn.Module, data: SyntheticBatch, batch_size: int = 1000,
               device: str = "cpu") -> tuple[float, float | None]:
    """(fraction of scored positions whose argmax logit equals the target, the same at the last position of
    the sequences that score it - None if none does)."""
    was_training = model.training
    model.eval()
    correct = total = last_correct = last_total = 0
    for i in range(0, len(data), batch_size):
        b = data[i : i + batch_size].to(device)
        hit = logits_of(model(b.input_ids)).argmax(-1) == b.targets
        correct += int(hit[b.loss_mask].sum())
        total += int(b.loss_mask.sum())
        last_correct += int(hit[:, -1][b.loss_mask[:, -1]].sum())
        last_total += int(b.loss_mask[:, -1].sum())
    model.train(was_training)
    return correct / max(total, 1), (last_correct / last_total if last_total else None)


def evaluate(model: nn.Module, data: SyntheticBatch, batch_size: int = 1000, device: str = "cpu") -> float:
    """Fraction of scored positions whose argmax logit equals the target (the task's accuracy)."""
    return accuracies(model, data, batch_size, device)[0]


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored positions; 0 (no gradient) for a batch without any - short k-hop
    sequences can have none, and the plain mean would be NaN and poison the weights. No host sync."""
    total = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def build_run_model(cfg: SyntheticTrainConfig) -> nn.Module:
    """The model a run of ``cfg`` trains (on the CPU, initialised from the current torch seed): its
    (arch, task) Table-6 model (:func:`~pararnn_lm.eval.synthetic.models.model_spec`) with ``cfg``'s width
    and model settings."""
    bias = cfg.retain_gate_bias if cfg.arch in RNN_ARCHS else 0.0
    return build_model(cfg.arch, cfg.task, d_model=cfg.d_model, num_heads=cfg.num_heads, retain_gate_bias=bias,
                       **cfg.model_kwargs)


def batches_per_epoch(cfg: SyntheticTrainConfig) -> int:
    """Optimiser steps per epoch; a CUDA graph needs equal batches, so graph mode drops the last partial one."""
    graphed = cfg.cuda_graph and torch.device(cfg.device).type == "cuda"
    return cfg.n_train // cfg.batch_size if graphed else math.ceil(cfg.n_train / cfg.batch_size)


def planned_steps(cfg: SyntheticTrainConfig) -> int:
    """The step budget (cosine horizon) of one seed under ``cfg``: the curriculum's steps, then the main
    stage's (``max_steps``, else ``max_epochs`` epochs)."""
    main = cfg.max_steps or cfg.max_epochs * max(batches_per_epoch(cfg), 1)
    return sum(steps for _, steps in cfg.curriculum) + main


class SeedRun:
    """One seed of one (arch, task), advanced one step at a time.

    ``advance()`` enqueues one optimiser step and, at an epoch end, validates (the only host sync) and
    decides whether to stop. With ``cuda_graph`` the whole step (forward, backward, AdamW with a device-side
    learning rate) is captured once after ``GRAPH_WARMUP`` eager steps and replayed on the run's own CUDA
    stream, so many runs advanced round-robin (:func:`pararnn_lm.synthetic.devices.train_runs`) overlap on
    one GPU: a one-layer d=64 model is far too small to fill a GPU, and without graphs every step is launch
    bound. A graph needs equal batches, so the last partial batch of an epoch is dropped in graph mode; if
    the capture fails (an op that syncs the host), the run logs why and continues eagerly.
    """

    GRAPH_WARMUP = 3

    def __init__(self, cfg: SyntheticTrainConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        spec = TASKS[cfg.task]
        self.splits = make_splits(spec, seed=seed, seq_len=cfg.seq_len, n_train=cfg.n_train, n_test=cfg.n_test,
                                  n_val=cfg.n_val, **cfg.task_kwargs)
        torch.manual_seed(seed)
        self.model = build_run_model(cfg)
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
    def lr_at(self, step: float) -> float:
        """Cosine from lr to min_lr over the full budget, every curriculum stage included; no warm-up."""
        lr, min_lr = self.cfg.lr, self.cfg.min_lr
        return lr * warmup_cosine(step, self.horizon, 0, min_lr / lr if lr else 0.0)

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

    # -- state (to continue after a time budget, e.g. a SLURM time limit) ---------------------------
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
        self.val_history = list(state.get("val_history", []))  # absent in states saved before curves were kept
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
        test_acc, test_acc_last = accuracies(self.model, self.splits["test"], self.cfg.eval_batch_size, self.cfg.device)
        cfg = self.cfg
        res = {"seed": self.seed, "test_acc": test_acc, "test_acc_last": test_acc_last,
               "best_val_acc": self.best_val, "epochs": self.epoch,
               "steps": self.step, "stopped": self.stop_reason or "time budget", "cuda_graph": self.graph is not None,
               "final_train_loss": None if self.last_loss is None else float(self.last_loss.detach()),
               "train_seconds": round(self.elapsed(), 2),
               "params": sum(p.numel() for p in self.model.parameters()), "val_history": self.val_history}
        log.info("%s/%s seed %d: test acc %.4f (val %.4f, %d epochs, %d steps, stopped: %s)", cfg.arch, cfg.task,
                 self.seed, test_acc, self.best_val, self.epoch, self.step, res["stopped"])
        return res


# -- a run's files in a state folder (OUT/runs) ------------------------------------------------------

class RunFiles:
    """Where one run keeps its state: ``KEY.pt`` while stopped by a time budget, ``KEY.result.json`` once
    finished; both carry the run's settings (:func:`run_identity`), written atomically."""

    def __init__(self, folder: Path, cfg: SyntheticTrainConfig, seed: int) -> None:
        self.key = run_key(cfg.arch, cfg.task, seed)
        self.identity = run_identity(cfg)
        self.state, self.result = folder / f"{self.key}.pt", folder / f"{self.key}.result.json"

    def save_stopped(self, run: SeedRun) -> None:
        atomic_torch_save({**run.state_dict(), "run_config": self.identity}, self.state)

    def save_finished(self, result: dict[str, Any]) -> None:
        atomic_write_text(self.result, json.dumps({**result, "run_config": self.identity}, indent=2))
        self.state.unlink(missing_ok=True)

    def finished(self) -> dict[str, Any] | None:
        """The result of a run finished earlier, or None."""
        if not self.result.exists():
            return None
        saved = json.loads(self.result.read_text())
        saved.pop("run_config", None)
        return saved

    def stopped_state(self) -> dict[str, Any] | None:
        """The saved state of a run stopped earlier, or None."""
        return torch.load(self.state, map_location="cpu", weights_only=True) if self.state.exists() else None

    def saved_identity(self) -> tuple[bool, dict[str, Any] | None]:
        """(whether anything is saved, the settings it was saved under - None in files written without them)."""
        if self.result.exists():
            return True, json.loads(self.result.read_text()).get("run_config")
        if self.state.exists():
            return True, torch.load(self.state, map_location="cpu", weights_only=True).get("run_config")
        return False, None


def check_resumable(jobs: Sequence[tuple[SyntheticTrainConfig, int]], folder: Path) -> None:
    """Refuse, before anything trains, to resume a saved run under different settings (it would mix two
    trajectories under one key). Files saved without their settings are accepted with a warning; a setting
    missing from a saved file counts as its default, a missing model or task record as a different one (the
    file predates them: its model may not be today's)."""
    clashes = []
    defaults = {k: v for k, v in run_identity(SyntheticTrainConfig()).items() if k not in RECORDED_CHOICES}
    for cfg, seed in jobs:
        files = RunFiles(folder, cfg, seed)
        found, saved = files.saved_identity()
        if not found:
            continue
        if saved is None:
            log.warning("%s: saved without its settings; resuming it as it is", files.key)
            continue
        want = files.identity
        diff = {k: (saved.get(k, defaults.get(k)), want.get(k)) for k in sorted(set(saved) | set(want))
                if saved.get(k, defaults.get(k)) != want.get(k)}
        if diff:
            clashes.append(f"{files.key}: " + ", ".join(f"{k} saved {a!r} now {b!r}" for k, (a, b) in diff.items()))
    if clashes:
        raise ValueError(f"--resume: {len(clashes)} saved run(s) in {folder} were started with other settings - "
                         "pass the same settings or a new --out:\n  " + "\n  ".join(clashes))
