"""Continued pretraining (``init_from``): a new run starts from the weights of a checkpoint, a run folder, a
DeepSpeed checkpoint or an HF export. Its first loss is the loss the source model gives on the run's first
batch, computed here by loading the weights into a fresh model with the export module's loaders (not with
``training.init_from``); optimiser, schedule and step start fresh; a resume continues the new run without
reading the source again; another architecture, a missing path and pickled weights are refused clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pararnn_lm.provenance import config_dir
from pararnn_lm.training.init_from import InitFromError, locate
from pararnn_lm.training.optim import warmup_cosine
from test_train import FAST, assert_continues, attempts, losses, records, run_train


def config(run_dir: Path, *overrides: str):
    """The typed configuration train.py composes from FAST and ``overrides``."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=[*FAST, f"run_dir={run_dir}", "train.device=cpu",
                                                               "eval.at_end=false", *overrides]))


def train_here(run_dir: Path, *overrides: str) -> dict:
    """train() in this process (no interpreter start-up); its signal handlers are put back afterwards."""
    import signal

    import pararnn_lm.train as script

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        return script.train(config(run_dir, *overrides))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def start_record(run_dir: Path, index: int = 0) -> dict:
    return [r for r in records(run_dir) if r.get("event") == "start"][index]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A run folder of 6 trained steps with its HF export: the source of the continued runs."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    train_here(run_dir, "train.steps=6", "checkpoint.every=3", "export.at_end=true")
    return run_dir


def first_batch_loss(model: torch.nn.Module, run_dir: Path) -> float:
    """Cross-entropy of ``model`` on the first batch the run in ``run_dir`` trains on (same data config
    and seed), as the training forward computes it (train mode, fp32 on the CPU)."""
    from pararnn_lm.data import build_datasets

    cfg = config(run_dir)
    torch.manual_seed(cfg.train.seed)
    batch = next(iter(build_datasets(cfg.data, 0, 1, batch_size=cfg.train.micro_batch_size, progress=False).train))
    with torch.no_grad():
        return float(model.train()(**batch).ce_loss)


def source_model(source_run: Path, kind: str) -> torch.nn.Module:
    from pararnn_lm.models import ParaRNNLMConfig, ParaRNNLMForCausalLM
    from pararnn_lm.models.export import load_source

    if kind == "export":
        return ParaRNNLMForCausalLM.from_pretrained(source_run / "export")
    return load_source(source_run / "checkpoints" / "step_00000006", ParaRNNLMConfig.from_pretrained(source_run / "export"))


@pytest.mark.parametrize("kind", ["checkpoint", "run folder", "export"])
def test_the_first_loss_is_the_source_models_loss_and_the_rest_starts_fresh(tmp_path, source, kind):
    path = {"checkpoint": source / "checkpoints" / "step_00000006", "run folder": source,
            "export": source / "export"}[kind]
    run_dir = tmp_path / "continued"
    train_here(run_dir, "train.steps=2", f"init_from={path}")
    expected = first_batch_loss(source_model(source, "export" if kind == "export" else "checkpoint"), run_dir)
    first = losses(run_dir)[1]
    assert first == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # the source's own first step: a random initialisation's loss on the same batch, far above
    assert losses(source)[1] - first > 0.5
    # A new run: its own id, step 0, this run's schedule from its start, its own checkpoints.
    start = start_record(run_dir)
    assert start["step"] == 0 and start["resumed_from"] is None
    assert start["init_from"] == str(source / "checkpoints" / "step_00000006" if kind != "export" else path)
    assert start["run_id"] != start_record(source)["run_id"]
    lr = {r["step"]: r["lr"] for r in records(run_dir) if "lr" in r}
    assert lr == pytest.approx({s: 3e-3 * warmup_cosine(s, 2, 0) for s in (1, 2)}, rel=1e-6)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]
    state = torch.load(run_dir / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # AdamW moments of 2 steps


def test_a_deepspeed_checkpoint_is_a_source_too(tmp_path):
    """ZeRO-2 stores the fp32 masters in its optimiser shards; the run starts from those."""
    from pararnn_lm.models import ParaRNNLMConfig
    from pararnn_lm.models.export import load_source

    zero2 = tmp_path / "zero2"
    run_train(zero2, "train.steps=6", "deepspeed=zero2", "export.at_end=true")
    run_dir = tmp_path / "continued"
    train_here(run_dir, "train.steps=1", f"init_from={zero2}")
    model = load_source(zero2 / "checkpoints" / "step_00000006", ParaRNNLMConfig.from_pretrained(zero2 / "export"))
    assert losses(run_dir)[1] == pytest.approx(first_batch_loss(model, run_dir), rel=1e-5, abs=1e-6)
    assert start_record(run_dir)["init_from"] == str(zero2 / "checkpoints" / "step_00000006")


def test_a_resumed_run_continues_itself_and_does_not_read_the_source_again(tmp_path, source):
    steps = ["train.steps=5", "checkpoint.every=0", f"init_from={source / 'export'}"]
    reference = tmp_path / "reference"
    run_train(reference, *steps)
    preempted = tmp_path / "preempted"
    run_train(preempted, *steps, fault="sigterm@3", expect=3)  # checkpoint at step 3, exit for a requeue
    result = run_train(preempted, *steps)  # the same command: resume=auto
    assert_continues(preempted, losses(reference), resumed_at=3)
    assert [a[0] for a in attempts(preempted)] == [0, 3]
    assert start_record(preempted, 0)["init_from"] == str(source / "export")
    second = start_record(preempted, 1)
    assert second["init_from"] is None and second["resumed_from"].endswith("step_00000003")
    assert f"init_from={source / 'export'} is not applied" in result.stdout + result.stderr


@pytest.mark.parametrize("overrides, differences", [
    (["model.arch=paralstm"], ["mixers: source ['paragru', 'paragru'], this run ['paralstm', 'paralstm']",
                               "model.layers.0.mixer.cell.recurrent: source (3, 32), this run (5, 32)"]),
    (["+model.overrides.hidden_size=48", "+model.overrides.num_hidden_layers=3"],
     ["hidden_size: source 32, this run 48", "num_hidden_layers: source 2, this run 3",
      "model.embed_tokens.weight: source (", "model.layers.2.mixer.in_proj.weight: only in this run's model"]),
])
def test_another_architecture_is_refused_with_every_difference(tmp_path, source, overrides, differences):
    for path in (source, source / "export"):
        run_dir = tmp_path / path.name
        with pytest.raises(InitFromError, match="holds another architecture than this run's model") as err:
            train_here(run_dir, f"init_from={path}", *overrides)
        for difference in differences:
            assert difference in str(err.value), str(err.value)
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_a_missing_or_unusable_path_fails_before_anything_is_written(tmp_path, source):
    run_dir = tmp_path / "run"
    with pytest.raises(InitFromError, match=f"init_from={tmp_path / 'nowhere'}: no such file or directory"):
        train_here(run_dir, f"init_from={tmp_path / 'nowhere'}")
    assert not run_dir.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InitFromError, match="is neither a checkpoint .* a run folder .* nor an HF export"):
        train_here(run_dir, f"init_from={tmp_path / 'empty'}")
    assert not run_dir.exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "pararnn_lm"}))
    torch.save({"lm_head.weight": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(InitFromError, match="pickled weights .* not loaded"):
        locate(str(pickled))
    empty_run = tmp_path / "no_checkpoint"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(InitFromError, match="holds no complete checkpoint"):
        train_here(run_dir, f"init_from={empty_run}")
