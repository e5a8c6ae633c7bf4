"""SOPHIA: semi-off-policy RL from on-policy descriptions and off-policy reasoning (arXiv 2507.16814).

The policy VLM describes each image (on-policy) without seeing the question; a frozen, stronger
text-only reasoner solves the question from each description (off-policy slow thinking); the outcome
rewards of the trajectories flow back to the descriptions as visual rewards; the policy then learns
the selected trajectory conditioned on the real image. One step, per batch of questions::

    K descriptions c_k ~ π_θ(description prompt, image)         # the question is not shown
    N trajectories y ~ reasoner(question, c_k) for each c_k; R(y) = 1 if its final answer is right
    R(c_k) = mean_n R(y_k^n)                                    # the visual reward
    keep-1: the shortest y with R(y) = 1 among descriptions with R(c_k) > α (keep-all: every such y)
    weighted SFT step on (image, question) -> y with weight R(y)·w, trajectory tokens only

The paper runs this once, offline, over the whole dataset; vlrl runs it online (``fit``: one step
per batch, so later descriptions come from the updated policy) and offline (``predict`` writes the
selected trajectories to JSONL with ``vlrl.data.trajectories``; ``vlrl.methods.SFT`` then trains
on them, ``configs/sophia_offline.yaml``). Both train on the same rows: a chat with the datamodule's
prompt (or, when the trajectory contains ``<think>``, the long-CoT system prompt) and the trajectory
as the assistant turn, encoded and weighted by SFT's own code.

Decisions where the paper leaves room:

- ``importance_weight: none`` sets w = π_θ/μ = 1, as the paper does. ``clipped`` (policy and reasoner
  sharing a tokenizer, reasoner an ``HFReasoner``) uses the length-normalised sequence ratio
  ``w = clip(exp(mean_t log π_θ(y_t) − mean_t log μ(y_t)), 0, 1 + ε)``: a whole-sequence ratio of a
  long trajectory under two different models would be 0 or huge.
- Trajectory length (for keep-1) is in reasoner tokens (characters where a server reports no
  usage); ties go to the first description, then the first sample.
- A batch with nothing kept still counts as a step (its optimizer step has no gradients, so the
  weights stay as they are), so ``max_steps`` and schedules count batches.
- The vision tower and projector are frozen (``train_vision: false``); descriptions are never
  trained on.
- Trajectories are whole: a reasoning model's ``<think>`` opening that its chat template supplies
  (QwQ, R1-Distill) and reasoning a server returns apart are put back by the reasoner backends, and
  the long-CoT system prompt applies to a trajectory that is a think block followed by an answer
  (``vlrl.rewards.reasoners.thinks``).
- A served reasoner follows the fault model of ``vlrl.rewards.reasoners``: past its outage budget
  the training step stops on every rank at once (``agreed``); its context is checked against the
  description budget when it is set up.
- The offline SFT's cosine schedule is as long as the offline rows make it (``OfflineCosine``).

Run: ``lightning-cli fit --config configs/demo/sophia.yaml`` (tiny models, CPU) or
``lightning-cli fit|predict --config configs/sophia.yaml`` (Qwen2.5-VL-7B policy, QwQ-32B reasoner).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from vlrl.algorithms import token_logprobs
from vlrl.data.sft import WEIGHT_FIELD
from vlrl.data.trajectories import KEPT_GLOB, TrajectoryWriter
from vlrl.methods.sft import SFT, MicroBatch, SFTSample, encode_conversation, padded_batch
from vlrl.models.inputs import encode_prompt, map_micro_batches, to_device
from vlrl.models.loading import Policy, tokenizer_of
from vlrl.rewards import CaptionReward, HFReasoner
from vlrl.rewards.reasoners import ReasonerOutput, agreed, thinks
from vlrl.rollout import Sampling
from vlrl.seeding import stream_seed
from vlrl.types import PromptBatch

DESCRIPTION_PROMPT = (
    "Describe this image in detail: every object, its colour, shape, size and position, and any text, numbers "
    "or labels, so that someone who cannot see the image could answer any question about it."
)
REASONER_PROMPT = (
    "### Description of an image: {caption}\n\n### Question about the image: {question}\n\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}."
)
LONG_COT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Before answering, think through the problem carefully, step by step, inside "
    "<think> and </think>; check your reasoning; then state the final answer within \\boxed{}."
)
Keep = Literal["one", "all"]


# ---------------------------------------------------------------------------------- the math


def visual_rewards(correct: torch.Tensor) -> torch.Tensor:
    """``R(c) = mean_n R(y^n)``: ``[..., K, N]`` trajectory rewards to ``[..., K]`` description rewards."""
    return correct.float().mean(dim=-1)


def select_trajectories(
    correct: torch.Tensor, lengths: torch.Tensor, alpha: float, keep: Keep
) -> list[tuple[int, int]]:
    """The trajectories of one question that are trained on, as ``(description, sample)`` pairs.

    Only correct trajectories of descriptions whose visual reward is above ``alpha`` qualify; keep
    ``one`` takes the shortest of them (ties: the first description, then the first sample), keep
    ``all`` takes every one.

    Args:
        correct: ``[K, N]`` outcome rewards R(y) in {0, 1}.
        lengths: ``[K, N]`` trajectory lengths.
        alpha: Visual-reward threshold (strict: R(c) = alpha does not qualify).
        keep: ``one`` (the paper) or ``all``.

    Example:
        correct ``[[1, 1, 1, 0], [1, 1, 1, 1]]``, lengths ``[[5, 2, 9, 1], [7, 3, 3, 8]]``, alpha 0.7:
        R(c) = [0.75, 1.0], both qualify; keep ``one`` gives ``[(0, 1)]`` (length 2).
    """
    eligible = (visual_rewards(correct) > alpha)[:, None] & (correct > 0)  # [K, N]
    candidates = [(k, n) for k, n in eligible.nonzero().tolist()]  # row-major: description, then sample
    if keep == "all" or not candidates:
        return candidates
    return [min(candidates, key=lambda c: float(lengths[c]))]  # min keeps the first of equal lengths


def clipped_importance_weights(policy_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, eps: float):
    """``clip(exp(policy − behaviour), 0, 1 + eps)`` of per-trajectory mean token log-probs ``[M]``.

    Example:
        policy ``[log 0.2, log 0.5]``, behaviour ``[log 0.4, log 0.25]``, eps 0.2 give ``[0.5, 1.2]``.
    """
    return torch.exp(policy_logprobs - behaviour_logprobs).clamp(min=0.0, max=1.0 + eps)  # [M]


def mean_logprobs(
    model: torch.nn.Module, samples: list[SFTSample], pad_id: int, temperature: float = 1.0, micro_batch_size: int = 8
) -> torch.Tensor:
    """``[M]`` mean log-prob of each sample's trained (assistant) tokens under ``model`` (no gradient)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype

    def means(micro: MicroBatch) -> torch.Tensor:
        inputs = to_device(micro.inputs, device, dtype)
        logits = model(**inputs, use_cache=False).logits[:, :-1]  # [n, L - 1, V] predicting tokens 1..L-1
        logprobs = token_logprobs(logits, inputs["input_ids"][:, 1:], temperature).cpu()  # [n, L - 1]
        trained = micro.trained[:, 1:]  # [n, L - 1]
        return (logprobs * trained).sum(dim=1) / trained.sum(dim=1).clamp(min=1.0)  # [n]

    size = micro_batch_size
    return map_micro_batches(means, (padded_batch(samples[i : i + size], pad_id) for i in range(0, len(samples), size)))


# ------------------------------------------------------------------------------ the stages


@dataclass
class SemiOffPolicyStep:
    """What one batch of ``B`` questions produced: descriptions, trajectories, rewards, the selection."""

    descriptions: list[list[str]]  # B lists of K descriptions
    description_lengths: torch.Tensor  # [B, K] tokens
    description_truncated: torch.Tensor  # [B, K] 1.0 where a description hit the length limit
    correct: torch.Tensor  # [B, K, N] R(y)
    lengths: torch.Tensor  # [B, K, N] trajectory lengths (reasoner tokens)
    outputs: list[list[list[ReasonerOutput]]]  # B x K x N trajectories
    selected: list[list[tuple[int, int]]]  # per question, the kept (description, sample) pairs
    reasoner_stats: dict[str, float]

    @property
    def visual_rewards(self) -> torch.Tensor:
        """``[B, K]`` R(c)."""
        return visual_rewards(self.correct)

    def metrics(self, alpha: float) -> dict[str, float]:
        """R(c) distribution, kept fraction and length, reasoner accuracy, description length."""
        rewards = self.visual_rewards.flatten()  # [B*K]
        quartiles = torch.quantile(rewards, torch.tensor([0.25, 0.5, 0.75])).tolist()
        kept = [(b, k, n) for b, pairs in enumerate(self.selected) for k, n in pairs]
        return {
            "sophia/visual_reward_mean": rewards.mean().item(),
            "sophia/visual_reward_q25": quartiles[0],
            "sophia/visual_reward_median": quartiles[1],
            "sophia/visual_reward_q75": quartiles[2],
            "sophia/visual_reward_zero_frac": (rewards == 0).float().mean().item(),
            "sophia/visual_reward_one_frac": (rewards == 1).float().mean().item(),
            "sophia/above_alpha_frac": (rewards > alpha).float().mean().item(),
            "sophia/kept_question_frac": sum(bool(p) for p in self.selected) / max(len(self.selected), 1),
            "sophia/kept_trajectories": float(len(kept)),
            "sophia/kept_length": sum(float(self.lengths[i]) for i in kept) / len(kept) if kept else 0.0,
            "description/length": self.description_lengths.float().mean().item(),
            "description/truncated_frac": self.description_truncated.float().mean().item(),
            **self.reasoner_stats,
        }


class SOPHIA(SFT):
    """Semi-off-policy RL: the policy describes, a frozen reasoner reasons, the policy learns the kept reasoning.

    Args:
        policy: The VLM being trained (path, dtype, LoRA, quantization).
        visual_reward: The frozen text-only reasoner with its prompt (fields ``{caption}``, the
            description, and ``{question}``), sampling and ``samples_per_caption`` (N trajectories
            per description); R(c) is its accuracy from description c (a truncated trajectory scores 0).
        descriptions_per_image: Descriptions sampled per image (K).
        description_sampling: Sampling of the descriptions (default temperature 1.0, 1024 tokens).
        description_prompt: User text of the description prompt, after the images; the question is
            never shown.
        description_system_prompt: System prompt of the description prompt (null: none).
        alpha: Visual-reward threshold: only descriptions with R(c) > alpha contribute trajectories.
        keep: ``one``: the shortest correct trajectory per question (the paper); ``all``: every
            correct trajectory of the qualifying descriptions.
        importance_weight: ``none``: w = 1 (the paper); ``clipped``: w = the length-normalised ratio
            π_θ(y | image, question) / μ(y | description, question) clipped to [0, 1 + importance_clip];
            needs an ``HFReasoner`` sharing the policy's tokenizer.
        importance_clip: ε of the ``clipped`` weight.
        long_cot_system_prompt: System prompt of a training row whose trajectory contains
            ``<think>`` (it replaces the datamodule's); other rows keep the datamodule's prompt.
            Null: always the datamodule's.
        train_vision: Also train the vision tower and projector (the paper freezes them; default
            false sets ``policy.freeze_vision``).
        output_dir: Folder ``predict`` writes the offline dataset to (see ``vlrl.data.trajectories``);
            a rerun skips the questions already there.
        seed: Seed of the description and reasoner sampling (combined with the step, or with the
            batch index in ``predict``).
        **kwargs: The arguments of ``SFT`` (optimizer, lr_scheduler, max_length, pack,
            micro_batch_size, max_grad_norm, eval_sampling). ``eval_sampling`` defaults to greedy
            here: validation and test answer each question from the image and grade the answer.
    """

    def __init__(
        self,
        policy: Policy,
        visual_reward: CaptionReward,
        *,
        descriptions_per_image: int = 8,
        description_sampling: Sampling | None = None,
        description_prompt: str = DESCRIPTION_PROMPT,
        description_system_prompt: str | None = None,
        alpha: float = 0.75,
        keep: Keep = "one",
        importance_weight: Literal["none", "clipped"] = "none",
        importance_clip: float = 0.2,
        long_cot_system_prompt: str | None = LONG_COT_SYSTEM_PROMPT,
        train_vision: bool = False,
        output_dir: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if descriptions_per_image < 1:
            raise ValueError(f"descriptions_per_image={descriptions_per_image} must be >= 1 (the paper uses 8)")
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha={alpha} must be in [0, 1): descriptions need R(c) > alpha (the paper: 0.75)")
        if keep not in ("one", "all"):
            raise ValueError(f"keep={keep!r} must be 'one' (shortest correct trajectory) or 'all'")
        if importance_weight not in ("none", "clipped"):
            raise ValueError(f"importance_weight={importance_weight!r} must be 'none' or 'clipped'")
        if importance_weight == "clipped" and not isinstance(visual_reward.reasoner, HFReasoner):
            raise ValueError(
                f"importance_weight='clipped' needs the reasoner's token log-probs, which only "
                f"vlrl.rewards.HFReasoner gives here, not {visual_reward.reasoner!r}; use importance_weight: none "
                "(the paper's choice)"
            )
        if importance_clip < 0:
            raise ValueError(f"importance_clip={importance_clip} must be >= 0")
        if train_vision and policy.freeze_vision:
            raise ValueError("train_vision=true contradicts policy.freeze_vision=true; set one of them")
        super().__init__(policy=replace(policy, freeze_vision=not train_vision), seed=seed, **kwargs)
        self.eval_sampling = self.eval_sampling or Sampling(temperature=0.0)
        self.visual_reward = visual_reward  # a plain object: never a submodule, never in the checkpoint
        self.descriptions_per_image = descriptions_per_image
        self.description_sampling = description_sampling or Sampling(temperature=1.0, max_new_tokens=1024)
        self.description_prompt = description_prompt
        self.description_system_prompt = description_system_prompt
        self.alpha = alpha
        self.keep = keep
        self.importance_weight = importance_weight
        self.importance_clip = importance_clip
        self.long_cot_system_prompt = long_cot_system_prompt
        self.output_dir = output_dir
        self.writer: TrajectoryWriter | None = None
        self.predicted: Counter[str] = Counter()

    # ---------------------------------------------------------------------- the frozen reasoner
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.setup_reasoner()

    def setup_reasoner(self) -> None:
        """Load the reasoner onto this device (its context checked against the description budget);
        for ``clipped`` weights, check the tokenizers match."""
        self.visual_reward.setup(self.device, caption_tokens=self.description_sampling.max_new_tokens)
        if self.importance_weight == "clipped":
            reasoner = tokenizer_of(self.visual_reward.reasoner.processor)
            if tokenizer_of(self.processor).get_vocab() != reasoner.get_vocab():
                raise ValueError(
                    "importance_weight='clipped' needs the policy and the reasoner to share a tokenizer, and "
                    f"{self.policy.model_path} and {self.visual_reward.reasoner!r} do not; use importance_weight: none"
                )

    def sample_seed(self, index: int) -> int:
        """Seed of one step's sampling: the run seed, the step (or predict batch) and the rank; the reasoner
        samples with the seed of its own stream, ``reasoner_seed(seed)``."""
        purpose = "descriptions" if self.training else "descriptions/predict"
        return self.seed_for(purpose, index)

    @staticmethod
    def reasoner_seed(seed: int) -> int:
        """The reasoner's seed for the step whose descriptions are sampled with ``seed``."""
        return stream_seed(seed, "reasoner")

    # ---------------------------------------------------------------------------- the step
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        step = self.semi_off_policy(batch, self.sample_seed(self.global_step))  # 1.-3. describe, reason, keep
        rows = self.trajectory_rows(batch, step)  # 4. (image, question) -> trajectory, weight R(y)·w
        samples, stats = self.encode(rows) if len(rows) else ([], {})  # 5. SFT encoding: trajectory tokens only
        stats.update(self.weighted_sft_step(samples, batch, step))  # 6. one weighted SFT step
        stats.update(step.metrics(self.alpha))
        stats["perf/step_s"] = time.perf_counter() - start
        self.log_dict(stats, batch_size=len(batch))
        bar = {"kept": "sophia/kept_question_frac", "R(c)": "sophia/visual_reward_mean", "acc": "reasoner/accuracy"}
        self.log_dict({k: stats[v] for k, v in bar.items()}, prog_bar=True, logger=False, batch_size=len(batch))

    def semi_off_policy(self, batch: PromptBatch, seed: int) -> SemiOffPolicyStep:
        """K descriptions per image, N graded trajectories per description, and the keep rule."""
        if len(batch.questions) != len(batch):
            raise ValueError(
                f"SOPHIA shows the reasoner PromptBatch.questions, which has {len(batch.questions)} entries for "
                f"{len(batch)} prompts; batches of vlrl.data.RLDataModule carry them"
            )
        b, k = len(batch), self.descriptions_per_image
        descriptions, lengths, truncated = self.describe(batch, seed)  # B*K, on-policy
        repeat = [i for i in range(b) for _ in range(k)]

        def reason():  # N trajectories per description, off-policy, graded
            return self.visual_reward(
                descriptions,
                questions=[batch.questions[i] for i in repeat],
                answers=[batch.answers[i] for i in repeat],
                choices=[batch.choices[i] for i in repeat],
                seed=self.reasoner_seed(seed),
            )

        # in fit every rank stops together; the offline pass is per rank (resumable, no collectives)
        scores = agreed(reason, self.device) if self.training else reason()
        n = scores.correct.shape[1]
        outputs = [scores.outputs[i * k : (i + 1) * k] for i in range(b)]  # B x K x N
        trajectory_lengths = torch.tensor(
            [[[o.num_tokens or len(o.text) for o in group] for group in per_question] for per_question in outputs],
            dtype=torch.float32,
        ).view(b, k, n)  # [B, K, N]
        correct = scores.correct.view(b, k, n)  # [B, K, N]
        return SemiOffPolicyStep(
            descriptions=[descriptions[i * k : (i + 1) * k] for i in range(b)],
            description_lengths=lengths.view(b, k),
            description_truncated=truncated.view(b, k),
            correct=correct,
            lengths=trajectory_lengths,
            outputs=outputs,
            selected=[select_trajectories(correct[i], trajectory_lengths[i], self.alpha, self.keep) for i in range(b)],
            reasoner_stats=scores.stats,
        )

    def describe(self, batch: PromptBatch, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``B*K`` descriptions (K per image, question not shown), their token lengths and truncation flags."""
        system = [{"role": "system", "content": [{"type": "text", "text": self.description_system_prompt}]}]
        prompts = []
        for images in batch.images:
            user = [{"type": "image"} for _ in images] + [{"type": "text", "text": self.description_prompt}]
            messages = [*system[: bool(self.description_system_prompt)], {"role": "user", "content": user}]
            prompts.append(encode_prompt(self.processor, messages, images))
        repeated = [p for p in prompts for _ in range(self.descriptions_per_image)]
        out = self.rollout_engine.generate(repeated, self.description_sampling, seed=seed)
        truncated = torch.tensor([r == "length" for r in out.finish_reasons], dtype=torch.float32)  # [B*K]
        return self.decode(out.response_ids, out.response_mask), out.response_mask.sum(dim=1), truncated

    def trajectory_rows(self, batch: PromptBatch, step: SemiOffPolicyStep) -> PromptBatch:
        """The kept trajectories as SFT rows: the question's chat + the trajectory, with weight and metadata."""
        index, messages, extras, ids = [], [], [], []
        for i, pairs in enumerate(step.selected):
            for j, (k, n) in enumerate(pairs):
                trajectory = step.outputs[i][k][n]
                index.append(i)
                ids.append(batch.ids[i] if self.keep == "one" else f"{batch.ids[i]}#{j}")
                messages.append(self.policy_messages(batch.messages[i], trajectory.text))
                extras.append(
                    {
                        WEIGHT_FIELD: float(step.correct[i, k, n]),  # R(y); times w below
                        "question": batch.questions[i],
                        "description": step.descriptions[i][k],
                        "visual_reward": float(step.visual_rewards[i, k]),
                        "trajectory_tokens": int(step.lengths[i, k, n]),
                    }
                )
        rows = replace(batch.select(index), ids=ids, messages=messages, extras=extras)
        if self.importance_weight == "clipped" and len(rows):
            for row, w in zip(rows.extras, self.importance_weights(rows).tolist(), strict=True):
                row[WEIGHT_FIELD] *= w
                row["importance_weight"] = w
        return rows

    def policy_messages(self, messages: list[dict[str, Any]], trajectory: str) -> list[dict[str, Any]]:
        """The question's chat (long-CoT system prompt if the trajectory is a think block and an answer) + the
        trajectory."""
        if self.long_cot_system_prompt and thinks(trajectory):
            system = {"role": "system", "content": [{"type": "text", "text": self.long_cot_system_prompt}]}
            messages = [system, *(m for m in messages if m["role"] != "system")]
        return [*messages, {"role": "assistant", "content": [{"type": "text", "text": trajectory}]}]

    def importance_weights(self, rows: PromptBatch) -> torch.Tensor:
        """``[M]`` clipped length-normalised ratios π_θ(y | image, question) / μ(y | description, question)."""
        reasoner = self.visual_reward.reasoner
        policy = [
            encode_conversation(self.processor, m, images, self.rollout_engine.stop_ids)
            for m, images in zip(rows.messages, rows.images, strict=True)
        ]
        prompts = self.visual_reward.build_prompts(
            [e["description"] for e in rows.extras], [e["question"] for e in rows.extras], rows.choices
        )
        behaviour = [
            encode_conversation(
                reasoner.processor,
                [*p, {"role": "assistant", "content": m[-1]["content"][0]["text"]}],
                [],
                reasoner.stop_ids,
            )
            for p, m in zip(prompts, rows.messages, strict=True)
        ]
        temperature = self.visual_reward.sampling.temperature or 1.0
        policy_logprobs = mean_logprobs(self.model, policy, self.pad_id, 1.0, self.micro_batch_size)  # [M]
        behaviour_logprobs = mean_logprobs(
            reasoner.model, behaviour, reasoner.pad_id, temperature, self.micro_batch_size
        )
        return clipped_importance_weights(policy_logprobs, behaviour_logprobs, self.importance_clip)  # [M]

    def weighted_sft_step(self, samples: list[SFTSample], batch: PromptBatch, step: SemiOffPolicyStep):
        """SFT's optimizer step on the samples; with none kept on any device, a step without gradients."""
        total = self.all_reduce(torch.tensor(float(len(samples))), "sum")
        if total == 0:
            optimizer, scheduler = self.optimizer_and_scheduler(0)
            optimizer.zero_grad(set_to_none=True)  # no parameter has a gradient: the weights stay,
            stats = self.step_optimizer(optimizer, scheduler)  # the step and the schedule advance
            return {"update/skipped": 1.0, "update/lr": stats["update/lr"]}
        if not samples:  # others kept some: join their gradient sync with a sample that trains nothing
            filler = self.policy_messages(batch.messages[0], step.descriptions[0][0])
            sample = encode_conversation(self.processor, filler, batch.images[0], self.rollout_engine.stop_ids)
            samples = [replace(sample, loss_mask=torch.zeros_like(sample.loss_mask), weight=0.0)]
        return {"update/skipped": 0.0, **self.sft_step(self.micro_batches(samples))}

    # ------------------------------------------------------------------------ the offline pass
    def on_predict_start(self) -> None:
        if self.output_dir is None:
            raise ValueError(
                "predict writes SOPHIA's offline dataset: set model.init_args.output_dir (e.g. outputs/sophia/offline)"
            )
        self.setup_reasoner()
        self.writer = TrajectoryWriter(self.output_dir, self.global_rank)
        self.predicted = Counter(already_done=len(self.writer.done))

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> int:
        """Describe, reason and select for the questions not yet written; append their records.

        Returns the number of trajectories written (the records themselves go to the files).
        """
        todo = [i for i, question_id in enumerate(batch.ids) if question_id not in self.writer.done]
        if not todo:
            return 0
        batch = batch.select(todo)
        step = self.semi_off_policy(batch, self.sample_seed(batch_idx))
        rows = self.trajectory_rows(batch, step)
        offset = 0
        for i, pairs in enumerate(step.selected):
            images = self.writer.save_images(batch.ids[i], batch.images[i]) if pairs else []
            kept = [self.record(rows, j, images) for j in range(offset, offset + len(pairs))]
            offset += len(pairs)
            unkept = {
                "question": batch.questions[i],
                "answer": batch.answers[i],
                "data_source": batch.data_sources[i],
                "visual_rewards": step.visual_rewards[i].tolist(),
            }
            self.writer.write(batch.ids[i], kept, unkept)
            self.predicted.update(questions=1, kept_questions=bool(pairs), trajectories=len(pairs))
        self.predicted.update(
            visual_reward_sum=float(step.visual_rewards.sum()), descriptions=step.correct[..., 0].numel()
        )
        return len(rows)

    @staticmethod
    def record(rows: PromptBatch, j: int, images: list[str]) -> dict[str, Any]:
        """Row ``j`` of ``rows`` as a JSON-ready SFT row whose images are the saved files ``images``."""
        return {
            "id": rows.ids[j],
            "images": images,
            "messages": rows.messages[j],
            "answer": rows.answers[j],
            "choices": rows.choices[j],
            "data_source": rows.data_sources[j],
            **rows.extras[j],
        }

    def on_predict_end(self) -> None:
        done = self.predicted
        rank_zero_info(
            f"SOPHIA offline pass (rank {self.global_rank}): {done['questions']} new questions "
            f"({done['already_done']} already written), {done['kept_questions']} with a kept trajectory, "
            f"{done['trajectories']} trajectories, mean R(c) {done['visual_reward_sum'] / max(done['descriptions'], 1):.3f}"
            f" -> {self.output_dir}"
        )

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, batch: PromptBatch, stage: str) -> None:
        """The policy answers each question from the image (the datamodule's prompt); graded accuracy."""
        prompts = [
            encode_prompt(self.processor, m, images) for m, images in zip(batch.messages, batch.images, strict=True)
        ]
        out = self.rollout_engine.generate(prompts, self.eval_sampling, seed=self.seed_for("eval"))
        texts = self.decode(out.response_ids, out.response_mask)
        self.record(stage, batch, texts, self.evaluation.grade(texts, batch))
        self.log(f"{stage}/response_length", out.response_mask.sum(dim=1).float().mean(), batch_size=len(batch))


# ------------------------------------------------------------------------- the offline schedule


class OfflineCosine(torch.optim.lr_scheduler.LambdaLR):
    """Cosine decay of the lr to ``final_fraction`` of it over the offline SFT, its length from the rows.

    The offline pass writes an unknown number of rows, so a fixed ``T_max`` either ends the decay
    early (and a periodic cosine warms the lr back up) or never reaches the end. This schedule
    counts the rows the pass wrote (the lines of ``path``'s ``rank*.jsonl``) at the first optimizer
    step, after the pass (a config can be built and checked before the pass has run), and decays over ``ceil(rows / global_batch_size) * epochs``
    optimizer steps; past them the lr stays at its final value.

    Args:
        optimizer: The optimizer (given by LightningCLI).
        path: Folder of the offline rows (``SOPHIA.output_dir``, the SFT data's ``path``).
        global_batch_size: Rows per optimizer step over all devices (``data.global_batch_size``).
        epochs: Passes over the rows (``trainer.max_epochs``).
        final_fraction: The last lr as a fraction of the initial one (the paper: 1/4).

    Example:
        1,100 rows, batch 512, 1 epoch: 3 steps; the lr factor goes 1.0, 0.8125, 0.4375, then 0.25.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        path: str,
        global_batch_size: int,
        epochs: int = 1,
        final_fraction: float = 0.25,
    ) -> None:
        if global_batch_size < 1 or epochs < 1:
            raise ValueError(f"global_batch_size={global_batch_size} and epochs={epochs} must be >= 1")
        if not 0 <= final_fraction <= 1:
            raise ValueError(f"final_fraction={final_fraction} must be in [0, 1] (the paper: 0.25)")
        self.path = path
        self.global_batch_size = global_batch_size
        self.epochs = epochs
        self.final_fraction = final_fraction
        self._total_steps: int | None = None  # counted at the first step: the rows may not exist yet at build time
        super().__init__(optimizer, self.factor)

    @property
    def total_steps(self) -> int:
        """``ceil(rows / global_batch_size) * epochs``, the rows counted once, when first needed."""
        if self._total_steps is None:
            files = sorted(Path(self.path).glob(KEPT_GLOB))
            if not files:
                raise ValueError(
                    f"OfflineCosine path={self.path!r} holds no rank*.jsonl: run SOPHIA's offline pass first "
                    "(lightning-cli predict --config configs/sophia.yaml), or point path at its output_dir"
                )
            rows = sum(1 for f in files for line in f.read_text().splitlines() if line.strip())
            self._total_steps = max(math.ceil(rows / self.global_batch_size) * self.epochs, 1)
        return self._total_steps

    def factor(self, step: int) -> float:
        """The lr factor after ``step`` optimizer steps."""
        progress = min(step / self.total_steps, 1.0) if step > 0 else 0.0
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
