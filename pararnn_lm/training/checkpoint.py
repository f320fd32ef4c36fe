"""Atomic, verified, resumable checkpoints.

Layout of a run's checkpoint directory::

    checkpoints/
      latest                 # text file naming the newest *complete* checkpoint (replaced atomically)
      step_00000100/
        COMPLETE             # written last: the manifest (JSON); a directory without it is never loaded
        state.pt             # model, optimiser, scheduler, step, tokens, run metadata (torch backend)
        deepspeed/           # DeepSpeed's own (sharded) files instead of state.pt (deepspeed backend)
        rank_00000.pt        # per-rank state: data cursor and RNG states
        ...
        deepspeed_universal/ # made at a resume on another number of DeepSpeed ranks (see ``converted``)

A checkpoint is written into a hidden temporary directory and renamed into place only when every rank
has finished writing; ``latest`` is then replaced with ``os.replace``. A crash at any point leaves
either the previous checkpoint or the new one as ``latest``, never a half-written one.

The manifest records the run's id and configuration and the size and sha256 of every file, so a file
damaged after the save (a truncated copy, a full disk during a transfer, an edit) is found before it is
loaded. Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never a pickled object whose unpickling could run code. The RNG states are stored as tensors and ints
for that reason.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..provenance import build_info

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_RANK_FILE = re.compile(r"^rank_(\d{5})\.pt$")
MANIFEST = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, damaged, or not loadable without running code."""


# --- RNG state, in a form torch.load(weights_only=True) reads ----------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) generators' states as tensors, ints and floats."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- files -------------------------------------------------------------------------------------------

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


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def load_tensors(path: Path | str) -> Any:
    """``torch.load`` of a checkpoint file with ``weights_only=True``; every failure names the file."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing") from err
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain containers, which are not loaded "
            f"(unpickling them could run code): {reason[-1] if reason else err}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged or truncated: {err}") from err


# --- the checkpoints of a run ------------------------------------------------------------------------

class CheckpointManager:
    """Saves, verifies and finds the checkpoints of one run; every rank calls ``save`` (collective).

    ``any_rank(flag)`` tells every rank whether the flag is set on some rank (an all-reduce): checksums
    are computed and verified in shares, one per rank, and every rank must reach the same verdict.
    """

    def __init__(self, root: Path | str, keep_last: int, rank: int = 0, barrier: Callable[[], None] | None = None,
                 world_size: int = 1, any_rank: Callable[[bool], bool] | None = None):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size}: a rank is in [0, world_size)")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank, self.world_size = rank, world_size
        self.barrier = barrier or (lambda: None)
        self.any_rank = any_rank or bool

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    def save(
        self,
        step: int,
        rank_state: dict[str, Any],
        global_state: dict[str, Any] | None = None,
        write_sharded: Callable[[Path], None] | None = None,
        record: dict[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint for ``step``.

        global_state: written by rank 0 to state.pt (torch backend).
        write_sharded: called on every rank with the temporary directory (DeepSpeed's collective save).
        record: what the manifest says about the run (its id and configuration).
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
        files = self._file_records(tmp)
        if self.rank == 0:
            manifest = {"step": step, **(record or {}), "files": files, **build_info()}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest))
            if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._prune(step, (record or {}).get("run_id"))
            logger.info("saved checkpoint %s", final)
        self.barrier()
        return final

    def _file_records(self, tmp: Path) -> dict[str, dict[str, Any]]:
        """{relative path: size and sha256} of every file the ranks wrote into ``tmp`` (complete on rank 0).
        Each rank hashes a share; with several ranks the shares meet in small JSON files."""
        self.barrier()  # every rank has written
        names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        mine = {name: file_record(tmp / name) for name in names[self.rank::self.world_size]}
        if self.world_size == 1:
            return mine
        self.barrier()  # every rank has listed the files before the shares appear among them
        atomic_write_text(tmp / f".share_{self.rank:05d}.json", json.dumps(mine))
        self.barrier()
        if self.rank != 0:
            return {}
        records: dict[str, dict[str, Any]] = {}
        for rank in range(self.world_size):
            share = tmp / f".share_{rank:05d}.json"
            records.update(json.loads(share.read_text()))
            share.unlink()
        return dict(sorted(records.items()))

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=self.step_of)

    def _prune(self, step: int, run_id: str | None) -> None:
        """Keep the ``keep_last`` newest checkpoints of this run up to ``step``; a checkpoint of another
        run, or one past ``step`` (from before a resume further back), is not this save's to delete."""
        ours = []
        for path in self._complete():
            try:
                owner = self.read_manifest(path).get("run_id")
            except CheckpointError:
                continue
            if owner == run_id and self.step_of(path) <= step:
                ours.append(path)
        for old in ours[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*.tmp"):  # leftovers of a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)

    def latest(self) -> Path | None:
        """The checkpoint named by ``latest`` if complete, else the newest complete one, else None.

        ``latest`` must name a checkpoint directory of this folder: anything else (another folder, a
        link out of it) is refused, not followed."""
        pointer = self.root / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            candidate = self.root / name
            if not _STEP_DIR.match(name) or candidate.resolve().parent != self.root.resolve():
                raise CheckpointError(
                    f"{pointer} names {name!r}, which is not a checkpoint directory of {self.root} "
                    "(step_XXXXXXXX inside it); it is not followed. Write the name of one of its step_* "
                    "directories into it, or delete it to resume from the newest complete checkpoint.")
            if (candidate / MANIFEST).is_file():
                return candidate
            logger.warning("'latest' points at an incomplete checkpoint %s; scanning for the newest complete one", candidate)
        complete = self._complete()
        return complete[-1] if complete else None

    def candidates(self) -> list[Path]:
        """Complete checkpoints in the order ``resume=auto`` tries them: ``latest`` first, then newest first."""
        first = self.latest()
        if first is None:
            return []
        return [first] + [p for p in reversed(self._complete()) if p.name != first.name]

    @staticmethod
    def step_of(path: Path) -> int:
        match = _STEP_DIR.match(path.name)
        if not match:
            raise ValueError(f"{path} is not a checkpoint directory (expected step_XXXXXXXX)")
        return int(match.group(1))

    @staticmethod
    def read_manifest(path: Path) -> dict[str, Any]:
        file = Path(path) / MANIFEST
        if not file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint directory (no {MANIFEST} manifest)")
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file} is damaged: {err}") from err
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{file} is damaged: not a JSON object")
        return manifest

    def problems(self, path: Path) -> list[str]:
        """What is wrong with checkpoint ``path`` (empty: it verifies), agreed by every rank: sizes and
        checksums against the manifest, each rank checking a share of the files."""
        try:
            manifest = self.read_manifest(path)
            files = manifest.get("files")
            if not isinstance(files, dict):
                version = manifest.get("pararnn_lm_version", "an older version")
                raise CheckpointError(
                    f"{path / MANIFEST} records no checksums: the checkpoint was written by pararnn_lm {version}, "
                    "whose files cannot be verified or loaded without unpickling code")
            found = []
            for name in sorted(files)[self.rank::self.world_size]:
                file, expected = path / name, files[name]
                if not file.is_file():
                    found.append(f"{file} is missing")
                elif file.stat().st_size != expected["size"]:
                    found.append(f"{file} is damaged (truncated or changed): {file.stat().st_size} bytes, "
                                 f"{expected['size']} when it was saved")
                elif file_record(file)["sha256"] != expected["sha256"]:
                    found.append(f"{file} is damaged (changed): its sha256 differs from the one recorded when "
                                 "it was saved")
        except (CheckpointError, OSError) as err:
            found = [str(err)]
        if self.any_rank(bool(found)) and not found:
            found = [f"{path}: another rank found a damaged file (see its log)"]
        return found

    def verified(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` names, verified: none; the newest of this run that verifies
        (``auto``, which says when it falls back past a damaged one); or a path."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            found = self.problems(path)
            if found:
                raise CheckpointError(f"resume={resume} cannot be used: " + "; ".join(found))
            return path
        failed: list[str] = []
        for path in self.candidates():
            found = self.problems(path)
            if not found:
                if failed:
                    logger.warning("resuming from %s, the newest checkpoint that verifies (skipped: %s)",
                                   path.name, ", ".join(failed))
                return path
            logger.warning("checkpoint %s does not verify: %s", path, "; ".join(found))
            failed.append(path.name)
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.root} verifies ({', '.join(failed)}: see the warnings above); nothing "
                "was changed. Restore the damaged files, or start over with run.overwrite=true.")
        return None

    @classmethod
    def saved_world_size(cls, path: Path) -> int:
        """The number of ranks of the run that wrote checkpoint ``path`` (its rank files, per the manifest)."""
        files = cls.read_manifest(path).get("files") or {}
        ranks = sum(1 for name in files if _RANK_FILE.match(name))
        if ranks == 0:
            raise CheckpointError(f"{path / MANIFEST} records no rank files: not a checkpoint of a training run")
        return ranks

    def converted(self, path: Path, name: str, convert: Callable[[Path], None], what: str) -> Path:
        """``path/name``: another form of checkpoint ``path`` (``what``), which ``convert`` writes into the
        directory it is given. Made once, by rank 0 while the others wait, into a hidden directory that is
        renamed into place when complete; kept inside the checkpoint, so it goes when the checkpoint is
        pruned. Its own manifest records its files' checksums and the checkpoint manifest it was made from:
        a copy that does not verify (damaged, or made from other files) is made again. Collective."""
        target, tmp = path / name, path / f".{name}.tmp"
        found = self.problems(target)
        if not found:
            made_from = self.read_manifest(target).get("made_from")
            if made_from == file_record(path / MANIFEST)["sha256"]:
                logger.info("using %s, %s made earlier from %s", target, what, path.name)
                return target
            found = [f"{target} was made from another {path / MANIFEST}"]
        if (target / MANIFEST).is_file():
            logger.warning("%s is made again: %s", target, "; ".join(found))
        error: BaseException | None = None
        if self.rank == 0:
            logger.info("writing %s of %s to %s (rank 0; the other ranks wait)", what, path.name, target)
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                convert(tmp)
                files = {p.relative_to(tmp).as_posix(): file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                manifest = {"made_from": file_record(path / MANIFEST)["sha256"], "files": files, **build_info()}
                atomic_write_text(tmp / MANIFEST, json.dumps(manifest))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
                _fsync_dir(path)
                logger.info("wrote %s to %s", what, target)
            except Exception as err:  # noqa: BLE001 - re-raised below, after every rank knows
                error = err
                shutil.rmtree(tmp, ignore_errors=True)
        if self.any_rank(error is not None):  # also the barrier: the other ranks wait for rank 0 here
            if error is not None:
                raise CheckpointError(f"could not write {what} of {path} to {target}: {error}") from error
            raise CheckpointError(f"rank 0 could not write {what} of {path} to {target} (see its log)")
        return target

    def load_rank_state(self, path: Path) -> dict[str, Any]:
        """This rank's RNG state and data cursor. On another number of ranks than the saving run's, ``data``
        is the list of every saving rank's cursor (the loader takes its share from their global position),
        and a rank the saving run did not have takes the RNG state of rank ``rank % saved ranks``."""
        saved = self.saved_world_size(path)
        if saved == self.world_size:
            return load_tensors(path / f"rank_{self.rank:05d}.pt")
        state = load_tensors(path / f"rank_{self.rank % saved:05d}.pt")
        state["data"] = [load_tensors(path / f"rank_{rank:05d}.pt")["data"] for rank in range(saved)]
        return state

    def check_layout(self, path: Path, micro_batch_size: int, grad_accum: int) -> None:
        """Say how this run's layout (ranks, micro-batch, gradient accumulation) differs from the one that
        saved ``path``: the global batch and the sequence of global batches are unchanged (the data cursor
        remaps, ``load_rank_state``); the optimiser state is the backend's to load on the new number of ranks."""
        saved_ranks = self.saved_world_size(path)
        train = (self.read_manifest(path).get("config") or {}).get("train") or {}
        saved_micro = train.get("micro_batch_size", micro_batch_size)
        saved_accum = train.get("global_batch_size", micro_batch_size * grad_accum * self.world_size) // (saved_micro * saved_ranks)
        if (saved_ranks, saved_micro, saved_accum) == (self.world_size, micro_batch_size, grad_accum):
            return
        logger.warning("elastic resume from %s: ranks %d -> %d, micro-batch %d -> %d, gradient accumulation %d -> %d "
                       "(the global batch and the sequence of global batches are unchanged)", path.name, saved_ranks,
                       self.world_size, saved_micro, micro_batch_size, saved_accum, grad_accum)

    @staticmethod
    def load_global_state(path: Path) -> dict[str, Any]:
        return load_tensors(path / "state.pt")
