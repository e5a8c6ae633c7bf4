"""Policy terms beyond the PPO clip: GSPO's sequence-level ratio and CISPO's clipped, detached weight.

Each is a ``PolicyTerm`` for ``policy_objective`` (``(logprobs, old_logprobs, advantages, mask) ->
PolicyLossOutput``, constants bound with ``functools.partial``), so the importance weights, the KL to the
reference, the entropy bonus, the off-policy sequence mask and the aggregation stay the shared ones.

- GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the ratio of a sequence is the
  length-normalised ``s_i = exp(mean_t (log π_θ − log π_old))`` and the clip acts on it, per sequence.
  ``level="token"`` (GSPO-token) keeps the value ``s_i`` at every token but lets each token's gradient
  flow through its own log-prob only: ``sg(s_i) · π_θ(y_t) / sg(π_θ(y_t))``. With one advantage per
  sequence both give the same loss and the same gradient; GSPO-token differs when advantages are per token.
- CISPO (MiniMax-M1, 2025): ``−sg(min(ρ_t, max_weight)) · A · log π_θ(y_t)``; the importance weight is
  clipped and detached, so no token loses its gradient to the clip (unlike PPO, whose clipped tokens get none).

Conventions as in ``vlrl.algorithms.losses``: ``N`` samples, ``T`` response tokens (right-padded), ``mask``
1 on trained tokens; every ``per_token`` is 0 on padding.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vlrl.algorithms.losses import _MAX_LOG_RATIO, PolicyLossOutput, kl_penalty, masked_mean


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    level: Literal["sequence", "token"] = "sequence",
) -> PolicyLossOutput:
    """GSPO's clipped loss with the length-normalised sequence ratio, as a per-token tensor.

    With ``s_i = exp(Σ_t m_t·(log π_θ − log π_old) / Σ_t m_t)`` the loss of sequence ``i`` is
    ``max(−A·s_i, −A·clip(s_i, 1 − eps_low, 1 + eps_high))``, written at each of its trained tokens, so that
    the ``seq-mean-token-mean`` aggregation gives GSPO's mean over sequences. For ``level="sequence"`` the
    gradient reaches every token through ``s_i``; for ``level="token"`` the token's value is
    ``sg(s_i)·exp(log π_θ(y_t) − sg(log π_θ(y_t)))`` (the same number, the gradient of its own log-prob).

    Example (clip range [0.8, 1.2]): a sequence of two tokens with log-ratios 0.2 and 0, ``A = 1``, has
    ``s = e^0.1 = 1.1052`` and loss −1.1052 at both tokens; one token with log-ratio −0.5 and ``A = −1`` has
    ``s = e^−0.5 = 0.6065``, clipped to 0.8: loss 0.8 and no gradient.

    Args:
        logprobs: ``[N, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logprobs: ``[N, T]`` log-probs under the behaviour policy.
        advantages: ``[N]`` (one per sequence, GSPO's case) or ``[N, T]``.
        mask: ``[N, T]``, 1 on trained tokens.
        eps_low: Lower clip range of the sequence ratio (the paper: 3e-4).
        eps_high: Upper clip range of the sequence ratio (the paper: 4e-4).
        level: ``sequence`` (GSPO) or ``token`` (GSPO-token).

    Returns:
        A ``PolicyLossOutput`` whose ``ratio`` is ``s_i`` at every token of sequence ``i`` and whose
        ``clip_fraction`` counts the trained tokens of clipped sequences (``dual_clip_fraction`` is 0).
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got eps_low={eps_low}, eps_high={eps_high}.")
    if level not in ("sequence", "token"):
        raise ValueError(f"level must be 'sequence' or 'token', got {level!r}.")
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [N, 1]
    advantages = advantages.to(logprobs.dtype)
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=-1)  # [N], 0 for an empty sequence
    seq_log_ratio = seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).unsqueeze(-1)  # [N, 1]
    if level == "sequence":
        log_ratio = seq_log_ratio.expand_as(logprobs)  # [N, T], the gradient reaches all tokens of the sequence
    else:
        log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach()  # [N, T], value s_i, own gradient
    ratio = log_ratio.exp()  # [N, T]
    unclipped = -advantages * ratio  # [N, T]
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    loss = torch.maximum(unclipped, clipped)  # [N, T]
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(mask.dtype), mask)
        approx_kl = masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask)
    return PolicyLossOutput(
        per_token=loss * mask,
        ratio=ratio.detach(),
        clip_fraction=clip_fraction,
        dual_clip_fraction=torch.zeros_like(clip_fraction),
        approx_kl=approx_kl,
    )


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    max_weight: float = 1.28,
) -> PolicyLossOutput:
    """CISPO's per-token loss ``−sg(min(ρ_t, max_weight))·A·log π_θ(y_t)``, ``ρ_t = π_θ / π_old``.

    The gradient of a token is ``−min(ρ_t, max_weight)·A·∇log π_θ(y_t)``: every token keeps a gradient,
    scaled down where its ratio is above ``max_weight``. Aggregate it with ``token-mean`` (the paper's).

    Example: ``ρ = 2``, ``A = 1``, ``π_θ = 0.5``, ``max_weight = 1.5``: loss ``−1.5·log 0.5 = 1.0397``, and
    ``d loss / d log π = −1.5``.

    Args:
        logprobs: ``[N, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logprobs: ``[N, T]`` log-probs under the behaviour policy.
        advantages: ``[N]`` or ``[N, T]``.
        mask: ``[N, T]``, 1 on trained tokens.
        max_weight: The cap ``ε_max`` > 0 of the importance weight (GRPO passes ``1 + eps_high``).

    Returns:
        A ``PolicyLossOutput``; ``clip_fraction`` counts the trained tokens whose weight was capped (their
        gradient is scaled, not cut), ``dual_clip_fraction`` is 0.
    """
    if max_weight <= 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}.")
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [N, 1]
    advantages = advantages.to(logprobs.dtype)
    ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp().detach()  # [N, T]
    weight = ratio.clamp(max=max_weight)  # [N, T], a constant
    loss = -weight * advantages * logprobs  # [N, T]
    with torch.no_grad():
        clip_fraction = masked_mean((ratio > max_weight).to(mask.dtype), mask)
        approx_kl = masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask)
    return PolicyLossOutput(
        per_token=loss * mask,
        ratio=ratio,
        clip_fraction=clip_fraction,
        dual_clip_fraction=torch.zeros_like(clip_fraction),
        approx_kl=approx_kl,
    )
