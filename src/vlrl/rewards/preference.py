"""Rewards of a pairwise judge (UnifiedReward-Think), and a trained judge used as a reward.

A judgement reads ``<think>…reasoning, scores…</think>\\n<answer>Image 1 is better</answer>``.

- ``PreferenceReward`` scores a judge's own judgements in GRPO: ``accuracy + format`` where accuracy
  is 1 if the verdict inside ``<answer>`` equals the pair's label (after normalising case, spaces and
  surrounding punctuation; the released code's exact string match is brittle) and format is 1 if
  the whole output is ``<think>.*?</think>\\s*<answer>.*?</answer>`` (dot matches newlines).
- ``JudgeReward`` puts a trained judge to work for another method: it judges each response
  against the gold answer (pairwise) or scores it alone (pointwise). The judge is any reasoner
  backend (``HFReasoner`` also shows it the prompt's images), held outside the policy's module
  tree: never trained, never checkpointed.

Position bias: a judge may prefer a position rather than a candidate. ``both_orders`` scores a pair
judged twice, the second time with its candidates swapped (``vlrl.data.preference.swap_candidates``):
a pair counts as right only when both verdicts are right, and as position-consistent when the two
verdicts name the same candidate (so the named position flips with the order). A judge that always
names "Image 1" scores 0 on both, not the 50% one order gives it on a balanced set.
``JudgeReward(order_swap=True)`` pays a response only when the judge prefers it in both positions.

Verdicts are read by ``answer_tag``: the text of the last complete ``<answer>…</answer>`` (tags in
any case; of nested tags the innermost), ``None`` without one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from vlrl.data.preference import UNDERSTANDING_PROMPT, named_position, normalise_label
from vlrl.data.prompts import check_template_fields, strip_image_placeholders
from vlrl.rewards.functions import RewardFunction, TagFormatReward
from vlrl.rewards.reasoners import HFReasoner, Reasoner
from vlrl.rollout.base import Sampling

__all__ = ["JudgeReward", "OrderSwap", "PreferenceReward", "answer_tag", "both_orders", "judged_correctly"]

OPEN_TAG, CLOSE_TAG = "<answer>", "</answer>"
POINTWISE_PROMPT = (
    "You are given a question about the image and an answer to it.\n"
    "Question: {question}\n\nAnswer: {response}\n\n"
    "Judge the answer. Think it through inside <think> and </think>: evaluate its semantic accuracy, correctness "
    "and clarity. Then give one overall score from 1 to 10 inside <answer> and </answer>."
)


def answer_tag(text: str) -> str | None:
    """The verdict of a judgement: the text inside its last complete ``<answer>…</answer>``, stripped.

    That is the last opening tag that is closed, up to the nearest closing tag after it (so of nested
    tags the innermost pair counts). Tags match in any case; text outside them is ignored.

    >>> answer_tag("<think>…</think> <ANSWER> Image 2 is better. </ANSWER> thanks")
    'Image 2 is better.'
    >>> answer_tag("<answer>Image 1 is better") is None
    True
    """
    lower = text.lower()
    start = lower.rfind(OPEN_TAG)
    while start >= 0:  # the last opening tag that is closed later; its nearest closing tag
        end = lower.find(CLOSE_TAG, start)
        if end >= 0:
            return text[start + len(OPEN_TAG) : end].strip()
        start = lower.rfind(OPEN_TAG, 0, start)
    return None


def judged_correctly(judgement: str, label: str) -> bool:
    """Whether the verdict of ``judgement`` is ``label`` (both normalised, see ``normalise_label``).

    >>> judged_correctly("<think>1 wins</think><answer>image 1 is better!</answer>", "Image 1 is better")
    True
    """
    verdict = answer_tag(judgement)
    return verdict is not None and normalise_label(verdict) == normalise_label(label)


@dataclass
class OrderSwap:
    """Per pair, judged in both orders: ``correct`` both verdicts right, ``consistent`` both name one candidate."""

    correct: list[bool]
    consistent: list[bool]


def both_orders(first: list[str], second: list[str], labels: list[str]) -> OrderSwap:
    """Score pairs judged as given (``first``) and with their candidates swapped (``second``).

    ``labels`` are the pairs' labels in the given order. A pair is ``correct`` when both verdicts are
    right and ``consistent`` when they name the same candidate, i.e. position 1 in one order and
    position 2 in the other (a missing or unreadable verdict is neither).

    >>> always_first = "<think>t</think><answer>Image 1 is better</answer>"
    >>> both_orders([always_first] * 2, [always_first] * 2, ["Image 1 is better", "Image 2 is better"])
    OrderSwap(correct=[False, False], consistent=[False, False])
    >>> both_orders(["<answer>Image 2 is better</answer>"], ["<answer>Image 1 is better</answer>"], ["Image 2 is better"])
    OrderSwap(correct=[True], consistent=[True])
    """
    correct, consistent = [], []
    for one, two, label in zip(first, second, labels, strict=True):
        p1, p2 = named_position(answer_tag(one)), named_position(answer_tag(two))
        consistent.append(p1 is not None and p2 is not None and p1 != p2)
        correct.append(consistent[-1] and p1 == named_position(label))
    return OrderSwap(correct, consistent)


class PreferenceReward(RewardFunction):
    """UnifiedReward-Think's GRPO reward for its own judgements: ``accuracy + format_weight · format``.

    ``answers`` hold each pair's label ("Image 1 is better", "Answer 2 is better"), as
    ``vlrl.data.PreferencePairs`` gives them.

    Args:
        format_weight: Factor of the format term (the paper: 1).
        name: see ``RewardFunction``.
        weight: see ``RewardFunction``.

    Example:
        >>> reward = PreferenceReward()
        >>> reward(["<think>a</think>\\n<answer>Image 1 is better</answer>", "<answer>Image 1 is better</answer>",
        ...         "<think>a</think><answer>Image 2 is better</answer>"],
        ...        answers=["Image 1 is better"] * 3, choices=[None] * 3, finish_reasons=["stop"] * 3)
        [2.0, 1.0, 1.0]
    """

    def __init__(self, format_weight: float = 1.0, name: str | None = None, weight: float = 1.0) -> None:
        super().__init__(name, weight)
        if not math.isfinite(format_weight):
            raise ValueError(f"format_weight={format_weight!r}: give a finite number such as 1.0")
        self.format_weight = float(format_weight)
        self.format = TagFormatReward()  # the spec's pattern, anchored to the whole output

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        **kwargs: Any,
    ) -> list[float]:
        formats = self.format(completions, answers=answers, choices=choices, finish_reasons=finish_reasons)
        return [
            float(judged_correctly(c, label)) + self.format_weight * f
            for c, label, f in zip(completions, answers, formats, strict=True)
        ]


class JudgeReward(RewardFunction):
    """A trained judge as a reward function: pairwise against the gold answer, or pointwise scores.

    All responses of a step go to the judge in one batched ``generate`` call. ``pairwise``: the
    judge compares the response with the gold answer (the response is Answer 1, or Answer 2 with
    ``response_position: second``); the reward is 1 when it prefers the response, 0 when it
    prefers the gold answer. With ``order_swap`` it judges each response in both positions (2 × the
    prompts, still one call): 1 only when it prefers the response both times, 0 otherwise (a verdict
    that follows the position, not the answer, earns nothing; counted in ``counts["inconsistent"]``).
    ``pointwise``: the reward is the last number ``score_pattern`` finds in
    the verdict, divided by ``max_score``.

    A judge output without a usable verdict scores ``NaN``, which the reward runner replaces by its
    failure score and counts in ``reward/failures/<name>``; an exception of the judge (a server
    down) is counted the same way, so neither stops the run. ``counts`` keeps running totals
    (``judged``, ``unparseable``, ``inconsistent``).

    The judge needs each sample's question and images: the RL step passes them as ``questions``
    and ``images`` keyword arguments. The judge is loaded by ``setup`` (the RL methods call it at
    fit start; otherwise on the first call).

    Args:
        judge: The judge's backend: ``vlrl.rewards.HFReasoner`` (a local model, shown the images),
            ``VLLMReasoner`` or ``OpenAIReasoner`` (text only: set ``show_images: false``).
        mode: ``pairwise`` or ``pointwise``.
        prompt: The judge's prompt. Pairwise fields: ``{question}``, ``{answer1}``, ``{answer2}``
            (default: the understanding prompt of ``vlrl.data.PreferencePairs``); pointwise:
            ``{question}`` and ``{response}``.
        system_prompt: Text of a system turn before the prompt (``None``: none).
        response_position: ``first`` (the response is Answer 1) or ``second``.
        order_swap: Pairwise: judge each response in both positions and pay it only when the judge
            prefers it in both (``response_position`` is then unused).
        score_pattern: Pointwise: regular expression of the score (its first group, if it has
            groups), searched in the ``<answer>`` text if there is one, else in the whole output;
            the last match counts.
        max_score: Pointwise: the score that maps to reward 1.
        sampling: The judge's sampling (default greedy, up to 1024 tokens).
        show_images: Give the judge the prompt's images (needs ``HFReasoner``).
        seed: Seed of the judge's sampling.
        name: see ``RewardFunction``.
        weight: see ``RewardFunction``.
    """

    def __init__(
        self,
        judge: Reasoner,
        mode: Literal["pairwise", "pointwise"] = "pairwise",
        prompt: str | None = None,
        system_prompt: str | None = None,
        response_position: Literal["first", "second"] = "first",
        order_swap: bool = False,
        score_pattern: str = r"-?\d+(?:\.\d+)?",
        max_score: float = 10.0,
        sampling: Sampling | None = None,
        show_images: bool = True,
        seed: int = 0,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        if mode not in ("pairwise", "pointwise"):
            raise ValueError(f"mode={mode!r} must be 'pairwise' or 'pointwise'")
        if response_position not in ("first", "second"):
            raise ValueError(f"response_position={response_position!r} must be 'first' or 'second'")
        if order_swap and mode != "pairwise":
            raise ValueError(
                f"order_swap=true with mode={mode!r}: a pointwise judge sees one response, there is no order to "
                "swap; set mode: pairwise or order_swap: false"
            )
        if show_images and not isinstance(judge, HFReasoner):
            raise ValueError(
                f"show_images=true needs a judge backend that takes images (vlrl.rewards.HFReasoner), not {judge!r}; "
                "use HFReasoner or set show_images: false"
            )
        if not max_score > 0:
            raise ValueError(f"max_score={max_score} must be > 0 (the score that maps to reward 1)")
        prompt = prompt or (UNDERSTANDING_PROMPT if mode == "pairwise" else POINTWISE_PROMPT)
        fields = {"question", "answer1", "answer2"} if mode == "pairwise" else {"question", "response"}
        check_template_fields("prompt", prompt, fields)
        try:
            self.score_pattern = re.compile(score_pattern)
        except re.error as error:
            raise ValueError(f"score_pattern={score_pattern!r} is not a valid regular expression: {error}") from error
        self.judge = judge
        self.mode = mode
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.response_position = response_position
        self.order_swap = order_swap
        self.max_score = float(max_score)
        self.sampling = sampling or Sampling(temperature=0.0, max_new_tokens=1024)
        self.show_images = show_images
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self._ready = False

    @property
    def min_time_budget_s(self) -> float:
        """A served judge's outage budget plus one request's timeout (+ 30 s): an outage pauses the step."""
        outage, timeout = getattr(self.judge, "outage_budget_s", None), getattr(self.judge, "timeout_s", None)
        return float(outage) + float(timeout or 0.0) + 30.0 if outage is not None else 0.0

    def setup(self, device: torch.device | str) -> None:
        """Load the judge (once) onto ``device``."""
        self.judge.setup(torch.device(device))
        self._ready = True

    def __call__(
        self,
        completions: list[str],
        *,
        answers: list[str],
        choices: list[list[str] | None],
        finish_reasons: list[str],
        questions: list[str] | None = None,
        images: list[list[Image.Image]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if questions is None:
            raise ValueError(
                "JudgeReward needs each sample's question: the RL step passes PromptBatch.questions, which "
                "batches of vlrl.data.RLDataModule carry; a custom datamodule must fill it"
            )
        if not self._ready:
            self.setup("cuda" if torch.cuda.is_available() else "cpu")
        shown = images if self.show_images and images is not None else None
        positions = ["first", "second"] if self.order_swap else [self.response_position]
        prompts = [
            self.messages(question, response, reference, len(shown[i]) if shown is not None else 0, position)
            for position in positions
            for i, (question, response, reference) in enumerate(zip(questions, completions, answers, strict=True))
        ]
        extra = {"images": shown * len(positions)} if shown is not None else {}  # only HFReasoner takes images
        outputs = self.judge.generate(prompts, self.sampling, seed=self.seed, **extra)
        n = len(completions)
        by_position = [
            [self.verdict_score(o.text, position) for o in outputs[k * n : (k + 1) * n]]
            for k, position in enumerate(positions)
        ]  # [positions][N]
        per_response = [s for s in zip(*by_position, strict=True) if not any(math.isnan(x) for x in s)]
        scores = [math.nan if any(math.isnan(x) for x in s) else min(s) for s in zip(*by_position, strict=True)]
        self.counts.update(
            judged=n,
            unparseable=n - len(per_response),
            inconsistent=sum(len(set(s)) > 1 for s in per_response),
        )
        return scores

    def messages(
        self, question: str, response: str, reference: str, num_images: int, position: str | None = None
    ) -> list[dict[str, Any]]:
        """The judge's chat for one response (image parts first when the judge sees images); pairwise, the
        response is Answer 1 when ``position`` (default ``response_position``) is ``first``."""
        question = strip_image_placeholders(question)
        if self.mode == "pointwise":
            text = self.prompt.format(question=question, response=response.strip())
        else:
            pair = (response.strip(), reference.strip())
            first, second = pair if (position or self.response_position) == "first" else pair[::-1]
            text = self.prompt.format(question=question, answer1=first, answer2=second)
        content: str | list[dict[str, Any]] = text
        if num_images:
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": content}]

    def verdict_score(self, output: str, position: str | None = None) -> float:
        """The reward of one judge output; ``NaN`` if it has no usable verdict. Pairwise, the response
        was Answer 1 when ``position`` (default ``response_position``) is ``first``.

        >>> JudgeReward(HFReasoner("tiny:qwen2"), show_images=False).verdict_score("<answer>Answer 1 is better</answer>")
        1.0
        """
        verdict = answer_tag(output)
        if self.mode == "pointwise":
            found = list(self.score_pattern.finditer(verdict if verdict is not None else output))
            if not found:
                return math.nan
            last = found[-1]
            return float(last.group(1) if last.groups() else last.group(0)) / self.max_score
        if verdict is None or not normalise_label(verdict).startswith("answer"):
            return math.nan  # no verdict, or one on images: not a verdict on two answers
        winner = named_position(verdict)
        if winner is None:
            return math.nan
        return float(winner == (1 if (position or self.response_position) == "first" else 2))
