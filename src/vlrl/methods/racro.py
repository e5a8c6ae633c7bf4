"""RACRO: caption reward optimization, GRPO on captions rewarded by a frozen text-only reasoner.

Perception and reasoning are split (arXiv 2506.04559): the policy VLM writes a caption of the image
for the question, without answering it; a frozen text-only reasoner answers the question from the
caption alone; the caption's reward is the reasoner's graded accuracy (mean over ``k`` answers, a
truncated answer scores 0). The captioner is trained with GRPO on its caption tokens only: group
advantages with std, PPO-clip, k3 KL to the reference in the loss. RACRO is GRPO with another
prompt (``generate``) and another reward (``score``); evaluation runs caption -> reasoner -> grade
(``evaluate``), optionally with the captioner's own tentative answer passed to the reasoner
("joint check").

The reasoner is pluggable (``vlrl.rewards.HFReasoner``, ``VLLMReasoner``, ``OpenAIReasoner``): it is
not part of the module's parameters or checkpoint, so a trained captioner is evaluated with another
reasoner by changing the config only. A served reasoner follows the fault model of
``vlrl.rewards.reasoners``: an outage shorter than its budget only slows the step down; past it the
step stops with ``ReasonerUnavailable`` on every rank at once (``agreed``), never training on
rewards of a dead server. Its context is checked at fit start against the caption budget.

Run: ``lightning-cli fit --config configs/demo/racro.yaml`` (tiny models, CPU) or
``lightning-cli fit --config configs/racro.yaml`` (Qwen2.5-VL-7B captioner, R1-Distill-Qwen-7B reasoner).
"""

from __future__ import annotations

from dataclasses import replace

from vlrl.data.prompts import build_messages, check_template_fields
from vlrl.methods.grpo import GRPO
from vlrl.models.loading import Policy
from vlrl.rewards import RewardFunction
from vlrl.rewards.caption import CaptionReward, CaptionScores
from vlrl.rewards.reasoners import agreed
from vlrl.rollout import Sampling
from vlrl.types import PromptBatch, Rollout

CAPTION_SYSTEM_PROMPT = (
    "You are given an image and a relevant question. Based on the query, please describe the image in detail. "
    "Do not try to answer the question."
)
CAPTION_PROMPT = "Question: {question}\nPlease describe the image. DO NOT try to answer the question!"


class RACRO(GRPO):
    """Caption reward optimization: GRPO on question-conditioned captions, rewarded by a frozen reasoner.

    Args:
        policy: The captioner being trained (path, dtype, LoRA, quantization, freezing).
        caption_reward: The frozen reasoner, its prompts and sampling; a caption's reward is the
            reasoner's accuracy from it.
        rewards: Further reward functions on the captions, added to the reasoner's accuracy (none by
            default).
        caption_system_prompt: System prompt of the captioner (``""`` or null: no system turn).
        caption_prompt: Captioner user prompt, built from each row's raw question: ``{question}``
            (followed by the lettered options of a multiple-choice row unless ``{choices}`` is used)
            and ``{choices}``. The images come first, as in the datamodule's prompts.
        joint_check: In validation and test, the captioner also answers each question itself (with
            the datamodule's prompt) and the reasoner gets that tentative answer with the caption
            (``caption_reward.joint_prompt``).
        **kwargs: The arguments of ``GRPO`` (advantage, eps_low, eps_high, kl_coef, kl_estimator,
            reference, ...) and ``RLMethod`` (sampling, eval_sampling, group_size, mini_batch_size,
            optimizer, ...). ``configs/racro.yaml`` ships the paper's values.
    """

    def __init__(
        self,
        policy: Policy,
        caption_reward: CaptionReward,
        rewards: list[RewardFunction] | None = None,
        *,
        caption_system_prompt: str | None = CAPTION_SYSTEM_PROMPT,
        caption_prompt: str = CAPTION_PROMPT,
        joint_check: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(policy=policy, rewards=list(rewards or []), **kwargs)
        check_template_fields("caption_prompt", caption_prompt, {"question"}, {"choices"})
        self.caption_reward = caption_reward  # a plain object: never a submodule, never in the checkpoint
        self.caption_system_prompt = caption_system_prompt
        self.caption_prompt = caption_prompt
        self.joint_check = joint_check

    # ---------------------------------------------------------------------- the frozen reasoner
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.caption_reward.setup(
            self.device, caption_tokens=max(self.sampling.max_new_tokens, self.eval_sampling.max_new_tokens)
        )

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self.caption_reward.setup(self.device)

    def on_test_start(self) -> None:
        super().on_test_start()
        self.caption_reward.setup(self.device)

    def reasoner_seed(self) -> int:
        """Seed of the reasoner's sampling: a function of the run seed, the step and the rank."""
        return self.seed_for("reasoner")

    def reason(self, captions: list[str], batch: PromptBatch, idx: list[int], **kwargs) -> CaptionScores:
        """The reasoner's graded answers from each caption (row ``idx[i]`` of ``batch``), agreed over ranks."""
        return agreed(
            lambda: self.caption_reward(
                captions,
                questions=[batch.questions[i] for i in idx],
                answers=[batch.answers[i] for i in idx],
                choices=[batch.choices[i] for i in idx],
                seed=self.reasoner_seed(),
                **kwargs,
            ),
            self.device,
        )

    # ------------------------------------------------------------------------- the RL step
    def caption_batch(self, batch: PromptBatch) -> PromptBatch:
        """``batch`` with its messages replaced by caption prompts built from the raw questions."""
        if len(batch.questions) != len(batch):
            raise ValueError(
                f"RACRO builds caption prompts from PromptBatch.questions, which has {len(batch.questions)} "
                f"entries for {len(batch)} prompts; batches of vlrl.data.RLDataModule carry them"
            )
        messages = [
            build_messages(question, None, len(images), options, self.caption_prompt, self.caption_system_prompt)
            for question, images, options in zip(batch.questions, batch.images, batch.choices, strict=True)
        ]
        return replace(batch, messages=messages)

    def generate(self, batch: PromptBatch, sampling: Sampling, group_size: int) -> Rollout:
        """Sample ``group_size`` captions per prompt (``rollout.batch`` holds the caption prompts)."""
        return super().generate(self.caption_batch(batch), sampling, group_size)

    def score(self, rollout: Rollout) -> Rollout:
        """Reward of a caption: the reasoner's accuracy from it (plus any further reward functions)."""
        rollout = super().score(rollout)
        result = self.reason(rollout.texts, rollout.batch, rollout.group_index.tolist())
        rollout.rewards = rollout.rewards + result.accuracy  # [N]
        rollout.reward_components["reasoner_accuracy"] = result.accuracy  # [N]
        rollout.facts["reasoner_texts"] = [[o.text for o in answers] for answers in result.outputs]
        rollout.stats.update(result.stats)
        rollout.stats["caption/length"] = rollout.response_mask.sum(dim=1).mean().item()
        return rollout

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, batch: PromptBatch, stage: str) -> None:
        """Caption -> reasoner -> grade (``evaluation``'s grading) of the reasoner's first answer to each row;
        the prediction file keeps the caption (and the tentative answer with ``joint_check``)."""
        captions = self.generate(batch, self.eval_sampling, 1)
        tentative = super().generate(batch, self.eval_sampling, 1).texts if self.joint_check else None
        result = self.reason(
            captions.texts,
            batch,
            list(range(len(batch))),
            tentative=tentative,
            sampling=self.caption_reward.eval_sampling,
        )
        answers = [outputs[0].text if outputs else "" for outputs in result.outputs]
        details = [
            {"caption": caption, **({"tentative": tentative[i]} if tentative is not None else {})}
            for i, caption in enumerate(captions.texts)
        ]
        self.record(stage, batch, answers, self.evaluation.grade(answers, batch), details)
        stats = result.stats
        figures = {
            f"{stage}/caption_length": captions.response_mask.sum(dim=1).mean().item(),
            f"{stage}/reasoner_response_length": stats["reasoner/response_length"],
            f"{stage}/reasoner_latency_s": stats["reasoner/latency_s"],
        }
        self.log_dict(figures, batch_size=len(batch), sync_dist=True)
