"""The 2026 family against numbers worked out by hand on padded batches: GSPO (sequence and token), CISPO,
the off-policy sequence mask, k3+, REINFORCE++ (both variants), DAPO's overlong filtering and soft overlong
punishment; and GRPO's keys that select them."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import pytest
import torch

from tests.test_grpo import make_module
from tests.test_ppo import hand_rollout
from vlrl.algorithms import (
    batch_advantages,
    cispo_loss,
    gspo_loss,
    kl_penalty,
    off_policy_sequence_mask,
    overlong_filter,
    policy_loss,
    policy_objective,
    soft_overlong_penalty,
)
from vlrl.rollout import Sampling

# Two right-padded responses of 2 and 1 trained tokens; padded positions hold garbage that must not count.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
LOGPROBS = torch.tensor([[math.log(0.6), math.log(0.5), -30.0], [math.log(0.3), -30.0, -30.0]])
E01 = math.exp(0.1)


def with_log_ratios(ratios: list[list[float]]) -> torch.Tensor:
    """Old log-probs such that log π_θ − log π_old is ``ratios`` (padding: old 0, a log-ratio of −30)."""
    old = LOGPROBS - torch.tensor(ratios)
    return torch.where(MASK.bool(), old, torch.zeros_like(old))


# ----------------------------------------------------------------------------------------------- GSPO
# sequence 0: log-ratios 0.2 and 0 -> s = e^0.1 = 1.10517, A = 1: inside [0.8, 1.2], loss −1.10517 at both tokens
# sequence 1: log-ratio −0.5 -> s = e^−0.5 = 0.60653, A = −1: max(0.60653, 0.8) = 0.8, clipped
GSPO_OLD = with_log_ratios([[0.2, 0.0, 0.0], [-0.5, 0.0, 0.0]])
SEQ_ADV = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_gspo_sequence_ratio_clip_and_gradient_by_hand(level):
    logprobs = LOGPROBS.clone().requires_grad_(True)
    out = gspo_loss(logprobs, GSPO_OLD, SEQ_ADV, MASK, eps_low=0.2, eps_high=0.2, level=level)
    expected = torch.tensor([[-E01, -E01, 0.0], [0.8, 0.0, 0.0]])
    torch.testing.assert_close(out.per_token.detach(), expected, rtol=0, atol=1e-6)
    assert out.ratio[0, 0].item() == pytest.approx(E01, abs=1e-6)
    assert out.ratio[1, 0].item() == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)  # the one token of the clipped sequence
    objective = policy_objective(
        logprobs,
        GSPO_OLD,
        SEQ_ADV,
        MASK,
        policy_term=partial(gspo_loss, eps_low=0.2, eps_high=0.2, level=level),
        mode="seq-mean-token-mean",
    )
    assert objective.loss.item() == pytest.approx((-E01 + 0.8) / 2, abs=1e-6)
    objective.loss.backward()
    # d/dℓ_t of −s·A with s = exp(mean ℓ): −s/2 per token of sequence 0, then / 2 sequences; none through the clip
    expected_grad = torch.tensor([[-E01 / 4, -E01 / 4, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=0, atol=1e-6)


def test_gspo_token_gives_each_token_its_own_advantage_gradient():
    token_adv = torch.tensor([[1.0, 2.0, 9.0], [-1.0, 9.0, 9.0]])  # the 9s sit on padding
    grads = {}
    for level in ("sequence", "token"):
        logprobs = LOGPROBS.clone().requires_grad_(True)
        term = partial(gspo_loss, eps_low=0.2, eps_high=0.2, level=level)
        out = policy_objective(logprobs, GSPO_OLD, token_adv, MASK, policy_term=term, mode="seq-mean-token-mean")
        assert out.loss.item() == pytest.approx((-E01 * 1.5 + 0.8) / 2, abs=1e-6)  # same value at both levels
        out.loss.backward()
        grads[level] = logprobs.grad[0, :2].tolist()
    # sequence: every token moves s, d/dℓ_t = −(A_0 + A_1)/2 · s/2 / 2; token: −A_t · s / 2 / 2
    assert grads["sequence"] == pytest.approx([-1.5 * E01 / 4, -1.5 * E01 / 4], abs=1e-6)
    assert grads["token"] == pytest.approx([-E01 / 4, -2 * E01 / 4], abs=1e-6)


def test_gspo_empty_sequence_and_bad_settings():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = gspo_loss(LOGPROBS, GSPO_OLD, SEQ_ADV, mask, eps_low=0.2, eps_high=0.2)
    assert out.per_token[1].abs().sum().item() == 0.0 and torch.isfinite(out.per_token).all()
    with pytest.raises(ValueError, match="level must be 'sequence' or 'token', got 'seq'"):
        gspo_loss(LOGPROBS, GSPO_OLD, SEQ_ADV, MASK, level="seq")


# ---------------------------------------------------------------------------------------------- CISPO
def test_cispo_clips_the_detached_weight_and_keeps_every_gradient():
    # ratios 0.6/0.3 = 2 (capped at 1.5), 0.5/0.5 = 1, 0.3/0.6 = 0.5; A = 1, 1, −2
    old = torch.tensor([[math.log(0.3), math.log(0.5), 0.0], [math.log(0.6), 0.0, 0.0]])
    advantages = torch.tensor([1.0, -2.0])
    logprobs = LOGPROBS.clone().requires_grad_(True)
    out = policy_objective(logprobs, old, advantages, MASK, policy_term=partial(cispo_loss, max_weight=1.5))
    per_token = [-1.5 * math.log(0.6), -1.0 * math.log(0.5), -0.5 * -2.0 * math.log(0.3)]
    assert out.loss.item() == pytest.approx(sum(per_token) / 3, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    assert out.ratio_mean.item() == pytest.approx((2.0 + 1.0 + 0.5) / 3, abs=1e-6)
    out.loss.backward()
    # −w·A per token, / 3 tokens: the capped token keeps a gradient (PPO's clip would give it none)
    expected = torch.tensor([[-1.5, -1.0, 0.0], [1.0, 0.0, 0.0]]) / 3
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-6)
    ppo = policy_objective(
        LOGPROBS.clone().requires_grad_(True), old, advantages, MASK, policy_term=partial(policy_loss, eps_high=0.5)
    )
    assert ppo.clip_fraction.item() == pytest.approx(2 / 3)  # for contrast: PPO drops the gradient of two tokens


# ------------------------------------------------------------------------------------ off-policy mask
def test_off_policy_sequence_mask_by_hand():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    old = torch.zeros(3, 2)
    # log π_θ − log π_old: sequence 0 −0.3, −0.1 (mean −ℓ 0.2), sequence 1 −0.5 (0.5), sequence 2 0.1 (−0.1)
    logprobs = torch.tensor([[-0.3, -0.1], [-0.5, 7.0], [0.1, 7.0]])
    advantages = torch.tensor([-1.0, 1.0, -1.0])
    keep = off_policy_sequence_mask(logprobs, old, advantages, mask, delta=0.1)
    assert keep.tolist() == [False, True, True]  # 1 is far but positive; 2 is negative but close
    assert off_policy_sequence_mask(logprobs, old, advantages, mask, delta=0.25).tolist() == [True, True, True]
    token_adv = torch.tensor([[-1.0, 0.5], [1.0, -9.0], [-1.0, 9.0]])  # sequence 0 mean −0.25 < 0: negative
    assert off_policy_sequence_mask(logprobs, old, token_adv, mask, delta=0.1).tolist() == [False, True, True]
    # in the loss: sequence 0 adds 0, the token count stays 4
    # seq 1: ρ = e^−0.5 = 0.60653, A = 1: −0.60653; seq 2: ρ = e^0.1 = 1.10517, A = −1: 1.10517 (inside the clip)
    out = policy_objective(logprobs, old, advantages, mask, off_policy_delta=0.1)
    assert out.loss.item() == pytest.approx((-math.exp(-0.5) + E01) / 4, abs=1e-6)
    assert out.metrics()["update/off_policy_masked_frac"].item() == pytest.approx(1 / 3)
    unmasked = policy_objective(logprobs, old, advantages, mask)
    assert "update/off_policy_masked_frac" not in unmasked.metrics()
    # sequence 0 back in: ρ = e^−0.3 = 0.74082 clipped to 0.8, ρ = e^−0.1 = 0.90484 inside, A = −1
    assert unmasked.loss.item() == pytest.approx((0.8 + math.exp(-0.1) - math.exp(-0.5) + E01) / 4, abs=1e-6)


# ------------------------------------------------------------------------------------------------ k3+
def test_k3_plus_has_the_k3_value_and_the_k2_gradient():
    d = torch.tensor([[0.5, -0.5, 2.0]])
    ref = torch.zeros(1, 3)
    logprobs = d.clone().requires_grad_(True)
    value = kl_penalty(logprobs, ref, "k3+")
    torch.testing.assert_close(value.detach(), kl_penalty(d, ref, "k3"), rtol=0, atol=0)
    assert value[0, 0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-7)  # 0.10653
    value.sum().backward()
    torch.testing.assert_close(logprobs.grad, d)  # ∇ ½d² = d, where k3's would be 1 − e^{−d}
    with pytest.raises(ValueError, match="'k3\\+', got 'k4'"):
        kl_penalty(d, ref, "k4")


# ----------------------------------------------------------------------------------------- REINFORCE++
def test_reinforce_plus_plus_by_hand():
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1])
    # μ = 0.25, unbiased σ = 0.5
    plain = batch_advantages(rewards, eps=0.0)
    torch.testing.assert_close(plain, torch.tensor([1.5, -0.5, -0.5, -0.5]))
    # c = [0.5, −0.5, 0, 0], σ(c) = sqrt(0.5 / 3) = 1/√6
    with_baseline = batch_advantages(rewards, groups, baseline=True, eps=0.0)
    torch.testing.assert_close(with_baseline, torch.tensor([math.sqrt(1.5), -math.sqrt(1.5), 0.0, 0.0]))
    assert with_baseline[2:].eq(0).all()  # the equal-reward group is exactly 0
    assert batch_advantages(torch.full((6,), 0.7)).eq(0).all()  # no rounding noise
    with pytest.raises(ValueError, match="give group_index"):
        batch_advantages(rewards, baseline=True)


# ---------------------------------------------------------------------------------------------- DAPO
def test_soft_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 16, 17, 19, 20, 25])
    out = soft_overlong_penalty(lengths, max_length=20, cache_length=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0, -1.0]))
    torch.testing.assert_close(soft_overlong_penalty(lengths, 20, 4, factor=0.5), out * 0.5)
    with pytest.raises(ValueError, match="cache_length=0 must be in \\(0, max_length=20\\]"):
        soft_overlong_penalty(lengths, 20, 0)


def test_overlong_filter_masks_truncated_rows():
    out = overlong_filter(MASK, torch.tensor([True, False]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------------- GRPO selects them
def padded_rollout(advantages=SEQ_ADV, old=GSPO_OLD):
    return replace(hand_rollout([0.0, 0.0], torch.zeros(2, 3), MASK), logprobs=old, advantages=advantages)


@pytest.mark.parametrize("term", ["gspo", "gspo-token"])
def test_grpo_policy_term_gspo_is_gspo_loss(term):
    module = make_module(policy_term=term, eps_low=0.2, eps_high=0.2, loss_aggregation="seq-mean-token-mean")
    loss, metrics = module.loss(padded_rollout(), LOGPROBS.clone(), None, torch.tensor(3.0), 2)
    assert loss.item() == pytest.approx((-E01 + 0.8) / 2, abs=1e-6)
    assert metrics["update/clip_frac"].item() == pytest.approx(1 / 3)


def test_grpo_policy_term_cispo_caps_at_one_plus_eps_high():
    old = torch.tensor([[math.log(0.3), math.log(0.5), 0.0], [math.log(0.6), 0.0, 0.0]])
    module = make_module(policy_term="cispo", eps_high=0.5)
    loss, _ = module.loss(padded_rollout(torch.tensor([1.0, -2.0]), old), LOGPROBS.clone(), None, torch.tensor(3.0), 2)
    expected = (-1.5 * math.log(0.6) - math.log(0.5) + math.log(0.3)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_grpo_off_policy_delta_and_k3_plus_reach_the_loss():
    module = make_module(off_policy_delta=0.1, eps_low=0.2, eps_high=0.2)
    # sequence 1 (A = −1, −ℓ = 0.5 > 0.1) is dropped; sequence 0 (A = 1): ρ = e^0.2 clipped to 1.2, and ρ = 1;
    # over the 3 tokens of the batch
    loss, metrics = module.loss(padded_rollout(), LOGPROBS.clone(), None, torch.tensor(3.0), 2)
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 3, abs=1e-6)
    assert metrics["update/off_policy_masked_frac"].item() == pytest.approx(0.5)
    assert make_module(kl_coef=0.1, kl_estimator="k3+").loss_terms(padded_rollout())["kl_estimator"] == "k3+"


def test_grpo_reinforce_plus_plus_advantages():
    rollout = replace(hand_rollout([1.0, 0.0, 0.0, 0.0], torch.zeros(4, 2), torch.ones(4, 2)))
    rollout.group_index = torch.tensor([0, 0, 1, 1])
    plain = make_module(advantage="reinforce++").compute_advantages(rollout)
    torch.testing.assert_close(plain, torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=0, atol=1e-5)
    baseline = make_module(advantage="reinforce++-baseline").compute_advantages(rollout)
    torch.testing.assert_close(baseline, torch.tensor([1.2247, -1.2247, 0.0, 0.0]), rtol=0, atol=1e-4)


def test_grpo_soft_overlong_punishment_and_filter():
    # responses of 8, 6 and 3 tokens, limit 8, cache 4: penalties −1, −0.5, 0 added to the rewards
    mask = torch.tensor([[1.0] * 8, [1.0] * 6 + [0.0] * 2, [1.0] * 3 + [0.0] * 5])
    rollout = hand_rollout([0.0, 0.0, 0.0], torch.zeros(3, 8), mask)
    rollout.finish_reasons = ["length", "stop", "stop"]
    module = make_module(overlong_cache=4, overlong_filter=True, sampling=Sampling(max_new_tokens=8), rewards=[])
    scored = module.score(rollout)
    torch.testing.assert_close(scored.rewards, torch.tensor([-1.0, -0.5, 0.0]))
    torch.testing.assert_close(scored.reward_components["overlong"], torch.tensor([-1.0, -0.5, 0.0]))
    module.prepare_update(scored)
    assert scored.train_mask.sum(1).tolist() == [0.0, 6.0, 3.0]  # the truncated sample leaves the loss


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy_term="gspo", dual_clip=3.0), "dual_clip=3.0 belongs to policy_term='ppo-clip'"),
        (dict(off_policy_delta=-0.1), "off_policy_delta must be >= 0"),
        (dict(overlong_cache=9), "overlong_cache=9 must be in \\[0, sampling.max_new_tokens=8\\]"),
        (dict(advantage="reinforce++-baseline", group_size=1), "advantage='reinforce\\+\\+-baseline' needs group_size"),
    ],
)
def test_bad_family_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)
