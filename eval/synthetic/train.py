"""Train single-layer models on the paper's synthetic tasks (Table 6) and write JSON results.

Paper recipe (method.md Sec. 5): one layer, d=64, 4 heads, AdamW (0.9, 0.999), cosine decay from 5e-4,
weight decay 1e-6, batch 16, up to 3000 epochs over 10k training sequences, best of 3 seeds, accuracy
on a 100k-sequence test set. We stop a seed early once its validation accuracy reaches
``target_acc`` (the cosine horizon stays the full budget, so early stopping never changes the schedule
of the steps that did run), and evaluate the best-validation weights on the test set.

CLI (one task / the whole grid):
    python -m eval.synthetic.train --task parity --arch paragru --out results/synthetic
    python -m eval.synthetic.train --grid --out results/synthetic          # 4 archs x 5 tasks x 3 seeds
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import ARCHS, build_model, logits_of
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
    max_steps: int | None = None  # optional hard cap (also the cosine horizon when set)
    eval_every: int = 1  # epochs between validation passes
    target_acc: float = 1.0  # stop a seed once validation accuracy reaches this
    patience: int | None = None  # stop after this many evaluations without improvement
    grad_clip: float | None = None  # the paper states none
    d_model: int = 64
    num_heads: int = 4
    eval_batch_size: int = 1000
    device: str = "cpu"
    progress: bool = True
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # generator overrides (e.g. all_positions)
    model_kwargs: dict[str, Any] = field(default_factory=dict)


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
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def train_seed(cfg: SyntheticTrainConfig, seed: int,
               model_factory: Callable[..., nn.Module] | None = None) -> dict[str, Any]:
    """Train one seed; returns its metrics (test accuracy of the best-validation weights)."""
    spec = TASKS[cfg.task]
    splits = make_splits(spec, seed=seed, seq_len=cfg.seq_len, n_train=cfg.n_train, n_test=cfg.n_test,
                         n_val=cfg.n_val, **cfg.task_kwargs)
    torch.manual_seed(seed)
    factory = model_factory or build_model
    model = factory(cfg.arch, spec.vocab_size, bare_mixer=spec.bare_mixer, d_model=cfg.d_model,
                    num_heads=cfg.num_heads, **{"gain_bound": spec.gain_bound, **cfg.model_kwargs}).to(cfg.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(cfg.n_train / cfg.batch_size)
    horizon = cfg.max_steps or cfg.max_epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # cosine from lr to min_lr over the full budget, no warm-up
        frac = min(step / max(horizon, 1), 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))

    train = splits["train"]
    val = splits.get("val", train)
    shuffler = torch.Generator().manual_seed(seed)
    best_val, best_state, evals_since_best = -1.0, None, 0
    step, epoch, t0 = 0, 0, time.time()
    bar = tqdm(total=horizon, desc=f"{cfg.arch}/{cfg.task}/s{seed}", disable=not cfg.progress, leave=False)
    stop = False
    while not stop and epoch < cfg.max_epochs and step < horizon:
        perm = torch.randperm(len(train), generator=shuffler)
        for i in range(0, len(train), cfg.batch_size):
            b = train[perm[i : i + cfg.batch_size]].to(cfg.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = masked_loss(logits_of(model(b.input_ids)), b.targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{best_val:.3f}", ep=epoch)
            if step >= horizon:
                break
        epoch += 1
        if epoch % cfg.eval_every == 0 or step >= horizon or epoch >= cfg.max_epochs:
            acc = evaluate(model, val, cfg.eval_batch_size, cfg.device)
            if acc > best_val:
                best_val, best_state, evals_since_best = acc, copy.deepcopy(model.state_dict()), 0
            else:
                evals_since_best += 1
            log.debug("%s/%s seed %d epoch %d step %d val %.4f", cfg.arch, cfg.task, seed, epoch, step, acc)
            if acc >= cfg.target_acc or (cfg.patience is not None and evals_since_best >= cfg.patience):
                stop = True
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    test_acc = evaluate(model, splits["test"], cfg.eval_batch_size, cfg.device)
    result = {"seed": seed, "test_acc": test_acc, "best_val_acc": best_val, "epochs": epoch, "steps": step,
              "train_seconds": round(time.time() - t0, 2), "params": sum(p.numel() for p in model.parameters())}
    log.info("%s/%s seed %d: test acc %.4f (val %.4f, %d epochs)", cfg.arch, cfg.task, seed, test_acc, best_val, epoch)
    return result


def run_task(cfg: SyntheticTrainConfig, model_factory: Callable[..., nn.Module] | None = None,
             out_dir: str | Path | None = None) -> dict[str, Any]:
    """All seeds of one (arch, task); ``accuracy`` is the best test accuracy over seeds (paper)."""
    runs = [train_seed(cfg, s, model_factory) for s in cfg.seeds]
    best = max(runs, key=lambda r: r["test_acc"])
    result = {"kind": "synthetic", "task": cfg.task, "arch": cfg.arch, "accuracy": best["test_acc"],
              "best_seed": best["seed"], "seeds": runs, "config": _jsonable(dataclasses.asdict(cfg))}
    if out_dir is not None:
        path = Path(out_dir) / f"{cfg.arch}__{cfg.task}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        log.info("wrote %s", path)
    return result


def run_grid(base: SyntheticTrainConfig, archs: Sequence[str] = ARCHS, tasks: Sequence[str] = tuple(TASKS),
             out_dir: str | Path | None = None,
             model_factory: Callable[..., nn.Module] | None = None) -> dict[str, Any]:
    """The Table-6 grid; writes one JSON per cell and ``table6.json`` (+ ``table6.md``) in ``out_dir``."""
    results = []
    for arch in archs:
        for task in tasks:
            cfg = dataclasses.replace(base, arch=arch, task=task)
            try:
                results.append(run_task(cfg, model_factory, out_dir))
            except Exception as err:  # keep the grid going; the failure is recorded in the table
                log.exception("%s/%s failed", arch, task)
                results.append({"kind": "synthetic", "task": task, "arch": arch, "accuracy": None, "error": repr(err)})
    grid = {"kind": "synthetic_grid", "results": results}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table6.json").write_text(json.dumps(grid, indent=2))
        from eval.tables import render_table6

        (out / "table6.md").write_text(render_table6(results))
    return grid


def load_config(path: str | Path) -> SyntheticTrainConfig:
    """SyntheticTrainConfig from a YAML of its fields; unknown keys fail loudly."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(SyntheticTrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown SyntheticTrainConfig keys {sorted(unknown)}")
    for k in ("seeds", "betas"):
        if k in raw:
            raw[k] = tuple(raw[k])
    return SyntheticTrainConfig(**raw)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML of SyntheticTrainConfig fields (e.g. configs/synthetic/table6.yaml); "
                   "explicit flags override it")
    p.add_argument("--task", choices=sorted(TASKS), help="one task (omit with --grid)")
    p.add_argument("--arch", default="paragru", help=f"one of {ARCHS}")
    p.add_argument("--grid", action="store_true", help="run archs x tasks (default: all) and render Table 6")
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2")
    p.add_argument("--out", default="results/synthetic")
    p.add_argument("--seq-len", type=int, default=None, help="default 100")
    p.add_argument("--n-train", type=int, default=None, help="default 10000")
    p.add_argument("--n-test", type=int, default=None, help="default 100000")
    p.add_argument("--n-val", type=int, default=None, help="default 2000")
    p.add_argument("--max-epochs", type=int, default=None, help="default 3000")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="default 1")
    p.add_argument("--lr", type=float, default=None, help="default 5e-4")
    p.add_argument("--batch-size", type=int, default=None, help="default 16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(a.config) if a.config else SyntheticTrainConfig()
    flags = dict(seeds=tuple(a.seeds) if a.seeds else None, seq_len=a.seq_len, n_train=a.n_train, n_test=a.n_test,
                 n_val=a.n_val, max_epochs=a.max_epochs, max_steps=a.max_steps, eval_every=a.eval_every, lr=a.lr,
                 batch_size=a.batch_size)
    cfg = dataclasses.replace(cfg, task=a.task or cfg.task, arch=a.arch, device=a.device, progress=not a.no_progress,
                              **{k: v for k, v in flags.items() if v is not None})
    if a.grid:
        grid = run_grid(cfg, a.archs, a.tasks, a.out)
        from eval.tables import render_table6

        print(render_table6(grid["results"]))
        return grid
    if not a.task:
        raise SystemExit("give --task or --grid")
    res = run_task(cfg, out_dir=a.out)
    print(json.dumps({k: res[k] for k in ("task", "arch", "accuracy", "best_seed")}))
    return res


if __name__ == "__main__":
    main()
