"""Per-token losses, KL estimators and loss aggregation.

Every loss here returns an un-aggregated ``[N, T]`` tensor (0 on padding); ``aggregate_loss`` turns
it into the scalar that is back-propagated. Keeping the two apart lets one aggregation rule serve
the policy loss, the value loss and the KL term, and makes the gradient-accumulation arithmetic
explicit in a single place.

``policy_objective`` is the one loss path of the RL methods (GRPO and its family, PPO): a policy term
(``policy_loss``, the PPO clip, or any other ``PolicyTerm``), optional per-token importance weights,
an optional KL to a reference, an optional entropy bonus, then the aggregation. A new loss variant
(e.g. GSPO's sequence ratio) is a new ``PolicyTerm`` function handed to it; the rest is shared.

Conventions: ``N`` samples, ``T`` response tokens (right-padded); ``mask`` is 1 on trained tokens
and 0 elsewhere (float or bool).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vlrl.algorithms.logprobs import chunk_grid

# Log-ratios are clamped to this range before ``exp`` so a stale or replayed sample cannot overflow
# the ratio to ``inf`` (e^20 ≈ 4.9e8 is already far outside any clip range).
_MAX_LOG_RATIO = 20.0

AggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3", "k3+"]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    Args:
        x: Values, any shape.
        mask: Same shape as ``x``; 1 (or a positive weight) where ``x`` counts, 0 elsewhere.
        dim: Reduce over this dimension only; ``None`` reduces over everything.

    Returns:
        The masked mean (a scalar, or ``x`` with ``dim`` removed). An empty mask gives 0, not NaN.
    """
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    # Where the mask is empty the numerator is exactly 0, so dividing by a tiny count yields 0
    # (and a zero gradient) instead of NaN.
    return total / count.clamp_min(torch.finfo(x.dtype).tiny)


@dataclass
class PolicyLossOutput:
    """What ``policy_loss`` returns: the per-token loss and the metrics computed alongside it."""

    per_token: Tensor  # [N, T] un-aggregated loss, 0 on padding
    ratio: Tensor  # [N, T] importance ratio π_θ / π_old (detached)
    clip_fraction: Tensor  # scalar, fraction of valid tokens whose gradient a clip cut off
    dual_clip_fraction: Tensor  # scalar, the part of ``clip_fraction`` due to the dual clip
    approx_kl: Tensor  # scalar, k3 estimate of KL(π_old ‖ π_θ), masked mean (detached)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate loss per token, with asymmetric clip range and optional dual clip.

    With ``ρ = exp(logprobs − old_logprobs)`` the loss of a token is
    ``max(−A·ρ, −A·clip(ρ, 1 − eps_low, 1 + eps_high))``, and with a dual clip ``c`` tokens with
    ``A < 0`` are further capped: ``min(that, −A·c)`` (Ye et al., 2020), which bounds the loss of a
    sample whose ratio has grown very large.

    Args:
        logprobs: ``[N, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logprobs: ``[N, T]`` log-probs under the behaviour policy that produced the samples.
        advantages: ``[N]`` (one per sequence, broadcast over tokens) or ``[N, T]``.
        mask: ``[N, T]``, 1 on trained tokens.
        eps_low: Lower clip range, the ratio is clipped at ``1 − eps_low``.
        eps_high: Upper clip range, the ratio is clipped at ``1 + eps_high`` (VL-Rethinker: 0.35).
        dual_clip: Dual-clip constant ``c > 1``; ``None`` switches it off.

    Returns:
        A ``PolicyLossOutput``. ``clip_fraction`` counts every valid token whose gradient is zero
        because of clipping: the ordinary clip (the clipped term is strictly the larger) or the dual
        clip (the cap is strictly the smaller); ``dual_clip_fraction`` counts the latter alone.
        ``approx_kl`` is ``mean(ρ − 1 − log ρ)``, the k3 estimator of KL(π_old ‖ π_θ) for tokens
        sampled from π_old.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got eps_low={eps_low}, eps_high={eps_high}.")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {dual_clip}.")
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [N, 1]
    advantages = advantages.to(logprobs.dtype)

    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [N, T]
    ratio = log_ratio.exp()  # [N, T]
    unclipped = -advantages * ratio  # [N, T]
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    loss = torch.maximum(unclipped, clipped)  # [N, T]
    is_clipped = clipped > unclipped  # [N, T]

    is_dual_clipped = torch.zeros_like(is_clipped)  # [N, T]
    if dual_clip is not None:
        cap = -advantages * dual_clip  # [N, 1] or [N, T]
        is_dual_clipped = (advantages < 0) & (cap < loss)  # [N, T]
        loss = torch.where(is_dual_clipped, cap.expand_as(loss), loss)  # [N, T]

    with torch.no_grad():
        clip_fraction = masked_mean((is_clipped | is_dual_clipped).to(mask.dtype), mask)
        dual_clip_fraction = masked_mean(is_dual_clipped.to(mask.dtype), mask)
        approx_kl = masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask)

    return PolicyLossOutput(
        per_token=loss * mask,
        ratio=ratio.detach(),
        clip_fraction=clip_fraction,
        dual_clip_fraction=dual_clip_fraction,
        approx_kl=approx_kl,
    )


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of tokens sampled from π.

    With ``d = logprobs − ref_logprobs`` (Schulman, "Approximating KL divergence"):
    ``k1 = d`` (unbiased, can be negative), ``k2 = ½·d²`` (biased, low variance),
    ``k3 = exp(−d) + d − 1`` (unbiased, always >= 0, low variance). ``k3+`` has the value of ``k3`` and
    the gradient of ``k2`` (straight-through, ``sg(k3) + k2 − sg(k2)``): ``∇k2 = d·∇log π``, whose
    expectation over samples of π is the gradient of KL(π ‖ π_ref), where ``∇k3 = (1 − e^{−d})·∇log π`` is not.

    Args:
        logprobs: ``[N, T]`` log-probs under π (the policy the tokens were sampled from).
        ref_logprobs: ``[N, T]`` log-probs of the same tokens under the reference policy.
        estimator: Which estimator to use.

    Returns:
        ``[N, T]`` per-token estimates (padding is not masked; aggregate with a mask).
    """
    log_ratio = logprobs - ref_logprobs  # [N, T]
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator in ("k3", "k3+"):
        neg = (-log_ratio).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [N, T] ref − logp
        k3 = neg.exp() - neg - 1.0  # [N, T]
        if estimator == "k3":
            return k3
        k2 = 0.5 * log_ratio.square()  # [N, T]
        return k3.detach() + k2 - k2.detach()  # [N, T] value k3, gradient k2
    raise ValueError(f"estimator must be one of 'k1', 'k2', 'k3', 'k3+', got {estimator!r}.")


def off_policy_sequence_mask(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, delta: float
) -> Tensor:
    """Which sequences stay in the policy loss under the off-policy sequence mask (DeepSeek-V3.2, TRL).

    A sequence is dropped when its advantage is negative and the mean over its trained tokens of
    ``log π_old − log π_θ`` (a k1 estimate of KL(π_old ‖ π_θ) on its own tokens) exceeds ``delta``: the
    policy has moved far from the one that sampled it, and pushing such a sample further down mostly adds
    noise. Positive-advantage sequences always stay.

    Example: log-ratios ``log π_θ − log π_old`` of −0.3 and −0.1 give a mean of 0.2 for ``−ℓ``; with
    ``A = −1`` the sequence is dropped at ``delta = 0.1`` and kept at ``delta = 0.25``, and kept with ``A = 1``.

    Args:
        logprobs: ``[N, T]`` log-probs under the policy being trained (no gradient is taken through the mask).
        old_logprobs: ``[N, T]`` log-probs under the behaviour policy.
        advantages: ``[N]``, or ``[N, T]`` (a sequence is negative when its mean over trained tokens is).
        mask: ``[N, T]``, 1 on trained tokens.
        delta: The threshold ``δ`` (>= 0) on the mean ``−ℓ``.

    Returns:
        ``[N]`` bool, True for the sequences that stay.
    """
    if delta < 0:
        raise ValueError(f"delta must be >= 0 (the threshold on the mean log π_old − log π_θ), got {delta}.")
    with torch.no_grad():
        mask = mask.to(logprobs.dtype)
        divergence = masked_mean(old_logprobs - logprobs, mask, dim=-1)  # [N]
        seq_advantage = advantages if advantages.dim() == 1 else masked_mean(advantages.to(mask.dtype), mask, -1)
        return ~((seq_advantage.to(divergence.device) < 0) & (divergence > delta))  # [N]


PolicyTerm = Callable[[Tensor, Tensor, Tensor, Tensor], PolicyLossOutput]
"""A policy term ``(logprobs, old_logprobs, advantages, mask) -> PolicyLossOutput`` for ``policy_objective``.

``policy_loss`` (PPO clip) is one, its constants bound with ``functools.partial``:
``partial(policy_loss, eps_low=0.2, eps_high=0.28)``. A new variant (GSPO's sequence ratio, CISPO's clipped
weight) is another function of this signature whose ``per_token`` is its loss per token (0 on padding) and
whose ``ratio`` / ``clip_fraction`` / ``approx_kl`` are its own measures of the same things.
"""


@dataclass
class PolicyObjective:
    """What ``policy_objective`` returns: the scalar to back-propagate and its metrics (detached scalars)."""

    loss: Tensor  # scalar, the aggregated loss (carries the gradient)
    policy_loss: Tensor  # scalar, masked mean of the (importance-weighted) policy term per token
    clip_fraction: Tensor  # scalar, fraction of trained tokens whose gradient a clip cut off
    dual_clip_fraction: Tensor  # scalar, the part of ``clip_fraction`` due to the dual clip
    ratio_mean: Tensor  # scalar, masked mean of the ratio π_θ / π_old
    approx_kl: Tensor  # scalar, k3 estimate of KL(π_old ‖ π_θ)
    kl_ref: Tensor | None  # scalar, masked mean of the KL estimate to the reference; None without a reference
    entropy: Tensor | None  # scalar, masked mean entropy; None without entropies
    off_policy_masked: Tensor | None = None  # scalar, fraction of non-empty sequences the off-policy mask dropped

    def metrics(self, prefix: str = "update") -> dict[str, Tensor]:
        """The figures named ``{prefix}/policy_loss``, ``clip_frac``, ``dual_clip_frac``, ``ratio_mean``,
        ``approx_kl``, and ``kl_ref`` / ``entropy`` / ``off_policy_masked_frac`` when they were measured."""
        figures = {
            "policy_loss": self.policy_loss,
            "clip_frac": self.clip_fraction,
            "dual_clip_frac": self.dual_clip_fraction,
            "ratio_mean": self.ratio_mean,
            "approx_kl": self.approx_kl,
            "kl_ref": self.kl_ref,
            "entropy": self.entropy,
            "off_policy_masked_frac": self.off_policy_masked,
        }
        return {f"{prefix}/{name}": value for name, value in figures.items() if value is not None}


def policy_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    policy_term: PolicyTerm = policy_loss,
    is_weights: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    mode: AggregationMode = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    max_len: int | None = None,
    off_policy_delta: float | None = None,
) -> PolicyObjective:
    """The loss of one micro-batch of an RL policy update, and its metrics.

    Per token, ``L = M·w·policy_term + kl_coef·KL(π_θ ‖ π_ref) − entropy_coef·H``, then
    ``aggregate_loss(L, mask, mode, ...)``: ``M`` is the off-policy sequence mask (1 without ``off_policy_delta``;
    the token counts of the aggregation are unchanged by it), ``w`` are the importance weights (1 without them), ``KL`` the
    ``kl_estimator`` estimate from ``kl_penalty`` (0 without a reference) and ``H`` the entropy of the
    policy's distribution at the token (with gradient when ``entropy_coef`` is not 0).

    Example (one sequence of two tokens, ratio 1, A = 1, weights 0.5 and 2, token-mean):
    ``policy_loss`` gives ``−1`` per token, weighted ``[−0.5, −2]``, loss ``−1.25``.

    Args:
        logprobs: ``[N, T]`` log-probs of the sampled tokens under the policy being trained (with gradient).
        old_logprobs: ``[N, T]`` log-probs under the behaviour policy (``π_old`` of the ratio).
        advantages: ``[N]`` (one per sequence) or ``[N, T]``.
        mask: ``[N, T]``, 1 on trained tokens.
        policy_term: The per-token policy loss (see ``PolicyTerm``); default ``policy_loss`` with its
            default clip range.
        is_weights: ``[N, T]`` per-token importance weights multiplying the policy term (truncated
            importance sampling); ``None``: no weighting. Treated as constants.
        ref_logprobs: ``[N, T]`` log-probs under the reference policy; when given the KL to it is measured
            (``kl_ref``) and, with ``kl_coef`` not 0, added to the loss.
        kl_coef: Weight of the KL term in the loss; not 0 needs ``ref_logprobs``.
        kl_estimator: ``k1``, ``k2`` or ``k3`` (see ``kl_penalty``).
        entropy: ``[N, T]`` entropies of the policy at each position; when given their mean is measured.
        entropy_coef: Weight of the entropy bonus (subtracted from the loss); not 0 needs ``entropy``.
        mode: Aggregation rule of ``aggregate_loss``.
        num_tokens: Trained tokens of the whole mini-batch on all devices (``aggregate_loss``).
        num_sequences: Sequences with a trained token in the whole mini-batch on all devices.
        max_len: Fixed length of ``seq-mean-token-sum-norm``.
        off_policy_delta: Drop the policy term of negative-advantage sequences whose mean
            ``log π_old − log π_θ`` exceeds this (``off_policy_sequence_mask``); ``None``: keep every sequence.

    Returns:
        A ``PolicyObjective``. Every input is moved to ``logprobs``' device.
    """
    device = logprobs.device
    if kl_coef and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} adds a KL to the reference, but no ref_logprobs were given")
    if entropy_coef and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} adds an entropy bonus, but no entropy was given")
    for name, value in (("is_weights", is_weights), ("ref_logprobs", ref_logprobs), ("entropy", entropy)):
        if value is not None and value.shape != logprobs.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, logprobs {tuple(logprobs.shape)}: give one per token"
            )
    mask = mask.to(device)  # [N, T]
    out = policy_term(logprobs, old_logprobs.to(device), advantages.to(device), mask)
    per_token = out.per_token  # [N, T]
    if is_weights is not None:
        per_token = per_token * is_weights.to(device)  # [N, T]
    off_policy_masked = None
    if off_policy_delta is not None:
        keep = off_policy_sequence_mask(
            logprobs, old_logprobs.to(device), advantages.to(device), mask, off_policy_delta
        )
        per_token = per_token * keep.unsqueeze(-1).to(per_token.dtype)  # [N, T]
        non_empty = mask.sum(-1) > 0  # [N]
        off_policy_masked = (~keep & non_empty).sum().to(per_token.dtype) / non_empty.sum().clamp_min(1)
    policy_mean = masked_mean(per_token.detach(), mask)
    kl_ref = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs.to(device), kl_estimator)  # [N, T]
        kl_ref = masked_mean(kl.detach(), mask)
        if kl_coef:
            per_token = per_token + kl_coef * kl  # [N, T]
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy  # [N, T]
    loss = aggregate_loss(per_token, mask, mode, num_tokens=num_tokens, num_sequences=num_sequences, max_len=max_len)
    return PolicyObjective(
        loss=loss,
        policy_loss=policy_mean,
        clip_fraction=out.clip_fraction,
        dual_clip_fraction=out.dual_clip_fraction,
        ratio_mean=masked_mean(out.ratio.detach(), mask),
        approx_kl=out.approx_kl,
        kl_ref=kl_ref,
        entropy=None if entropy is None else masked_mean(entropy.detach(), mask),
        off_policy_masked=off_policy_masked,
    )


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
) -> Tensor:
    """Clipped value loss per token: ``½·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)``.

    Without clipping (``clip_eps=None``) it is ``½·(V − R)²``. Aggregate the result with
    ``aggregate_loss``; ``value_clip_fraction`` gives the matching metric.

    Args:
        values: ``[N, T]`` critic values being trained.
        old_values: ``[N, T]`` critic values at rollout time.
        returns: ``[N, T]`` regression targets (GAE returns).
        mask: ``[N, T]``, 1 on trained tokens.
        clip_eps: Value clip range ``ε``; ``None`` disables clipping.

    Returns:
        ``[N, T]`` per-token loss, 0 on padding.
    """
    loss = (values - returns).square()  # [N, T]
    if clip_eps is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # [N, T]
        loss = torch.maximum(loss, (clipped_values - returns).square())  # [N, T]
    return 0.5 * loss * mask.to(loss.dtype)


@torch.no_grad()
def value_clip_fraction(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float) -> Tensor:
    """Fraction of valid tokens where the clipped term of ``value_loss`` is strictly the larger.

    On those tokens the value loss has no gradient. Arguments as in ``value_loss``.

    Returns:
        A scalar in ``[0, 1]``.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # [N, T]
    is_clipped = (clipped_values - returns).square() > (values - returns).square()  # [N, T]
    return masked_mean(is_clipped.to(values.dtype), mask)


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: AggregationMode = "token-mean",
    *,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce a ``[N, T]`` per-token loss to the scalar that is back-propagated.

    Modes (``L`` = per-token loss, ``m`` = mask, ``i`` sequences, ``t`` tokens):

    - ``"token-mean"``: ``Σ_i Σ_t L·m / num_tokens`` — every response token of the update batch
      weighs the same, whatever the length of its sequence.
    - ``"seq-mean-token-mean"``: ``Σ_i (Σ_t L·m / Σ_t m) / num_sequences``.
    - ``"seq-mean-token-sum"``: ``Σ_i (Σ_t L·m) / num_sequences``.
    - ``"seq-mean-token-sum-norm"`` (Dr. GRPO): ``Σ_i (Σ_t L·m / max_len) / num_sequences`` — a
      fixed length instead of each sequence's token count, so no length bias.

    In the ``seq-mean`` modes ``i`` runs over the non-empty sequences (at least one token with
    ``m = 1``) and ``num_sequences`` counts those: a sequence with no trained token adds 0 to the sum
    and does not dilute the mean.

    **Gradient accumulation and data parallelism.** To obtain exactly the loss (and gradient) of the
    whole update batch when it is split into micro-batches and devices, the caller:

    1. Once per optimizer step, before the first micro-batch, counts the valid tokens of *all* its
       micro-batches (``num_tokens``; for the ``seq-mean`` modes the non-empty sequences,
       ``num_sequences``) and all-reduces (sums) that count over the data-parallel devices.
    2. Calls ``aggregate_loss(..., num_tokens=global_count)`` on every micro-batch: each returns its
       share ``Σ L·m / global_count``, so the shares of all micro-batches on all devices sum to the
       full-batch mean.
    3. Multiplies each micro-batch loss by the data-parallel world size before ``backward``, because
       DDP/FSDP *average* gradients over devices where the shares must be *summed*. If the training
       loop itself divides the loss by the number of accumulation steps (Lightning's automatic
       optimisation with ``accumulate_grad_batches=k`` does), multiply by ``k`` as well, or use
       manual optimisation.

    Without ``num_tokens`` / ``num_sequences`` the local counts of this call are used, i.e. the mean
    of this micro-batch alone.

    Args:
        per_token: ``[N, T]`` per-token loss.
        mask: ``[N, T]``, 1 on trained tokens.
        mode: Aggregation rule, see above.
        num_tokens: Global valid-token count for ``"token-mean"``; ``None`` uses ``mask.sum()``.
        num_sequences: Global count of sequences with at least one valid token for the
            ``seq-mean`` modes; ``None`` uses the local count.
        max_len: The fixed length of ``"seq-mean-token-sum-norm"`` (e.g. the maximum response
            length of the rollout); required by that mode only.

    Returns:
        A scalar tensor. An empty mask with no global count gives 0.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask  # [N, T]
    if mode == "token-mean":
        count = mask.sum() if num_tokens is None else num_tokens
        return masked.sum() / _positive(count, masked)

    token_counts = mask.sum(-1)  # [N] trained tokens per sequence; 0 for an empty one
    seq_sums = masked.sum(-1)  # [N]
    if mode == "seq-mean-token-mean":
        seq_losses = seq_sums / token_counts.clamp_min(1.0)  # [N] an empty sequence gives 0
    elif mode == "seq-mean-token-sum":
        seq_losses = seq_sums  # [N]
    elif mode == "seq-mean-token-sum-norm":
        if max_len is None or max_len <= 0:
            raise ValueError(
                f"mode='seq-mean-token-sum-norm' needs a positive max_len (e.g. the maximum response "
                f"length), got max_len={max_len}."
            )
        seq_losses = seq_sums / max_len  # [N]
    else:
        raise ValueError(
            f"mode must be one of 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum', "
            f"'seq-mean-token-sum-norm', got {mode!r}."
        )
    count = (token_counts > 0).sum() if num_sequences is None else num_sequences  # non-empty sequences
    return seq_losses.sum() / _positive(count, seq_losses)


def _positive(count: float | Tensor, like: Tensor) -> Tensor:
    """``count`` as a tensor on ``like``'s device; a zero count becomes 1 so an empty batch gives 0."""
    count = torch.as_tensor(count, dtype=like.dtype, device=like.device).detach()
    return torch.where(count > 0, count, torch.ones_like(count))


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, *, chunk_size: int = 1024) -> Tensor:
    """Entropy of the categorical distribution given by ``logits``, in float32.

    Computed as ``−Σ p·log p`` with ``log p = log_softmax(logits)``, which never exponentiates a
    large logit; ``−inf`` logits (masked vocabulary entries) contribute 0.

    When no gradient is needed (the entropy is only a metric) it runs over ``chunk_size`` positions
    at a time, in place on one float32 chunk, so its extra memory is ``chunk_size × V`` floats rather
    than several copies of ``logits``. Under autograd it keeps the differentiable full-size form.

    Args:
        logits: ``[..., V]`` unnormalised scores.
        temperature: The distribution is ``softmax(logits / temperature)``; dividing here, chunk by
            chunk, spares the caller a full-size float32 copy of ``logits``.
        chunk_size: About how many positions the no-gradient path takes at once; the result does not
            depend on it.

    Returns:
        ``[...]`` entropies in nats.
    """
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size} and {temperature}.")
    if torch.is_grad_enabled() and logits.requires_grad:
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [..., V]
        # Clamping −inf log-probs to the most negative float keeps 0·log 0 at 0 (and its gradient finite).
        logp = logp.clamp_min(torch.finfo(logp.dtype).min)  # [..., V]
        return -(logp.exp() * logp).sum(-1)
    x = logits.detach()
    x = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])  # [N, T, V]; a slice of model outputs stays a view
    out = torch.empty(x.shape[:-1], dtype=torch.float32, device=logits.device)  # [N, T]
    for rows, cols in chunk_grid(x.shape[0], x.shape[1], chunk_size):
        z = x[rows, cols].float()  # [n, t, V]
        logp = torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)  # [n, t, V]
        logp.clamp_min_(torch.finfo(torch.float32).min)
        out[rows, cols] = -logp.exp().mul_(logp).sum(-1)
    return out.reshape(logits.shape[:-1])
