"""Checkpoints that are whole and complete: atomic writes.

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

The global random state that checkpoints carry is saved by ``vlrl.callbacks.RandomState``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


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
