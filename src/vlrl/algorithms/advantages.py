"""Advantage estimators: group-relative (GRPO, RLOO), batch-normalised (REINFORCE++), GAE (PPO), and
batch normalisation.

All functions are pure and work on detached tensors: advantages and returns are targets, never
differentiated through. Conventions: ``N`` samples, ``T`` response tokens (right-padded); ``mask``
is 1 on trained tokens and 0 elsewhere.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vlrl.algorithms.losses import masked_mean


def group_advantages(
    rewards: Tensor,
    group_index: Tensor | None = None,
    group_size: int | None = None,
    mode: Literal["std", "mean", "loo"] = "std",
    eps: float = 1e-6,
) -> Tensor:
    """Advantage of each sample relative to the other samples of its prompt.

    Modes, with ``μ_g`` the group mean and ``σ_g`` the unbiased group standard deviation:

    - ``"std"`` (GRPO): ``(r − μ_g) / (σ_g + eps)``.
    - ``"mean"`` (Dr. GRPO, VL-Rethinker): ``r − μ_g``.
    - ``"loo"`` (RLOO): ``r`` minus the mean of the *other* members, ``= n/(n−1)·(r − μ_g)``.

    A group whose rewards are all equal (``max == min``, compared exactly), a group of one sample
    included, gets advantages exactly 0 in every mode: the float arithmetic of ``r − μ_g`` would
    otherwise leave rounding noise (e.g. sixteen rewards of 0.7 give ``±0.106`` in mode ``"std"``,
    where ``σ_g`` is noise too), and a whole uninformative group would be pushed one way.

    Args:
        rewards: ``[N]`` one scalar reward per sample.
        group_index: ``[N]`` integer group label per sample; labels are arbitrary (need not be
            contiguous or sorted) and groups may differ in size.
        group_size: Alternatively, groups are consecutive blocks of this many samples
            (``N`` must be a multiple). Give exactly one of ``group_index`` and ``group_size``.
        mode: Which estimator, see above.
        eps: Added to ``σ_g`` in mode ``"std"``.

    Returns:
        ``[N]`` advantages, float (float32 unless ``rewards`` is a wider float).
    """
    if (group_index is None) == (group_size is None):
        raise ValueError("give exactly one of group_index (a label per sample) and group_size (contiguous blocks).")
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    n = rewards.shape[0]
    if group_size is not None:
        if group_size < 1 or n % group_size:
            raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of samples ({n}).")
        group_index = torch.arange(n, device=rewards.device) // group_size  # [N]
    _, inverse = torch.unique(group_index, return_inverse=True)  # [N] labels -> 0..G-1
    num_groups = int(inverse.max()) + 1 if n else 0

    counts = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, torch.ones_like(rewards)
    )  # [G]
    sums = torch.zeros_like(counts).index_add_(0, inverse, rewards)  # [G]
    centred = rewards - (sums / counts)[inverse]  # [N]
    size = counts[inverse]  # [N]
    highest = torch.full_like(counts, -torch.inf).scatter_reduce_(0, inverse, rewards, "amax")  # [G]
    lowest = torch.full_like(counts, torch.inf).scatter_reduce_(0, inverse, rewards, "amin")  # [G]
    constant = (highest == lowest)[inverse]  # [N] the group's rewards are all equal (or it has one sample)
    if mode == "mean":
        advantages = centred
    elif mode == "loo":
        advantages = centred * size / (size - 1).clamp_min(1.0)
    elif mode == "std":
        sq = torch.zeros_like(counts).index_add_(0, inverse, centred.square())  # [G]
        std = (sq / (counts - 1).clamp_min(1.0)).sqrt()  # [G]
        advantages = centred / (std[inverse] + eps)
    else:
        raise ValueError(f"mode must be one of 'std', 'mean', 'loo', got {mode!r}.")
    return torch.where(constant, torch.zeros_like(advantages), advantages)


def batch_advantages(
    rewards: Tensor,
    group_index: Tensor | None = None,
    baseline: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """REINFORCE++ advantages (Hu 2025): rewards normalised over the whole batch, no critic.

    - ``baseline=False`` (REINFORCE++): ``(r − μ_B) / (σ_B + eps)`` with the mean and unbiased std of all
      rewards of the batch. A sample is scored against the batch, not its group, so an equal-reward group
      gets advantages of the sign of its distance to the batch mean.
    - ``baseline=True`` (REINFORCE++-baseline): ``c = r − μ_g`` (``group_advantages`` mode ``"mean"``), then
      ``c / (σ_B(c) + eps)``. The batch mean of ``c`` is 0 by construction, so it is not subtracted again,
      which keeps the advantages of an equal-reward group exactly 0.

    Statistics are over samples (one value each). OpenRLHF takes them over tokens, every token carrying its
    sample's return; without a KL in the reward the two differ only by weighting samples by length. For the
    global batch of a data-parallel run, pass the rewards gathered from all devices (``GRPO`` does).

    Example: rewards ``[1, 0, 0, 0]`` in groups ``[0, 0, 1, 1]``: without baseline ``μ = 0.25``,
    ``σ = 0.5`` and advantages ``[1.5, −0.5, −0.5, −0.5]``; with it ``c = [0.5, −0.5, 0, 0]``,
    ``σ(c) = 1/√6`` and advantages ``[1.2247, −1.2247, 0, 0]`` (eps aside).

    Args:
        rewards: ``[N]`` one scalar reward per sample.
        group_index: ``[N]`` group label per sample; needed with ``baseline=True``.
        baseline: Subtract the group mean first (REINFORCE++-baseline).
        eps: Added to the batch std.

    Returns:
        ``[N]`` advantages (float32 unless ``rewards`` is a wider float); all 0 when the values are all equal.
    """
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if baseline:
        if group_index is None:
            raise ValueError("baseline=True subtracts the group mean: give group_index (a label per sample).")
        values = group_advantages(rewards, group_index, mode="mean")  # [N], exactly 0 for equal-reward groups
    else:
        values = rewards - rewards.mean()  # [N]
    if len(values) < 2 or bool((rewards == rewards[0]).all()):
        return torch.zeros_like(values)
    return values / (values.std() + eps)  # [N]


def zero_advantage(advantages: Tensor) -> Tensor:
    """Which samples carry no advantage: the one definition the replay, the metrics and filters share.

    A sample's advantage is zero when it is exactly 0 (``group_advantages`` gives exact zeros to
    groups whose rewards are equal); for token advantages, when every token's is 0 (padding is 0
    in the outputs of ``gae`` and ``normalize_advantages``, so only the response tokens decide).

    Args:
        advantages: ``[N]`` sequence advantages or ``[N, T]`` token advantages.

    Returns:
        ``[N]`` bool, True where the sample adds no policy gradient.
    """
    if advantages.dim() not in (1, 2):
        raise ValueError(
            f"advantages must be [N] (one per sample) or [N, T] (per token), got shape {tuple(advantages.shape)}"
        )
    zero = advantages == 0  # [N] or [N, T]
    return zero if zero.dim() == 1 else zero.all(dim=-1)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens of each row.

    ``δ_t = r_t + γ·V_{t+1} − V_t`` and ``A_t = δ_t + γλ·A_{t+1}``, where ``t + 1`` is the next
    *valid* token of the row and the value after the last valid token is 0. Positions with mask 0
    are skipped entirely (their rewards and values are ignored): for right-padded rows this is the
    usual end-of-sequence handling, and a masked span inside a row (e.g. tokens excluded from
    training) is stepped over as if absent.

    With ``γ = λ = 1`` and a single reward ``R`` on the last token, ``A_t = R − V_t``.

    Args:
        rewards: ``[N, T]`` per-token rewards (e.g. from ``kl_in_reward``).
        values: ``[N, T]`` critic values at rollout time.
        mask: ``[N, T]``, 1 on response tokens.
        gamma: Discount ``γ``.
        lam: GAE ``λ``.

    Returns:
        ``(advantages, returns)``, both ``[N, T]`` and 0 on padding; ``returns = advantages + values``.
    """
    rewards, values = rewards.detach(), values.detach()
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values = rewards.to(dtype), values.to(dtype)
    valid = mask.bool()  # [N, T]
    advantages = torch.zeros_like(values)  # [N, T]
    next_value = values.new_zeros(values.shape[0])  # [N] value of the next valid token
    next_advantage = values.new_zeros(values.shape[0])  # [N]
    # A Python loop over T: the recursion is sequential in t, and each step is one small vector op.
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [N]
        advantage = delta + gamma * lam * next_advantage  # [N]
        advantages[:, t] = torch.where(valid[:, t], advantage, 0.0)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
    returns = torch.where(valid, advantages + values, 0.0)  # [N, T]
    return advantages, returns


def normalize_advantages(adv: Tensor, mask: Tensor, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """Whiten token advantages over the valid tokens of the batch (PPO).

    ``(A − mean) / (std + eps)`` with the masked mean and the unbiased masked std; with
    ``shift_mean=False`` only the scale is changed, ``A / (std + eps)``. The statistics are those of
    the tensors given (gather a data-parallel batch first for global statistics).

    Args:
        adv: ``[N, T]`` advantages.
        mask: ``[N, T]``, 1 on valid tokens.
        eps: Added to the std.
        shift_mean: Subtract the mean (True) or only rescale (False).

    Returns:
        ``[N, T]`` normalised advantages, 0 on padding.
    """
    adv = adv.detach()
    mask = mask.to(adv.dtype)
    mean = masked_mean(adv, mask)
    count = mask.sum()
    var = ((adv - mean).square() * mask).sum() / (count - 1).clamp_min(1.0)
    centred = adv - mean if shift_mean else adv  # [N, T]
    return centred / (var.sqrt() + eps) * mask


def kl_in_reward(rewards: Tensor, kl: Tensor, mask: Tensor, coef: float) -> Tensor:
    """Per-token rewards with a KL penalty folded in, to feed ``gae`` (the "KL in reward" variant).

    Every valid token gets ``−coef·kl_t``; the sequence reward is added on the last valid token of
    its row. Padding gets 0. (The alternative, "KL in loss", adds ``coef`` times the aggregated
    ``kl_penalty`` to the policy loss instead.)

    Args:
        rewards: ``[N]`` sequence rewards.
        kl: ``[N, T]`` per-token KL estimates (``kl_penalty``), treated as constants.
        mask: ``[N, T]``, 1 on response tokens.
        coef: KL coefficient.

    Returns:
        ``[N, T]`` token rewards. A row without valid tokens stays all 0.
    """
    valid = mask.to(kl.dtype)  # [N, T]
    token_rewards = -coef * kl.detach() * valid  # [N, T]
    positions = torch.arange(valid.shape[1], device=valid.device)  # [T]
    last = (positions * valid).argmax(-1)  # [N] index of the last valid token
    has_tokens = valid.sum(-1) > 0  # [N]
    bonus = torch.where(has_tokens, rewards.detach().to(kl.dtype), 0.0)  # [N]
    return token_rewards.scatter_add(1, last.unsqueeze(-1), bonus.unsqueeze(-1))
