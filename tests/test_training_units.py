"""Units of the training loop: checkpoints, schedule, optimiser groups, DeepSpeed JSON, signals."""
import math
import os
import signal

import pytest
import torch
from torch import nn

from training.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from training.config import DeepSpeedConfig, TrainConfig, validate
from training.distributed import DistInfo
from training.optim import build_scheduler, parameter_groups, warmup_cosine
from training.signals import PreemptionFlag


def _save(manager, step):
    return manager.save(step, {"data": {"cursor": step}}, global_state={"step": step})


def test_checkpoints_are_complete_pruned_and_found(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        _save(manager, step)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000020", "step_00000030"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000030"
    latest = manager.latest()
    assert CheckpointManager.step_of(latest) == 30
    assert manager.load_rank_state(latest)["data"]["cursor"] == 30
    assert CheckpointManager.load_global_state(latest)["step"] == 30


def test_a_crash_mid_write_never_becomes_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    _save(manager, 10)
    # A crash while writing step 20: the temporary directory exists, nothing was renamed.
    (tmp_path / ".step_00000020.tmp").mkdir()
    torch.save({"partial": True}, tmp_path / ".step_00000020.tmp" / "state.pt")
    assert CheckpointManager.step_of(manager.latest()) == 10
    # A 'latest' pointing at a directory without COMPLETE (e.g. edited by hand) is not trusted.
    (tmp_path / "step_00000030").mkdir()
    (tmp_path / "latest").write_text("step_00000030\n")
    assert CheckpointManager.step_of(manager.latest()) == 10
    # The next save cleans up the stale temporary directory.
    _save(manager, 40)
    assert not (tmp_path / ".step_00000020.tmp").exists()
    assert CheckpointManager.step_of(manager.latest()) == 40


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path / "none", keep_last=1).latest() is None


def test_missing_rank_file_has_a_clear_error(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    path = _save(manager, 5)
    with pytest.raises(FileNotFoundError, match="same number of processes"):
        CheckpointManager(tmp_path, keep_last=1, rank=1).load_rank_state(path)


def test_rng_state_round_trip():
    state = capture_rng_state()
    a = (torch.rand(3), os.urandom(0))
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), a[0])


def test_warmup_cosine_formula():
    total, warmup = 100, 10
    assert warmup_cosine(0, total, warmup) == pytest.approx(0.1)
    assert warmup_cosine(9, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(55, total, warmup) == pytest.approx(0.5)
    assert warmup_cosine(100, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(35, 110, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_scheduler_drives_the_optimizer_lr():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[-1] < 0.01


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_deepspeed_json():
    from training.backends import deepspeed_json

    cfg = TrainConfig()
    cfg.deepspeed = DeepSpeedConfig(enabled=True, stage=3, offload_optimizer=True, offload_params=True,
                                    extra={"zero_optimization": {"reduce_bucket_size": 123}})
    cfg.train.micro_batch_size = 2
    info = DistInfo(0, 4, 0, torch.device("cpu"))
    ds = deepspeed_json(cfg, info, grad_accum=3)
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["reduce_bucket_size"] == 123
    assert ds["bf16"]["enabled"] is False  # precision=auto on CPU
    cfg.deepspeed = DeepSpeedConfig(enabled=True, stage=2, offload_params=True)
    with pytest.raises(ValueError, match="offload_params needs ZeRO stage 3"):
        deepspeed_json(cfg, info, 1)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "precision", "fp8", "train.precision='fp8' is not one of"),
        ("train", "on_nonfinite", "ignore", "train.on_nonfinite"),
        ("deepspeed", "stage", 4, "deepspeed.stage must be 0..3"),
        ("optim", "warmup_fraction", 1.0, "warmup_fraction"),
    ],
)
def test_config_value_checks(section, key, value, message):
    cfg = TrainConfig()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_preemption_flag_by_signal_and_by_sentinel(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    try:
        stale = tmp_path / "PREEMPT"
        stale.touch()
        os.utime(stale, (0, 0))  # left by a previous attempt
        flag = PreemptionFlag(sentinel=stale)
        assert flag
        flag.clear_sentinel()
        assert not flag
        stale.touch()  # a new notice arriving while this attempt starts is kept
        flag.clear_sentinel()
        assert flag and stale.exists()
        stale.unlink()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag and flag.received == signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
