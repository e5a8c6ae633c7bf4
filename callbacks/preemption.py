"""``Preemption``: on SIGTERM/SIGUSR1/SIGINT, finish the step, write a checkpoint, stop (and requeue on SLURM);
on an exception inside ``fit``, write the last completed step.

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

Ctrl-C (SIGINT) is taken like SIGTERM: the step finishes, ``last.ckpt`` is written, the run stops
(``lightning-cli`` exits 130). A second Ctrl-C, or one before the first step started (nothing to save
yet), abandons the run at once (``KeyboardInterrupt``); the rule for exceptions below then decides
whether a checkpoint is written.

An exception inside ``fit`` (a reward server down past its budget, a NaN guard, a full disk, a bug)
writes the state of the last completed step to the same file, and says where, unless one of these holds:

- the failing step had begun its updates (an optimizer step was taken in it): the weights and optimizer
  state are then part-way through the step, so nothing is written and the log names the rule; the last
  periodic checkpoint is what resumes. The exception is caught before the step's first update in the
  common cases (rollout, rewards, reasoners, advantages);
- several ranks, and the exception is not an ``vlrl.errors.AllRanksError`` (nor Lightning's SIGTERM stop):
  every rank must take part in a save (a sharded FSDP save is collective, and so are the barriers of any
  save), but an exception on one rank of many leaves the others elsewhere (inside a collective of the step,
  or running on), so a save from it would hang or mismatch collectives. The rank logs that it did not save
  and the exception ends the process, which ends the other ranks too (Lightning's launcher, or the broken
  process group);
- no step completed in this ``fit`` (the state is that of the checkpoint the run started from).

"The last completed step" is exact: the weights and optimizer state are untouched until the first
update, and the loop and data-loader state saved with them is the one at the end of the last step (taken
then), with the callbacks' state as it was at the start of the failing step (taken then); so the resumed
run redoes the failing step with the same batch. Taking those two small snapshots at every step can be
turned off with ``save_on_exception: false``.

``lightning-cli`` adds a ``Preemption()`` to every ``fit`` unless the config has one; give
``signals: []`` to turn the signal handling off. In YAML::

    trainer:
      callbacks:
        - class_path: vlrl.callbacks.Preemption
          init_args:
            signals: [SIGTERM, SIGUSR1, SIGINT]
"""

from __future__ import annotations

import contextlib
import copy
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
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vlrl.errors import AllRanksError

log = logging.getLogger(__name__)

_HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class Preemption(pl.Callback):
    """Saves a checkpoint at the end of the current step when the job is told to stop, then stops it.

    Args:
        signals: Names of the signals that ask the run to stop (``SIGTERM``, ``SIGUSR1``, ``SIGUSR2``,
            ``SIGINT`` ...). An empty list turns the signal handling off.
        dirpath: Folder of the checkpoint outside SLURM. Default: the ``ModelCheckpoint``'s
            ``dirpath``, else ``<default_root_dir>/checkpoints``.
        filename: File name of that checkpoint; ``last.ckpt`` is what ``--ckpt_path last`` finds.
        requeue: Under SLURM, requeue the job after saving (``scontrol requeue``) when the signal was
            not SIGTERM/SIGINT (those come from ``scancel`` or from SLURM's own preemption, which
            requeues by itself); the requeued job resumes from the ``hpc_ckpt`` file on its own.
        save_on_exception: On an exception inside ``fit``, write the state of the last completed step
            (see the module docstring for when it does not).
    """

    def __init__(
        self,
        signals: list[str] | None = None,
        dirpath: str | None = None,
        filename: str = "last.ckpt",
        requeue: bool = True,
        save_on_exception: bool = True,
    ) -> None:
        names = ["SIGTERM", "SIGUSR1", "SIGINT"] if signals is None else list(signals)
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
        self.save_on_exception = save_on_exception
        self.received: int | None = None  # the signal that asked to stop
        self.saved_path: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._active = False
        self._training = False  # between on_train_start and the end of the fit
        self._in_step = False  # between this callback's on_train_batch_start and on_train_batch_end
        self._updated = False  # an optimizer step was taken in the current step
        self._start_step = 0  # global_step when training started
        self._loops: dict[str, Any] | None = None  # the loops' state at the end of the last completed step
        self._callbacks: dict[str, Any] | None = None  # the callbacks' state at the start of the current step
        self._substitute: dict[str, Any] | None = None  # what ``on_save_checkpoint`` puts in the checkpoint

    @property
    def exit_code(self) -> int | None:
        """``128 + signal`` after SIGTERM or SIGINT (143, 130: what a shell reports), else ``None``."""
        return 128 + self.received if self.received in (signal.SIGTERM, signal.SIGINT) else None

    # ------------------------------------------------------------------------------ handlers
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.signals or self._active:
            return
        self.received, self.saved_path, self._training, self._loops = None, None, False, None
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
        if signum == signal.SIGINT and (self.received == signal.SIGINT or not self._training):
            self.received = signum  # a second Ctrl-C, or one before training began: abandon now
            raise KeyboardInterrupt
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
            self._training = False
            self._restore_handlers()

    # ------------------------------------------------------------------ what a step has changed
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training, self._start_step = True, trainer.global_step
        self._snapshot_loops(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._in_step, self._updated = True, False
        if self.save_on_exception:  # first of the callbacks: before any of them changes its state in this step
            self._callbacks = copy.deepcopy(call._call_callbacks_state_dict(trainer))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._updated = True

    def _snapshot_loops(self, trainer: pl.Trainer) -> None:
        if self.save_on_exception:
            loops = (trainer.fit_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop)
            names = ("fit_loop", "validate_loop", "test_loop", "predict_loop")
            self._loops = copy.deepcopy({name: loop.state_dict() for name, loop in zip(names, loops, strict=True)})

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._substitute is not None:  # saving the last completed step from on_exception
            checkpoint.update(self._substitute)

    # --------------------------------------------------------------------------- safe points
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._in_step, self._updated = False, False
        self._snapshot_loops(trainer)
        self._save_if_asked(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_if_asked(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            reason = self._why_not_save(trainer, exception)
            if reason is not None:
                if reason:
                    log.error("Preemption: no checkpoint written after %s: %s", type(exception).__name__, reason)
                return
            self._substitute = {"loops": self._loops}
            if self._in_step and self._callbacks is not None:
                self._substitute["callbacks"] = self._callbacks
            try:
                self.save(trainer)
            except Exception as error:  # the run is failing already: say why this save failed too, keep the cause
                log.error("Preemption: saving the last completed step failed too: %s", error)
            finally:
                self._substitute = None
        finally:
            self._training = False
            self._restore_handlers()

    def _why_not_save(self, trainer: pl.Trainer, exception: BaseException) -> str | None:
        """Why ``on_exception`` must not save (``""``: no need to say), or ``None`` to save the last completed step."""
        if self.saved_path is not None:
            return ""  # this step's checkpoint was written already
        if isinstance(exception, SIGTERMException) and self.received is not None:
            return None  # Lightning stopped validation for the signal
        if not self.save_on_exception or not self._training or self._loops is None:
            return ""
        if self._in_step and self._updated:
            return (
                f"it was raised after the step's first update (global_step {trainer.global_step}): the weights are "
                "part-updated; resume from the last periodic checkpoint"
            )
        if trainer.world_size > 1 and not isinstance(exception, AllRanksError):
            return (
                f"it was raised on rank {trainer.global_rank} of {trainer.world_size}, and a checkpoint needs every "
                "rank (only an error all ranks raise together, vlrl.errors.AllRanksError, can save); resume from "
                "the last periodic checkpoint"
            )
        if trainer.global_step == self._start_step:
            return f"no step completed since this fit started at step {self._start_step}"
        return None

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
        name = signal.Signals(self.received).name if self.received is not None else "an exception"
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
