"""Truncated importance sampling: weights and mismatch figures pinned to hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from vlrl.algorithms import truncated_importance_weights

LN2 = math.log(2.0)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two samples, three tokens; padding holds garbage that must not count."""
    trainer = torch.tensor([[math.log(0.5), math.log(0.2), -30.0], [math.log(0.3), -7.0, -9.0]])
    engine = torch.tensor([[math.log(0.25), math.log(0.4), 0.0], [math.log(0.3), -80.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return trainer, engine, mask


def test_weights_and_mismatch_by_hand():
    trainer, engine, mask = batch()
    out = truncated_importance_weights(trainer, engine, mask, cap=1.5)
    # ratios π_trainer / π_engine: 0.5/0.25 = 2 (truncated to 1.5), 0.2/0.4 = 0.5, 0.3/0.3 = 1
    torch.testing.assert_close(out.weights, torch.tensor([[1.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    # |log ratio| = ln 2, ln 2, 0 over three valid tokens
    torch.testing.assert_close(out.mean_abs_log_ratio, torch.tensor(2 * LN2 / 3))
    torch.testing.assert_close(out.max_abs_log_ratio, torch.tensor(LN2))
    # k3 = ρ − 1 − ln ρ: (2 − 1 − ln 2) + (0.5 − 1 + ln 2) + 0 = 0.5, over 3 tokens
    torch.testing.assert_close(out.kl, torch.tensor(0.5 / 3))
    torch.testing.assert_close(out.truncated_fraction, torch.tensor(1 / 3))


def test_a_high_cap_leaves_the_plain_ratio_and_nothing_is_truncated():
    trainer, engine, mask = batch()
    out = truncated_importance_weights(trainer, engine, mask, cap=10.0)
    torch.testing.assert_close(out.weights, torch.tensor([[2.0, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    assert out.truncated_fraction.item() == 0.0


def test_equal_log_probs_give_unit_weights_and_no_mismatch():
    trainer, _, mask = batch()
    out = truncated_importance_weights(trainer, trainer.clone(), mask)
    torch.testing.assert_close(out.weights, mask)
    assert out.mean_abs_log_ratio.item() == 0.0 and out.kl.item() == 0.0


def test_weights_carry_no_gradient_and_extreme_ratios_stay_finite():
    trainer = torch.tensor([[0.0, -1.0]], requires_grad=True)
    engine = torch.tensor([[-100.0, -1.0]])  # a token the engine found e^-100 unlikely
    out = truncated_importance_weights(trainer, engine, torch.ones(1, 2), cap=2.0)
    assert not out.weights.requires_grad
    torch.testing.assert_close(out.weights, torch.tensor([[2.0, 1.0]]))
    assert math.isfinite(out.kl.item()) and out.truncated_fraction.item() == 0.5


def test_empty_mask_gives_zeros_not_nan():
    trainer, engine, _ = batch()
    out = truncated_importance_weights(trainer, engine, torch.zeros(2, 3))
    assert out.weights.abs().sum().item() == 0.0
    assert [out.mean_abs_log_ratio.item(), out.max_abs_log_ratio.item(), out.kl.item()] == [0.0, 0.0, 0.0]


def test_bad_arguments_are_named():
    trainer, engine, mask = batch()
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(trainer, engine, mask, cap=0.0)
    with pytest.raises(ValueError, match="one shape"):
        truncated_importance_weights(trainer, engine[:, :2], mask)
