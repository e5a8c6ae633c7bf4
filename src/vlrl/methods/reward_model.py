"""UnifiedReward-Think (arXiv 2505.03318): a vision-language judge that reasons before its verdict.

The judge reads a pair (a caption and two images, or a question with two answers) and writes
``<think>…per-dimension scores, totals…</think>\\n<answer>Image 1 is better</answer>``. Three stages,
one config each (``configs/unified_reward_think/``):

1. Cold start: ``vlrl.methods.SFT`` on a small set of chain-of-thought judgements, vision frozen
   (``vlrl.data.SFTDataModule`` over ``vlrl.data.PreferencePairs`` rows with a ``response``).
2. Rejection sampling: ``lightning-cli predict`` with ``UnifiedRewardThink`` judges every pair of a
   large preference set and writes, under ``output_dir``, the correctly judged pairs with their
   judgement as SFT rows (``rank{r}.jsonl``; train on them again with the stage-1 settings) and the
   wrongly judged pairs (``unkept/rank{r}.jsonl``) for stage 3. A rerun skips the pairs already
   written (``vlrl.data.trajectories.TrajectoryWriter``: each line is synced before the next, an
   interrupted last line is cut off).
3. GRPO on the wrongly judged pairs, rewarded by ``vlrl.rewards.PreferenceReward`` (accuracy +
   format): ``UnifiedRewardThink`` is ``GRPO`` with the std-normalised advantage's epsilon as an
   argument (the paper: 1e-4) and evaluation as pairwise accuracy.

``validate``/``test`` judge each held-out pair once (``eval_sampling``, greedy by default) and report
``{stage}/accuracy`` overall and ``{stage}/accuracy/generation`` / ``…/understanding`` (the pair's
``data_source`` is its task), plus the rate of well-formed judgements ``{stage}/format``. With
``order_swap`` each pair is judged twice, the second time with its candidates swapped (in one
``generate`` call): ``{stage}/accuracy`` then counts a pair only when both verdicts are right (a judge
that always names "Image 1" scores 0), ``{stage}/accuracy_one_order`` is the accuracy of the given
order alone, and ``{stage}/position_consistency`` the rate of pairs whose two verdicts name the same
candidate; ``{stage}/format`` is over all judgements.

Decisions: with ``rejection_samples`` > 1 judgements per pair, every correct one becomes an SFT row
and a pair goes to the GRPO file only when none is correct (with 1, the default, the split is
exactly right/wrong). Verdicts are compared after normalising case, spaces and surrounding
punctuation.

Any RL method can use a trained judge as a reward (``vlrl.rewards.JudgeReward``): the RL step hands
the rewards each sample's question and images.

Run (tiny models, CPU): ``make demo-unified-reward-think``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from vlrl.algorithms import group_advantages
from vlrl.data import swap_candidates
from vlrl.data.trajectories import TrajectoryWriter
from vlrl.methods.grpo import GRPO
from vlrl.rewards import TagFormatReward, both_orders, judged_correctly
from vlrl.rewards.grading import Grade
from vlrl.rewards.preference import answer_tag
from vlrl.rollout import Sampling
from vlrl.types import PromptBatch, Rollout

PAIR_FIELDS = ("task", "prompt", "responses")


def split_judgements(judgements: list[list[str]], labels: list[str]) -> list[list[int]]:
    """For each pair, the indices of its judgements whose verdict equals its label.

    A pair with an empty list was judged wrongly every time (it goes to the GRPO stage).

    >>> split_judgements([["<answer>Image 1 is better</answer>"], ["<answer>Image 1 is better</answer>", "no"]],
    ...                  ["Image 1 is better", "Image 2 is better"])
    [[0], []]
    """
    return [
        [j for j, text in enumerate(texts) if judged_correctly(text, label)]
        for texts, label in zip(judgements, labels, strict=True)
    ]


def pair_row(batch: PromptBatch, i: int, images: list[str], response: str | None = None) -> dict[str, Any]:
    """Pair ``i`` of ``batch`` as a JSON-ready pair row (readable by ``vlrl.data.PreferencePairs``)."""
    extras = batch.extras[i] if batch.extras else {}
    row = {"id": batch.ids[i], **{k: extras[k] for k in PAIR_FIELDS if k in extras}, "images": images}
    row["label"] = batch.answers[i]
    if batch.choices[i]:
        row["choices"] = batch.choices[i]
    if response is not None:
        row["response"] = response
    return row


class UnifiedRewardThink(GRPO):
    """UnifiedReward-Think's judge: GRPO on pairs, rejection sampling in ``predict``, pairwise accuracy in ``test``.

    Args:
        advantage_eps: Added to the group's std in the ``std`` advantage (the paper: 1e-4).
        output_dir: Folder the rejection-sampling pass (``predict``) writes: ``rank{r}.jsonl`` the
            correctly judged pairs with their judgement (SFT rows), ``unkept/rank{r}.jsonl`` the
            wrongly judged ones (GRPO rows), ``images/`` their images. A rerun skips pairs already
            written there.
        rejection_samples: Judgements sampled per pair in ``predict``.
        rejection_sampling: Sampling of those judgements (default: ``sampling``).
        order_swap: In ``validate``/``test``, judge each pair in both orders and count it right only
            when both verdicts are (see the module docstring); also logs the position consistency.
        **kwargs: The arguments of ``GRPO`` (advantage, eps_low, eps_high, kl_coef, ...) and
            ``RLMethod`` (policy, rewards, sampling, group_size, optimizer, ...).
    """

    def __init__(
        self,
        *args,
        advantage_eps: float = 1e-4,
        output_dir: str | None = None,
        rejection_samples: int = 1,
        rejection_sampling: Sampling | None = None,
        order_swap: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if advantage_eps < 0:
            raise ValueError(f"advantage_eps={advantage_eps} must be >= 0 (the paper: 1e-4)")
        if rejection_samples < 1:
            raise ValueError(f"rejection_samples={rejection_samples} must be >= 1")
        self.advantage_eps = advantage_eps
        self.output_dir = output_dir
        self.rejection_samples = rejection_samples
        self.rejection_sampling = rejection_sampling or self.sampling
        self.order_swap = order_swap
        self.format_reward = TagFormatReward()
        self.writer: TrajectoryWriter | None = None
        self.predicted: Counter[str] = Counter()

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        return group_advantages(rollout.rewards, rollout.group_index, mode=self.advantage, eps=self.advantage_eps)

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, batch: PromptBatch, stage: str) -> None:
        """One judgement per pair (two with ``order_swap``); accuracy overall and per task (``data_source``),
        the format rate and, with ``order_swap``, the one-order accuracy and the position consistency.
        The predictions file keeps each judgement, its verdict and (with ``order_swap``) the swapped one."""
        n = len(batch)
        judged = PromptBatch.concat([batch, swap_candidates(batch)]) if self.order_swap else batch
        rollout = self.generate(judged, self.eval_sampling, 1)
        texts = rollout.texts  # [n] or, with order_swap, [2n]: the given order, then the swapped one
        one_order = [judged_correctly(text, label) for text, label in zip(texts[:n], batch.answers, strict=True)]
        verdicts = [answer_tag(text) for text in texts[:n]]
        details: list[dict] = [{"one_order_correct": ok} for ok in one_order]
        if self.order_swap:
            swapped = both_orders(texts[:n], texts[n:], batch.answers)
            correct = swapped.correct
            for i, row in enumerate(details):
                row.update(swapped_response=texts[n + i], consistent=swapped.consistent[i])
            self.log(f"{stage}/accuracy_one_order", sum(one_order) / n, batch_size=n, sync_dist=True)
            self.log(f"{stage}/position_consistency", sum(swapped.consistent) / n, batch_size=n, sync_dist=True)
        else:
            correct = one_order
        grades = [Grade(ok, verdict) for ok, verdict in zip(correct, verdicts, strict=True)]
        self.record(stage, batch, texts[:n], grades, details)
        formats = self.format_reward(
            texts, answers=judged.answers, choices=judged.choices, finish_reasons=[""] * len(texts)
        )
        self.log(f"{stage}/format", sum(formats) / len(texts), batch_size=n, sync_dist=True)
        self.log(f"{stage}/response_length", rollout.response_mask.sum(1).mean(), batch_size=n, sync_dist=True)

    # ---------------------------------------------------------------------- rejection sampling
    def on_predict_start(self) -> None:
        if self.output_dir is None:
            raise ValueError(
                "predict runs the rejection-sampling pass: set model.init_args.output_dir "
                "(e.g. outputs/unified_reward_think/rejection)"
            )
        self.writer = TrajectoryWriter(self.output_dir, self.global_rank)
        self.predicted = Counter(already_done=len(self.writer.done))

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> int:
        """Judge the pairs not yet written and record each; returns how many were judged correctly."""
        todo = [i for i, pair_id in enumerate(batch.ids) if pair_id not in self.writer.done]
        if not todo:
            return 0
        batch = batch.select(todo)
        k = self.rejection_samples
        texts = self.generate(batch, self.rejection_sampling, k).texts
        return self.record_judgements(batch, [texts[i * k : (i + 1) * k] for i in range(len(batch))])

    def record_judgements(self, batch: PromptBatch, judgements: list[list[str]]) -> int:
        """Write each pair: its correct judgements as SFT rows, or (none correct) the pair for GRPO."""
        correct = split_judgements(judgements, batch.answers)
        for i, kept in enumerate(correct):
            images = self.writer.save_images(batch.ids[i], batch.images[i])
            rows = [pair_row(batch, i, images, judgements[i][j]) for j in kept]
            if len(rows) > 1:
                for j, row in enumerate(rows):
                    row["id"] = f"{row['id']}#{j}"
            wrong = pair_row(batch, i, [f"../{path}" for path in images])  # unkept/ is one folder down
            self.writer.write(batch.ids[i], rows, {**wrong, "judgements": judgements[i]})
            self.predicted.update(pairs=1, correct_pairs=bool(kept), sft_rows=len(rows))
        return sum(bool(kept) for kept in correct)

    def on_predict_end(self) -> None:
        done = self.predicted
        rank_zero_info(
            f"UnifiedReward-Think rejection sampling (rank {self.global_rank}): {done['pairs']} pairs judged "
            f"({done['already_done']} already written), {done['correct_pairs']} correct -> {done['sft_rows']} SFT "
            f"rows in {self.output_dir}, {done['pairs'] - done['correct_pairs']} wrong -> "
            f"{self.output_dir}/unkept (GRPO)"
        )


__all__ = ["UnifiedRewardThink", "pair_row", "split_judgements"]
