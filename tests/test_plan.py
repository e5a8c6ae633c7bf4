"""The update plan: every batch size of an RL step derived once, with one error per misfit naming the keys."""

from __future__ import annotations

import pytest

from vlrl.methods.plan import plan_update

BASE = dict(prompts=4, prompts_source="data.batch_size=4", group_size=8, micro_batch_size=4)


def test_sizes_by_hand():
    whole = plan_update(**BASE)
    assert (whole.rollout_size, whole.update_size, whole.mini_batch_size, whole.policy_steps_per_epoch) == (
        32,
        32,
        None,
        1,
    )
    split = plan_update(**BASE, mini_batch_size=8)
    assert split.policy_steps_per_epoch == 4
    # RACRO-like: 512 samples per optimizer step over 64 devices -> 8 per device, 4 steps per 32-sample rollout
    racro = plan_update(**BASE, global_mini_batch_size=512, world_size=64, num_nodes=8)
    assert (racro.mini_batch_size, racro.policy_steps_per_epoch) == (8, 4)
    replay = plan_update(**BASE, mini_batch_size=8, update_batch_size=16, update_batch_source="Replay.batch_size")
    assert (replay.update_size, replay.policy_steps_per_epoch) == (16, 2)
    critic = plan_update(**BASE, critic_steps=4)
    assert critic.critic_steps == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(mini_batch_size=5),
            r"mini_batch_size=5 does not divide the update batch of 32 samples \(data.batch_size=4 prompts x group_size=8\); pick a divisor of 32",
        ),
        (dict(mini_batch_size=2), r"micro_batch_size=4 is larger than mini_batch_size=2"),
        (
            dict(global_mini_batch_size=100, world_size=8),
            r"model.global_mini_batch_size=100 does not split evenly over 8 devices",
        ),
        (
            dict(global_mini_batch_size=40, world_size=8),
            r"mini_batch_size=5 \(model.global_mini_batch_size=40 / 8 devices\) does not divide",
        ),
        (
            dict(update_batch_size=40, update_batch_source="SelectiveSampleReplay.batch_size"),
            r"SelectiveSampleReplay.batch_size=40 is larger than the rollout of 32 samples",
        ),
        (
            dict(update_batch_size=12, update_batch_source="SelectiveSampleReplay.batch_size", mini_batch_size=8),
            r"does not divide the update batch of 12 samples \(SelectiveSampleReplay.batch_size\)",
        ),
        (dict(critic_steps=3), r"critic_steps=3 does not divide the update batch of 32 samples"),
    ],
)
def test_each_misfit_names_its_keys(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_update(**{**BASE, **kwargs})


def test_a_token_budget_replaces_the_micro_batch_size_check():
    # micro_batch_size=4 over a mini-batch of 2 is refused by sample count; with a budget the forwards are cut
    # by tokens, so only the mini-batch sizes are checked
    plan = plan_update(**BASE, mini_batch_size=2, max_tokens_per_micro_batch=4096)
    assert (plan.mini_batch_size, plan.policy_steps_per_epoch, plan.max_tokens_per_micro_batch) == (2, 16, 4096)
    with pytest.raises(ValueError, match="mini_batch_size=5 does not divide"):
        plan_update(**BASE, mini_batch_size=5, max_tokens_per_micro_batch=4096)
