"""Position bias of a pairwise judge: candidates swapped, both orders scored, a judge that names position 1 scores 0."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_grpo import quiet_trainer
from vlrl.data import PreferencePairs, RLDataModule, SFTDataModule, SyntheticPairs, make_pairs, swap_candidates
from vlrl.data.preference import named_position
from vlrl.methods import SFT, UnifiedRewardThink
from vlrl.models import Policy
from vlrl.rewards import HFReasoner, JudgeReward, PreferenceReward, both_orders, judged_correctly
from vlrl.rollout import Sampling

ALWAYS_FIRST = "<think>t</think>\n<answer>Answer 1 is better</answer>"


def pair_batch(size: int, tasks: list[str] | None = None):
    data = RLDataModule(predict=PreferencePairs(SyntheticPairs("val", size, tasks=tasks)), eval_batch_size=size)
    data.setup("predict")
    return next(iter(data.predict_dataloader()))


# ------------------------------------------------------------------------------ swapping


def test_swap_candidates_swaps_answers_or_images_and_flips_labels():
    batch = pair_batch(4)  # generation, understanding, generation, understanding
    swapped = swap_candidates(batch)
    flip = {"Image 1 is better": "Image 2 is better", "Answer 1 is better": "Answer 2 is better"}
    flip |= {v: k for k, v in flip.items()}
    assert swapped.answers == [flip[a] for a in batch.answers]
    for i in range(4):
        text, swapped_text = (m[-1]["content"][-1]["text"] for m in (batch.messages[i], swapped.messages[i]))
        if batch.data_sources[i] == "generation":
            assert swapped_text == text  # the caption prompt does not change, the images change places
            assert [im.tobytes() for im in swapped.images[i]] == [im.tobytes() for im in batch.images[i][::-1]]
        else:
            first, second = batch.extras[i]["responses"]
            assert f"Answer 1: {first}\n\nAnswer 2: {second}" in text
            assert f"Answer 1: {second}\n\nAnswer 2: {first}" in swapped_text
            assert [im.tobytes() for im in swapped.images[i]] == [im.tobytes() for im in batch.images[i]]
            assert swapped.extras[i]["responses"] == [second, first]
    twice = swap_candidates(swapped)
    assert twice.messages == batch.messages and twice.answers == batch.answers
    assert [[im.tobytes() for im in ims] for ims in twice.images] == [
        [im.tobytes() for im in ims] for ims in batch.images
    ]


def test_swap_candidates_refuses_rows_that_are_not_pairs():
    batch = pair_batch(2)
    batch.extras[1].pop("swapped_messages")
    with pytest.raises(ValueError, match=r"swapped_messages.*PreferencePairs"):
        swap_candidates(batch)


def test_named_position_reads_both_tasks_labels():
    assert [named_position(v) for v in ("Image 1 is better", " answer 2 is BETTER.", "Both", None)] == [
        1,
        2,
        None,
        None,
    ]


# ------------------------------------------------------------------------- both orders


def test_both_orders_hand_worked():
    """Four pairs, labels 1, 2, 1, 2 (given order). Verdicts (given order / swapped order):

    pair 0: 1 / 2 -> names the same candidate both times, right both times: correct, consistent
    pair 1: 1 / 1 -> position 1 both times: neither (right once, in the given order it is wrong)
    pair 2: 2 / 1 -> consistent but wrong both times
    pair 3: 2 / no verdict -> neither
    """
    v = "<think>t</think><answer>Image {} is better</answer>".format
    first = [v(1), v(1), v(2), v(2)]
    second = [v(2), v(1), v(1), "<think>t</think>"]
    labels = ["Image 1 is better", "Image 2 is better", "Image 1 is better", "Image 2 is better"]
    result = both_orders(first, second, labels)
    assert result.correct == [True, False, False, False]
    assert result.consistent == [True, False, True, False]


def test_a_judge_that_always_names_position_one_scores_half_in_one_order_and_zero_in_both():
    labels = ["Image 1 is better", "Image 2 is better"] * 4  # balanced
    always = ["<think>t</think><answer>Image 1 is better</answer>"] * 8
    assert sum(judged_correctly(t, label) for t, label in zip(always, labels, strict=True)) / 8 == 0.5
    result = both_orders(always, always, labels)
    assert sum(result.correct) == 0 and sum(result.consistent) == 0


# --------------------------------------------------- a real judge trained to name position 1


class AlwaysFirst(PreferencePairs):
    """Understanding pairs whose judgement always names Answer 1 (a judge with pure position bias)."""

    def __init__(self, size: int) -> None:
        super().__init__(SyntheticPairs("train", size, tasks=["understanding"]))

    def judge_record(self, record: Any, where: Any) -> dict[str, Any]:
        return {**super().judge_record(record, where), "response": ALWAYS_FIRST}


@pytest.fixture(scope="module")
def biased_judge(tmp_path_factory) -> Path:
    """The tiny VLM after SFT on one constant judgement: greedy, it names Answer 1 whatever the pair."""
    torch.manual_seed(0)
    module = SFT(
        Policy("tiny:qwen2_5_vl", dtype="float32"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        micro_batch_size=8,
    )
    quiet_trainer(max_steps=80).fit(module, SFTDataModule(train=AlwaysFirst(16), batch_size=8))
    out = tmp_path_factory.mktemp("biased_judge")
    module.model.save_pretrained(out)
    module.processor.save_pretrained(out)
    return out


def evaluate(path: Path, order_swap: bool) -> dict[str, float]:
    model = UnifiedRewardThink(
        policy=Policy(str(path), dtype="float32"),
        rewards=[PreferenceReward()],
        eval_sampling=Sampling(temperature=0.0, max_new_tokens=24),
        order_swap=order_swap,
        group_size=2,
    )
    data = RLDataModule(
        test=PreferencePairs(SyntheticPairs("test", 8, tasks=["understanding"])), batch_size=2, eval_batch_size=8
    )
    trainer = quiet_trainer(max_steps=1, default_root_dir=path / f"eval_swap{int(order_swap)}")
    trainer.test(model, data, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_test_stage_with_order_swap_scores_a_position_biased_judge_zero(biased_judge):
    labels = [row["label"] for row in make_pairs("test", 8, tasks=["understanding"])]
    first_wins = sum(label == "Answer 1 is better" for label in labels) / 8
    assert 0 < first_wins < 1  # both positions win in the held-out pairs
    one = evaluate(biased_judge, order_swap=False)
    assert one["test/format"] == 1.0  # the judge learnt its one judgement
    assert one["test/accuracy"] == pytest.approx(first_wins)  # one order: right wherever Answer 1 is the label
    both = evaluate(biased_judge, order_swap=True)
    assert both["test/format"] == 1.0
    assert both["test/accuracy_one_order"] == pytest.approx(first_wins)
    assert both["test/accuracy"] == 0.0 and both["test/accuracy/understanding"] == 0.0
    assert both["test/position_consistency"] == 0.0
    # each pair's two judgements are in the predictions file, neither consistent
    report = biased_judge / "eval_swap1" / "eval" / "test-step0" / "predictions.jsonl"
    written = [json.loads(line) for line in report.open()]
    assert len(written) == 8 and all(r["details"]["consistent"] is False for r in written)
    assert all("Answer 1" in r["extracted"] and "Answer 1" in r["details"]["swapped_response"] for r in written)


def test_judge_reward_with_order_swap_pays_nothing_for_a_position_verdict(biased_judge):
    judge = HFReasoner(str(biased_judge), dtype="float32")
    sampling = Sampling(temperature=0.0, max_new_tokens=24)
    kwargs = dict(
        answers=["red", "blue", "3"],
        choices=[None] * 3,
        finish_reasons=["stop"] * 3,
        questions=["What colour is the shape?", "What colour is the shape?", "How many shapes are there?"],
    )
    completions = ["red", "green", "2"]
    plain = JudgeReward(judge, show_images=False, sampling=sampling)
    assert plain(completions, **kwargs) == [1.0, 1.0, 1.0]  # the response is Answer 1: always "preferred"
    second = JudgeReward(judge, show_images=False, sampling=sampling, response_position="second")
    assert second(completions, **kwargs) == [0.0, 0.0, 0.0]
    swapped = JudgeReward(judge, show_images=False, sampling=sampling, order_swap=True)
    assert swapped(completions, **kwargs) == [0.0, 0.0, 0.0]
    assert swapped.counts == {"judged": 3, "unparseable": 0, "inconsistent": 3}


def test_judge_reward_order_swap_hand_worked_scores():
    """A verdict scores for the response by the position it held; a verdict on images is no verdict on answers."""
    reward = JudgeReward(HFReasoner("tiny:qwen2_5_vl"), show_images=False, order_swap=True)
    assert reward.verdict_score("<answer>Answer 1 is better</answer>", "first") == 1.0
    assert reward.verdict_score("<answer>Answer 1 is better</answer>", "second") == 0.0
    assert reward.verdict_score("<answer>Answer 2 is better</answer>", "second") == 1.0
    assert math.isnan(reward.verdict_score("<answer>Image 2 is better</answer>", "second"))
    with pytest.raises(ValueError, match=r"order_swap=true with mode='pointwise'"):
        JudgeReward(HFReasoner("tiny:qwen2_5_vl"), mode="pointwise", show_images=False, order_swap=True)
