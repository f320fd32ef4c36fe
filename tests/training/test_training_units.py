"""Units of the training loop: checkpoints, schedule, optimiser groups, DeepSpeed JSON, signals, the
optimiser step (skipping a non-finite one on the device) and the loop's host syncs."""
import collections
import copy
import math
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pararnn_lm.training.checkpoint import (
    CheckpointManager, atomic_torch_save, atomic_write_text, capture_rng_state, restore_rng_state)
from pararnn_lm.training.config import DeepSpeedConfig, TrainConfig, validate
from pararnn_lm.training.distributed import DistInfo
from pararnn_lm.training.optim import build_scheduler, parameter_groups, warmup_cosine
from pararnn_lm.training.signals import PreemptionFlag


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


def test_atomic_files_are_replaced_whole_or_not_at_all(tmp_path):
    text, state = tmp_path / "result.json", tmp_path / "run.pt"
    atomic_write_text(text, "old")
    atomic_torch_save({"w": torch.arange(3)}, str(state))
    atomic_write_text(str(text), "new")
    atomic_torch_save({"w": torch.arange(4)}, state)
    assert text.read_text() == "new" and torch.equal(torch.load(state)["w"], torch.arange(4))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):  # fails half-way through writing
        atomic_torch_save({"w": torch.arange(5), "x": Unpicklable()}, state)
    assert torch.equal(torch.load(state)["w"], torch.arange(4))  # the previous file, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "run.pt"]  # no temporary left


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path / "none", keep_last=1).latest() is None


def test_missing_rank_file_has_a_clear_error(tmp_path):
    from pararnn_lm.training.checkpoint import CheckpointError

    manager = CheckpointManager(tmp_path, keep_last=1)
    path = _save(manager, 5)
    (path / "rank_00000.pt").unlink()
    assert manager.problems(path) == [f"{path / 'rank_00000.pt'} is missing"]  # verification finds it first
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt is missing"):
        manager.load_rank_state(path)  # and a load that skipped verification names the file
    with pytest.raises(ValueError, match=r"rank 1 of 1"):
        CheckpointManager(tmp_path, keep_last=1, rank=1)


def test_rng_state_round_trips_through_a_file_that_loads_without_unpickling_code(tmp_path):
    import random

    import numpy as np

    random.random(), np.random.standard_normal()  # a cached Gaussian in NumPy's state
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    drawn = (random.random(), random.getrandbits(64), np.random.standard_normal(3), np.random.rand(), torch.rand(3))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), random.getrandbits(64), np.random.standard_normal(3), np.random.rand(), torch.rand(3))
    assert drawn[:2] == again[:2] and np.array_equal(drawn[2], again[2]) and drawn[3] == again[3]
    assert torch.equal(drawn[4], again[4])


def test_resume_config_changes_are_free_fixed_or_allowed_by_name(tmp_path):
    from pararnn_lm.training.run_folder import RunFolderError, allowed_changes, config_changes, config_dict

    saved = config_dict(TrainConfig())
    now = TrainConfig()
    now.logging.wandb_mode, now.checkpoint.every, now.run.overwrite = "disabled", 7, True  # how a run is run
    assert config_changes(saved, config_dict(now)).keys() == {"logging.wandb_mode", "checkpoint.every", "run.overwrite"}
    assert allowed_changes(config_changes(saved, config_dict(now)), [], tmp_path) == {}
    now.optim.lr, now.train.steps = 1e-3, 50
    with pytest.raises(RunFolderError, match=r"optim\.lr \(checkpoint 0\.003, now 0\.001\); train\.steps"):
        allowed_changes(config_changes(saved, config_dict(now)), ["optim.beta1"], tmp_path)
    assert allowed_changes(config_changes(saved, config_dict(now)), ["optim", "train.steps"], tmp_path) == {
        "optim.lr": (3e-3, 1e-3), "train.steps": (300, 50)}
    now.model.overrides = {"num_hidden_layers": 1}
    with pytest.raises(RunFolderError, match="another model or backend: model.overrides.num_hidden_layers"):
        allowed_changes(config_changes(saved, config_dict(now)), ["optim", "train.steps"], tmp_path)
    del saved["export"]["dtype"]  # a checkpoint written before the field existed: its default
    assert "export.dtype" not in config_changes(saved, config_dict(TrainConfig()))


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
    from pararnn_lm.training.backends import deepspeed_json

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
    assert ds["bf16"]["enabled"] is False and ds["torch_autocast"]["enabled"] is False  # precision=auto on CPU
    cfg.train.precision = "bf16"  # fp32 parameters under bf16 autocast, as the torch backend; fp32 reductions
    ds = deepspeed_json(cfg, info, grad_accum=3)
    assert ds["bf16"]["enabled"] is False and ds["torch_autocast"] == {
        "enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
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
        ("export", "dtype", "fp16", "export.dtype='fp16' is not one of"),
        ("run", "allow_changes", ["model.size"], "run.allow_changes cannot include model.size"),
        ("model", "arch", "gru", "unknown architecture 'gru'"),
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


# --- the optimiser step (TorchBackend) ---------------------------------------------------------------

class _Toy(nn.Module):
    """Returns what the LM returns to the backends: the objective and its cross-entropy part."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(4, 3), nn.LayerNorm(3)

    def forward(self, x, y, extra=None, push=None):
        ce = (self.norm(self.proj(x)) - y).pow(2).mean()
        loss = ce + 1e-3 * self.proj.weight.pow(2).sum()
        if extra is not None:  # added to the value only
            loss = loss + extra
        if push is not None:  # added to the gradient of every weight only
            w = self.proj.weight.sum()
            loss = loss + (w - w.detach()) * push
        return SimpleNamespace(loss=loss, ce_loss=ce)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(5, 4, generator=g), "y": 3 * torch.randn(5, 3, generator=g)} for _ in range(n)]


def _backend(model, fused=True, grad_accum=2, constant_lr=False):
    from pararnn_lm.training.backends import TorchBackend

    cfg = TrainConfig()
    cfg.optim.grad_clip, cfg.train.precision = 0.5, "fp32"
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0) if constant_lr
                 else build_scheduler(optimizer, total_steps=10, warmup_steps=2))
    return TorchBackend(model, optimizer, scheduler, cfg, DistInfo(0, 1, 0, torch.device("cpu")), grad_accum)


def _take_step(backend, batches, poison_at=None):
    for i, batch in enumerate(batches):
        loss, finite = backend.forward_backward(batch, poison=i == poison_at)
        assert isinstance(loss, torch.Tensor) and isinstance(finite, torch.Tensor)  # nothing read on the host
    norm, applied = backend.step()
    assert isinstance(norm, torch.Tensor) and isinstance(applied, torch.Tensor)
    return norm, applied


def _snapshot(backend):
    return [p.detach().clone() for p in backend.module.parameters()], copy.deepcopy(backend.optimizer.state_dict()["state"])


def _assert_identical(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[1][key][name], b[1][key][name]), (key, name)


@pytest.mark.parametrize("fused", [True, False])  # False: the host-side fallback (one sync)
@pytest.mark.parametrize("fault", ["nan_loss_at_micro_1", "inf_loss_with_finite_grads", "inf_grad_norm"])
def test_a_non_finite_step_is_skipped_exactly(fused, fault):
    torch.manual_seed(0)
    backend = _backend(_Toy(), fused=fused, constant_lr=True)
    assert backend.skips_on_device() == fused
    _take_step(backend, _batches(2, seed=1))  # the optimiser state exists
    untouched = copy.deepcopy(backend)
    before = _snapshot(backend)

    batches, poison_at = _batches(2, seed=2), None
    if fault == "nan_loss_at_micro_1":  # one bad micro-batch skips the whole step
        poison_at = 1
    elif fault == "inf_loss_with_finite_grads":  # only the micro-batch flag can tell
        batches[0]["extra"] = torch.tensor(float("inf"))
    else:  # finite losses and gradients, but their norm overflows
        batches[1]["push"] = torch.tensor(3e38)
    norm, applied = _take_step(backend, batches, poison_at)
    assert not applied
    if fault == "inf_grad_norm":
        assert norm == float("inf")
    _assert_identical(_snapshot(backend), before)

    # The next step continues as if the skipped one had never been tried.
    following = _batches(2, seed=3)
    _take_step(backend, following)
    _, applied_ref = _take_step(untouched, following)
    assert applied_ref
    _assert_identical(_snapshot(backend), _snapshot(untouched))


def test_torch_backend_step_equals_reference_adamw_with_clipping():
    from pararnn_lm.training.optim import warmup_cosine

    torch.manual_seed(0)
    model = _Toy()
    reference = copy.deepcopy(model)
    backend = _backend(model)
    optimizer = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  foreach=False)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=2)
    for step in range(4):
        batches = _batches(2, seed=10 + step)
        norm, applied = _take_step(backend, batches)
        for batch in batches:
            (reference(**batch).loss / 2).backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        assert applied and norm_ref > 0.5  # clipping is active
        torch.testing.assert_close(norm, norm_ref, rtol=1e-6, atol=0)
        assert backend.lr() == pytest.approx(1e-2 * warmup_cosine(step + 1, 10, 2))
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert all(state["step"] == step + 1 for state in backend.optimizer.state.values())


def test_resuming_a_non_fused_checkpoint_keeps_the_fused_update(tmp_path):
    # Checkpoints written before the optimiser was fused keep `step` on the host and fused=None.
    torch.manual_seed(0)
    old = _backend(_Toy(), fused=False)
    _take_step(old, _batches(2))
    manager = CheckpointManager(tmp_path, keep_last=1)
    path = old.save(manager, 1, {"data": {}}, {"step": 1})
    new = _backend(_Toy(), fused=True)
    new.load(manager, path)
    assert new.skips_on_device()
    _take_step(new, _batches(2, seed=1))
    _take_step(old, _batches(2, seed=1))
    for p, q in zip(new.module.parameters(), old.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# --- the loop reads the device only at log steps ---------------------------------------------------------

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")


def _train_in_process(tmp_path, steps: int) -> collections.Counter:
    """Runs train.py's train() and counts the reads of tensor values it makes outside the model's
    forward and backward (those are the model's business: tests/test_models_no_host_sync.py), by call site."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pararnn_lm.train as script
    from pararnn_lm.provenance import config_dir

    overrides = [
        "model.size=debug", "data.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4",
        f"train.steps={steps}", "train.log_every=1000", "eval.every=0", "eval.at_end=false", "export.at_end=false",
        "logging.wandb_mode=disabled", "logging.progress_bar=false", "checkpoint.every=0", "resume=none",
        "train.device=cpu", f"run_dir={tmp_path / str(steps)}",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    torch_dir = str(Path(torch.__file__).parent)
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name, original):
        def read(self, *args, **kwargs):
            frames, frame = [], sys._getframe(1)
            while frame is not None:
                frames.append(frame)
                frame = frame.f_back
            in_loop = any(f.f_code.co_filename == script.__file__ for f in frames)
            in_model = any(f.f_code.co_name in ("_call_impl", "_wrapped_call_impl")
                           or f.f_code.co_filename.endswith(os.path.join("autograd", "__init__.py")) for f in frames)
            if in_loop and not in_model:
                caller = next(f for f in frames if not f.f_code.co_filename.startswith(torch_dir))
                counts[f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}"] += 1
            return original(self, *args, **kwargs)
        return read

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        summary = script.train(cfg)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert summary["step"] == steps and len(summary["losses"]) == steps
    assert all(isinstance(loss, float) for loss in summary["losses"])
    return counts


def test_training_steps_between_log_steps_read_nothing_from_the_device(tmp_path):
    short, long = _train_in_process(tmp_path, 3), _train_in_process(tmp_path, 7)
    assert any(site.startswith("tolist at train.py") for site in short)  # the log step's reads are seen
    # Four more steps, none of them a log step: not one more read.
    assert long == short, f"reads per step: {dict(long - short)}"


def test_checkpointed_blocks_recompute_and_give_the_same_gradients():
    """build.checkpoint_activations: every block's forward runs again in the backward; the loss and
    all gradients equal the plain model's (the recompute is the same arithmetic)."""
    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for
    from pararnn_lm.training.build import checkpoint_activations

    torch.manual_seed(0)
    config = config_for("paragru", "debug", vocab_size=64, num_hidden_layers=2)
    plain = ParaRNNLMForCausalLM(config).train()
    recomputed = checkpoint_activations(copy.deepcopy(plain))
    calls = collections.Counter()
    for index, layer in enumerate(recomputed.model.layers):
        # a pre-hook: the recompute stops early once it has the saved tensors (no post-forward hook)
        layer.register_forward_pre_hook(lambda module, args, index=index: calls.update([index]))
    ids = torch.randint(0, 64, (2, 12))
    grads = []
    for model in (plain, recomputed):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls == {0: 2, 1: 2}  # once forward, once recomputed in the backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_flops_terms_count_full_parameters_even_when_zero3_partitions_them():
    from pararnn_lm.models import ParaRNNLMConfig, ParaRNNLMForCausalLM
    from pararnn_lm.training.metrics import flops_terms

    config = ParaRNNLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                             num_attention_heads=4, layer_pattern=["paragru", "attention", "paragru"],
                             tie_word_embeddings=False)
    model = ParaRNNLMForCausalLM(config)
    expected = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert flops_terms(model) == (expected, 1, 32)
    # ZeRO-3 leaves empty placeholders on each rank and records the full size in ds_numel
    for param in model.parameters():
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    assert flops_terms(model) == (expected, 1, 32)


def test_compiled_blocks_under_zero3_are_leaf_modules_with_a_compiled_forward():
    from deepspeed.utils import z3_leaf_module  # a hard dependency: an import error must fail, not skip

    from pararnn_lm.models import ParaRNNLMConfig, ParaRNNLMForCausalLM
    from pararnn_lm.training.build import compile_blocks

    torch.manual_seed(0)
    config = ParaRNNLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                             num_attention_heads=4, mixer="attention")
    model = ParaRNNLMForCausalLM(config)
    ids = torch.randint(0, 64, (2, 16))
    expected = model(ids).logits
    compile_blocks(model, zero3=True)
    for block in model.model.layers:
        assert z3_leaf_module(block)  # ZeRO-3 hooks on the block only: its children are not hooked
        assert hasattr(block.forward, "_torchdynamo_orig_callable")  # the forward alone is compiled
    assert not any(z3_leaf_module(m) for m in model.model.layers[0].children())
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)


_ONE_PROCESS_GROUP = """
import os, socket, torch, torch.distributed as dist
from pararnn_lm.training.distributed import init_distributed
info = init_distributed("cpu", process_group=True)
t = torch.ones(1)
dist.all_reduce(t)
print(info.world_size, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], int(t.item()), flush=True)
dist.destroy_process_group()
"""


def test_a_single_process_group_uses_its_own_host_and_a_free_port():
    # one task under srun sees the launch node's address; a single process must not rendezvous there,
    # and two such runs on one machine must not pick the same port
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "SLURM_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LAUNCH_NODE_IPADDR="10.255.255.1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    runs = [subprocess.Popen([sys.executable, "-c", _ONE_PROCESS_GROUP], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [run.communicate(timeout=120) for run in runs]
    finally:
        for run in runs:
            run.kill()
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outs]
    fields = [out.split() for out, _ in outs]
    assert [(f[0], f[1], f[3]) for f in fields] == [("1", "127.0.0.1", "1")] * 2
    assert fields[0][2] != fields[1][2]


def test_export_weights_are_fp32_unless_bf16_is_asked_for(tmp_path):
    """scripts/export_hf.py --dtype (and export.dtype of a run): fp32 by default, the fp32 weights rounded
    to bf16 on request; either export reloads with the logits of the model it was written from."""
    from safetensors.torch import load_file

    from pararnn_lm.models import ParaRNNLMForCausalLM, config_for
    from repo_scripts import load_script

    torch.manual_seed(0)
    ParaRNNLMForCausalLM(config_for("paragru", "debug", vocab_size=64)).save_pretrained(tmp_path / "source")
    export_hf = load_script("scripts/export_hf.py")
    export_hf.main([str(tmp_path / "source"), str(tmp_path / "fp32")])
    export_hf.main([str(tmp_path / "source"), str(tmp_path / "bf16"), "--dtype", "bf16"])
    fp32, bf16 = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in fp32.values()} == {torch.float32} and {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert fp32.keys() == bf16.keys() and all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    with pytest.raises(SystemExit):
        export_hf.main([str(tmp_path / "source"), str(tmp_path / "fp16"), "--dtype", "fp16"])
