"""Atomic, resumable checkpoints.

Layout of a run's checkpoint directory::

    checkpoints/
      latest                 # text file naming the newest *complete* checkpoint (replaced atomically)
      step_00000100/
        COMPLETE             # written last: a directory without it is never loaded
        state.pt             # model, optimiser, scheduler, step, tokens, run metadata (torch backend)
        deepspeed/           # DeepSpeed's own (sharded) files instead of state.pt (deepspeed backend)
        rank_00000.pt        # per-rank state: data cursor and RNG states
        ...

A checkpoint is written into a hidden temporary directory and renamed into place only when every rank
has finished writing; ``latest`` is then replaced with ``os.replace``. A crash at any point leaves
either the previous checkpoint or the new one as ``latest``, never a half-written one.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..provenance import build_info

if TYPE_CHECKING:
    from .config import TrainConfig

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_synced(obj: Any, path: Path) -> None:
    """``torch.save`` whose bytes are on disk when it returns."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _replace_atomically(path: Path | str, write: Callable[[Path], None]) -> None:
    """``write`` a hidden file beside ``path``, then rename it over ``path``: a crash at any point leaves
    the previous file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # what a failed write left (nothing after a successful rename)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Replace ``path`` by a file holding ``text``, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _replace_atomically(path, write)


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save(obj, path)``, atomically."""
    _replace_atomically(path, lambda tmp: torch_save_synced(obj, tmp))


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank calls ``save`` (collective)."""

    def __init__(self, root: Path | str, keep_last: int, rank: int = 0, barrier: Callable[[], None] | None = None):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier or (lambda: None)

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    def save(
        self,
        step: int,
        rank_state: dict[str, Any],
        global_state: dict[str, Any] | None = None,
        write_sharded: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write a checkpoint for ``step``.

        global_state: written by rank 0 to state.pt (torch backend).
        write_sharded: called on every rank with the temporary directory (DeepSpeed's collective save).
        """
        final = self.root / self.tag(step)
        tmp = self.root / f".{self.tag(step)}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        if write_sharded is not None:
            write_sharded(tmp)
        if global_state is not None and self.rank == 0:
            torch_save_synced(global_state, tmp / "state.pt")
        torch_save_synced(rank_state, tmp / f"rank_{self.rank:05d}.pt")
        self.barrier()
        if self.rank == 0:
            atomic_write_text(tmp / "COMPLETE", json.dumps({"step": step, **build_info()}))
            if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._prune()
            logger.info("saved checkpoint %s", final)
        self.barrier()
        return final

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
        return sorted(found, key=lambda p: p.name)

    def _prune(self) -> None:
        for old in self._complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*.tmp"):  # leftovers of a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)

    def latest(self) -> Path | None:
        """The checkpoint named by ``latest`` if complete, else the newest complete one, else None."""
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / "COMPLETE").is_file():
                return candidate
            logger.warning("'latest' points at an incomplete checkpoint %s; scanning for the newest complete one", candidate)
        complete = self._complete()
        return complete[-1] if complete else None

    @staticmethod
    def step_of(path: Path) -> int:
        match = _STEP_DIR.match(path.name)
        if not match:
            raise ValueError(f"{path} is not a checkpoint directory (expected step_XXXXXXXX)")
        return int(match.group(1))

    def load_rank_state(self, path: Path) -> dict[str, Any]:
        file = path / f"rank_{self.rank:05d}.pt"
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the checkpoint was written by a run with fewer ranks. Resume with the "
                "same number of processes (the data cursor is per rank)."
            )
        return torch.load(file, map_location="cpu", weights_only=False)

    @staticmethod
    def load_global_state(path: Path) -> dict[str, Any]:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def resume_path(cfg: TrainConfig, checkpoints: CheckpointManager) -> Path | None:
    """The checkpoint ``resume`` names: none, the newest complete one of the run (``auto``), or a path,
    which must be a complete checkpoint directory."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return checkpoints.latest()
    path = Path(cfg.resume)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r} is not a complete checkpoint directory (no COMPLETE marker)")
    return path
