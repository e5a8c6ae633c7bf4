"""The caption reward (RACRO): how often a frozen text-only reasoner answers right from a caption.

Each caption goes to the reasoner with the question (the reasoner prompt, a template in config);
the reasoner answers ``k`` times; each answer is graded against the gold with
``vlrl.rewards.is_correct`` (an answer cut off by the length limit scores 0) and the caption's
reward is the mean of its ``k`` grades. All captions of a step reach the reasoner in one batched
``generate`` call.

With a tentative answer per caption ("joint check", used at evaluation), the joint prompt also shows
the reasoner what the captioner itself answered, to be checked and overridden where wrong.

Example::

    reward = CaptionReward(OpenAIReasoner("http://localhost:8000/v1", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"))
    reward.setup(torch.device("cpu"))
    scores = reward(["A big red square on white."], ["What colour is the shape?"], ["red"], [None])
    scores.accuracy   # tensor([1.]) when the reasoner answered \\boxed{red}
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from vlrl.data.prompts import check_template_fields, prompt_text
from vlrl.rewards.functions import AccuracyReward
from vlrl.rewards.reasoners import Messages, OpenAIReasoner, Reasoner, ReasonerError, ReasonerOutput
from vlrl.rollout.base import Sampling

__all__ = ["CaptionReward", "CaptionScores"]

log = logging.getLogger(__name__)

REASONER_SYSTEM_PROMPT = "You are a helpful assistant."
REASONER_PROMPT = (
    "### The detailed caption of the provided image: {caption}\n\n"
    "### Question: {question} Please think step by step. The final answer MUST BE put in \\boxed{{}}."
)
JOINT_PROMPT = (
    "### The detailed caption of the provided image: {caption}\n\n"
    "### A tentative answer by a model that saw the image (it may be wrong; if it is, override it): "
    "{tentative}\n\n"
    "### Question: {question} Please think step by step. The final answer MUST BE put in \\boxed{{}}."
)


@dataclass
class CaptionScores:
    """The reasoner's graded answers for ``N`` captions, ``k`` answers each."""

    accuracy: torch.Tensor  # [N] mean grade of each caption's k answers: the caption's reward
    correct: torch.Tensor  # [N, k] 1.0 where an answer is right (a truncated answer counts 0)
    outputs: list[list[ReasonerOutput]]  # N lists of k answers
    latency_s: float  # wall time of the reasoner call

    @property
    def stats(self) -> dict[str, float]:
        """Step-level figures: accuracy, answer length in tokens, truncated and shortened fractions, latency."""
        answers = [o for group in self.outputs for o in group]
        count = max(len(answers), 1)
        return {
            "reasoner/accuracy": self.correct.mean().item() if self.correct.numel() else 0.0,
            "reasoner/response_length": sum(o.num_tokens for o in answers) / count,
            "reasoner/truncated_frac": sum(o.finish_reason == "length" for o in answers) / count,
            "reasoner/shortened_frac": sum(o.shortened for o in answers) / count,
            "reasoner/latency_s": self.latency_s,
        }


class CaptionReward:
    """Scores captions by the accuracy of a frozen text-only reasoner that answers from them.

    Args:
        reasoner: The frozen reasoner (``vlrl.rewards.HFReasoner``, ``VLLMReasoner``,
            ``OpenAIReasoner``); swap it in the config to evaluate with another one.
        samples_per_caption: Reasoner answers per caption (``k``); the reward is their mean grade.
        sampling: Reasoner sampling in training (default: temperature 1.0, up to 8192 tokens).
        eval_sampling: Reasoner sampling in validation/test (default: greedy, same length).
        system_prompt: Reasoner system prompt (``""`` or null: no system turn).
        prompt: Reasoner user prompt, with the fields ``{caption}`` and ``{question}`` (the raw
            question, followed by its lettered options for multiple-choice rows); write a literal
            brace as ``{{`` or ``}}``.
        joint_prompt: Reasoner user prompt of the joint check, with ``{caption}``, ``{question}``
            and ``{tentative}`` (the captioner's own answer).
    """

    def __init__(
        self,
        reasoner: Reasoner,
        samples_per_caption: int = 1,
        sampling: Sampling | None = None,
        eval_sampling: Sampling | None = None,
        system_prompt: str | None = REASONER_SYSTEM_PROMPT,
        prompt: str = REASONER_PROMPT,
        joint_prompt: str = JOINT_PROMPT,
    ) -> None:
        if samples_per_caption < 1:
            raise ValueError(f"samples_per_caption={samples_per_caption} must be >= 1 (the paper uses 1)")
        check_template_fields("prompt", prompt, {"caption", "question"})
        check_template_fields("joint_prompt", joint_prompt, {"caption", "question", "tentative"})
        self.reasoner = reasoner
        self.samples_per_caption = samples_per_caption
        self.sampling = sampling or Sampling(temperature=1.0, max_new_tokens=8192)
        self.eval_sampling = eval_sampling or Sampling(temperature=0.0, max_new_tokens=self.sampling.max_new_tokens)
        self.system_prompt = system_prompt
        self.prompt = prompt
        self.joint_prompt = joint_prompt
        self.grade = AccuracyReward(truncated_score=0.0)

    def setup(self, device: torch.device, caption_tokens: int | None = None) -> None:
        """Load the reasoner (once) onto ``device``; with ``caption_tokens``, check its context first.

        A served reasoner whose context (``max_model_len``) is known and whose tokenizer is named
        (``OpenAIReasoner``) is checked before the first step: the reasoner prompt around an empty
        caption and question, plus ``caption_tokens`` (the longest caption), plus the answer budget
        ``sampling.max_new_tokens``, must fit. If even the prompt and the caption leave no room for
        an answer, this raises; if only the full answer budget does not fit, it warns (long
        captions' answers are shortened at run time, ``reasoner/shortened_frac``).
        """
        self.reasoner.setup(device)
        if caption_tokens is None or not isinstance(self.reasoner, OpenAIReasoner):
            return
        context = self.reasoner.max_model_len
        fixed = self.reasoner.prompt_tokens(self.build_prompts([""], [""], [None])[0])
        if context is None or fixed is None:
            return
        answer = max(self.sampling.max_new_tokens, self.eval_sampling.max_new_tokens)
        need = fixed + caption_tokens + answer
        if fixed + caption_tokens >= context:
            raise ValueError(
                f"the reasoner's context max_model_len={context} at {self.reasoner.base_url} holds no answer: the "
                f"prompt takes {fixed} tokens and a caption up to {caption_tokens}; serve the reasoner with "
                f"--max-model-len {need} or more (plus the longest question), or shorten the captions"
            )
        if need > context:
            log.warning(
                "the reasoner's context max_model_len=%d is less than prompt (%d) + caption (%d) + answer (%d) "
                "tokens = %d (plus the question): answers to long captions will be shortened to fit; serve with "
                "--max-model-len %d or more to avoid it",
                context,
                fixed,
                caption_tokens,
                answer,
                need,
                need,
            )

    def build_prompts(
        self,
        captions: list[str],
        questions: list[str],
        choices: list[list[str] | None],
        tentative: list[str] | None = None,
    ) -> list[Messages]:
        """The reasoner's chat prompt for each caption (the joint prompt where ``tentative`` is given)."""
        template = self.prompt if tentative is None else self.joint_prompt
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        prompts = []
        for i, (caption, question, options) in enumerate(zip(captions, questions, choices, strict=True)):
            user = template.format(
                caption=caption.strip(),
                question=prompt_text(question, options, "{question}"),
                tentative=tentative[i].strip() if tentative is not None else "",
            )
            prompts.append([*system, {"role": "user", "content": user}])
        return prompts

    def __call__(
        self,
        captions: list[str],
        questions: list[str],
        answers: list[str],
        choices: list[list[str] | None],
        *,
        tentative: list[str] | None = None,
        sampling: Sampling | None = None,
        seed: int | None = None,
    ) -> CaptionScores:
        """Grade the reasoner's answers from each caption.

        Args:
            captions: ``N`` captions.
            questions: The raw question of each caption's prompt.
            answers: The gold answer of each.
            choices: The options of each (``None`` for free-form questions).
            tentative: The captioner's own answer to each question, for the joint check.
            sampling: Reasoner sampling for this call (default: ``self.sampling``).
            seed: Seed of the reasoner's sampling.
        """
        n, k = len(captions), self.samples_per_caption
        for name, values in (("questions", questions), ("answers", answers), ("choices", choices)):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} captions")
        if tentative is not None and len(tentative) != n:
            raise ValueError(f"tentative has {len(tentative)} entries for {n} captions")
        prompts = [p for p in self.build_prompts(captions, questions, choices, tentative) for _ in range(k)]
        start = time.perf_counter()
        outputs = self.reasoner.generate(prompts, sampling or self.sampling, seed=seed)
        latency = time.perf_counter() - start
        if len(outputs) != len(prompts):
            raise ReasonerError(f"{self.reasoner!r} returned {len(outputs)} answers for {len(prompts)} prompts")
        grades = self.grade(
            [o.text for o in outputs],
            answers=[a for a in answers for _ in range(k)],
            choices=[c for c in choices for _ in range(k)],
            finish_reasons=[o.finish_reason for o in outputs],
        )
        correct = torch.tensor(grades, dtype=torch.float32).view(n, k)  # [N, k]
        return CaptionScores(
            accuracy=correct.mean(dim=1),  # [N]
            correct=correct,
            outputs=[outputs[i * k : (i + 1) * k] for i in range(n)],
            latency_s=latency,
        )
