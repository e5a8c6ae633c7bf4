"""Checkpoints that are whole and complete: atomic writes, a record of the newest, errors that name the file.

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

After each complete local write the folder's record ``.vlrl-checkpoints.json`` names the checkpoint
and its global step (``newest_checkpoint``): ``--ckpt_path last`` resumes from it (``vlrl.cli``) and
``vlrl.rundir.RunDirectory`` makes a lagging ``last.ckpt`` equal to it at the next start. A write that
fails raises ``CheckpointError``, one line naming the file and the cause (disk full, read-only file
system, file too large ...), instead of torch's ``enforce fail at inline_container.cc``; a checkpoint
that cannot be read (empty, truncated, not a checkpoint) raises one naming the file.

The global random state that checkpoints carry is saved by ``vlrl.callbacks.RandomState``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vlrl.errors import ConfigError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "check_checkpoint_file",
    "describe_state_dict_mismatch",
    "newest_checkpoint",
]

RECORD_NAME = ".vlrl-checkpoints.json"
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # the temporary files of ``AtomicCheckpointIO``


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


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
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")  # hidden, not named *.ckpt
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "xb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except Exception as error:
            cause = write_failure(temporary, error)
            temporary.unlink(missing_ok=True)
            if cause is None:  # not the file system: e.g. an object in the checkpoint that cannot be pickled
                raise
            raise CheckpointError(
                f"could not write checkpoint {target}: {cause}; the checkpoint there before (if any) is unchanged. "
                "Free space or point the checkpoint folder (ModelCheckpoint dirpath, trainer.default_root_dir) "
                "at a writable disk"
            ) from error
        except BaseException:  # KeyboardInterrupt, SystemExit: no partial file is left either
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)
        _write_record(target, checkpoint.get("global_step"))

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Loads with ``weights_only=True`` unless asked otherwise: loading a checkpoint runs no pickled code.

        Raises:
            ConfigError: ``path`` is missing, empty or not a checkpoint archive.
            CheckpointError: the archive is damaged (truncated, a record unreadable).
        """
        if isinstance(get_filesystem(path), LocalFileSystem):
            check_checkpoint_file(path)
        try:
            return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)
        except (EOFError, RuntimeError) as error:  # torch's zip reader; an unpickling refusal is left as it is
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({first}): it is truncated or damaged; resume from another "
                "checkpoint of the run"
            ) from error


def check_checkpoint_file(path: _PATH, key: str = "ckpt_path") -> None:
    """Raise ``ConfigError`` unless ``path`` is a checkpoint: a non-empty torch archive or a sharded checkpoint folder."""
    file = Path(path)
    if file.is_dir():
        if not (file / "meta.pt").is_file():
            raise ConfigError(
                f"{key}={str(path)!r} is a folder without meta.pt, not a sharded checkpoint; give a .ckpt file or the "
                "folder a sharded (FSDP) save wrote"
            )
        return
    if not file.exists():
        raise ConfigError(
            f"{key}={str(path)!r}: no such file (relative to {Path.cwd()}); give an existing checkpoint, or `last` "
            "for the newest checkpoint of this run's folder"
        )
    if file.stat().st_size == 0:
        raise ConfigError(
            f"{key}={str(path)!r} is empty (0 bytes), a write that was cut off; resume from another checkpoint"
        )
    if not zipfile.is_zipfile(file):
        raise ConfigError(
            f"{key}={str(path)!r} is not a checkpoint (not an archive torch.save writes; truncated?); resume from "
            "another checkpoint"
        )


def write_failure(temporary: Path, error: Exception) -> str | None:
    """What the file system said when writing ``temporary`` failed, in words; ``None`` if it was not the file system.

    torch's writer reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc ...] file write
    failed`` without the system's reason; a second small write to the same file then tells it (disk full, quota,
    read-only, file too large).
    """
    if isinstance(error, OSError):
        return _os_cause(error)
    if "inline_container" not in str(error) and "PytorchStreamWriter" not in str(error):
        return None
    try:
        with open(temporary, "ab") as file:
            file.write(b"\0" * (1 << 20))
            file.flush()
            os.fsync(file.fileno())
    except OSError as probe:
        return _os_cause(probe)
    return str(error).strip().splitlines()[-1]


def _os_cause(error: OSError) -> str:
    words = {
        errno.ENOSPC: "disk full",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EFBIG: "file too large for this file system or process limit",
    }
    reason = error.strerror or str(error)
    return f"{words[error.errno]} ({reason})" if error.errno in words else reason


def _write_record(target: Path, global_step: int | None) -> None:
    """Name ``target`` as the newest complete checkpoint of its folder (atomically; failures only lose the record)."""
    record = target.parent / RECORD_NAME
    temporary = target.parent / f"{RECORD_NAME}.{secrets.token_hex(6)}.tmp"
    try:
        temporary.write_text(json.dumps({"name": target.name, "global_step": global_step, "written": time.time()}))
        os.replace(temporary, record)
    except OSError:
        temporary.unlink(missing_ok=True)


def newest_checkpoint(folder: _PATH) -> tuple[Path, int | None, float] | None:
    """The newest complete checkpoint recorded in ``folder``: (path, its global step, when written); ``None`` if none."""
    try:
        record = json.loads((Path(folder) / RECORD_NAME).read_text())
        path = Path(folder) / record["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (path, record.get("global_step"), float(record.get("written", 0.0))) if path.exists() else None


def describe_state_dict_mismatch(message: str) -> str | None:
    """A short account of torch's ``Error(s) in loading state_dict`` message: which modules differ and how.

    >>> describe_state_dict_mismatch('Error(s) in loading state_dict for M:\\n\\tMissing key(s) in state_dict: '
    ...     '"model.visual.a.weight", "model.visual.b.weight". ')
    'the checkpoint does not fit this model: 2 weights of the model are missing from the checkpoint (model.visual: 2, e.g. model.visual.a.weight). Resume with the model the checkpoint was trained with (policy.model_path, lora, quantization), or start without ckpt_path'
    """
    if not message.startswith("Error(s) in loading state_dict"):
        return None
    parts = []
    for label, pattern in (
        ("weights of the model are missing from the checkpoint", r"Missing key\(s\) in state_dict: (.*?)\.\s*$"),
        ("weights in the checkpoint are not in the model", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$"),
    ):
        found = re.search(pattern, message, flags=re.MULTILINE)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            modules = Counter(".".join(k.split(".")[:2]) for k in keys)
            shown = ", ".join(f"{m}: {n}" for m, n in modules.most_common(3))
            parts.append(f"{len(keys)} {label} ({shown}, e.g. {keys[0]})")
    sizes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch.Size\((\[[^\]]*\])\) from checkpoint, "
        r"the shape in current model is torch.Size\((\[[^\]]*\])\)",
        message,
    )
    if sizes:
        name, saved, current = sizes[0]
        parts.append(f"{len(sizes)} weights differ in shape (e.g. {name}: {saved} in the checkpoint, {current} here)")
    summary = "; ".join(parts) or message.splitlines()[0]
    return (
        f"the checkpoint does not fit this model: {summary}. Resume with the model the checkpoint was trained with "
        "(policy.model_path, lora, quantization), or start without ckpt_path"
    )


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
