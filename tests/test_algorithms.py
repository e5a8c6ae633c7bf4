"""Hand-worked numbers for the shared algorithm core (advantages, losses, aggregation, log-probs).

Every expected value is a literal worked out by hand; the arithmetic is in the comment next to it.
Batches are right-padded with rows of different lengths, and padding holds garbage on purpose.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from tests.test_grpo import make_data, make_module
from vlrl.algorithms import (
    aggregate_loss,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_in_reward,
    kl_penalty,
    masked_mean,
    normalize_advantages,
    policy_loss,
    token_logprobs,
    value_clip_fraction,
    value_loss,
    zero_advantage,
)


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- #
# Group advantages
# ---------------------------------------------------------------------------------------------- #

# Groups of sizes 4, 4, 1: {1,0,0,1} | {1,1,1,1} | {0.5}.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])


def test_group_advantages_std_unbiased() -> None:
    # Group 0: mean 0.5, deviations ±0.5, unbiased var = 4·0.25/3 = 1/3, std = 1/√3 = 0.5773503,
    # A = ±0.5·√3 = ±0.8660254 (eps = 1e-6 shifts it by 1.5e-6, within atol).
    # Group 1: all equal -> 0. Group 2: singleton -> 0 (not NaN).
    a = group_advantages(REWARDS, group_index=GROUPS, mode="std")
    close(a, [0.8660254, -0.8660254, -0.8660254, 0.8660254, 0, 0, 0, 0, 0], atol=1e-5)


def test_group_advantages_mean_and_loo() -> None:
    # mean: r − 0.5 in group 0; 0 elsewhere.
    close(group_advantages(REWARDS, group_index=GROUPS, mode="mean"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0])
    # loo: r=1 -> 1 − (0+0+1)/3 = 2/3; r=0 -> 0 − (1+0+1)/3 = −2/3; all-equal -> 0; singleton -> 0.
    close(
        group_advantages(REWARDS, group_index=GROUPS, mode="loo"),
        [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, 0],
    )


def test_group_advantages_group_size_matches_group_index() -> None:
    # Contiguous blocks of 4 over the first 8 rewards are groups 0 and 1 above.
    for mode in ("std", "mean", "loo"):
        by_size = group_advantages(REWARDS[:8], group_size=4, mode=mode)
        by_index = group_advantages(REWARDS[:8], group_index=GROUPS[:8], mode=mode)
        torch.testing.assert_close(by_size, by_index)


def test_group_advantages_non_contiguous_labels() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    labels = torch.tensor([7, 3, 7, 3, 3])
    # Label 7: {1, 3}, mean 2. Label 3: {2, 4, 6}, mean 4.
    # mean: [1−2, 2−4, 3−2, 4−4, 6−4]
    close(group_advantages(rewards, group_index=labels, mode="mean"), [-1, -2, 1, 0, 2])
    # std: label 7 unbiased std = √((1+1)/1) = √2 -> ∓1/√2 = ∓0.7071068;
    #      label 3 unbiased std = √((4+0+4)/2) = 2 -> [−1, 0, 1].
    close(
        group_advantages(rewards, group_index=labels, mode="std", eps=0.0),
        [-0.70710678, -1, 0.70710678, 0, 1],
    )
    # loo: 1 − 3 = −2, 3 − 1 = 2; 2 − (4+6)/2 = −3, 4 − (2+6)/2 = 0, 6 − (2+4)/2 = 3.
    close(group_advantages(rewards, group_index=labels, mode="loo"), [-2, -3, 2, 0, 3])


@pytest.mark.parametrize("mode", ["std", "mean", "loo"])
@pytest.mark.parametrize(("value", "size"), [(-0.1, 8), (0.7, 16), (1.1, 16), (0.3, 5), (1e6 + 0.1, 3)])
def test_equal_rewards_give_exactly_zero(mode, value, size) -> None:
    # float32 sums leave noise otherwise: −0.1 x8 gave +0.0074 (std), 0.7 or 1.1 x16 gave ±0.106 (std)
    # and ~1e-7 (mean, loo). A constant group next to a mixed one: the constant one is exactly 0, and
    # the mixed group {0, 1} keeps its hand-worked values (std: ±0.5·√2 = ±0.7071068 with eps = 0).
    rewards = torch.tensor([value] * size + [0.0, 1.0])
    labels = torch.tensor([0] * size + [1, 1])
    a = group_advantages(rewards, group_index=labels, mode=mode, eps=0.0)
    assert a[:size].tolist() == [0.0] * size  # exact, not close
    mixed = {"std": [-0.70710678, 0.70710678], "mean": [-0.5, 0.5], "loo": [-1.0, 1.0]}[mode]
    close(a[size:], mixed)


def test_zero_advantage_is_exact_for_sequence_and_token_advantages() -> None:
    # [N]: only exact zeros count (1e-9 is a real, if small, advantage).
    assert zero_advantage(torch.tensor([0.0, -0.0, 1e-9, -0.5])).tolist() == [True, True, False, False]
    # [N, T]: a sample is zero when every token is (padding is 0 in gae / normalize_advantages).
    tokens = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.2, 0.0], [-1.0, 0.0, 0.0]])
    assert zero_advantage(tokens).tolist() == [True, False, False]
    # a whole constant group from group_advantages is zero by this definition, in every mode
    rewards = torch.tensor([0.7] * 16 + [0.0, 1.0, 1.0, 1.0])
    for mode in ("std", "mean", "loo"):
        assert zero_advantage(group_advantages(rewards, group_size=4, mode=mode)).tolist() == [True] * 16 + [False] * 4
    with pytest.raises(ValueError, match=r"advantages must be \[N\].*got shape \(2, 2, 2\)"):
        zero_advantage(torch.zeros(2, 2, 2))


def test_group_advantages_rejects_ambiguous_grouping() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(REWARDS, group_index=GROUPS, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(REWARDS, group_size=4)  # 9 samples are not blocks of 4


# ---------------------------------------------------------------------------------------------- #
# GAE, normalisation, KL in reward
# ---------------------------------------------------------------------------------------------- #


def test_gae_gamma_one_lambda_one_is_return_minus_value() -> None:
    # Row 0: 3 tokens, reward 1 on the last. Row 1: 2 tokens + padding (garbage 0.9 / 9.0 there).
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.5, 0.9]])
    values = torch.tensor([[0.2, 0.5, 0.7], [0.1, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_t = R − V_t: row 0 -> [1−0.2, 1−0.5, 1−0.7]; row 1 -> [0.5−0.1, 0.5−0.4, pad 0].
    close(adv, [[0.8, 0.5, 0.3], [0.4, 0.1, 0.0]])
    # returns = A + V = R on valid tokens.
    close(ret, [[1.0, 1.0, 1.0], [0.5, 0.5, 0.0]])


def test_gae_discounted_with_padded_row() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 7.0]])
    values = torch.tensor([[0.2, 0.5, 0.7], [0.2, 0.6, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)  # γλ = 0.25
    # Row 0: δ2 = 1 + 0.5·0 − 0.7 = 0.3                 A2 = 0.3
    #        δ1 = 0 + 0.5·0.7 − 0.5 = −0.15             A1 = −0.15 + 0.25·0.3 = −0.075
    #        δ0 = 0 + 0.5·0.5 − 0.2 = 0.05              A0 = 0.05 + 0.25·(−0.075) = 0.03125
    # Row 1 (padding ignored): δ1 = 1 + 0 − 0.6 = 0.4   A1 = 0.4
    #        δ0 = 0 + 0.5·0.6 − 0.2 = 0.1               A0 = 0.1 + 0.25·0.4 = 0.2
    close(adv, [[0.03125, -0.075, 0.3], [0.2, 0.4, 0.0]])
    # returns = A + V: [0.23125, 0.425, 1.0], [0.4, 1.0, 0]
    close(ret, [[0.23125, 0.425, 1.0], [0.4, 1.0, 0.0]])


def test_gae_steps_over_masked_span() -> None:
    # A masked token inside a row is skipped: [a, (hole), b] behaves like the row [a, b].
    adv_hole, _ = gae(
        torch.tensor([[0.0, 3.0, 1.0]]), torch.tensor([[0.2, 9.0, 0.6]]), torch.tensor([[1, 0, 1]]), 0.5, 0.5
    )
    adv_flat, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.6]]), torch.tensor([[1, 1]]), 0.5, 0.5)
    # Same numbers as row 1 above: [0.2, 0.4].
    close(adv_hole, [[0.2, 0.0, 0.4]])
    close(adv_flat, [[0.2, 0.4]])


def test_normalize_advantages() -> None:
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Valid values 1, 2, 3, 4: mean 2.5, unbiased var = (2.25+0.25+0.25+2.25)/3 = 5/3, std = 1.2909944.
    out = normalize_advantages(adv, mask, eps=0.0)
    close(out, [[-1.5 / 1.2909944, -0.5 / 1.2909944, 0.5 / 1.2909944], [1.5 / 1.2909944, 0, 0]])
    out = normalize_advantages(adv, mask, eps=0.0, shift_mean=False)
    close(out, [[1 / 1.2909944, 2 / 1.2909944, 3 / 1.2909944], [4 / 1.2909944, 0, 0]])


def test_kl_in_reward_places_reward_on_last_valid_token() -> None:
    rewards = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # −0.1·kl on valid tokens; reward added on the last valid one: row 0 -> 1 − 0.03 = 0.97.
    close(kl_in_reward(rewards, kl, mask, coef=0.1), [[-0.01, -0.02, 0.97], [-0.05, -0.05, 0.0]])


# ---------------------------------------------------------------------------------------------- #
# Policy loss
# ---------------------------------------------------------------------------------------------- #


def _logprobs_with_ratios(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((len(ratios), len(ratios[0])), -1.0, dtype=torch.float64)
    new = (old + torch.tensor(ratios, dtype=torch.float64).log()).requires_grad_(True)
    return new, old


def test_policy_loss_symmetric_clip_and_gradients() -> None:
    # Row 0, A = +1: ρ = 1.1 inside, ρ = 1.5 above 1.2 (clipped), ρ = 0.5 below 0.8 (A > 0: not clipped).
    # Row 1, A = −1: ρ = 0.5 below 0.8 (clipped), ρ = 1.5 (A < 0: not clipped), padding.
    new, old = _logprobs_with_ratios([[1.1, 1.5, 0.5], [0.5, 1.5, 3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = policy_loss(new, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask, eps_low=0.2, eps_high=0.2)
    # A = +1: max(−ρ, −clip ρ) = −min(ρ, clip ρ): −1.1, −min(1.5, 1.2) = −1.2, −min(0.5, 0.8) = −0.5.
    # A = −1: max(ρ, clip ρ): max(0.5, 0.8) = 0.8, max(1.5, 1.2) = 1.5, padding 0.
    close(out.per_token, [[-1.1, -1.2, -0.5], [0.8, 1.5, 0.0]])
    close(out.ratio, [[1.1, 1.5, 0.5], [0.5, 1.5, 3.0]])
    close(out.clip_fraction, 2 / 5)  # 2 clipped of 5 valid tokens
    close(out.dual_clip_fraction, 0.0)
    # k3 of KL(old ‖ new) = ρ − 1 − ln ρ: 1.1 -> 0.0046898, 1.5 -> 0.0945349, 0.5 -> 0.1931472;
    # mean over valid = (0.0046898 + 2·0.0945349 + 2·0.1931472) / 5 = 0.1160108.
    close(out.approx_kl, 0.1160108)
    # d(−Aρ)/d logp = −Aρ on unclipped tokens, exactly 0 on clipped tokens and padding.
    out.per_token.sum().backward()
    close(new.grad, [[-1.1, 0.0, -0.5], [0.0, 1.5, 0.0]])


def test_policy_loss_asymmetric_clip() -> None:
    # eps_low 0.2, eps_high 0.35: range [0.8, 1.35].
    new, old = _logprobs_with_ratios([[1.3, 1.5], [0.7, 1.3]])
    mask = torch.ones(2, 2)
    out = policy_loss(new, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask, eps_low=0.2, eps_high=0.35)
    # A = +1: ρ = 1.3 inside (would be clipped at 1.2) -> −1.3; ρ = 1.5 -> −1.35 (clipped).
    # A = −1: ρ = 0.7 -> max(0.7, 0.8) = 0.8 (clipped); ρ = 1.3 -> max(1.3, 1.3) = 1.3.
    close(out.per_token, [[-1.3, -1.35], [0.8, 1.3]])
    close(out.clip_fraction, 2 / 4)


def test_policy_loss_dual_clip() -> None:
    new, old = _logprobs_with_ratios([[5.0, 2.0, 5.0], [4.0, 1.0, 1.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0], [-2.0, 1.0, 1.0]], dtype=torch.float64)  # per-token advantages
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = policy_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    # A = −1, ρ = 5: max(5, 1.2) = 5, dual cap −A·c = 3 -> 3 (dual clip active).
    # A = −1, ρ = 2: max(2, 1.2) = 2 < 3 -> 2.
    # A = +1, ρ = 5: −min(5, 1.2) = −1.2 (ordinary clip; dual clip only acts on A < 0).
    # A = −2, ρ = 4: max(8, 2.4) = 8, cap 2·3 = 6 -> 6 (dual clip active).
    close(out.per_token, [[3.0, 2.0, -1.2], [6.0, 0.0, 0.0]])
    close(out.clip_fraction, 3 / 4)  # tokens 1, 3 (dual) and 3rd of row 0 (ordinary)
    close(out.dual_clip_fraction, 2 / 4)
    out.per_token.sum().backward()
    close(new.grad, [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])  # only the unclipped token: −Aρ = 2
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(new, old, adv, mask, dual_clip=1.0)


# ---------------------------------------------------------------------------------------------- #
# KL estimators
# ---------------------------------------------------------------------------------------------- #


def test_kl_estimators_by_hand() -> None:
    logp = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    ref = torch.zeros(1, 2, dtype=torch.float64)
    close(kl_penalty(logp, ref, "k1"), [[0.5, -0.5]])
    close(kl_penalty(logp, ref, "k2"), [[0.125, 0.125]])  # ½·0.5²
    # k3 = e^{−d} + d − 1: d = 0.5 -> 0.6065306597 − 0.5 = 0.1065306597; d = −0.5 -> 1.6487212707 − 1.5.
    close(kl_penalty(logp, ref, "k3"), [[0.1065306597, 0.1487212707]], atol=1e-9)


def test_k3_is_non_negative() -> None:
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, 32, generator=g) * 3, torch.randn(64, 32, generator=g) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert kl_penalty(ref, ref, "k3").abs().max() == 0


# ---------------------------------------------------------------------------------------------- #
# Aggregation
# ---------------------------------------------------------------------------------------------- #

# Row 0 has 3 tokens (1, 2, 3), row 1 has 2 tokens (4, 5) and garbage padding (100).
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_aggregation_modes_by_hand() -> None:
    close(aggregate_loss(PER_TOKEN, MASK, "token-mean"), 3.0)  # (1+2+3+4+5)/5
    close(aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-mean"), 3.25)  # (6/3 + 9/2)/2 = (2 + 4.5)/2
    close(aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum"), 7.5)  # (6 + 9)/2
    close(aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm", max_len=4), 1.875)  # (6/4 + 9/4)/2
    close(aggregate_loss(PER_TOKEN, MASK, "token-mean", num_tokens=10), 1.5)  # 15/10
    close(aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum", num_sequences=5), 3.0)  # 15/5
    close(masked_mean(PER_TOKEN, MASK), 3.0)
    close(masked_mean(PER_TOKEN, MASK, dim=-1), [2.0, 4.5])
    close(aggregate_loss(PER_TOKEN, torch.zeros(2, 3)), 0.0)  # empty mask -> 0, not NaN
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm")


def test_token_mean_is_exact_across_micro_batches() -> None:
    # Update batch of 4 rows with lengths 3, 2, 1, 2, split into 2 micro-batches of 2 rows.
    full = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, -9.0], [6.0, -9.0, -9.0], [7.0, 8.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]])
    global_tokens = mask.sum()  # 8, counted once per optimizer step

    reference = aggregate_loss(full, mask)  # (1+…+8)/8 = 36/8 = 4.5
    close(reference, 4.5)
    (ref_grad,) = torch.autograd.grad(reference, full)

    # Micro-batch shares: 15/8 + 21/8 = 36/8.
    shares = [aggregate_loss(full[i : i + 2], mask[i : i + 2], num_tokens=global_tokens) for i in (0, 2)]
    close(sum(shares), 4.5)
    (acc_grad,) = torch.autograd.grad(sum(shares), full, retain_graph=True)
    torch.testing.assert_close(acc_grad, ref_grad)  # 1/8 on every valid token

    # Averaging per-micro-batch means is NOT the token mean when lengths differ: (15/5 + 21/3)/2 = 5.
    local_means = [aggregate_loss(full[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
    close(sum(local_means) / 2, 5.0)

    # Two data-parallel devices, one micro-batch each: DDP averages the gradients, so each device
    # multiplies its loss by world_size = 2 and the averaged gradient equals the full-batch one.
    device_grads = [torch.autograd.grad(2 * share, full, retain_graph=True)[0] for share in shares]
    torch.testing.assert_close((device_grads[0] + device_grads[1]) / 2, ref_grad)


def test_seq_mean_is_exact_across_micro_batches() -> None:
    full = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, -9.0], [6.0, -9.0, -9.0], [7.0, 8.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]])
    # Sequence means 2, 4.5, 6, 7.5 -> (2 + 4.5 + 6 + 7.5)/4 = 5.
    close(aggregate_loss(full, mask, "seq-mean-token-mean"), 5.0)
    shares = [aggregate_loss(full[i : i + 2], mask[i : i + 2], "seq-mean-token-mean", num_sequences=4) for i in (0, 2)]
    close(sum(shares), 5.0)  # 6.5/4 + 13.5/4


def test_the_step_counts_only_sequences_with_trained_tokens() -> None:
    # A mini-batch of 4 sampled responses, the last with no trained token (its loss mask is all 0),
    # in micro-batches of 2: the seq-mean loss of the step must be the mean over the 3 non-empty
    # sequences, so its gradient equals that of the whole mini-batch's loss with num_sequences = 3
    # (counting all 4 scales it by 3/4).
    module = make_module(loss_aggregation="seq-mean-token-mean", micro_batch_size=2, group_size=2)
    module.configure_model()
    data = make_data(batch_size=2)
    data.setup("fit")
    rollout = module.score(module.generate(next(iter(data.train_dataloader())), module.sampling, 2))
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rollout.loss_mask = rollout.response_mask.clone()  # [4, T]
    rollout.loss_mask[3] = 0.0
    assert (rollout.loss_mask[:3].sum(dim=1) > 0).all()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    params = [p for p in module.model.parameters() if p.requires_grad]

    module.accumulate_gradients(rollout, module.policy_micro_loss)
    accumulated = [p.grad.clone() for p in params]
    module.model.zero_grad()
    logprobs, entropy = module.policy_logprobs(module.model, rollout, with_entropy=True)
    loss, _ = module.loss(rollout, logprobs, entropy, rollout.train_mask.sum(), 3)
    loss.backward()
    for got, want in zip(accumulated, [p.grad for p in params], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- #
# Value loss, entropy
# ---------------------------------------------------------------------------------------------- #

VALUES = torch.tensor([[1.2, 0.5, 0.2], [0.3, 0.9, 4.0]])
OLD_VALUES = torch.tensor([[0.8, 0.5, 0.5], [0.3, 0.5, 0.0]])
RETURNS = torch.tensor([[1.5, 0.5, 0.0], [0.0, 0.5, 0.0]])


def test_value_loss_clipped() -> None:
    # (0,0): V 1.2, clip to 0.8±0.2 -> 1.0; max((1.2−1.5)², (1.0−1.5)²) = max(0.09, 0.25) -> ½·0.25 = 0.125 (clipped)
    # (0,1): V = V_old = R = 0.5 -> 0
    # (0,2): V 0.2, clip to 0.5±0.2 -> 0.3; max(0.04, 0.09) -> 0.045 (clipped)
    # (1,0): V = V_old = 0.3, R 0 -> ½·0.09 = 0.045
    # (1,1): V 0.9, clip to 0.5±0.2 -> 0.7; max((0.4)², (0.2)²) = 0.16 -> 0.08 (unclipped term larger)
    close(value_loss(VALUES, OLD_VALUES, RETURNS, MASK, clip_eps=0.2), [[0.125, 0.0, 0.045], [0.045, 0.08, 0.0]])
    close(value_clip_fraction(VALUES, OLD_VALUES, RETURNS, MASK, clip_eps=0.2), 2 / 5)


def test_value_loss_unclipped() -> None:
    # ½(V − R)²: ½·0.09, 0, ½·0.04, ½·0.09, ½·0.16, padding 0.
    close(value_loss(VALUES, OLD_VALUES, RETURNS, MASK, clip_eps=None), [[0.045, 0.0, 0.02], [0.045, 0.08, 0.0]])


def test_entropy_from_logits() -> None:
    close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)).tolist())  # uniform: ln 7
    close(entropy_from_logits(torch.full((1, 5), 1e4)), [math.log(5)], atol=1e-5)  # no overflow
    # p = softmax([0, ln 3]) = [0.25, 0.75]: H = 0.25·ln 4 + 0.75·ln(4/3) = 0.3465736 + 0.2157616.
    close(entropy_from_logits(torch.tensor([0.0, math.log(3.0)])), 0.5623351)
    # A −inf logit is a zero-probability entry: H = ln 2, and the gradient stays finite.
    logits = torch.tensor([0.0, 0.0, -math.inf], requires_grad=True)
    h = entropy_from_logits(logits)
    h.backward()
    close(h, math.log(2))
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------- #
# Token log-probs
# ---------------------------------------------------------------------------------------------- #


def test_token_logprobs_by_hand() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    close(token_logprobs(logits, tokens), [[math.log(0.75)]])  # p = 3/4 -> −0.2876821
    # T = 2: z = [0, ln3/2], p1 = √3/(1+√3) = 0.6339746 -> ln p1 = −0.4557464.
    close(token_logprobs(logits, tokens, temperature=2.0), [[-0.4557464]])


def test_token_logprobs_matches_log_softmax_and_chunking() -> None:
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 6, 11, generator=g, dtype=torch.float64) * 4
    logits = full[:, 1:, :].detach().requires_grad_(True)  # [3, 5, 11], a shifted slice as in training
    view = logits[:, :, :]
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (expected_grad,) = torch.autograd.grad((expected * torch.arange(15.0).view(3, 5)).sum(), logits)

    for chunk_size in (1, 2, 3, 7, 1000):
        out = token_logprobs(view, tokens, temperature=0.7, chunk_size=chunk_size)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
        (grad,) = torch.autograd.grad((out * torch.arange(15.0).view(3, 5)).sum(), logits)
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_token_logprobs_non_contiguous_bf16_input() -> None:
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 9, 13, generator=g).to(torch.bfloat16)
    logits = full[:, :-1]  # non-contiguous view [2, 8, 13]
    tokens = torch.randint(0, 13, (2, 8), generator=g)
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = token_logprobs(logits, tokens, chunk_size=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
