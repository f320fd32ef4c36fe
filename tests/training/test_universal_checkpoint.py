"""Elastic resume under DeepSpeed ZeRO: a checkpoint saved by 2 ranks resumes on 1 (and 1 on 2) through
DeepSpeed's universal checkpoint, made once inside the checkpoint by ``ds_to_universal``.

End to end with train.py on the CPU (gloo), against an uninterrupted 2-rank run and against the saved
ZeRO partitions gathered here by hand (not by DeepSpeed's converter):
- the resumed state is the saved one exactly: a resume that stops at once re-saves the checkpoint on the
  new number of ranks, and its fp32 masters, Adam moments and step counters equal the saved run's;
- the global batches continue: the data cursor ends where the uninterrupted run's does, and every loss
  after the resume is the uninterrupted run's within 1e-6 relative. The same batches through the same
  arithmetic, summed over 1 rank instead of 2: measured at most 1.2e-7 (one float32 rounding of a loss
  near 8.5); another batch is ~1e-2 off, and DeepSpeed's ZeRO-3 universal load, which shares one step
  counter between the parameter groups (AdamW then counts two steps per step), is 1.8e-5 off at the
  first step after the resume.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pararnn_lm.training.checkpoint import MANIFEST, CheckpointError, CheckpointManager, load_tensors
from test_train import attempts, losses, run_train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
GLOBAL_BATCH = 8
COMMON = ["train.steps=6", f"train.global_batch_size={GLOBAL_BATCH}", "checkpoint.every=1", "eval.at_end=false"]
ALLOW = "run.allow_changes=[train.micro_batch_size,train.steps]"
LOSS_TOLERANCE = 1e-6  # relative; see the module docstring


def launch(ranks: int) -> list[str] | None:
    return TORCHRUN if ranks == 2 else None


def layout(ranks: int) -> list[str]:
    return [f"train.micro_batch_size={GLOBAL_BATCH // ranks // 2}"]  # gradient accumulation 2 on either


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted 2-rank run of each ZeRO stage, made once for the tests that compare with it."""
    runs: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            runs[stage] = tmp_path_factory.mktemp(f"zero{stage}") / "uninterrupted"
            run_train(runs[stage], *COMMON, f"deepspeed=zero{stage}", *layout(2), launcher=TORCHRUN)
        return runs[stage]

    return run


def gathered_zero_state(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter: fp32 master, exp_avg, exp_avg_sq, step} from the ZeRO partitions of every rank in the
    DeepSpeed checkpoint ``folder`` (tag ``ds``), put together from DeepSpeed's documented layout: ZeRO-1/2
    split each parameter group's flat buffer over the ranks; ZeRO-3 splits every parameter, each rank's
    share padded to ceil(numel / ranks)."""
    from pararnn_lm.models.export import deepspeed_weights_only

    tag = folder / "ds"
    with deepspeed_weights_only():
        optim = [torch.load(f) for f in sorted(tag.glob("*optim_states.pt"))]
        model = torch.load(sorted(tag.glob("*model_states.pt"))[0])
    ranks, stage = len(optim), int(optim[0]["optimizer_state_dict"]["zero_stage"])
    out = {}
    for group, shapes in enumerate(model["param_shapes"]):
        if stage == 3:
            states = [o["optimizer_state_dict"]["optimizer_state_dict"]["state"][group] for o in optim]
            masters = [o["optimizer_state_dict"]["fp32_flat_groups"][group] for o in optim]
        else:
            states = [o["optimizer_state_dict"]["base_optimizer_state"]["state"][group] for o in optim]
            masters = [o["optimizer_state_dict"]["single_partition_of_fp32_groups"][group] for o in optim]
        flat = {"fp32": masters, "exp_avg": [s["exp_avg"] for s in states], "exp_avg_sq": [s["exp_avg_sq"] for s in states]}
        (step,) = {float(s["step"]) for s in states}  # one step count on every rank
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            share = math.ceil(numel / ranks) if stage == 3 else numel
            pieces = {key: [part[offset:offset + share] for part in parts] if stage == 3 else [torch.cat(parts)[offset:offset + numel]]
                      for key, parts in flat.items()}
            out[name] = {key: torch.cat(p)[:numel].view(shape) for key, p in pieces.items()}
            out[name]["step"] = torch.tensor(step)
            offset += share
    return out


def cursors(checkpoint: Path) -> list[dict]:
    return [load_tensors(f)["data"] for f in sorted(checkpoint.glob("rank_*.pt"))]


def assert_resumes_exactly(run: Path, stage: int, before: int, after: int, tmp_path: Path) -> None:
    """A copy of ``run`` resumed on ``after`` ranks with train.steps at the checkpoint's step loads it and
    re-saves it at once: on the new number of ranks, the same state as the saved one, exactly."""
    copy = tmp_path / f"exact_{before}_{after}"
    shutil.copytree(run, copy)
    saved = gathered_zero_state(run / "checkpoints" / "step_00000003" / "deepspeed")
    result = run_train(copy, *COMMON, "train.steps=3", "checkpoint.every=0", f"deepspeed=zero{stage}", *layout(after), ALLOW,
                       launcher=launch(after))
    log = result.stdout + result.stderr
    assert f"ZeRO-{stage} state of {before} rank(s) loads on {after} rank(s) from the universal checkpoint" in log
    resaved = copy / "checkpoints" / "step_00000003"
    assert CheckpointManager.saved_world_size(resaved) == after
    loaded = gathered_zero_state(resaved / "deepspeed")
    assert loaded.keys() == saved.keys() and len(saved) > 10
    for name, states in saved.items():
        for key, tensor in states.items():
            assert torch.equal(loaded[name][key], tensor), (name, key)
    assert {float(states["step"]) for states in saved.values()} == {3.0}


def assert_continues(run: Path, reference: Path, resumed_at: int) -> None:
    """The last process started at the checkpoint, its losses are the uninterrupted run's (within the
    tolerance of 1 rank vs 2), and the data cursor ends where the uninterrupted run's does."""
    assert attempts(run)[-1][0] == resumed_at
    expected, resumed = losses(reference), losses(run)
    assert sorted(resumed) == sorted(expected) == list(range(1, 7))
    for step, loss in expected.items():
        assert abs(resumed[step] - loss) <= LOSS_TOLERANCE * abs(loss), (step, resumed[step], loss)
    identity = lambda cursor: {k: v for k, v in cursor.items() if k not in ("next_batch", "rank", "world_size", "batch_size")}  # noqa: E731
    ends = {json.dumps(identity(c), sort_keys=True) for c in cursors(run / "checkpoints" / "step_00000006")}
    assert ends == {json.dumps(identity(c), sort_keys=True) for c in cursors(reference / "checkpoints" / "step_00000006")}
    assert len(ends) == 1 and json.loads(ends.pop())["position"] == 6 * GLOBAL_BATCH


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_checkpoint_of_two_ranks_resumes_on_one(tmp_path, uninterrupted, stage):
    reference = uninterrupted(stage)
    run = tmp_path / "run"  # 2 ranks, killed after step 4 (checkpoint 3)
    run_train(run, *COMMON, f"deepspeed=zero{stage}", *layout(2), launcher=TORCHRUN, fault="sigkill@4", expect=1)
    assert_resumes_exactly(run, stage, 2, 1, tmp_path)

    result = run_train(run, *COMMON, f"deepspeed=zero{stage}", *layout(1), ALLOW)
    log = result.stdout + result.stderr
    assert "elastic resume from step_00000003: ranks 2 -> 1, micro-batch 2 -> 4" in log
    universal = run / "checkpoints" / "step_00000003" / "deepspeed_universal"
    assert f"wrote DeepSpeed's universal checkpoint to {universal}" in log
    assert (universal / MANIFEST).is_file() and not (universal.parent / ".deepspeed_universal.tmp").exists()
    assert_continues(run, reference, 3)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_of_one_rank_resumes_on_two(tmp_path, uninterrupted, stage):
    reference = uninterrupted(stage)
    run = tmp_path / "run"  # 1 rank, killed after step 4 (checkpoint 3)
    run_train(run, *COMMON, f"deepspeed=zero{stage}", *layout(1), fault="sigkill@4", expect=-9)
    assert_resumes_exactly(run, stage, 1, 2, tmp_path)

    result = run_train(run, *COMMON, f"deepspeed=zero{stage}", *layout(2), ALLOW, launcher=TORCHRUN)
    assert "elastic resume from step_00000003: ranks 1 -> 2, micro-batch 4 -> 2" in result.stdout + result.stderr
    assert_continues(run, reference, 3)


def test_a_pickle_planted_in_a_zero_checkpoint_does_not_run_in_the_conversion(tmp_path):
    """ds_to_universal reads the checkpoint with torch.load(weights_only=False): it runs weights-only too."""
    from test_run_folder import forge_manifest, output, plant

    run, marker = tmp_path / "run", tmp_path / "PWNED"
    run_train(run, "train.steps=1", "deepspeed=zero2", *layout(2), f"train.global_batch_size={GLOBAL_BATCH}", launcher=TORCHRUN)
    checkpoint = run / "checkpoints" / "step_00000001"
    file = checkpoint / "deepspeed" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant(file, marker)
    forge_manifest(file)
    result = run_train(run, "train.steps=2", "deepspeed=zero2", *layout(1), f"train.global_batch_size={GLOBAL_BATCH}", ALLOW,
                       expect=1)
    log = output(result)
    assert f"could not write DeepSpeed's universal checkpoint of {checkpoint}" in log and "UnpicklingError" in log
    assert not marker.exists() and not (checkpoint / "deepspeed_universal").exists()


# --- the universal checkpoint's directory (no DeepSpeed needed) --------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    return manager, manager.save(3, {"data": {}}, global_state={"step": 3}, record={"run_id": "r"})


def write_parts(calls: list[Path]):
    def convert(out: Path) -> None:
        calls.append(out)
        (out / "ds").mkdir()
        (out / "ds" / "part.pt").write_bytes(b"x" * 100)
    return convert


def test_converted_is_made_once_and_reused_while_it_verifies(checkpoint, caplog):
    manager, path = checkpoint
    calls: list[Path] = []
    target = manager.converted(path, "deepspeed_universal", write_parts(calls), "the universal checkpoint")
    assert target == path / "deepspeed_universal" and len(calls) == 1 and calls[0].name == ".deepspeed_universal.tmp"
    assert (target / "ds" / "part.pt").read_bytes() == b"x" * 100 and not calls[0].exists()
    assert manager.problems(path) == []  # the checkpoint itself still verifies
    caplog.set_level("INFO")
    assert manager.converted(path, "deepspeed_universal", write_parts(calls), "the universal checkpoint") == target
    assert len(calls) == 1 and "made earlier from step_00000003" in caplog.text

    (target / "ds" / "part.pt").write_bytes(b"y" * 100)  # damaged: made again
    manager.converted(path, "deepspeed_universal", write_parts(calls), "the universal checkpoint")
    assert len(calls) == 2 and (target / "ds" / "part.pt").read_bytes() == b"x" * 100
    assert "is made again" in caplog.text and "sha256 differs" in caplog.text

    manifest = json.loads((target / MANIFEST).read_text())  # made from another checkpoint's files: made again
    (target / MANIFEST).write_text(json.dumps({**manifest, "made_from": "0" * 64}))
    manager.converted(path, "deepspeed_universal", write_parts(calls), "the universal checkpoint")
    assert len(calls) == 3


def test_a_failed_conversion_leaves_nothing_and_names_the_checkpoint(checkpoint):
    manager, path = checkpoint

    def fail(out: Path) -> None:
        (out / "half.pt").write_bytes(b"x")
        raise RuntimeError("DeepSpeed's ds_to_universal failed (AssertionError: boom)")

    with pytest.raises(CheckpointError, match=f"could not write the universal checkpoint of {path}.*boom"):
        manager.converted(path, "deepspeed_universal", fail, "the universal checkpoint")
    assert sorted(p.name for p in path.iterdir()) == sorted(["COMPLETE", "state.pt", "rank_00000.pt"])
