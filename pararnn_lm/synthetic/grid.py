"""What a call trains and what it writes: one (arch, task) cell over its seeds, or the Table-6 grid of
architectures x tasks x seeds, optionally under every combination of swept settings. The files and
their names are listed in :mod:`pararnn_lm.eval.synthetic.results`.

A cell's ``accuracy`` is the best test accuracy over its seeds (the paper's protocol); ``accuracy_last`` is
that seed's accuracy at the last position. Every cell records the model it trained (``model_spec``) and its
task's options (``task_options``, e.g. ``scoring``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from pararnn_lm.eval.synthetic import results as files
from pararnn_lm.eval.synthetic.models import ARCHS
from pararnn_lm.eval.synthetic.tasks import TASKS
from pararnn_lm.eval.tables import grid_curves, plot_curves, render_table6, write_sweep

from .config import SyntheticTrainConfig, jsonable, run_choices, sweep_variants, with_overrides
from .devices import describe_devices, train_runs_on_devices

log = logging.getLogger(__name__)


def cell_result(cfg: SyntheticTrainConfig, runs: list[dict[str, Any]], out_dir: str | Path | None) -> dict[str, Any]:
    """One Table-6 cell from its seeds' results; written to ``out_dir/ARCH__TASK.json`` when given."""
    ok = [r for r in runs if r.get("test_acc") is not None]
    best = max(ok, key=lambda r: r["test_acc"]) if ok else {}
    result: dict[str, Any] = {"kind": "synthetic", "task": cfg.task, "arch": cfg.arch,
                              "accuracy": best.get("test_acc"), "best_seed": best.get("seed"),
                              "accuracy_last": best.get("test_acc_last"),  # the best seed's, at the last position
                              **run_choices(cfg), "seeds": runs, "config": jsonable(dataclasses.asdict(cfg))}
    if not ok:
        result["error"] = "; ".join(str(r.get("error")) for r in runs)
    if out_dir is not None:
        path = Path(out_dir) / files.cell_file(cfg.arch, cfg.task)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        log.info("wrote %s", path)
    return result


def check_settings(cfg: SyntheticTrainConfig) -> None:
    """Fail before anything trains on a model or task option the cell cannot take (e.g. MQAR's ``layout``
    swept over a grid with keep-nth), not when its result is written."""
    try:
        run_choices(cfg)
        TASKS[cfg.task].generate(1, cfg.seq_len, seed=0, **cfg.task_kwargs)
    except ValueError as err:
        raise ValueError(f"{cfg.arch}/{cfg.task}: {err}") from None


def run_task(cfg: SyntheticTrainConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """All seeds of one (arch, task); raises if every seed failed."""
    check_settings(cfg)
    runs = train_runs_on_devices([(cfg, s) for s in cfg.seeds], devices=cfg.devices,
                                 concurrent_runs=cfg.concurrent_runs, time_budget_s=cfg.time_budget_s,
                                 progress=cfg.progress, resume=cfg.resume,
                                 state_dir=None if out_dir is None else Path(out_dir) / files.RUNS_DIR)
    errors = [r["error"] for r in runs if r.get("error")]
    if len(errors) == len(runs):
        raise RuntimeError(f"{cfg.arch}/{cfg.task}: every seed failed: {errors}")
    return cell_result(cfg, runs, out_dir)


def run_grid(base: SyntheticTrainConfig, archs: Sequence[str] = ARCHS, tasks: Sequence[str] = tuple(TASKS),
             out_dir: str | Path | None = None, *, cells: Sequence[tuple[str, str]] | None = None,
             sweep: dict[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """The Table-6 grid; writes one JSON per cell, ``table6.json``, ``table6.md`` and ``curves.png`` in ``out_dir``.

    ``cells``: an explicit list of ``(arch, task)`` pairs instead of ``archs`` x ``tasks`` - e.g. only the
    cells an earlier budget left unfinished, still trained together by one scheduler.

    ``sweep`` (:func:`~pararnn_lm.synthetic.config.parse_sweep`): the grid under every combination of the
    swept settings, e.g. a learning-rate sweep, each combination in its own folder ``out_dir/NAME``
    (:func:`~pararnn_lm.eval.synthetic.results.variant_name`) laid out as a plain grid, plus ``sweep.json``,
    ``sweep.md``, ``sweep.png`` (accuracy per cell and setting) and ``sweep_curves.png`` in ``out_dir``.

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
        folder = None if out is None else out / files.variant_name(overrides) if sweep else out
        varied = with_overrides(base, overrides)
        variants.append((overrides, folder, [dataclasses.replace(varied, arch=a, task=t) for a, t in pairs]))
    jobs, states = [], []
    for _, folder, cfgs in variants:
        for cfg in cfgs:
            check_settings(cfg)
            jobs += [(cfg, seed) for seed in cfg.seeds]
            states += [None if folder is None else folder / files.RUNS_DIR] * len(cfg.seeds)
    t0 = time.time()
    runs = train_runs_on_devices(jobs, devices=base.devices, concurrent_runs=base.concurrent_runs,
                                 time_budget_s=base.time_budget_s, progress=base.progress, state_dir=states,
                                 resume=base.resume)
    device = describe_devices(base.devices or (base.device,))
    k, grids = 0, []
    for overrides, folder, cfgs in variants:
        results = []
        for cfg in cfgs:
            results.append(cell_result(cfg, runs[k:k + len(cfg.seeds)], folder))
            k += len(cfg.seeds)
        grid = {"kind": "synthetic_grid", "results": results, "wall_seconds": round(time.time() - t0, 1),
                "device": device}
        if overrides:
            grid["overrides"] = jsonable(overrides)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / files.GRID_JSON).write_text(json.dumps(grid, indent=2))
            (folder / files.GRID_MD).write_text(render_table6(results))
            plot_curves(grid_curves(grid), folder / files.CURVES_PNG)
        grids.append(grid)
    if not sweep:
        return grids[0]
    swept = {"kind": "synthetic_sweep", "sweep": jsonable(dict(sweep)), "variants": grids,
             "results": [r for g in grids for r in g["results"]], "wall_seconds": round(time.time() - t0, 1),
             "device": device}
    if out is not None:
        (out / files.SWEEP_JSON).write_text(json.dumps(swept, indent=2))
        write_sweep(swept, out)
    return swept
