"""The shared algorithm core: advantages, losses, KL estimators, aggregation and token log-probs.

Pure functions on tensors, no configuration objects; every method composes them in its
``training_step``. The numbers they produce are pinned down by hand-worked tests.
"""

from vlrl.algorithms.advantages import gae, group_advantages, kl_in_reward, normalize_advantages, zero_advantage
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
    policy_loss,
    policy_objective,
    value_clip_fraction,
    value_loss,
)
from vlrl.algorithms.tis import ImportanceCorrection, truncated_importance_weights

__all__ = [
    "AggregationMode",
    "ImportanceCorrection",
    "KLEstimator",
    "PolicyLossOutput",
    "PolicyObjective",
    "PolicyTerm",
    "aggregate_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_in_reward",
    "kl_penalty",
    "masked_mean",
    "normalize_advantages",
    "policy_loss",
    "policy_objective",
    "token_logprobs",
    "truncated_importance_weights",
    "value_clip_fraction",
    "value_loss",
    "zero_advantage",
]
