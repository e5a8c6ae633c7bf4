"""VL-Rethinker's reward terms besides accuracy: the invalid-response penalty and the native-wait bonus.

VL-Rethinker (arXiv 2504.08837) rewards a response with its accuracy, except that an *invalid*
response (truncated, i.e. no EOS; no complete ``\\boxed{}``; or more than 5 occurrences of "wait")
scores -0.1. Its released code also scores a valid, correct response that says "wait" once or twice
of its own accord 1.1. The runner sums weighted reward terms, so both are written as terms to list
after ``AccuracyReward`` (weight 1, default ``truncated_score=0``; the paper grades the last
``\\boxed{}`` only, so both terms take ``boxed_only: true``)::

    rewards:
      - class_path: vlrl.rewards.AccuracyReward          # 1 if the last \boxed{} is right
        init_args: {boxed_only: true}
      - class_path: vlrl.rewards.InvalidResponsePenalty   # invalid: -0.1 - accuracy, valid: 0
        init_args: {boxed_only: true}
      - class_path: vlrl.rewards.NativeWaitBonus          # optional: 1 if valid, correct, 1-2 native waits
        init_args: {weight: 0.1}

    total = accuracy + penalty + 0.1 * bonus
          = -0.1 for an invalid response, 1.1 for a correct one with 1-2 native waits, else accuracy

The penalty cancels the accuracy of an invalid response (without ``boxed_only``, a response without
``\\boxed{}`` may still be graded correct from "the answer is ..."), so the total of an invalid
response is exactly the penalty. Both terms define which responses are correct
(``RewardFunction.correct``): the penalty's correct ones are valid and right, so forced rethinking
keeps no sample that would score the penalty. "Native" waits are the ones the model wrote: when a method passes each sample's forced
rethinking trigger (the fact ``facts["rethink_trigger"]``, see ``vlrl.callbacks.ForcedRethinking``),
the waits of the trigger are not counted; without it every "wait" of the text counts.
"""

from __future__ import annotations

import math
import re
from typing import Any

from vlrl.rewards.extract import extract_boxed
from vlrl.rewards.functions import AccuracyReward, RewardFunction
from vlrl.rewards.grading import is_correct

__all__ = ["InvalidResponsePenalty", "NativeWaitBonus", "count_waits", "invalid_reason"]

_WAIT = re.compile(r"\bwait\b", re.IGNORECASE)


def count_waits(text: str) -> int:
    """How many times ``text`` says the word "wait" (any case).

    Example:
        >>> count_waits("Wait, is it 3? wait... WAIT. Awaited.")
        3
    """
    return len(_WAIT.findall(text))


def invalid_reason(text: str, finish_reason: str, max_waits: int = 5) -> str | None:
    """Why a response is invalid (``truncated``, ``no_boxed``, ``too_many_waits``), or None if it is valid.

    Example:
        >>> invalid_reason(r"so \\boxed{2}", "stop"), invalid_reason(r"so \\boxed{2}", "length")
        (None, 'truncated')
    """
    if finish_reason != "stop":
        return "truncated"
    if not extract_boxed(text):
        return "no_boxed"
    if count_waits(text) > max_waits:
        return "too_many_waits"
    return None


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: give a whole number >= 0")


class InvalidResponsePenalty(RewardFunction):
    """Makes the total reward of an invalid response ``penalty`` (VL-Rethinker: -0.1).

    A response is invalid if it was truncated (no EOS), has no complete ``\\boxed{}``, or says
    "wait" more than ``max_waits`` times. The term scores ``penalty - accuracy_weight * accuracy``
    for an invalid response (accuracy graded as ``AccuracyReward(truncated_score=0,
    boxed_only=boxed_only)`` does) and 0 for a valid one, so that summed with that
    ``AccuracyReward`` of weight ``accuracy_weight`` (and this term at weight 1) the total is exactly
    ``penalty``. A response is correct by this term (``correct``) if it is valid and right.

    Args:
        penalty: Total reward of an invalid response.
        max_waits: More occurrences of "wait" than this make a response invalid.
        accuracy_weight: Weight of the ``AccuracyReward`` this term is summed with.
        boxed_only: ``boxed_only`` of the ``AccuracyReward`` this term is summed with.
        name: see ``RewardFunction``.
        weight: see ``RewardFunction``; keep 1 for the total above.

    Example:
        >>> term = InvalidResponsePenalty()
        >>> term([r"\\boxed{4}", "The answer is 4.", r"\\boxed{4}"], answers=["4"] * 3,
        ...      choices=[None] * 3, finish_reasons=["stop", "stop", "length"])
        [0.0, -1.1, -0.1]
        >>> InvalidResponsePenalty(boxed_only=True)(["The answer is 4."], answers=["4"], choices=[None],
        ...                                         finish_reasons=["stop"])
        [-0.1]
    """

    def __init__(
        self,
        penalty: float = -0.1,
        max_waits: int = 5,
        accuracy_weight: float = 1.0,
        boxed_only: bool = False,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        self.accuracy = AccuracyReward(truncated_score=0.0, boxed_only=boxed_only)  # what it cancels
        for key, value in (("penalty", penalty), ("accuracy_weight", accuracy_weight)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{key}={value!r}: give a finite number such as {-0.1 if key == 'penalty' else 1.0}")
        _check_count("max_waits", max_waits)
        self.penalty = float(penalty)
        self.max_waits = max_waits
        self.accuracy_weight = float(accuracy_weight)

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[float]:
        invalid = [
            j
            for j, (text, reason) in enumerate(zip(completions, finish_reasons, strict=True))
            if invalid_reason(text, reason, self.max_waits) is not None
        ]
        accuracy = self.accuracy(  # graded for the invalid responses only
            [completions[j] for j in invalid],
            answers=[answers[j] for j in invalid],
            choices=[choices[j] for j in invalid],
            finish_reasons=[finish_reasons[j] for j in invalid],
        )
        scores = [0.0] * len(completions)
        for j, acc in zip(invalid, accuracy, strict=True):
            scores[j] = self.penalty - self.accuracy_weight * acc
        return scores

    def correct(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[bool]:
        """Valid and graded right (a valid response has a ``\\boxed{}``, so ``boxed_only`` changes nothing here)."""
        return [
            invalid_reason(text, reason, self.max_waits) is None and is_correct(text, answer, options)
            for text, answer, options, reason in zip(completions, answers, choices, finish_reasons, strict=True)
        ]


class NativeWaitBonus(RewardFunction):
    """1.0 for a valid, correct response with ``min_waits`` to ``max_waits`` native "wait"s, else 0.0.

    With weight 0.1 next to ``AccuracyReward`` such a response totals 1.1 (VL-Rethinker's released
    code). Waits of a forced-rethinking trigger are not native: each sample's trigger text in
    ``facts["rethink_trigger"]`` (``""`` or None for samples without one) is left out of the count.

    Args:
        min_waits: Fewest native waits that earn the bonus.
        max_waits: Most native waits that earn the bonus.
        max_total_waits: Validity bound of ``InvalidResponsePenalty`` (more waits in the whole
            text make the response invalid, and invalid responses earn no bonus).
        name: see ``RewardFunction``.
        weight: see ``RewardFunction``; 0.1 in VL-Rethinker.

    Example:
        >>> bonus = NativeWaitBonus(weight=0.1)
        >>> bonus([r"3? Wait, no: \\boxed{4}", r"Wait. \\boxed{4}", r"\\boxed{4}"], answers=["4"] * 3,
        ...       choices=[None] * 3, finish_reasons=["stop"] * 3, facts={"rethink_trigger": ["", "Wait.", ""]})
        [1.0, 0.0, 0.0]
    """

    def __init__(
        self,
        min_waits: int = 1,
        max_waits: int = 2,
        max_total_waits: int = 5,
        name: str | None = None,
        weight: float = 0.1,
    ) -> None:
        super().__init__(name, weight)
        for key, value in (("min_waits", min_waits), ("max_waits", max_waits), ("max_total_waits", max_total_waits)):
            _check_count(key, value)
        if min_waits > max_waits:
            raise ValueError(f"min_waits={min_waits} is above max_waits={max_waits}; swap them")
        self.min_waits, self.max_waits, self.max_total_waits = min_waits, max_waits, max_total_waits

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        facts: dict[str, list[Any]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        triggers = (facts or {}).get("rethink_trigger") or [None] * len(completions)
        scores = []
        for text, answer, options, reason, trigger in zip(
            completions, answers, choices, finish_reasons, triggers, strict=True
        ):
            native = count_waits(text) - count_waits(trigger or "")
            earns = (
                self.min_waits <= native <= self.max_waits
                and invalid_reason(text, reason, self.max_total_waits) is None
                and is_correct(text, answer, options)
            )
            scores.append(float(earns))
        return scores
