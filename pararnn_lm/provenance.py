"""Where this code comes from: the package version, the git commit of a checkout, the shipped configs.

Checkpoints and exports record :func:`build_info` so a result can be traced to the code that made it.
"""
from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata, resources
from pathlib import Path

try:
    __version__ = metadata.version("pararnn-lm")
except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The Hydra config tree shipped with the package (``configs/`` of the repository)."""
    return Path(str(resources.files("pararnn_lm") / "configs"))


def config_file(*parts: str) -> Path:
    """A file of the shipped config tree, e.g. ``config_file("lm_eval", "paper.yaml")``."""
    path = config_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{'/'.join(parts)} is not among the configs shipped with pararnn_lm ({config_dir()})")
    return path


REVISION_FILE = "REVISION"  # the commit of a source tree copied without its .git


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the package is imported from (with ``+dirty`` for local changes);
    None for an installed wheel or when git is unavailable."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    revision_file = PACKAGE_DIR.parent / REVISION_FILE  # a source tree exported without .git (revision_tree)
    if not (PACKAGE_DIR.parent / ".git").exists() and revision_file.is_file():
        return revision_file.read_text().strip() or None
    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if not (top / "pyproject.toml").is_file() or PACKAGE_DIR.parent != top:
            return None  # the package sits inside some other repository (e.g. a user's project)
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def build_info() -> dict[str, str | None]:
    """``{"pararnn_lm_version": ..., "git_commit": ...}``: stamped into checkpoints and exports."""
    return {"pararnn_lm_version": __version__, "git_commit": git_commit()}


@contextlib.contextmanager
def revision_tree(rev: str, repo: Path | None = None) -> Iterator[tuple[str, Path]]:
    """A source tree of revision ``rev`` for benchmarks that compare commits: yields (commit, tree).

    ``rev`` is a git revision of ``repo`` (checked out in a temporary ``git worktree``, removed afterwards)
    or an existing folder that holds such a tree (a worktree prepared earlier, e.g. for a machine without
    the repository's ``.git``; its commit is read from git or from a ``REVISION`` file in it). The tree
    must have the ``pararnn_lm`` package layout.
    """
    repo = Path(repo or PACKAGE_DIR.parent)
    folder = Path(rev)
    if folder.is_dir():
        if not (folder / "pararnn_lm" / "train.py").is_file():
            raise ValueError(f"{folder} holds no pararnn_lm/train.py: not a tree of this project")
        marker = folder / REVISION_FILE
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = marker.read_text().strip() if marker.is_file() else "unknown"
        yield commit, folder.resolve()
        return

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "--short", f"{rev}^{{commit}}")
    except (OSError, subprocess.CalledProcessError):
        raise ValueError(f"{rev} is not a folder and not a revision of {repo}") from None
    if subprocess.run(["git", "cat-file", "-e", f"{commit}:pararnn_lm/train.py"], cwd=repo,
                      capture_output=True).returncode:
        raise ValueError(f"{rev} ({commit}) has no pararnn_lm/train.py; the revision must have the pararnn_lm "
                         "package layout (016a20d or later)")
    parent = Path(tempfile.mkdtemp(prefix="pararnn_base_"))
    tree = parent / commit
    git("worktree", "add", "--detach", str(tree), commit)
    try:
        yield commit, tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)
