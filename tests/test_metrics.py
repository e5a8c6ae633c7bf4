"""Evaluation metrics: per-source accuracy, and its states across Lightning's inference-mode stages."""

from __future__ import annotations

import pytest
import torch

from tests.test_grpo import make_data, make_module, quiet_trainer
from vlrl.metrics import AccuracyBySource


def test_accuracy_by_source_counts_per_source():
    metric = AccuracyBySource()
    metric.update([True, False, True], ["color", "color", "count"])
    metric.update(torch.tensor([True]), ["count"])
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(3 / 4)
    assert out["accuracy/color"].item() == pytest.approx(0.5)
    assert out["accuracy/count"].item() == pytest.approx(1.0)


def test_states_reset_in_inference_mode_update_outside_it():
    metric = AccuracyBySource()
    with torch.inference_mode():  # what trainer.validate does around reset()
        metric.update([True], ["a"])
        metric.compute()
        metric.reset()
    metric.update([True, False], ["a", "a"])  # fit's validation runs without inference mode
    assert metric.compute()["accuracy"].item() == pytest.approx(0.5)


def test_validate_then_fit_on_the_same_module():
    module, data = make_module(), make_data()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1, val_check_interval=1)
    trainer.validate(module, datamodule=data)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    assert "val/accuracy" in trainer.callback_metrics
