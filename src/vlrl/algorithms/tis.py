"""Truncated importance sampling (TIS) for the rollout-engine / trainer log-prob mismatch.

A fast rollout engine (vLLM) and the trainer compute slightly different probabilities for the same
tokens (other kernels, precision, batching), so the samples come from ``π_engine`` while the policy
gradient is taken for ``π_trainer``. Following Yao et al. (2025, "Your efficient RL framework secretly
brings you off-policy RL training"), each token's loss is weighted by the truncated ratio

    w = min(π_trainer(token) / π_engine(token), cap)

computed with the trainer's log-probs under the weights that sampled the rollout (the "old" policy,
before this step's updates). The weights are constants (no gradient). The same call measures the
mismatch, so it can be logged whether or not the correction is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlrl.algorithms.losses import masked_mean

# Log-ratios are clamped before ``exp`` (a token the engine sampled at a near-zero trainer probability
# must not overflow); any value above log(cap) is truncated to ``cap`` anyway.
_MAX_LOG_RATIO = 20.0


@dataclass
class ImportanceCorrection:
    """What ``truncated_importance_weights`` returns: per-token weights and the mismatch figures."""

    weights: Tensor  # [N, T] min(π_trainer / π_engine, cap), 0 on padding, no gradient
    mean_abs_log_ratio: Tensor  # scalar, masked mean |log π_trainer − log π_engine|
    max_abs_log_ratio: Tensor  # scalar, the largest |log π_trainer − log π_engine| over valid tokens
    kl: Tensor  # scalar, k3 estimate of KL(π_engine ‖ π_trainer) on the engine's samples
    truncated_fraction: Tensor  # scalar, fraction of valid tokens whose ratio exceeded ``cap``


def truncated_importance_weights(
    trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float = 2.0
) -> ImportanceCorrection:
    """Per-token truncated importance weights ``min(exp(trainer − engine), cap)`` and mismatch metrics.

    Args:
        trainer_logprobs: ``[N, T]`` log-probs of the sampled tokens recomputed by the trainer with the
            weights that generated them.
        engine_logprobs: ``[N, T]`` behaviour log-probs the rollout engine reported for them.
        mask: ``[N, T]``, 1 on tokens that are trained on.
        cap: Upper bound ``C`` of the weights (> 0; 2 in the paper).

    Returns:
        An ``ImportanceCorrection``; everything is detached. ``kl`` is ``mean(ρ − 1 − log ρ)`` with
        ``ρ = π_trainer / π_engine``, the k3 estimator of KL(π_engine ‖ π_trainer) for tokens drawn from
        the engine.

    Example:
        trainer log-probs ``[log 0.5, log 0.2]``, engine ``[log 0.25, log 0.4]`` and ``cap=1.5`` give
        ratios ``[2.0, 0.5]`` and weights ``[1.5, 0.5]`` (the first truncated).
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if trainer_logprobs.shape != engine_logprobs.shape or trainer_logprobs.shape != mask.shape:
        raise ValueError(
            f"trainer_logprobs, engine_logprobs and mask must have one shape [N, T], got "
            f"{tuple(trainer_logprobs.shape)}, {tuple(engine_logprobs.shape)} and {tuple(mask.shape)}"
        )
    with torch.no_grad():
        mask = mask.to(torch.float32)
        log_ratio = (trainer_logprobs.float() - engine_logprobs.float()) * mask  # [N, T], 0 on padding
        ratio = log_ratio.clamp(max=_MAX_LOG_RATIO).exp()  # [N, T]
        weights = ratio.clamp(max=cap) * mask  # [N, T]
        valid = mask.bool()
        return ImportanceCorrection(
            weights=weights,
            mean_abs_log_ratio=masked_mean(log_ratio.abs(), mask),
            max_abs_log_ratio=log_ratio.abs()[valid].max() if valid.any() else log_ratio.new_zeros(()),
            kl=masked_mean(ratio - 1 - log_ratio.clamp(max=_MAX_LOG_RATIO), mask),  # k3, as in kl_penalty
            truncated_fraction=masked_mean((ratio > cap).float(), mask),
        )
