"""``Preemption``: on SIGTERM/SIGUSR1, finish the step, write a checkpoint, stop (and requeue on SLURM).

A cluster that preempts a job sends it a signal first (SLURM: SIGTERM, or the signal of
``--signal=USR1@90`` some seconds ahead; Kubernetes: SIGTERM), then kills it after a grace period.
The callback's handler only sets a flag. The checkpoint is written at the next safe point: the end
of the current training step (``on_train_batch_end``, after the step's updates, where
``ModelCheckpoint`` saves too) or the end of a validation run, never in the middle of an update.
All ranks agree on the step (the flag is reduced over ranks at every step end). Then the trainer
stops.

Where it goes:

- outside SLURM: ``last.ckpt`` in the checkpoint folder (the ``ModelCheckpoint``'s ``dirpath``,
  else ``<default_root_dir>/checkpoints``), so the run resumes with ``--ckpt_path last`` (or that path);
- under SLURM: ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``, the name Lightning's SLURM support
  looks for: the requeued job resumes from it with no ``--ckpt_path``. After SIGUSR1 (the signal
  of ``sbatch --signal=USR1@90``, sent ahead of the time limit) rank 0 requeues the job
  (``scontrol requeue $SLURM_JOB_ID``, array jobs included) unless ``requeue: false``; after SIGTERM
  it does not, as Lightning does not (a user's ``scancel``, or a preemption SLURM requeues itself).

How it fits with Lightning 2.6's own handling (``trainer/connectors/signal_connector.py``): Lightning
installs its handlers after the ``setup`` hooks and keeps handlers it finds. On SIGTERM it calls
ours and raises ``SIGTERMException`` at the end of the step (after ours saved in
``on_train_batch_end``). Under SLURM with ``auto_requeue`` it installs its SIGUSR1 handler only when
SIGUSR1 has none; that handler saves ``hpc_ckpt`` immediately, wherever the process is (possibly in
the middle of an update), so this callback takes the signal instead and saves at the step's end,
to the same name. If the signal arrives while validation runs, Lightning aborts it with
``SIGTERMException``; the checkpoint is then written in ``on_exception`` (the state of the last
completed step).

``lightning-cli`` adds a ``Preemption()`` to every ``fit`` unless the config has one; give
``signals: []`` to turn it off. In YAML::

    trainer:
      callbacks:
        - class_path: vlrl.callbacks.Preemption
          init_args:
            signals: [SIGTERM, SIGUSR1]
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

_HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class Preemption(pl.Callback):
    """Saves a checkpoint at the end of the current step when the job is told to stop, then stops it.

    Args:
        signals: Names of the signals that ask the run to stop (``SIGTERM``, ``SIGUSR1``, ``SIGUSR2``,
            ``SIGINT`` ...). An empty list turns the callback off.
        dirpath: Folder of the checkpoint outside SLURM. Default: the ``ModelCheckpoint``'s
            ``dirpath``, else ``<default_root_dir>/checkpoints``.
        filename: File name of that checkpoint; ``last.ckpt`` is what ``--ckpt_path last`` finds.
        requeue: Under SLURM, requeue the job after saving (``scontrol requeue``) when the signal was
            not SIGTERM/SIGINT (those come from ``scancel`` or from SLURM's own preemption, which
            requeues by itself); the requeued job resumes from the ``hpc_ckpt`` file on its own.
    """

    def __init__(
        self,
        signals: list[str] | None = None,
        dirpath: str | None = None,
        filename: str = "last.ckpt",
        requeue: bool = True,
    ) -> None:
        names = ["SIGTERM", "SIGUSR1"] if signals is None else list(signals)
        unknown = [n for n in names if n in ("SIGKILL", "SIGSTOP") or n not in signal.Signals.__members__]
        if unknown:
            raise ValueError(
                f"Preemption.signals has unknown or uncatchable signal names {unknown}; use names such as "
                "SIGTERM, SIGUSR1"
            )
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"Preemption.filename={filename!r} must be a bare file name ending in .ckpt")
        self.signals = [signal.Signals[n] for n in names]
        self.dirpath = dirpath
        self.filename = filename
        self.requeue = requeue
        self.received: int | None = None  # the signal that asked to stop
        self.saved_path: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._active = False

    # ------------------------------------------------------------------------------ handlers
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.signals or self._active:
            return
        self.received, self.saved_path = None, None
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                log.warning("Preemption: cannot install a %s handler outside the main thread", signum.name)
        self._active = bool(self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._active:  # the run is over but a handler of ours was left installed: act as before it
            previous = self._previous.get(signal.Signals(signum), signal.SIG_DFL)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if self.received is None:
            log.warning(
                "Preemption: received %s; saving a checkpoint at the end of this step", signal.Signals(signum).name
            )
        self.received = signum

    def _restore_handlers(self) -> None:
        self._active = False
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore_handlers()

    # --------------------------------------------------------------------------- safe points
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._save_if_asked(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_if_asked(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            if isinstance(exception, SIGTERMException) and self.received is not None and self.saved_path is None:
                self.save(trainer)  # Lightning stopped validation for the signal: save the last completed step
        finally:
            self._restore_handlers()

    def _save_if_asked(self, trainer: pl.Trainer) -> None:
        if not self._active or self.saved_path is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.save(trainer)
        cancelled = self.received in (signal.SIGTERM, signal.SIGINT)  # scancel, or SLURM preempting on its own
        if SLURMEnvironment.detect() and self.requeue and not cancelled and trainer.is_global_zero:
            requeue_slurm_job()
        trainer.should_stop = True

    # --------------------------------------------------------------------------------- saving
    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the checkpoint goes: ``hpc_ckpt_<n>.ckpt`` under SLURM, else ``<dirpath>/<filename>``."""
        if SLURMEnvironment.detect():
            root = Path(trainer.default_root_dir)
            versions = [int(m.group(1)) for p in root.glob("hpc_ckpt_*.ckpt") if (m := _HPC_NAME.match(p.name))]
            return root / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt"
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            return Path(checkpoint.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def save(self, trainer: pl.Trainer) -> None:
        path = trainer.strategy.broadcast(str(self.checkpoint_path(trainer)))
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last:
            last = checkpoint.format_checkpoint_name({}, checkpoint.CHECKPOINT_NAME_LAST)
            if Path(last).resolve() == Path(path).resolve():  # its own last file: after resuming it goes on
                checkpoint.last_model_path = path  # updating this file rather than starting a last-v1.ckpt
        trainer.save_checkpoint(path, weights_only=False)  # the whole training state, optimizers included
        self.saved_path = path
        name = signal.Signals(self.received).name if self.received is not None else "a stop request"
        log.warning("Preemption: after %s, saved step %d to %s; stopping", name, trainer.global_step, path)


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (the array task of an array job); logs instead of raising."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("Preemption: no valid SLURM job id in the environment (%r); not requeued", job)
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("Preemption: `scontrol requeue %s` failed: %s", job, error)
        return
    if result.returncode:
        log.warning("Preemption: `scontrol requeue %s` exited %d: %s", job, result.returncode, result.stderr.strip())
    else:
        log.warning("Preemption: requeued SLURM job %s", job)
