"""VL-Rethinker's reward terms: the invalid-response penalty and the native-wait bonus, summed with accuracy."""

from __future__ import annotations

import pytest

from vlrl.rewards import (
    AccuracyReward,
    InvalidResponsePenalty,
    NativeWaitBonus,
    correct_by_rewards,
    count_waits,
    invalid_reason,
    score,
)


def test_count_waits_counts_the_word_in_any_case():
    assert count_waits("Wait, 3? wait... WAIT! awaited waiter wait.") == 4
    assert count_waits("no pauses here") == 0


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        (r"so \boxed{2}", "stop", None),
        (r"so \boxed{2}", "length", "truncated"),
        ("the answer is 2", "stop", "no_boxed"),
        (r"so \boxed{2", "stop", "no_boxed"),  # unclosed box
        ("wait " * 5 + r"\boxed{2}", "stop", None),  # five is allowed
        ("wait " * 6 + r"\boxed{2}", "stop", "too_many_waits"),
    ],
)
def test_invalid_reason(text, finish, reason):
    assert invalid_reason(text, finish) == reason


def test_weighted_sum_gives_the_vl_rethinker_reward():
    """accuracy + penalty + 0.1 * bonus: invalid -> -0.1, correct with 1-2 native waits -> 1.1, else accuracy."""
    cases = [  # text, finish, trigger, expected total
        (r"x = 4, so \boxed{4}", "stop", "", 1.0),  # correct, no wait
        (r"x = 3. Wait, x = 4, so \boxed{4}", "stop", "", 1.1),  # correct, one native wait
        (r"Wait. Wait, x = 4: \boxed{4}", "stop", "", 1.1),  # two native waits
        (r"wait wait wait \boxed{4}", "stop", "", 1.0),  # three: no bonus, still valid
        (r"Wait, x = 5, so \boxed{5}", "stop", "", 0.0),  # wrong: no bonus
        (r"x = 4 \boxed{4}", "length", "", -0.1),  # truncated
        ("so the answer is 4", "stop", "", -0.1),  # graded correct by the phrase, but no box
        ("wait " * 6 + r"\boxed{4}", "stop", "", -0.1),  # correct, too many waits
        ("wait " * 6 + r"\boxed{5}", "stop", "", -0.1),  # wrong, too many waits
        ("\n\nWait, does it seem right? Yes: \\boxed{4}", "stop", "\n\nWait, does it seem right?", 1.0),  # trigger wait
        ("\n\nWait, does it seem right? Wait, yes: \\boxed{4}", "stop", "\n\nWait, does it seem right?", 1.1),
    ]
    texts, finishes, triggers, expected = map(list, zip(*cases, strict=True))
    rewards = [AccuracyReward(), InvalidResponsePenalty(), NativeWaitBonus(weight=0.1)]
    out = score(
        rewards,
        texts,
        answers=["4"] * len(texts),
        choices=[None] * len(texts),
        finish_reasons=finishes,
        facts={"rethink_trigger": triggers},
    )
    assert out.total.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.components["invalid_response_penalty"].tolist() == pytest.approx(
        [0, 0, 0, 0, 0, -0.1, -1.1, -1.1, -0.1, 0, 0], abs=1e-6
    )


def test_penalty_follows_the_weight_of_accuracy():
    rewards = [AccuracyReward(weight=2.0), InvalidResponsePenalty(penalty=-0.5, accuracy_weight=2.0)]
    out = score(rewards, ["the answer is 4"], answers=["4"], choices=[None], finish_reasons=["stop"])
    assert out.total.tolist() == pytest.approx([-0.5])


def test_strict_accuracy_and_penalty_total_the_paper_reward():
    """VL-Rethinker grades the last \\boxed{}: with boxed_only on both terms an invalid response totals -0.1."""
    cases = [  # text, finish, expected total
        (r"x = 4, so \boxed{4}", "stop", 1.0),
        ("So the answer is 4.", "stop", -0.1),  # the lenient accuracy would say 1, the penalty cancels 0
        ("So the answer is 5.", "stop", -0.1),
        ("wait " * 6 + r"\boxed{4}", "stop", -0.1),
        (r"\boxed{4}", "length", -0.1),
        (r"\boxed{5}", "stop", 0.0),
    ]
    texts, finishes, expected = map(list, zip(*cases, strict=True))
    n = len(texts)
    rewards = [AccuracyReward(boxed_only=True), InvalidResponsePenalty(boxed_only=True)]
    out = score(rewards, texts, answers=["4"] * n, choices=[None] * n, finish_reasons=finishes)
    assert out.total.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.components["invalid_response_penalty"].tolist() == pytest.approx([0, -0.1, -0.1, -1.1, -0.1, 0])
    # a penalty that does not match the accuracy's extraction cancels an accuracy that is not there
    mismatched = [AccuracyReward(boxed_only=True), InvalidResponsePenalty()]
    out = score(mismatched, texts[1:2], answers=["4"], choices=[None], finish_reasons=["stop"])
    assert out.total.tolist() == pytest.approx([-1.1])


def test_penalty_counts_only_valid_right_responses_as_correct():
    texts = [r"so \boxed{4}", "So the answer is 4.", "Wait. " * 6 + r"\boxed{4}", r"\boxed{4}", r"\boxed{5}"]
    kwargs = dict(answers=["4"] * 5, choices=[None] * 5, finish_reasons=["stop", "stop", "stop", "length", "stop"])
    for penalty in (InvalidResponsePenalty(), InvalidResponsePenalty(boxed_only=True)):
        assert penalty.correct(texts, **kwargs) == [True, False, False, False, False]
    assert InvalidResponsePenalty(max_waits=6).correct(texts, **kwargs)[2] is True
    assert NativeWaitBonus().correct(texts, **kwargs) is None  # a bonus has no say on correctness
    vl_rethinker = [AccuracyReward(boxed_only=True), InvalidResponsePenalty(boxed_only=True), NativeWaitBonus()]
    assert correct_by_rewards(vl_rethinker, texts, **kwargs) == [True, False, False, False, False]
    assert correct_by_rewards([NativeWaitBonus()], texts, **kwargs) == [True, True, True, False, False]  # is_correct


def test_without_triggers_every_wait_is_native():
    bonus = NativeWaitBonus()
    assert bonus([r"Wait, \boxed{4}"], answers=["4"], choices=[None], finish_reasons=["stop"]) == [1.0]


def test_multiple_choice_is_graded_like_accuracy():
    rewards = [AccuracyReward(), InvalidResponsePenalty(), NativeWaitBonus()]
    out = score(
        rewards,
        [r"Wait, it is (B): \boxed{B}", r"\boxed{C}"],
        answers=["B", "B"],
        choices=[["1", "2", "3"]] * 2,
        finish_reasons=["stop", "stop"],
    )
    assert out.total.tolist() == pytest.approx([1.1, 0.0])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: InvalidResponsePenalty(penalty=float("nan")), "penalty=nan"),
        (lambda: InvalidResponsePenalty(max_waits=-1), "max_waits=-1"),
        (lambda: NativeWaitBonus(min_waits=3, max_waits=2), "min_waits=3 is above max_waits=2"),
        (lambda: NativeWaitBonus(max_total_waits=1.5), "max_total_waits=1.5"),
    ],
)
def test_bad_settings_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_step_passes_rethinking_facts_to_the_rewards():
    """A trigger's "Wait" is not native: the step hands ``facts["rethink_trigger"]`` from the rollout to the rewards."""
    import torch

    from vlrl.methods import GRPO
    from vlrl.models import Policy
    from vlrl.types import PromptBatch, Rollout

    text = "Wait, 2+2. \\boxed{4}"
    batch = PromptBatch(ids=["a"], messages=[[]], images=[[]], answers=["4"], choices=[None], data_sources=["x"])
    rollout = Rollout(
        prompts=[None, None],
        response_ids=torch.zeros(2, 3, dtype=torch.long),
        response_mask=torch.ones(2, 3),
        logprobs=torch.zeros(2, 3),
        texts=[text, text],
        finish_reasons=["stop", "stop"],
        group_index=torch.tensor([0, 0]),
        batch=batch,
        facts={"rethink_trigger": ["", "Wait"]},
    )
    module = GRPO(
        policy=Policy("tiny:qwen2_5_vl"),
        rewards=[AccuracyReward(), InvalidResponsePenalty(), NativeWaitBonus(weight=0.1)],
        group_size=2,
    )
    assert module.score(rollout).rewards.tolist() == pytest.approx([1.1, 1.0])
