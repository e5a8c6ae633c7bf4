"""Typed per-token Rollout fields (returns, engine log-probs, importance weights) and the one facts channel.

The fields travel with their samples through ``select``, ``concat`` and the replay buffer; what callbacks
know about samples (``Rollout.facts``) reaches the rewards as the one keyword ``facts``, so a fact named
like a reward keyword (``answers``, ``images``, ``finish_reasons``) neither breaks nor shadows it.
"""

from __future__ import annotations

import io

import pytest
import torch

from tests.test_replay import PAD, toy_rollout
from vlrl.callbacks import SelectiveSampleReplay
from vlrl.methods import GRPO
from vlrl.models import Policy
from vlrl.rewards import AccuracyReward, RewardFunction, correct_by_rewards, score
from vlrl.types import PromptBatch, Rollout


def with_fields(rollout: Rollout, base: float, weight: float) -> Rollout:
    """``returns = (base + k) * mask`` (k counts the [N, T] entries row by row), ``engine_logprobs = -returns``,
    ``is_weights = weight * mask``."""
    n, t = rollout.response_ids.shape
    rollout.returns = (base + torch.arange(n * t, dtype=torch.float32).view(n, t)) * rollout.response_mask
    rollout.engine_logprobs = -rollout.returns
    rollout.is_weights = weight * rollout.response_mask
    return rollout


# --------------------------------------------------------------------------- select / concat
def test_typed_fields_follow_their_samples_through_concat_and_select():
    a = with_fields(toy_rollout("a", [1.0, 0.0, 0.0, -1.0], width=5), base=0.0, weight=0.5)  # lengths 2 3 4 2
    b = with_fields(toy_rollout("b", [1.0, -1.0] * 4, width=3), base=100.0, weight=2.0)  # lengths 2 3 3 2 3 3 2 3
    out = Rollout.concat([a, b], pad_id=PAD)
    assert out.returns.shape == out.engine_logprobs.shape == out.is_weights.shape == (12, 5)
    assert torch.equal(out.returns[:4], a.returns)
    # b's rows keep their values and are right-padded with 0 to the width of 5
    assert out.returns[4].tolist() == [100.0, 101.0, 0.0, 0.0, 0.0]
    assert out.returns[5].tolist() == [103.0, 104.0, 105.0, 0.0, 0.0]
    assert out.engine_logprobs[5].tolist() == [-103.0, -104.0, -105.0, 0.0, 0.0]
    assert out.is_weights[5].tolist() == [2.0, 2.0, 2.0, 0.0, 0.0]
    picked = out.select([5, 1, 5])  # repeats allowed
    assert picked.returns.tolist() == [
        [103.0, 104.0, 105.0, 0.0, 0.0],
        [5.0, 6.0, 7.0, 0.0, 0.0],  # a's row 1: k = 5..9 on its 3 tokens
        [103.0, 104.0, 105.0, 0.0, 0.0],
    ]
    assert picked.is_weights.tolist() == [[2.0] * 3 + [0.0] * 2, [0.5] * 3 + [0.0] * 2, [2.0] * 3 + [0.0] * 2]
    assert torch.equal(picked.engine_logprobs, -picked.returns)


@pytest.mark.parametrize("name", ["returns", "engine_logprobs", "is_weights"])
def test_concat_refuses_a_typed_field_set_in_only_some_rollouts(name):
    a = with_fields(toy_rollout("a", [1.0] * 4), base=0.0, weight=1.0)
    b = with_fields(toy_rollout("b", [1.0] * 4), base=0.0, weight=1.0)
    setattr(b, name, None)
    with pytest.raises(ValueError, match=f"`{name}` is set in some rollouts and None in others"):
        Rollout.concat([a, b], pad_id=PAD)


def test_facts_are_per_sample_lists():
    rollout = toy_rollout("a", [1.0] * 4)
    rollout.facts["returns"] = torch.zeros(4, 5)  # a tensor belongs in a typed field
    with pytest.raises(TypeError, match=r"Rollout.facts\['returns'\] is a Tensor; facts are lists"):
        rollout.select([0])


# --------------------------------------------------------------------------------- replay
def test_the_replay_buffer_keeps_the_typed_fields_and_facts_of_its_samples():
    ssr = SelectiveSampleReplay(seed=0)
    first = with_fields(toy_rollout("s0", [0, 0, 0, 0, 1, -1, 0.5, -0.5]), base=0.0, weight=0.5)
    first.facts["rethought"] = [i == 5 for i in range(8)]
    out, _ = ssr.reshape(first, PAD, step=0)
    order = [4, 5, 6, 7, 0, 1, 2, 3]  # kept samples, then the zero-advantage fill
    assert torch.equal(out.returns, first.returns[order]) and torch.equal(out.is_weights, first.is_weights[order])
    assert [len(e["returns"]) for e in ssr.entries] == [3, 4, 2, 3]  # stored without padding
    second = with_fields(toy_rollout("s1", [2, -2, 1, -1, 0, 0, 0, 0]), base=1000.0, weight=2.0)
    out, _ = ssr.reshape(second, PAD, step=1)
    assert out.facts["replayed"] == [False] * 4 + [True] * 4
    assert torch.equal(out.returns[:4], second.returns[:4])
    for j in range(4, 8):  # each replayed sample carries its own stored rows, padded back to the width
        i = int(out.texts[j].split("-")[1])
        assert torch.equal(out.returns[j], first.returns[i])
        assert torch.equal(out.engine_logprobs[j], first.engine_logprobs[i])
        assert torch.equal(out.is_weights[j], first.is_weights[i])
        assert out.facts["rethought"][j] is (i == 5)
    assert out.facts["rethought"][:4] == [None] * 4  # the current step's samples have no such fact


def test_a_replay_checkpoint_round_trip_keeps_fields_and_reads_the_facts_of_earlier_checkpoints():
    ssr = SelectiveSampleReplay(seed=0)
    first = with_fields(toy_rollout("s0", [1, -1, 0.5, -0.5]), base=0.0, weight=0.5)
    first.facts["rethought"] = [True, False, False, True]
    ssr.reshape(first, PAD, step=0)
    state = ssr.state_dict()
    for entry in state["ranks"][0]["entries"]:  # as checkpoints written before facts had their name
        entry["extras"] = entry.pop("facts")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = SelectiveSampleReplay(seed=0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    replayed = restored.as_rollout(list(restored.entries), PAD)  # padded to the longest stored response, 4
    assert torch.equal(replayed.returns, first.returns[:, :4])
    assert torch.equal(replayed.is_weights, first.is_weights[:, :4])
    assert replayed.facts["rethought"] == [True, False, False, True]


# -------------------------------------------------------------------------------- rewards
class Recorder(RewardFunction):
    """Scores 0 and keeps the keywords of its last call."""

    isolation = "thread"  # read back after the call: its state must change in this process, not a worker's copy

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict = {}

    def __call__(self, completions, *, answers, choices, finish_reasons, **kwargs):
        self.seen = {"answers": answers, "finish_reasons": finish_reasons, **kwargs}
        return [0.0] * len(completions)


def facts_rollout(facts: dict) -> Rollout:
    batch = PromptBatch(
        ids=["a"], messages=[[]], images=[[]], answers=["4"], choices=[None], data_sources=["x"], questions=["2+2?"]
    )
    return Rollout(
        prompts=[None, None],
        response_ids=torch.zeros(2, 3, dtype=torch.long),
        response_mask=torch.ones(2, 3),
        logprobs=torch.zeros(2, 3),
        texts=[r"\boxed{4}", r"\boxed{5}"],
        finish_reasons=["stop", "stop"],
        group_index=torch.tensor([0, 0]),
        batch=batch,
        facts=facts,
    )


def test_facts_named_like_reward_keywords_reach_the_rewards_only_under_facts():
    recorder = Recorder()
    module = GRPO(policy=Policy("tiny:qwen2_5_vl"), rewards=[AccuracyReward(), recorder], group_size=2)
    facts = {"answers": ["5", "5"], "images": ["not", "images"], "finish_reasons": ["length"] * 2, "n": [1, 2]}
    rollout = module.score(facts_rollout(facts))
    assert rollout.rewards.tolist() == [1.0, 0.0]  # graded against the gold "4", not the fact "5"
    seen = recorder.seen
    assert seen["answers"] == ["4", "4"] and seen["finish_reasons"] == ["stop", "stop"]
    assert seen["images"] == [[], []] and seen["questions"] == ["2+2?"] * 2 and seen["data_sources"] == ["x", "x"]
    assert seen["facts"] == facts
    assert "n" not in seen  # facts are never spread into the keywords


def test_the_runner_and_correct_by_rewards_take_facts_as_one_keyword():
    recorder = Recorder()
    kwargs = dict(answers=["4", "4"], choices=[None, None], finish_reasons=["stop", "stop"])
    out = score([AccuracyReward(), recorder], [r"\boxed{4}", r"\boxed{5}"], facts={"answers": ["5", "5"]}, **kwargs)
    assert out.total.tolist() == [1.0, 0.0] and recorder.seen["facts"] == {"answers": ["5", "5"]}
    score([recorder], ["a", "b"], **kwargs)
    assert recorder.seen["facts"] == {} and recorder.seen["images"] is None  # the protocol's keywords, always
    verdict = correct_by_rewards(
        [AccuracyReward()], [r"\boxed{4}", r"\boxed{5}"], facts={"answers": ["5"] * 2}, **kwargs
    )
    assert verdict == [True, False]


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ({"answers": ["5"]}, r"facts\['answers'\] has 1 entries for 2 completions"),
        ({"w": torch.ones(2)}, r"facts\['w'\] is a Tensor: give a list with one entry per completion"),
        ([["5", "5"]], "facts is a list: give a dict of per-sample lists"),
    ],
)
def test_the_runner_names_a_bad_fact(facts, message):
    with pytest.raises(ValueError, match=message):
        score(
            [AccuracyReward()],
            ["a", "b"],
            answers=["4"] * 2,
            choices=[None] * 2,
            finish_reasons=["stop"] * 2,
            facts=facts,
        )
