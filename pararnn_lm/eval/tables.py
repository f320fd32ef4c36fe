"""Render result files into the paper's Table 5 / Table 6 layouts (markdown) and plots, paper numbers beside ours.

Inputs (JSON):
* synthetic: ``{"kind": "synthetic", "arch", "task", "accuracy" (0..1), ...}`` (``python -m pararnn_lm.synthetic``;
  files named in :mod:`pararnn_lm.eval.synthetic.results`) or a ``{"kind": "synthetic_grid", "results": [...]}`` file;
* perplexity: ``{"kind": "perplexity", "perplexity", "meta": {"arch", "size", ...}}`` (eval.perplexity);
* lm-eval: lm-eval's own results JSON (``results`` -> task -> ``"<metric>,<filter>"``); arch and size come
  from ``pararnn_meta`` (added by eval.lm_eval_tasks) or, failing that, from the file name
  (``<arch>[_-]<size>...json``, e.g. ``paragru_400m.json``).

CLI:
    python -m pararnn_lm.eval.tables --synthetic runs/synthetic/table6 --perplexity r/ppl_*.json --lm-eval r/lm_*.json --out tables/
    python -m pararnn_lm.eval.tables --sweep runs/synthetic/mqar_lr/sweep.json --out tables/    # sweep.md, sweep.png, sweep_curves.png
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import textwrap
from pathlib import Path
from typing import Any, Iterable, Sequence

from .paper import (ARCH_NAMES, PARAMS, SOURCE, SYNTHETIC_TASK_TITLES, TABLE5_ACC, TABLE5_PPL, TABLE6, TABLE6_MODELS,
                    TABLE6_RECIPE, TABLE6_TASKS, lm_eval_suite)
from .plotting import save_figure
from .synthetic.results import SWEEP_CURVES_PNG, SWEEP_MD, SWEEP_PNG, variant_name

log = logging.getLogger(__name__)

TASK_ORDER = list(SYNTHETIC_TASK_TITLES)
SIZE_ORDER = list(PARAMS)
LM_TASK_TITLES = {"arc_challenge": "ARC-C", "hellaswag": "HellaSwag", "openbookqa": "OBQA", "winogrande": "WinoGrande",
                  "piqa": "PIQA", "mmlu": "MMLU"}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _arch_order(archs: Iterable[str]) -> list[str]:
    archs = set(archs)
    return [a for a in ARCH_NAMES if a in archs] + sorted(a for a in archs if a not in ARCH_NAMES)


def _md(text: str) -> str:
    """Text for a markdown table cell (a bare "|", as in "|V|=128", would split the cell)."""
    return text.replace("|", "\\|")


def _name(arch: str) -> str:
    return ARCH_NAMES.get(arch, arch)


# ------------------------------------------------------------------------------------------ loading

def load_json_files(paths: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Files, or directories (all *.json inside, sorted)."""
    out = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        out += [(f, json.loads(f.read_text())) for f in files]
    return out


def synthetic_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for path, obj in load_json_files(paths):
        if obj.get("kind") == "synthetic_sweep":  # several settings per cell: not one Table 6
            log.warning("%s is a sweep: render it with --sweep, or pass one setting's folder "
                        "(%s/NAME) for Table 6", path, path.parent)
        items = obj["results"] if obj.get("kind") == "synthetic_grid" else [obj] if obj.get("kind") == "synthetic" else []
        for r in items:
            rows[(r["arch"], r["task"])] = r  # later files win (re-runs)
    return list(rows.values())


def _meta_from_name(path: Path) -> dict[str, str]:
    m = re.match(r"(?P<arch>[a-z0-9]+?)[_-](?P<size>[0-9.]+[mbk]|tiny|small|default)", path.stem.lower())
    return m.groupdict() if m else {}


def lm_eval_rows(paths: Iterable[str | Path]) -> dict[tuple[str, str], dict[str, float]]:
    """(arch, size) -> {"task@shots": accuracy %} using each task's metric from the paper suite."""
    metrics = {t: v["metric"] for t, v in lm_eval_suite().items()}
    table: dict[tuple[str, str], dict[str, float]] = {}
    for path, obj in load_json_files(paths):
        meta = obj.get("pararnn_meta") or _meta_from_name(path)
        if "arch" not in meta:
            log.warning("skipping %s: no arch/size (pararnn_meta or <arch>_<size>.json name)", path)
            continue
        key = (meta["arch"], str(meta.get("size", "?")))
        shots = obj.get("n-shot", {})
        for task, res in obj.get("results", {}).items():
            if task not in LM_TASK_TITLES:
                continue
            metric = metrics.get(task, "acc")
            val = res.get(f"{metric},none", res.get(metric))
            if val is None:
                continue
            table.setdefault(key, {})[f"{task}@{shots.get(task, '?')}"] = 100.0 * float(val)
    return table


def perplexity_rows(paths: Iterable[str | Path]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path, obj in load_json_files(paths):
        if obj.get("kind") != "perplexity":
            continue
        meta = obj.get("meta") or {}
        meta = {**_meta_from_name(path), **{k: v for k, v in meta.items() if v is not None}}
        if "arch" not in meta:
            log.warning("skipping %s: no arch in meta or file name", path)
            continue
        out[(meta["arch"], str(meta.get("size", "?")))] = {"perplexity": obj["perplexity"], **meta}
    return out


# ------------------------------------------------------------------------------------------ Table 6

def render_table6(results: Sequence[dict[str, Any]], include_paper_rows: bool = True) -> str:
    """Markdown: one row per architecture, cells "ours / paper" accuracy in %."""
    ours = {(r["arch"], r["task"]): r.get("accuracy") for r in results}
    off_recipe = {(r["arch"], r["task"]): d for r in results if (d := recipe_deviations(r))}
    archs = _arch_order({a for a, _ in ours} | (set(TABLE6) if include_paper_rows else set()))
    head = "| model | " + " | ".join(_md(SYNTHETIC_TASK_TITLES[t]) for t in TASK_ORDER) + " |"
    lines = [f"Synthetic tasks (Table 6): test accuracy %, ours / paper (best of seeds). Paper: {SOURCE}.", "",
             head, "|---" * (len(TASK_ORDER) + 1) + "|"]
    for a in archs:
        cells = []
        for t in TASK_ORDER:
            mine = ours.get((a, t))
            paper = TABLE6.get(a, {}).get(t)
            flag = " *" if (a, t) in off_recipe else ""
            cells.append(f"{_fmt(None if mine is None else 100 * mine)}{flag} / {_fmt(paper, 0)}")
        lines.append(f"| {_name(a)} | " + " | ".join(cells) + " |")
    if off_recipe:  # a number trained otherwise must not pass for the paper's setting
        lines.append("")
        lines += [f"\\* {_name(a)}, {SYNTHETIC_TASK_TITLES[t]}: not the paper's recipe: {', '.join(d)}"
                  for (a, t), d in sorted(off_recipe.items())]
    return "\n".join(lines) + "\n"


def recipe_deviations(result: dict[str, Any]) -> list[str]:
    """``key=ours (paper value)`` for each Table-6 setting a result differs in: the training recipe of its
    ``config``, and the model and task options it recorded (``model_spec``, ``task_options``) against the
    paper's for its cell (``TABLE6_MODELS``, ``TABLE6_TASKS``). A result without a ``config`` has nothing to
    compare; one with a config but no model record predates the paper's per-task models and is flagged."""
    cfg = result.get("config") or {}
    out = [f"{k}={cfg[k]} (paper {v})" for k, v in TABLE6_RECIPE.items()
           if isinstance(cfg.get(k), (int, float)) and cfg[k] != v]
    if cfg:
        out += _setup_deviations(result)
    if cfg.get("curriculum"):  # stages of (length, steps) before the main length
        out.append("curriculum " + " ".join(f"{length}:{steps}" for length, steps in cfg["curriculum"]) + " (paper none)")
    return out


# Model fields that choose how a model computes (kernels, solver), not which model it is: never off-recipe.
IMPLEMENTATION_FIELDS = frozenset({"rnn_mode", "rnn_newton", "ssd_backend", "attention_impl"})


def _differences(label: str, ours: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    return [f"{label} {k}={ours.get(k)} (paper {paper.get(k)})" for k in sorted(set(ours) | set(paper))
            if ours.get(k) != paper.get(k)]


def _setup_deviations(result: dict[str, Any]) -> list[str]:
    """How the model and task options a result recorded differ from the paper's for its cell."""
    if "model_spec" not in result or "task_options" not in result:
        return ["model and task options not recorded (trained before the paper's per-task models)"]
    out = []
    ours, paper = result["model_spec"], TABLE6_MODELS.get((result["arch"], result["task"]))
    if ours is not None and paper is not None:  # a registered architecture has no paper model to match
        out += _differences("model", {k: v for k, v in ours.items() if k != "mixer"},
                            {k: v for k, v in paper.items() if k != "mixer"})
        mixer = {k: v for k, v in (ours.get("mixer") or {}).items() if k not in IMPLEMENTATION_FIELDS}
        out += _differences("model", mixer, paper["mixer"])
    return out + _differences("task", result["task_options"] or {}, TABLE6_TASKS.get(result["task"], {}))


def plot_table6(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars: accuracy vs task per architecture; ours filled, the paper's as black markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = {(r["arch"], r["task"]): r.get("accuracy") for r in results}
    archs = _arch_order({a for a, _ in ours})
    width = 0.8 / max(len(archs), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, a in enumerate(archs):
        xs = [j + (i - (len(archs) - 1) / 2) * width for j in range(len(TASK_ORDER))]
        ys = [100 * (ours.get((a, t)) or 0.0) for t in TASK_ORDER]
        ax.bar(xs, ys, width, label=f"{_name(a)} (ours)")
        paper = [TABLE6.get(a, {}).get(t) for t in TASK_ORDER]
        px = [x for x, p in zip(xs, paper) if p is not None]
        ax.scatter(px, [p for p in paper if p is not None], marker="_", s=200, color="k", zorder=3,
                   label="paper" if i == 0 else None)
    ax.set_xticks(range(len(TASK_ORDER)), [SYNTHETIC_TASK_TITLES[t] for t in TASK_ORDER], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Synthetic tasks, single layer (Table 6)")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ sweeps

def _variant_label(grid: dict[str, Any]) -> str:
    return variant_name(grid.get("overrides") or {})


def render_sweep(swept: dict[str, Any]) -> str:
    """Markdown: one row per (architecture, task), one column per swept setting; best-of-seeds test
    accuracy % with each seed's in brackets, the paper's number beside."""
    variants = swept["variants"]
    by_variant = [{(r["arch"], r["task"]): r for r in g["results"]} for g in variants]
    cells = list(dict.fromkeys(key for table in by_variant for key in table))
    order = _arch_order({a for a, _ in cells})
    cells.sort(key=lambda c: (TASK_ORDER.index(c[1]) if c[1] in TASK_ORDER else len(TASK_ORDER), order.index(c[0])))
    labels = [_variant_label(g) for g in variants]
    lines = [f"Sweep over {', '.join(swept['sweep'])}: test accuracy %, best of seeds [each seed]; paper: {SOURCE}.",
             "", "| model | task | paper | " + " | ".join(labels) + " |", "|---" * (len(labels) + 3) + "|"]
    for arch, task in cells:
        row = []
        for table in by_variant:
            r = table.get((arch, task))
            seeds = [s.get("test_acc") for s in (r or {}).get("seeds", [])]
            each = ", ".join(_fmt(None if a is None else 100 * a) for a in seeds)
            acc = None if r is None or r.get("accuracy") is None else 100 * r["accuracy"]
            row.append(f"{_fmt(acc)}" + (f" [{each}]" if len(seeds) > 1 else ""))
        paper = TABLE6.get(arch, {}).get(task)
        lines.append(f"| {_name(arch)} | {_md(SYNTHETIC_TASK_TITLES.get(task, task))} | {_fmt(paper, 0)} | "
                     + " | ".join(row) + " |")
    swept_keys = {k.split(".")[-1] for k in swept["sweep"]}  # recipe_deviations names kwargs by their own key
    common = sorted(set.intersection(*[
        {d for d in recipe_deviations(r) if d.split("=", 1)[0].split(" ")[-1] not in swept_keys}
        for g in variants for r in g["results"]] or [set()]))
    if common:
        lines += ["", "Every run also differs from the paper's recipe in: " + ", ".join(common)]
    return "\n".join(lines) + "\n"


def plot_sweep(swept: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against the swept setting, one line per (architecture, task): best of seeds, each seed a
    dot, the paper's number dotted. One numeric setting is the x axis (log for a learning rate); several
    settings are laid out side by side as categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = swept["variants"]
    keys = list(swept["sweep"])
    values = [(g.get("overrides") or {}).get(keys[0]) for g in variants] if len(keys) == 1 else []
    numeric = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(variants)))
    fig, ax = plt.subplots(figsize=(7, 4))
    cells = list(dict.fromkeys((r["arch"], r["task"]) for g in variants for r in g["results"]))
    for arch, task in cells:
        best, seed_pts = [], []
        for x, g in zip(xs, variants):
            r = next((r for r in g["results"] if (r["arch"], r["task"]) == (arch, task)), None)
            acc = None if r is None else r.get("accuracy")
            best.append(float("nan") if acc is None else 100 * acc)
            seed_pts += [(x, 100 * s["test_acc"]) for s in (r or {}).get("seeds", []) if s.get("test_acc") is not None]
        label = f"{_name(arch)}, {SYNTHETIC_TASK_TITLES.get(task, task)}" if len({t for _, t in cells}) > 1 else _name(arch)
        (line,) = ax.plot(xs, best, marker="o", label=label)
        if seed_pts:
            ax.scatter(*zip(*seed_pts), s=12, color=line.get_color(), alpha=0.5)
        paper = TABLE6.get(arch, {}).get(task)
        if paper is not None:
            ax.axhline(paper, color=line.get_color(), linestyle=":", linewidth=1)
    if numeric:
        if min(xs) > 0 and max(xs) / min(xs) >= 10 or keys[0] in ("lr", "min_lr", "weight_decay"):
            ax.set_xscale("log")
        ax.set_xlabel(keys[0])
    else:
        ax.set_xticks(xs, [_variant_label(g) for g in variants], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    tasks = list(dict.fromkeys(t for _, t in cells))
    what = SYNTHETIC_TASK_TITLES.get(tasks[0], tasks[0]) if len(tasks) == 1 else "Synthetic tasks"
    ax.set_title(f"{what}: sweep over {', '.join(keys)} (dotted: paper)")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ learning curves

def _compact_count(x: float, _pos: Any = None) -> str:
    """Axis label for a step count: 250000 -> '250k', 1500000 -> '1.5M' (long plain numbers overlap)."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def curriculum_stage_starts(result: dict[str, Any]) -> list[tuple[int, int]]:
    """(first step, training length) of each stage of a cell run with a length curriculum, the main length
    last; empty without one. The stages end at their cumulative step counts (as the trainer runs them)."""
    cfg = result.get("config", {})
    stages = [tuple(s) for s in cfg.get("curriculum") or ()]
    if not stages:
        return []
    starts, step = [], 0
    for seq_len, steps in stages:
        starts.append((step, int(seq_len)))
        step += int(steps)
    return [*starts, (step, int(cfg["seq_len"]))]


def panel_stage_starts(results: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """The curriculum stage starts one panel of curves draws: only when all its runs share one curriculum,
    and only the stages some run trained (one stopped early does not stretch the axis to stages it never
    reached)."""
    starts = {tuple(curriculum_stage_starts(r)) for r in results}
    if len(starts) != 1:
        return []
    last = max((h["step"] for r in results for seed in r.get("seeds", []) for h in seed.get("val_history") or []),
               default=0)
    return [(step, seq_len) for step, seq_len in next(iter(starts)) if step < last]


def plot_curves(panels: dict[str, Sequence[dict[str, Any]]], path: str | Path) -> Path | None:
    """Validation accuracy (solid) and mean training loss (dashed, right axis) against the step, one panel per
    key of ``panels`` (a task, or a swept setting), one colour per architecture and one line per seed; the
    paper's accuracy dotted; the stage boundaries of a length curriculum that every run of a panel shares
    grey, each labelled with the length it trains at. ``None`` when no run carries a ``val_history`` (older result files)."""
    panels = {k: [r for r in v if any(s.get("val_history") for s in r.get("seeds", []))] for k, v in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    archs = _arch_order({r["arch"] for v in panels.values() for r in v})
    colour = {a: f"C{i}" for i, a in enumerate(archs)}
    for ax, (title, results) in zip(axes.flat, panels.items()):
        loss_ax = ax.twinx()
        for r in sorted(results, key=lambda r: archs.index(r["arch"])):
            for k, seed in enumerate(s for s in r["seeds"] if s.get("val_history")):
                hist = seed["val_history"]
                steps = [h["step"] for h in hist]
                # a marker per epoch shows short runs' evaluation points; thousands of them only thicken the line
                ax.plot(steps, [100 * h["val_acc"] for h in hist], color=colour[r["arch"]], linewidth=1.2,
                        marker="o" if len(hist) <= 100 else None, markersize=2.5,
                        label=_name(r["arch"]) if k == 0 else None)
                losses = [h.get("train_loss") for h in hist]
                if any(x is not None for x in losses):
                    loss_ax.plot(steps, [float("nan") if x is None else x for x in losses], color=colour[r["arch"]],
                                 linestyle="--", linewidth=0.8, alpha=0.6)
            paper = TABLE6.get(r["arch"], {}).get(r["task"])
            if paper is not None:
                ax.axhline(paper, color=colour[r["arch"]], linestyle=":", linewidth=1)
        for step, seq_len in panel_stage_starts(results):
            if step:
                ax.axvline(step, color="0.6", linewidth=0.8, linestyle="-.")
            ax.annotate(f"L={seq_len}", (step, 1), xycoords=("data", "axes fraction"), xytext=(2, -9),
                        textcoords="offset points", fontsize=6, color="0.4")
        ax.set_title(_panel_title(title), fontsize=8)
        ax.set_xlabel("step")
        ax.xaxis.set_major_formatter(FuncFormatter(_compact_count))
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 105)
        loss_ax.set_ylabel("training loss (dashed)", fontsize=8)
        ax.legend(fontsize=7, loc="center right")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path)


def _panel_title(title: str, width: int = 52) -> str:
    """A sweep setting as a panel title that fits its panel: without the ``task_kwargs.`` / ``model_kwargs.``
    prefixes (a setting's key is still unique), wrapped at the commas between settings."""
    short = re.sub(r"\b(task|model)_kwargs\.", "", title).replace(",", ", ")
    return "\n".join(textwrap.wrap(short, width))


def grid_curves(grid: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Panels for :func:`plot_curves`: a grid by task; a sweep by setting (and task, when several)."""
    def by_task(results: Sequence[dict[str, Any]], prefix: str = "") -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        tasks = list(dict.fromkeys(r["task"] for r in results))
        for r in results:
            title = SYNTHETIC_TASK_TITLES.get(r["task"], r["task"])
            key = prefix if prefix and len(tasks) == 1 else f"{prefix}: {title}" if prefix else title
            out.setdefault(key, []).append(r)
        return out

    if grid.get("kind") == "synthetic_sweep":
        return {k: v for g in grid["variants"] for k, v in by_task(g["results"], _variant_label(g)).items()}
    return by_task(grid["results"])


def write_sweep(swept: dict[str, Any], out_dir: str | Path) -> str:
    """``sweep.md``, ``sweep.png`` and ``sweep_curves.png`` (if the runs carry learning curves) in ``out_dir``."""
    out_dir = Path(out_dir)
    md = render_sweep(swept)
    (out_dir / SWEEP_MD).write_text(md)
    plot_sweep(swept, out_dir / SWEEP_PNG)
    plot_curves(grid_curves(swept), out_dir / SWEEP_CURVES_PNG)
    return md


# ------------------------------------------------------------------------------------------ Table 5

def _size_key(size: str) -> tuple[int, str]:
    return (SIZE_ORDER.index(size) if size in SIZE_ORDER else -1, size)


def render_table5(ppl: dict[tuple[str, str], dict[str, Any]], acc: dict[tuple[str, str], dict[str, float]],
                  include_paper_rows: bool = True) -> str:
    """Markdown: rows (size, model); perplexity ours / paper, then lm-eval accuracies (task@shots)."""
    keys = set(ppl) | set(acc)
    if include_paper_rows:
        keys |= {(a, s) for s, row in TABLE5_PPL.items() for a, v in row.items() if v is not None}
    suite_order = list(lm_eval_suite())
    cols = sorted({c for row in acc.values() for c in row},
                  key=lambda c: (suite_order.index(c.split("@")[0]) if c.split("@")[0] in suite_order else 99, c))
    head = "| size | model | PPL ours / paper | " + " | ".join(
        f"{LM_TASK_TITLES.get(c.split('@')[0], c.split('@')[0])} ({c.split('@')[1]}-shot)" for c in cols) + " |"
    lines = [f"Language models (Table 5): test perplexity (lower is better) and lm-eval accuracy %. "
             f"Paper: {SOURCE}.", "", head, "|---" * (len(cols) + 3) + "|"]
    for arch, size in sorted(keys, key=lambda k: (_size_key(k[1]), _arch_order([a for a, _ in keys]).index(k[0]))):
        mine = ppl.get((arch, size), {}).get("perplexity")
        paper = TABLE5_PPL.get(size, {}).get(arch)
        cells = []
        for c in cols:
            task = c.split("@")[0]
            p = TABLE5_ACC.get(size, {}).get(arch, {}).get(task)
            v = acc.get((arch, size), {}).get(c)
            cells.append(_fmt(v) + ("" if p is None else f" / {_fmt(p)}"))
        lines.append(f"| {size} | {_name(arch)} | {_fmt(mine, 2)} / {_fmt(paper, 2)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_perplexity_vs_size(ppl: dict[tuple[str, str], dict[str, Any]], path: str | Path) -> Path:
    """Perplexity vs parameters (log-log); ours solid with dots, the paper's dashed with crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    archs = _arch_order({a for a, _ in ppl} | set(ARCH_NAMES))
    for i, a in enumerate(archs):
        color = f"C{i}"
        pts = sorted((float(v.get("n_params") or PARAMS.get(s, {}).get(a) or 0), v["perplexity"])
                     for (aa, s), v in ppl.items() if aa == a)
        pts = [p for p in pts if p[0] > 0]
        if pts:
            ax.plot(*zip(*pts), "-o", color=color, label=f"{_name(a)} (ours)")
        ref = [(PARAMS[s][a], v) for s, row in TABLE5_PPL.items() for aa, v in row.items() if aa == a and v is not None]
        if ref:
            ax.plot(*zip(*sorted(ref)), "--x", color=color, alpha=0.7, label=f"{_name(a)} (paper)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test perplexity")
    ax.legend(fontsize=7)
    ax.set_title("Perplexity vs size (Table 5)")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ CLI

def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", nargs="*", default=[], help="synthetic result files or directories")
    p.add_argument("--perplexity", nargs="*", default=[], help="perplexity JSON files or directories")
    p.add_argument("--lm-eval", nargs="*", default=[], help="lm-eval results JSON files or directories")
    p.add_argument("--sweep", default=None, help="a sweep.json (python -m pararnn_lm.synthetic --sweep): sweep.md and plots")
    p.add_argument("--out", default=None, help="directory for table5.md / table6.md and plots")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out: dict[str, str] = {}
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.synthetic:
        res = synthetic_results(a.synthetic)
        out["table6.md"] = render_table6(res)
        if a.out:
            plot_table6(res, Path(a.out) / "table6.png")
            plot_curves(grid_curves({"results": res}), Path(a.out) / "curves.png")
    if a.sweep:
        swept = json.loads(Path(a.sweep).read_text())
        if swept.get("kind") != "synthetic_sweep":
            p.error(f"--sweep {a.sweep}: not a sweep file (kind {swept.get('kind')!r}); use --synthetic")
        out["sweep.md"] = write_sweep(swept, a.out) if a.out else render_sweep(swept)
    if a.perplexity or a.lm_eval:
        ppl, acc = perplexity_rows(a.perplexity), lm_eval_rows(a.lm_eval)
        out["table5.md"] = render_table5(ppl, acc)
        if a.out:
            plot_perplexity_vs_size(ppl, Path(a.out) / "perplexity_vs_size.png")
    for name, text in out.items():
        print(text)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / name).write_text(text)
    return out


if __name__ == "__main__":
    main()
