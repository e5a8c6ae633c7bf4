"""The shared algorithm core: advantages, losses, KL estimators, aggregation and token log-probs, and the
2026 family composed from them (GSPO, CISPO, DAPO's overlong handling, REINFORCE++, the off-policy mask).

Pure functions on tensors, no configuration objects; every method composes them in its
``training_step``. The numbers they produce are pinned down by hand-worked tests.
"""

from vlrl.algorithms.advantages import (
    batch_advantages,
    gae,
    group_advantages,
    kl_in_reward,
    normalize_advantages,
    zero_advantage,
)
from vlrl.algorithms.logprobs import token_logprobs
from vlrl.algorithms.losses import (
    AggregationMode,
    KLEstimator,
    PolicyLossOutput,
    PolicyObjective,
    PolicyTerm,
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    off_policy_sequence_mask,
    policy_loss,
    policy_objective,
    value_clip_fraction,
    value_loss,
)
from vlrl.algorithms.overlong import overlong_filter, soft_overlong_penalty
from vlrl.algorithms.policy_terms import cispo_loss, gspo_loss
from vlrl.algorithms.tis import ImportanceCorrection, truncated_importance_weights

__all__ = [
    "AggregationMode",
    "ImportanceCorrection",
    "KLEstimator",
    "PolicyLossOutput",
    "PolicyObjective",
    "PolicyTerm",
    "aggregate_loss",
    "batch_advantages",
    "cispo_loss",
    "entropy_from_logits",
    "gae",
    "gspo_loss",
    "group_advantages",
    "kl_in_reward",
    "kl_penalty",
    "masked_mean",
    "normalize_advantages",
    "off_policy_sequence_mask",
    "overlong_filter",
    "policy_loss",
    "policy_objective",
    "soft_overlong_penalty",
    "token_logprobs",
    "truncated_importance_weights",
    "value_clip_fraction",
    "value_loss",
    "zero_advantage",
]
