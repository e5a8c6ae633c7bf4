"""Truncated importance sampling: weights and mismatch figures pinned to hand-worked numbers, and in GRPO's step."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tests.test_grpo import make_data, make_module, quiet_trainer
from vlrl.algorithms import truncated_importance_weights
from vlrl.rollout import HFEngine

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


# ------------------------------------------------------------------------------------------------ in GRPO's step
def rollout_for_update(module, engine=None):
    """One scored rollout of the tiny VLM with group advantages, ready for ``prepare_update``."""
    module.configure_model()
    if engine is not None:
        module.rollout_engine = engine
        engine.bind(module.model, module.processor)
    data = make_data(batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rollout = module.score(module.generate(batch, module.sampling, module.group_size))
    rollout.advantages = module.compute_advantages(rollout)
    return rollout


def policy_loss_of(module, rollout):
    mini = rollout.select(list(range(len(rollout))))
    num_tokens = mini.train_mask.sum()
    logprobs, entropy = module.policy_logprobs(module.model, mini, with_entropy=True)
    return module.loss(mini, logprobs, entropy, num_tokens, len(mini))


class ShiftedEngine(HFEngine):
    """Test double for an engine whose log-probs disagree with the trainer's (as vLLM's do, a little): the HF
    engine's log-probs shifted by +ln 2 on even response positions and −ln 2 on odd ones."""

    def generate(self, prompts, sampling, seed=None):
        out = super().generate(prompts, sampling, seed)
        positions = torch.arange(out.logprobs.shape[1])
        shift = torch.where(positions % 2 == 0, LN2, -LN2)  # [T]
        return replace(out, logprobs=(out.logprobs + shift) * out.response_mask)


def test_with_the_hf_engine_weights_are_one_and_the_loss_is_the_uncorrected_one():
    torch.manual_seed(0)
    plain = make_module()
    rollout = rollout_for_update(plain)
    corrected = make_module(importance_correction="tis", tis_cap=2.0)
    corrected.configure_model()
    corrected.model.load_state_dict(plain.model.state_dict())
    corrected.processor = plain.processor
    engine_logprobs = rollout.logprobs.clone()
    tis_rollout = rollout.select(list(range(len(rollout))))
    with torch.no_grad():
        corrected.prepare_update(tis_rollout)
    mask = rollout.response_mask
    torch.testing.assert_close(tis_rollout.is_weights, mask, atol=1e-4, rtol=0)
    assert torch.equal(tis_rollout.engine_logprobs, engine_logprobs)
    torch.testing.assert_close(tis_rollout.logprobs, engine_logprobs, atol=1e-4, rtol=0)  # trainer == engine
    assert tis_rollout.stats["rollout/engine_mismatch_mean_abs_log_ratio"] < 1e-4
    loss_plain, _ = policy_loss_of(plain, rollout)
    loss_tis, _ = policy_loss_of(corrected, tis_rollout)
    torch.testing.assert_close(loss_tis, loss_plain, atol=1e-6, rtol=1e-4)


def test_a_shifted_engine_gets_the_truncated_ratios_and_the_loss_follows_them():
    module = make_module(importance_correction="tis", tis_cap=1.5)
    rollout = rollout_for_update(module, engine=ShiftedEngine())
    with torch.no_grad():
        module.prepare_update(rollout)
    mask = rollout.response_mask  # [N, T]
    # π_trainer / π_engine = e^{-ln 2} = 0.5 on even positions, e^{ln 2} = 2 → truncated to 1.5 on odd ones
    positions = torch.arange(mask.shape[1])
    expected = torch.where(positions % 2 == 0, 0.5, 1.5) * mask  # [N, T]
    torch.testing.assert_close(rollout.is_weights, expected, atol=1e-4, rtol=0)
    n_odd = float((mask * (positions % 2 == 1)).sum())
    assert rollout.stats["rollout/engine_mismatch_truncated_frac"] == pytest.approx(n_odd / float(mask.sum()))
    assert rollout.stats["rollout/engine_mismatch_mean_abs_log_ratio"] == pytest.approx(LN2, abs=1e-4)
    # the weights survive selection: a mini-batch carries its own samples' weights
    picked = rollout.select([3, 0])
    assert torch.equal(picked.is_weights, rollout.is_weights[[3, 0]])
    # π_old is the trainer's own log-prob, so before any update the ratio is 1 and each token's policy term is
    # −A·w: token-mean loss = −Σ A_i w_it / Σ mask
    loss, stats = policy_loss_of(module, rollout)
    advantages = rollout.advantages[:, None]  # [N, 1]
    assert advantages.abs().sum() > 0
    by_hand = -(advantages * expected).sum() / mask.sum()
    torch.testing.assert_close(loss, by_hand, atol=1e-5, rtol=1e-4)
    # without the correction the engine's shifted log-probs are π_old: the ratio is 2 or 0.5, clipped, and
    # the loss is another number
    plain = make_module(importance_correction="none")
    plain.configure_model()
    plain.model.load_state_dict(module.model.state_dict())
    plain.processor = module.processor
    shifted = replace(rollout, logprobs=rollout.engine_logprobs, engine_logprobs=None, is_weights=None)
    loss_plain, _ = policy_loss_of(plain, shifted)
    assert abs(loss_plain.item() - loss.item()) > 1e-3


def test_a_fit_with_tis_logs_the_mismatch():
    module = make_module(importance_correction="tis")
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, datamodule=make_data())
    metrics = trainer.callback_metrics
    assert metrics["rollout/engine_mismatch_mean_abs_log_ratio"] < 1e-4  # HF engine: the trainer's own numbers
    assert metrics["rollout/engine_mismatch_truncated_frac"] == 0.0
    assert torch.isfinite(metrics["update/policy_loss"])


def test_bad_importance_settings_are_named():
    with pytest.raises(ValueError, match="importance_correction='is'"):
        make_module(importance_correction="is")
    with pytest.raises(ValueError, match="tis_cap must be > 0"):
        make_module(importance_correction="tis", tis_cap=0.0)
