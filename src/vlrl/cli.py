"""The ``lightning-cli`` / ``vlrl`` console scripts: LightningCLI over any vlrl method and datamodule.

lightning-cli fit --config configs/demo/grpo.yaml
lightning-cli fit --model.help vlrl.methods.GRPO      # every constructor argument, documented
lightning-cli test --config configs/demo/grpo.yaml --ckpt_path last.ckpt
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> None:
    # In RL the state after the step's updates is exactly what a checkpoint should hold; Lightning's
    # warning about manual optimization and every_n_train_steps says otherwise, so it is silenced.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # optimizers are constructor arguments of the methods
        args=args,
    )


if __name__ == "__main__":
    main()
