"""The ``lightning-cli`` / ``vlrl`` console scripts: LightningCLI over any vlrl method and datamodule.

lightning-cli fit --config configs/demo/grpo.yaml
lightning-cli fit --model.help vlrl.methods.GRPO      # every constructor argument, documented
lightning-cli test --config configs/demo/grpo.yaml --ckpt_path last.ckpt

Every trainer the CLI builds is made safe for long runs on shared clusters (``with_safe_defaults``):
checkpoints are written atomically (``vlrl.checkpointing.AtomicCheckpointIO``, unless another
checkpoint plugin is configured), a SIGTERM/SIGUSR1/SIGINT (Ctrl-C) writes a checkpoint at the end of
the step and stops the run, and an exception inside ``fit`` writes the last completed step
(``vlrl.callbacks.Preemption``), checkpoints carry the global random state (``vlrl.callbacks.RandomState``),
and one run at a time uses an output folder (``vlrl.rundir.RunDirectory``: a lock, folders checked
writable before any weights load, leftovers of interrupted writes removed). A callback of the same
class in the config replaces the default one (e.g. ``Preemption`` with ``signals: []`` turns signal
handling off).

``--ckpt_path last`` resumes from the newest complete checkpoint that the checkpoint folders' records
name (``vlrl.rundir.resolve_last``), not from the newest file time; any other ``--ckpt_path`` must be an
existing, non-empty checkpoint, checked before any weights load.

A run stopped by SIGTERM exits with status 143, one stopped by Ctrl-C with 130 (128 + the signal, what a
shell reports for a process the signal killed), not 0, so a launcher that restarts failed runs
(``torchrun --max-restarts``, a Kubernetes Job, a retry loop) does not take a stopped run for a finished one.

vlrl's own errors (a bad setting, a bad row, a server down past its budget, a checkpoint that cannot be
written ...) are printed as one line, ``error: ...`` with the fix, without a traceback, and exit with
status 1; ``--debug`` (anywhere on the command line) or ``VLRL_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

import vlrl
import vlrl.callbacks
from vlrl.callbacks import Preemption, RandomState
from vlrl.checkpointing import AtomicCheckpointIO, check_checkpoint_file, describe_state_dict_mismatch
from vlrl.rundir import RunDirectory, resolve_last

# Where vlrl's code lives: an error raised there on purpose is printed as one line.
SOURCES = (Path(vlrl.__file__).resolve().parent, Path(vlrl.callbacks.__file__).resolve().parent)


def with_safe_defaults(trainer: pl.Trainer) -> pl.Trainer:
    """``trainer`` with atomic checkpoint writes and the ``Preemption``/``RandomState``/``RunDirectory`` callbacks it lacks."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a configured one
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for default in (RunDirectory, Preemption, RandomState):
        if not any(isinstance(callback, default) for callback in trainer.callbacks):
            trainer.callbacks.insert(0, default())  # before ModelCheckpoint, which Lightning keeps last
    return trainer


class VLRLCLI(LightningCLI):
    """LightningCLI whose trainers get ``with_safe_defaults``."""

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        return with_safe_defaults(super().instantiate_trainer(**kwargs))

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning reads it (it loads the file for hyper-parameters, before anything)."""
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if isinstance(ckpt_path, str) and ckpt_path not in ("last", "best", "hpc") and "://" not in ckpt_path:
            check_checkpoint_file(ckpt_path, "--ckpt_path")
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        """Resolve ``--ckpt_path last`` from this run's record, run, and exit 130/143 after Ctrl-C/SIGTERM."""
        config = self.config_init[subcommand]
        if config.get("ckpt_path") == "last":
            newest = resolve_last(self.trainer)
            config["ckpt_path"] = str(newest) if newest is not None else "last"  # no record: Lightning's own search
        preemption = [c for c in self.trainer.callbacks if isinstance(c, Preemption)]
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:  # Lightning stops on SIGTERM with a SystemExit whose status is 0
            sys.exit(128 + signal.SIGTERM)
        except SystemExit:  # Lightning exits 1 after a KeyboardInterrupt
            codes = [p.exit_code for p in preemption if p.exit_code]
            if codes:
                sys.exit(codes[0])
            raise
        codes = [p.exit_code for p in preemption if p.exit_code]
        if codes:
            sys.exit(codes[0])


def own_error(error: BaseException) -> BaseException | None:
    """The error of vlrl's own in ``error``'s chain (``error`` or what caused it), if there is one.

    An error is vlrl's own if its class is defined in vlrl, or it is a ``ValueError``/``TypeError``/
    ``RuntimeError``/``OSError`` raised by vlrl's code (a check), or torch's account of a checkpoint that
    does not fit the model. Others (a bug, a library's failure) keep their traceback.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith("vlrl.") or describe_state_dict_mismatch(str(current)):
            return current
        if isinstance(current, (ValueError, TypeError, RuntimeError, OSError)) and _raised_in_vlrl(
            current.__traceback__
        ):
            return current
        current = current.__cause__ or current.__context__
    return None


def _raised_in_vlrl(traceback: TracebackType | None) -> bool:
    last = None
    while traceback is not None:
        last, traceback = traceback, traceback.tb_next
    if last is None:
        return False
    file = Path(last.tb_frame.f_code.co_filename).resolve()
    return any(file.is_relative_to(source) for source in SOURCES)


def main(args: list[str] | None = None) -> None:
    # In RL the state after the step's updates is exactly what a checkpoint should hold; Lightning's
    # warning about manual optimization and every_n_train_steps says otherwise, so it is silenced.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    debug = "--debug" in (sys.argv[1:] if args is None else args) or os.environ.get("VLRL_DEBUG", "") not in ("", "0")
    if args is None:  # Lightning reads sys.argv itself (and warns when given both)
        sys.argv = [a for a in sys.argv if a != "--debug"]
    else:
        args = [a for a in args if a != "--debug"]
    try:
        VLRLCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # optimizers are constructor arguments of the methods
            args=args,
        )
    except Exception as error:
        own = None if debug else own_error(error)
        if own is None:
            raise
        message = describe_state_dict_mismatch(str(own)) or " ".join(str(own).split()) or type(own).__name__
        print(f"error: {message}\n(the traceback: run again with --debug or VLRL_DEBUG=1)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
