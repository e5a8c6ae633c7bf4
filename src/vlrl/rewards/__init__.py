"""Rewards: answer extraction, grading, reward functions and the safe runner.

- ``extract_answer``: the final answer of a response (last ``\\boxed{}``, ``<answer>``, "answer is").
- ``is_correct``: does a response's final answer equal the gold (math-verify + multiple choice)?
- reward functions (``AccuracyReward``, format rewards): callables with one protocol, see
  ``vlrl.rewards.functions``.
- ``score``: runs reward functions with a time budget and failure accounting -> ``RewardScores``.
"""

from vlrl.rewards.extract import extract_answer, extract_boxed
from vlrl.rewards.functions import (
    AccuracyReward,
    BoxedFormatReward,
    RewardFunction,
    TagFormatReward,
    ThinkFormatReward,
)
from vlrl.rewards.grading import is_correct
from vlrl.rewards.runner import RewardScores, score

__all__ = [
    "AccuracyReward",
    "BoxedFormatReward",
    "RewardFunction",
    "RewardScores",
    "TagFormatReward",
    "ThinkFormatReward",
    "extract_answer",
    "extract_boxed",
    "is_correct",
    "score",
]
