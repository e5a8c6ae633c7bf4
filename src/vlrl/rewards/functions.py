"""Reward functions: plain callables that score a batch of completions.

Every reward follows one call protocol, so the runner (``vlrl.rewards.runner.score``) and the
methods treat them alike::

    reward(completions, *, answers, choices, finish_reasons, **kwargs) -> list[float]

``completions`` are the N decoded responses; ``answers``/``choices`` the gold answer and the
option texts (None for free-form) of each sample's prompt; ``finish_reasons`` is ``"stop"`` or
``"length"`` per sample. The runner also passes, and rewards that don't need them ignore through
``**kwargs``: ``data_sources``, ``questions`` (raw question texts), ``images`` (each prompt's
images), each a list per sample or None, and ``facts``, what callbacks know about each sample
(``Rollout.facts``: name -> a list per sample, e.g. ``facts["rethink_trigger"]``), always this one
dict, never spread into the other keywords. Each reward has a ``name`` (its key in
metrics) and a ``weight`` (its factor in the total); both are constructor arguments, so a YAML
config names a reward by ``class_path`` and sets them under ``init_args``.

A reward may also say which completions it counts as *correct* (``RewardFunction.correct``, same
arguments, a bool per completion or None when the reward has no such notion). ``correct_by_rewards``
asks every reward of a method, so that a callback deciding on correctness (``ForcedRethinking``)
judges as the method's reward does: a rethought sample it keeps as correct is scored as correct.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

from vlrl.rewards.extract import extract_boxed
from vlrl.rewards.grading import is_correct

__all__ = [
    "RewardUnavailable",
    "RewardFunction",
    "AccuracyReward",
    "ThinkFormatReward",
    "BoxedFormatReward",
    "TagFormatReward",
    "correct_by_rewards",
    "reward_kwargs",
]


def _snake_case(name: str) -> str:
    """``AccuracyReward`` -> ``accuracy``: the class name in snake_case without the ``Reward`` suffix."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.removesuffix("Reward") or name).lower()


class RewardUnavailable(RuntimeError):
    """A reward cannot be computed at all right now (its server stayed down past the outage budget).

    Unlike any other exception of a reward, the runner does not score it as a failure (training on
    rewards that silently became 0): it re-raises, so the step stops and the run can checkpoint.
    """


class RewardFunction:
    """Base of the reward callables: holds ``name`` and ``weight`` and validates them.

    Subclasses implement ``__call__`` with the protocol of this module's docstring, and say where the
    reward runner calls them with the class attribute ``isolation``:

    - ``"process"`` (the default): in a worker process of the runner (``vlrl.rewards.runner``), so that
      a call past the time budget is stopped and a CPU-bound one does not slow training. For
      pure-Python rewards: the reward is pickled for each call (keep it small, no model), gets
      ``images=None`` (pixels are not copied between processes), and changes it makes to its own
      attributes stay in the worker.
    - ``"thread"``: in a thread of the trainer, for rewards that hold a model, a GPU or a client
      (``JudgeReward``); a hung call can only be abandoned. A subclass that defines ``setup`` (to
      load a model) is ``"thread"`` unless its class body sets ``isolation`` itself.

    Args:
        name: key of this reward in metrics and in ``RewardScores.components``; defaults to the
            snake_case class name (``AccuracyReward`` -> ``accuracy``).
        weight: factor of this reward in the total reward.
    """

    isolation: ClassVar[Literal["process", "thread"]] = "process"

    @property
    def min_time_budget_s(self) -> float:
        """The least time one call must be given, whatever the runner's ``time_budget_s`` (default 0).

        A reward backed by a server that rides out outages (``JudgeReward``) needs its backend's
        outage budget: cut short, it would score 0 while the server restarts.
        """
        return 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "setup" in vars(cls) and "isolation" not in vars(cls):
            cls.isolation = "thread"  # it loads a model: never pickled into a worker
        if cls.isolation not in ("process", "thread"):
            raise ValueError(f"{cls.__name__}.isolation={cls.isolation!r} must be 'process' or 'thread'")

    def __init__(self, name: str | None = None, weight: float = 1.0) -> None:
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"name={name!r}: give a non-empty string, or leave it unset")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"weight={weight!r}: give a finite number such as 1.0")
        self.name = name or _snake_case(type(self).__name__)
        self.weight = float(weight)

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[float]:
        raise NotImplementedError

    def correct(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[bool] | None:
        """Which completions this reward counts as correct; None (the default) if it has no notion of correct.

        Takes the arguments of ``__call__``. A reward that grades answers (``AccuracyReward``) or that
        can rule a response out (``InvalidResponsePenalty``) overrides it; see ``correct_by_rewards``.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


class AccuracyReward(RewardFunction):
    """1.0 if the final answer equals the gold answer (``vlrl.rewards.grading.is_correct``), else 0.0.

    The final answer is read as ``vlrl.rewards.extract_answer`` reads it: the last ``\\boxed{}``, else
    an ``<answer>`` tag, an "the answer is ..." phrase or a lone option letter on a line. With
    ``boxed_only`` only the last complete ``\\boxed{}`` counts and a response without one scores 0,
    as in VL-Rethinker and Open Vision Reasoner ("So the answer is 12." is then wrong).

    Args:
        truncated_score: score of a response cut off by the length limit (finish reason
            ``"length"``); None grades it like any other response.
        boxed_only: grade only the content of the last complete ``\\boxed{}`` (strict extraction).
        name: see ``RewardFunction``.
        weight: see ``RewardFunction``.

    Example:
        >>> reward = AccuracyReward()
        >>> reward([r"so \\boxed{\\frac{1}{2}}", r"\\boxed{3}", r"\\boxed{0.5} and then", "the answer is 0.5"],
        ...        answers=["0.5"] * 4, choices=[None] * 4, finish_reasons=["stop", "stop", "length", "stop"])
        [1.0, 0.0, 0.0, 1.0]
        >>> AccuracyReward(boxed_only=True)(["the answer is 0.5"], answers=["0.5"], choices=[None],
        ...                                 finish_reasons=["stop"])
        [0.0]
    """

    def __init__(
        self,
        truncated_score: float | None = 0.0,
        boxed_only: bool = False,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        if truncated_score is not None and not math.isfinite(truncated_score):
            raise ValueError(f"truncated_score={truncated_score!r}: give a finite number or None")
        if not isinstance(boxed_only, bool):
            raise ValueError(f"boxed_only={boxed_only!r}: give true or false")
        self.truncated_score = truncated_score
        self.boxed_only = boxed_only

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[float]:
        scores = []
        for completion, answer, options, reason in zip(completions, answers, choices, finish_reasons, strict=True):
            if reason == "length" and self.truncated_score is not None:
                scores.append(float(self.truncated_score))
            else:
                scores.append(float(self.graded(completion, answer, options)))
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
        """Graded correct, and not truncated unless ``truncated_score`` is None (a truncated answer is not correct)."""
        return [
            (reason != "length" or self.truncated_score is None) and self.graded(completion, answer, options)
            for completion, answer, options, reason in zip(completions, answers, choices, finish_reasons, strict=True)
        ]

    def graded(self, completion: str, answer: str, options: list[str] | None) -> bool:
        """Whether one completion's final answer is the gold ``answer``, under this reward's extraction."""
        # is_correct reads the last complete \boxed{} first, so when one is there it grades exactly that
        if self.boxed_only and not extract_boxed(completion):
            return False
        return is_correct(completion, answer, options)


class TagFormatReward(RewardFunction):
    """1.0 if the completion matches a regular expression (searched with DOTALL), else 0.0.

    The default pattern is the ``<think>...</think><answer>...</answer>`` format of
    UnifiedReward-Think.

    Args:
        pattern: the regular expression; anchor it with ``^``/``$`` to match the whole completion.
        name: see ``RewardFunction``.
        weight: see ``RewardFunction``.

    Example:
        >>> reward = TagFormatReward()
        >>> reward(["<think>a vs b</think>\\n<answer>Image 1 is better</answer>", "Image 1"],
        ...        answers=["", ""], choices=[None, None], finish_reasons=["stop", "stop"])
        [1.0, 0.0]
    """

    def __init__(
        self,
        pattern: str = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$",
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(f"pattern={pattern!r} is not a valid regular expression: {error}") from error

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[float]:
        return [float(self.pattern.search(c) is not None) for c in completions]


class ThinkFormatReward(RewardFunction):
    """1.0 if the completion is ``<think>...</think>`` followed by a non-empty answer, else 0.0.

    Exactly one thinking block, opening the completion (leading whitespace allowed).

    Example:
        >>> reward = ThinkFormatReward()
        >>> reward(["<think>2+2</think> It is 4.", "<think>2+2</think>", "It is 4."],
        ...        answers=["4"] * 3, choices=[None] * 3, finish_reasons=["stop"] * 3)
        [1.0, 0.0, 0.0]
    """

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[float]:
        return [float(self._has_format(c)) for c in completions]

    def _has_format(self, completion: str) -> bool:
        stripped = completion.lstrip()
        if not stripped.startswith("<think>") or stripped.count("<think>") != 1:
            return False
        _, sep, tail = stripped.partition("</think>")
        return bool(sep) and "</think>" not in tail and bool(tail.strip())


class BoxedFormatReward(RewardFunction):
    """1.0 if the completion contains a complete, non-empty ``\\boxed{...}``, else 0.0.

    Example:
        >>> reward = BoxedFormatReward()
        >>> reward([r"so \\boxed{42}", r"so \\boxed{42", "so 42"],
        ...        answers=["42"] * 3, choices=[None] * 3, finish_reasons=["stop"] * 3)
        [1.0, 0.0, 0.0]
    """

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[float]:
        return [float(bool(extract_boxed(c))) for c in completions]


def reward_kwargs(
    answers: list[str],
    choices: list[list[str] | None],
    finish_reasons: list[str],
    data_sources: list[str] | None = None,
    questions: list[str] | None = None,
    images: list[list[Any]] | None = None,
    facts: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """The keywords every reward is called with (the protocol of this module): None where not given, ``facts`` ``{}``.

    Example:
        >>> sorted(reward_kwargs(["4"], [None], ["stop"], facts={"answers": ["fact"]}).items())[:3]
        [('answers', ['4']), ('choices', [None]), ('data_sources', None)]
    """
    return {
        "answers": answers,
        "choices": choices,
        "finish_reasons": finish_reasons,
        "data_sources": data_sources,
        "questions": questions,
        "images": images,
        "facts": {} if facts is None else facts,
    }


def correct_by_rewards(
    rewards: list[RewardFunction],
    completions: list[str],
    *,
    answers: list[str],
    choices: list[list[str] | None],
    finish_reasons: list[str],
    data_sources: list[str] | None = None,
    questions: list[str] | None = None,
    images: list[list[Any]] | None = None,
    facts: dict[str, list[Any]] | None = None,
) -> list[bool]:
    """Which completions a method's rewards count as correct.

    A completion is correct if every reward that has a notion of correct (``RewardFunction.correct``
    is not None) says so. With no such reward, it is correct if it ended with EOS and
    ``is_correct`` grades its answer right.

    Args:
        rewards: the method's reward functions.
        completions: the N decoded responses.
        answers: gold answer per sample.
        choices: option texts per sample (None for free-form questions).
        finish_reasons: ``"stop"`` or ``"length"`` per sample.
        data_sources: data source per sample.
        questions: raw question text per sample.
        images: the images of each sample's prompt.
        facts: what callbacks know about each sample, name -> N values (one keyword, as
            ``vlrl.rewards.score`` passes it).

    Example:
        >>> from vlrl.rewards import InvalidResponsePenalty
        >>> texts = [r"\\boxed{4}", "the answer is 4", "wait " * 6 + r"\\boxed{4}"]
        >>> kwargs = dict(answers=["4"] * 3, choices=[None] * 3, finish_reasons=["stop"] * 3)
        >>> correct_by_rewards([AccuracyReward()], texts, **kwargs)
        [True, True, True]
        >>> correct_by_rewards([AccuracyReward(boxed_only=True), InvalidResponsePenalty()], texts, **kwargs)
        [True, False, False]
    """
    call = reward_kwargs(answers, choices, finish_reasons, data_sources, questions, images, facts)
    verdicts = [v for v in (fn.correct(completions, **call) for fn in rewards) if v is not None]
    if not verdicts:
        return [
            reason == "stop" and is_correct(text, answer, options)
            for text, answer, options, reason in zip(completions, answers, choices, finish_reasons, strict=True)
        ]
    return [all(verdict) for verdict in zip(*verdicts, strict=True)]
