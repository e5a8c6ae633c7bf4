"""CUDA checks (marked ``gpu``; skipped where no CUDA device exists)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.test_grpo import Recorder, make_data, make_module, quiet_trainer
from vlrl.models import Policy
from vlrl.rollout import Sampling

pytestmark = pytest.mark.gpu


def test_grpo_fit_on_cuda_in_bfloat16():
    module = make_module(policy=Policy("tiny:qwen2_5_vl", dtype="bfloat16"), kl_coef=0.05)
    devices = []

    class DeviceRecorder(Recorder):
        def on_rollout_end(self, trainer, pl_module, rollout):
            devices.append((pl_module.device.type, next(pl_module.model.parameters()).dtype))
            return rollout

    trainer = quiet_trainer(
        callbacks=[DeviceRecorder()],
        accelerator="gpu",
        devices=1,
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
    )
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step == 2
    assert devices == [("cuda", torch.bfloat16)] * 2
    assert torch.isfinite(trainer.callback_metrics["update/kl_ref"])
    assert trainer.callback_metrics["update/grad_norm"] > 0


def test_engine_and_trainer_logprobs_agree_on_cuda():
    module = make_module(policy=Policy("tiny:qwen2_5_vl", dtype="float32"))
    module.configure_model()
    module.cuda()
    data = make_data(batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    rollout = module.generate(batch, Sampling(max_new_tokens=16), 4)
    with torch.no_grad():
        recomputed, _ = module.policy_logprobs(module.model, rollout)
    diff = ((recomputed.cpu() - rollout.logprobs) * rollout.response_mask).abs().max().item()
    assert diff < 1e-3
