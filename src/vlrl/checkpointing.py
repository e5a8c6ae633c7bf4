"""Checkpoints that are whole and complete: atomic writes, and the global random state.

``AtomicCheckpointIO`` is a Lightning ``CheckpointIO`` plugin that never leaves a truncated file
under a checkpoint's name. Lightning's ``TorchCheckpointIO`` writes the target file in place, so a
crash, a full disk or a kill during the write leaves a half-written ``last.ckpt`` that the next
``--ckpt_path last`` (or a SLURM requeue's automatic resume) then fails to load. Here the checkpoint
is written to a hidden temporary file in the same directory (``.last.ckpt.<random>.tmp``), flushed
and ``fsync``-ed, then renamed over the target with ``os.replace`` (atomic on POSIX file systems),
and the directory is ``fsync``-ed so that the rename survives a power loss. A failed write removes
its temporary file and leaves the previous checkpoint as it was. Remote paths (``s3://`` ...) are
written by Lightning's own plugin, whose object stores already publish an object only once it is
complete. Checkpoints are loaded with ``weights_only=True`` (plain tensors and primitives; nothing
in the file can run code) unless a caller asks otherwise. ``lightning-cli`` installs this plugin by
default (``vlrl.cli``).

``RandomState`` is a callback that saves the global random number generators (Python's
``random``, NumPy's legacy global generator, torch's CPU generator and the CUDA generators of this
process's devices) in every checkpoint and restores them on resume, one state per rank. vlrl's own
randomness does not depend on them (rollout sampling, mini-batch order, the data order, sample
replay and rethinking are seeded from the configured seed and the step), but dropout, a reward
function calling ``random`` or a user callback do, and without it a resumed run draws from the
state ``seed_everything`` left at start-up instead of the state at the step it resumes from.
``lightning-cli`` adds it by default. The states are stored as plain tensors and integers, so a
checkpoint still loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["AtomicCheckpointIO", "RandomState", "random_state", "set_random_state"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs it, then renames it over the target.

    In YAML (``lightning-cli`` sets it by default)::

        trainer:
          plugins:
            - class_path: vlrl.checkpointing.AtomicCheckpointIO
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint takes no storage_options; "
                f"got {storage_options!r}. Use a custom CheckpointIO for them."
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")  # hidden, not named *.ckpt
        try:
            with open(temporary, "xb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Loads with ``weights_only=True`` unless asked otherwise: loading a checkpoint runs no pickled code."""
        return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (network mounts) refuse fsync on a directory; the rename itself is done
    finally:
        os.close(fd)


def random_state() -> dict[str, Any]:
    """The global generators' states as plain values (tensors, ints, floats): weights-only loadable."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Restore the global generators from ``random_state()``'s output."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class RandomState(pl.Callback):
    """Saves the global random generators of every rank in checkpoints and restores them on resume.

    No arguments: ``lightning-cli`` adds it to every run (see the module docstring for why).
    """

    def __init__(self) -> None:
        self._restored: dict[int, dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Called on every rank when a checkpoint is written: gathers each rank's state."""
        mine = random_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
            return {"ranks": dict(enumerate(states))}
        return {"ranks": {0: mine}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict["ranks"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore now, after everything that ran between loading the checkpoint and the first step."""
        if self._restored is None:
            return
        state = self._restored.get(trainer.global_rank)
        if state is None:  # resumed on more ranks than saved: the new ranks keep their seeded start
            rank_zero_warn(
                f"RandomState: the checkpoint holds random states of {len(self._restored)} rank(s); rank "
                f"{trainer.global_rank} keeps its fresh state"
            )
        else:
            set_random_state(state)
        self._restored = None
