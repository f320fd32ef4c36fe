"""The settings of a synthetic-task run: :class:`SyntheticTrainConfig`, its YAML files, length curricula
and sweeps.

The defaults are the paper's Table-6 recipe (arXiv 2510.21450, Table 6 and its appendix on the synthetic
tasks): one layer, d = 64, 4 heads, AdamW (0.9, 0.999) with weight decay 1e-6, a cosine from 5e-4 to 0,
batch 16, up to 3,000 epochs over 10k training sequences of length 100, best of 3 seeds, accuracy on
100k test sequences. Settings marked *ours* are not in the paper; a result that uses one is footnoted as
off-recipe in Table 6 (:func:`pararnn_lm.eval.tables.recipe_deviations`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pararnn_lm.eval.synthetic.models import resolved_spec
from pararnn_lm.eval.synthetic.tasks import TASKS
from pararnn_lm.provenance import config_file


@dataclass
class SyntheticTrainConfig:
    task: str = "parity"
    arch: str = "paragru"
    seeds: tuple[int, ...] = (0, 1, 2)
    seq_len: int = 100
    n_train: int = 10_000
    n_test: int = 100_000
    n_val: int = 2_000  # ours: a validation set for the best weights and early stopping
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
    concurrent_runs: int = 1  # runs advanced together (each on its own CUDA stream); 1 = one after another
    time_budget_s: float | None = None  # wall-clock cap of one call; unfinished runs report their best so far
    resume: bool = False  # continue the runs saved in OUT/runs by an earlier call (finished ones are read back)
    progress: bool = True
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # generator options (e.g. scoring="last")
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # ModelSpec overrides (e.g. gain_bound=None)
    # ours, a diagnostic (the paper's biases are 0): initial retention-gate bias of the RNN cells
    # (pararnn_lm.eval.synthetic.models.init_retain_gate); Transformer and Mamba2 runs ignore it.
    retain_gate_bias: float = 0.0
    # ours, a diagnostic (the paper states none): (seq_len, steps) stages trained, in order, before the main
    # stage at seq_len, each on n_train sequences of its length (:func:`parse_curriculum`). The cosine spans
    # every stage; validation, the best weights and the target-accuracy stop always use seq_len, and
    # ``patience`` counts main-stage validations only (the accuracy at seq_len can sit flat through a short
    # stage and still rise later).
    curriculum: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:  # every way in (YAML, flags, dataclasses.replace, the API) is checked
        self.curriculum = parse_curriculum(self.curriculum)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} > lr={self.lr}: the cosine decays from lr to min_lr")


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


def config_path(spec: str | Path) -> Path:
    """A YAML file, or the name of a config shipped in ``configs/synthetic`` (``table6``, ``quick``)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".yaml" else f"{path.name}.yaml"
    try:
        return config_file("synthetic", name)
    except FileNotFoundError:
        raise FileNotFoundError(f"{spec}: neither a file nor a config shipped in configs/synthetic") from None


def load_config(spec: str | Path) -> SyntheticTrainConfig:
    """SyntheticTrainConfig from a YAML of its fields (a path or a shipped config's name); unknown keys fail."""
    import yaml

    path = config_path(spec)
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(SyntheticTrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown SyntheticTrainConfig keys {sorted(unknown)}")
    for k in ("seeds", "betas", "devices"):
        if k in raw:
            raw[k] = tuple(raw[k])
    return SyntheticTrainConfig(**raw)  # a curriculum of "12:30000" strings or [12, 30000] pairs: __post_init__


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON reads it back (tuples become lists, anything else its ``str``)."""
    return json.loads(json.dumps(obj, default=str))


# Fields that only say how a call runs (where, how many at once, for how long), not what a run computes.
OPERATIONAL_FIELDS = frozenset({"seeds", "device", "devices", "cuda_graph", "concurrent_runs", "time_budget_s",
                                "resume", "progress", "eval_batch_size"})


# What a run's settings resolve to, recorded beside them: the model (ModelSpec) and the task's generator options.
RECORDED_CHOICES = ("model_spec", "task_options")


def run_choices(cfg: SyntheticTrainConfig) -> dict[str, Any]:
    """The model and task a run of ``cfg`` trains, as every result file records them: the resolved
    :class:`~pararnn_lm.eval.synthetic.models.ModelSpec` (None for a registered architecture) and the
    generator options (the paper's, updated by ``task_kwargs``; e.g. ``scoring``)."""
    return jsonable({"model_spec": resolved_spec(cfg.arch, cfg.task, **cfg.model_kwargs),
                     "task_options": TASKS[cfg.task].options(**cfg.task_kwargs)})


def run_identity(cfg: SyntheticTrainConfig) -> dict[str, Any]:
    """The settings that define a run's trajectory and result, and what they resolve to (:func:`run_choices`);
    saved with its state so ``--resume`` continues a run only under the settings and the model it started
    with (JSON-normalised: tuples become lists)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in OPERATIONAL_FIELDS}
    return {**jsonable(settings), **run_choices(cfg)}


# -- sweeps: the grid under several settings at once ------------------------------------------------
# Any field that changes what a run computes may be swept, and one key of model_kwargs / task_kwargs as
# "model_kwargs.KEY"; arch, task and how a call runs are not settings of a run.
_NOT_SWEPT = OPERATIONAL_FIELDS | {"task", "arch"}
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


def with_overrides(cfg: SyntheticTrainConfig, overrides: dict[str, Any]) -> SyntheticTrainConfig:
    """``cfg`` with one swept setting applied (``model_kwargs.KEY`` updates one entry of the group)."""
    plain = {k: v for k, v in overrides.items() if "." not in k}
    for key, value in overrides.items():
        if "." in key:
            group, sub = key.split(".", 1)
            plain[group] = {**plain.get(group, getattr(cfg, group)), sub: value}
    return dataclasses.replace(cfg, **plain)
