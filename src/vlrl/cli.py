"""The ``lightning-cli`` / ``vlrl`` console scripts: LightningCLI over any vlrl method and datamodule.

lightning-cli fit --config configs/demo/grpo.yaml
lightning-cli fit --model.help vlrl.methods.GRPO      # every constructor argument, documented
lightning-cli test --config configs/demo/grpo.yaml --ckpt_path last.ckpt

Every trainer the CLI builds is made safe for long runs on shared clusters (``with_safe_defaults``):
checkpoints are written atomically (``vlrl.checkpointing.AtomicCheckpointIO``, unless another
checkpoint plugin is configured), a SIGTERM/SIGUSR1 writes a checkpoint at the end of the step and
stops the run (``vlrl.callbacks.Preemption``) and checkpoints carry the global random state
(``vlrl.callbacks.RandomState``). A callback of the same class in the config replaces the default
one (e.g. ``Preemption`` with ``signals: []`` turns preemption handling off).

A run stopped by SIGTERM exits with status 143 (128 + 15, what a shell reports for a process the
signal killed), not 0, so a launcher that restarts failed runs (``torchrun --max-restarts``, a
Kubernetes Job, a retry loop) does not take a preempted run for a finished one.
"""

from __future__ import annotations

import signal
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vlrl.callbacks import Preemption, RandomState
from vlrl.checkpointing import AtomicCheckpointIO


def with_safe_defaults(trainer: pl.Trainer) -> pl.Trainer:
    """``trainer`` with atomic checkpoint writes and the ``Preemption``/``RandomState`` callbacks it lacks."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a configured one
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for default in (Preemption, RandomState):
        if not any(isinstance(callback, default) for callback in trainer.callbacks):
            trainer.callbacks.insert(0, default())  # before ModelCheckpoint, which Lightning keeps last
    return trainer


class VLRLCLI(LightningCLI):
    """LightningCLI whose trainers get ``with_safe_defaults``."""

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        return with_safe_defaults(super().instantiate_trainer(**kwargs))


def main(args: list[str] | None = None) -> None:
    # In RL the state after the step's updates is exactly what a checkpoint should hold; Lightning's
    # warning about manual optimization and every_n_train_steps says otherwise, so it is silenced.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
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
    except SIGTERMException:  # Lightning stops on SIGTERM with a SystemExit whose status is 0
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
