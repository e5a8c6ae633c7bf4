"""Rewards: answer extraction, grading, reward functions and the safe runner.

- ``extract_answer``: the final answer of a response (last ``\\boxed{}``, ``<answer>``, "answer is").
- ``is_correct``: does a response's final answer equal the gold (math-verify + multiple choice)? Strict
  ``mode="reward"`` or ``mode="benchmark"``; ``grade_answer`` also returns the answer it read.
- reward functions (``AccuracyReward``, format rewards): callables with one protocol, see
  ``vlrl.rewards.functions``; ``reward_kwargs``: the keywords they are called with (callback facts
  arrive as the one dict ``facts``); ``correct_by_rewards``: which responses a method's rewards count
  as correct (what forced rethinking keeps).
- ``score``: runs reward functions with a time budget and failure accounting -> ``RewardScores``.
- reasoners (``HFReasoner``, ``VLLMReasoner``, ``OpenAIReasoner``: one batched ``Reasoner`` protocol)
  and ``CaptionReward``, the reasoner's graded accuracy from a caption (RACRO).
- ``ModelExtractor``: model-based answer extraction for evaluation with the benchmarks' own prompts
  (MathVista, MathVerse), cached, off by default; ``grade_with_extraction``: rules first, the model only
  where the rules read no answer.
- ``PreferenceReward`` (a pairwise judge's accuracy + format, UnifiedReward-Think) and ``JudgeReward``
  (a trained judge as the reward of another method).
"""

from vlrl.rewards.answer_extraction import ModelExtractor, grade_with_extraction
from vlrl.rewards.caption import CaptionReward, CaptionScores
from vlrl.rewards.extract import extract_answer, extract_boxed
from vlrl.rewards.functions import (
    AccuracyReward,
    BoxedFormatReward,
    RewardFunction,
    RewardUnavailable,
    TagFormatReward,
    ThinkFormatReward,
    correct_by_rewards,
    reward_kwargs,
)
from vlrl.rewards.grading import Grade, grade_answer, is_correct
from vlrl.rewards.preference import JudgeReward, PreferenceReward, answer_tag, both_orders, judged_correctly
from vlrl.rewards.reasoners import (
    HFReasoner,
    OpenAIReasoner,
    Reasoner,
    ReasonerError,
    ReasonerOutput,
    ReasonerStopped,
    ReasonerUnavailable,
    VLLMReasoner,
)
from vlrl.rewards.rethinking import InvalidResponsePenalty, NativeWaitBonus, count_waits, invalid_reason
from vlrl.rewards.runner import RewardScores, score

__all__ = [
    "AccuracyReward",
    "BoxedFormatReward",
    "CaptionReward",
    "CaptionScores",
    "Grade",
    "HFReasoner",
    "InvalidResponsePenalty",
    "JudgeReward",
    "ModelExtractor",
    "NativeWaitBonus",
    "OpenAIReasoner",
    "PreferenceReward",
    "Reasoner",
    "ReasonerError",
    "ReasonerOutput",
    "ReasonerStopped",
    "ReasonerUnavailable",
    "RewardFunction",
    "RewardScores",
    "RewardUnavailable",
    "TagFormatReward",
    "ThinkFormatReward",
    "VLLMReasoner",
    "answer_tag",
    "both_orders",
    "correct_by_rewards",
    "count_waits",
    "extract_answer",
    "extract_boxed",
    "grade_answer",
    "grade_with_extraction",
    "invalid_reason",
    "is_correct",
    "judged_correctly",
    "reward_kwargs",
    "score",
]
