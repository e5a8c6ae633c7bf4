"""One run per output folder, and a clean start in it: ``RunDirectory``, a callback ``lightning-cli`` adds to every fit.

At the start of ``fit`` (the ``setup`` hook, before any weights load) rank 0, for the output folder
(``trainer.default_root_dir``) and every checkpoint folder (each ``ModelCheckpoint``'s ``dirpath``, else
``<default_root_dir>/checkpoints``, where ``Preemption`` then saves):

1. creates it, and fails at once with one line if it cannot be written (read-only, not a folder, ...),
   rather than at the first checkpoint, many steps later;
2. takes its lock: ``.vlrl-run.lock`` holds the pid, host and start time of the run's process. A second
   run in the same folder stops with the holder's pid and host (two runs would interleave their samples,
   write ``-v1`` checkpoints and resume from each other's). A lock whose process is gone (this host, and no
   such pid or a pid since reused by a process that started later) is stale and taken over with a warning.
   A lock from another host cannot be checked from here: the message says to delete it if that run is over;
3. removes the temporary files of interrupted checkpoint writes (``.NAME.<hex>.tmp`` of
   ``vlrl.checkpointing.AtomicCheckpointIO``; safe since no other run writes there);
4. makes ``last.ckpt`` equal the newest complete checkpoint that the folder's record names, when a kill
   fell between a step's checkpoint and its ``last.ckpt`` (a resume from the older ``last.ckpt`` would
   redo steps and write ``step=N-v1.ckpt`` duplicates).

Every rank also checks the ``model_path`` of each ``Policy`` the module holds (``check_model_path``),
so that a missing model folder fails here, not after another model's weights loaded.

The other ranks wait for rank 0 and raise the same error if it failed. The locks are removed when the fit
ends, normally or with an exception; a killed run leaves a lock that the next run finds stale.
``resolve_last`` is what ``--ckpt_path last`` resumes from: the newest checkpoint of the folders' records,
not the newest file time among ``*last*.ckpt`` files (Lightning's rule).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from vlrl.checkpointing import TEMPORARY, newest_checkpoint
from vlrl.errors import ConfigError
from vlrl.models.loading import Policy, check_model_path

log = logging.getLogger(__name__)

LOCK_NAME = ".vlrl-run.lock"

__all__ = ["RunDirectory", "checkpoint_folders", "resolve_last"]


class RunDirectory(pl.Callback):
    """Locks the run's folders, checks they can be written, cleans up after interrupted writes (see the module)."""

    def __init__(self) -> None:
        self.locks: list[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.locks:
            return
        for value in vars(pl_module).values():
            if isinstance(value, Policy):
                check_model_path(value.model_path)
        problem = None
        if trainer.is_global_zero:
            try:
                self.locks = prepare(trainer)
            except ConfigError as error:
                problem = str(error)
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise ConfigError(problem)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release()

    def release(self) -> None:
        """Remove the locks this process holds."""
        for lock in self.locks:
            if (_read(lock) or {}).get("pid") == os.getpid():
                lock.unlink(missing_ok=True)
        self.locks = []


def checkpoint_folders(trainer: pl.Trainer) -> list[Path]:
    """The folders of the run's checkpoints: each ``ModelCheckpoint.dirpath``, else ``<default_root_dir>/checkpoints``."""
    folders = [Path(c.dirpath) for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    return list(dict.fromkeys(folders)) or [Path(trainer.default_root_dir) / "checkpoints"]


def resolve_last(trainer: pl.Trainer) -> Path | None:
    """The newest complete checkpoint the records of the run's checkpoint folders name (``None``: no record)."""
    found = [n for folder in checkpoint_folders(trainer) if (n := newest_checkpoint(folder)) is not None]
    if not found:
        return None
    return max(found, key=lambda n: (n[1] if n[1] is not None else -1, n[2]))[0]


def prepare(trainer: pl.Trainer) -> list[Path]:
    """Check, lock and clean the output and checkpoint folders; return the locks taken."""
    locks: list[Path] = []
    checkpoints = checkpoint_folders(trainer)
    try:
        for folder in dict.fromkeys([Path(trainer.default_root_dir), *checkpoints]):
            locks.append(acquire(folder))
    except BaseException:
        for lock in locks:
            lock.unlink(missing_ok=True)
        raise
    for folder in checkpoints:
        remove_temporaries(folder)
        repair_last(folder)
    return locks


def acquire(folder: Path) -> Path:
    """Create ``folder`` and take its lock; ``ConfigError`` if it cannot be written or another live run holds it."""
    lock = folder / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
    }
    for _ in range(3):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                return lock  # this process already holds it (a second fit of the same trainer setup)
            if holder is None or (holder.get("host") == me["host"] and not _alive(holder)):
                log.warning("RunDirectory: taking over the stale lock %s (%s)", lock, _describe(holder))
                lock.unlink(missing_ok=True)
                continue
            elsewhere = holder.get("host") != me["host"]
            raise ConfigError(
                f"{folder} is in use by another run ({_describe(holder)}): two runs in one folder mix their "
                "checkpoints and samples. Wait for that run or stop it, or give this one another "
                "trainer.default_root_dir / ModelCheckpoint dirpath"
                + (f"; that run is on another host: if it is over, delete {lock}" if elsewhere else "")
            ) from None
        except OSError as error:
            raise ConfigError(
                f"the run's folder {folder} cannot be written ({error.strerror or error}); choose a folder you "
                "can write (trainer.default_root_dir, ModelCheckpoint dirpath) or fix its permissions"
            ) from error
        with os.fdopen(fd, "w") as file:
            json.dump(me, file)
        return lock
    raise ConfigError(f"could not take the lock {lock}: another run keeps taking it; stop it or use another folder")


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files that interrupted checkpoint writes left in ``folder``."""
    removed = [p for p in folder.iterdir() if p.is_file() and TEMPORARY.match(p.name)]
    size = 0
    for path in removed:
        size += path.stat().st_size
        path.unlink(missing_ok=True)
    if removed:
        log.warning("RunDirectory: removed %d partial checkpoint file(s), %d bytes, in %s", len(removed), size, folder)


def repair_last(folder: Path) -> None:
    """Make ``folder/last.ckpt`` the newest complete checkpoint of the folder's record, if it is older."""
    newest = newest_checkpoint(folder)
    last = folder / ModelCheckpoint.CHECKPOINT_NAME_LAST
    last = last.with_name(last.name + ModelCheckpoint.FILE_EXTENSION)
    if newest is None or newest[0].name == last.name or not last.is_file() or not newest[0].is_file():
        return
    if last.stat().st_mtime > newest[0].stat().st_mtime:
        return
    temporary = folder / f".{last.name}.{os.urandom(6).hex()}.tmp"
    try:
        os.link(newest[0], temporary)
    except OSError:  # file systems without hard links
        shutil.copyfile(newest[0], temporary)
    os.replace(temporary, last)
    log.warning("RunDirectory: %s lagged behind %s (step %s); replaced by it", last, newest[0].name, newest[1])


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), telling a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    start, now = holder.get("process_start"), _process_start(pid)
    return start is None or now is None or start == now


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "unreadable"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}: {holder.get('command')}"
