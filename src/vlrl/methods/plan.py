"""The update plan of an RL step: every batch size, derived and checked once, before any weights load.

The sizes of one step live in several objects: the data batch (prompts per device, or a global batch
split over devices × nodes), the group size ``G``, the update batch a callback may reshape to (the
replay's ``batch_size``), the policy's mini- and micro-batches (per device, or a global mini-batch),
and a critic's steps per rollout. ``plan_update`` derives the per-device sizes from them and raises
one ``ValueError`` naming the keys whenever they do not fit, so a run with bad sizes stops in ``setup``
with the fix in the message, not mid-step. A token budget (``max_tokens_per_micro_batch``) cuts the
forwards by tokens instead of ``micro_batch_size``: the mini-batch sizes are checked alike, the
micro-batch size is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlrl.data.datamodule import per_device


@dataclass(frozen=True)
class UpdatePlan:
    """How one step's samples become optimizer steps on each device.

    Attributes:
        rollout_size: Samples generated per device and step (prompts per device × ``G``).
        update_size: Samples in the update batch (a callback's ``update_batch_size``, else the rollout).
        mini_batch_size: Samples per policy optimizer step, or ``None``: the whole update batch.
        micro_batch_size: Samples per forward/backward pass (unused with a token budget).
        critic_steps: Critic optimizer steps per rollout (``None`` without a critic).
        max_tokens_per_micro_batch: Tokens per forward/backward pass, or ``None``: ``micro_batch_size``
            samples. With a budget the passes per mini-batch depend on the lengths sampled, not on sizes.
    """

    rollout_size: int
    update_size: int
    mini_batch_size: int | None
    micro_batch_size: int
    critic_steps: int | None = None
    max_tokens_per_micro_batch: int | None = None

    @property
    def policy_steps_per_epoch(self) -> int:
        """Policy optimizer steps per pass over the update batch."""
        return self.update_size // (self.mini_batch_size or self.update_size)


def plan_update(
    *,
    prompts: int,
    prompts_source: str,
    group_size: int,
    micro_batch_size: int,
    mini_batch_size: int | None = None,
    global_mini_batch_size: int | None = None,
    world_size: int = 1,
    num_nodes: int = 1,
    update_batch_size: int | None = None,
    update_batch_source: str = "",
    critic_steps: int | None = None,
    max_tokens_per_micro_batch: int | None = None,
) -> UpdatePlan:
    """Derive and check the per-device sizes of an RL step.

    Args:
        prompts: Prompts per device and step (the datamodule's per-device ``batch_size``).
        prompts_source: How ``prompts`` came about, for messages (e.g. ``data.batch_size=4``).
        group_size: Samples per prompt (``model.group_size``).
        micro_batch_size: ``model.micro_batch_size``.
        mini_batch_size: ``model.mini_batch_size`` (per device), or ``None``.
        global_mini_batch_size: ``model.global_mini_batch_size`` (over all devices), or ``None``.
        world_size: ``trainer.devices`` × ``trainer.num_nodes``.
        num_nodes: ``trainer.num_nodes`` (for messages).
        update_batch_size: The update batch a callback reshapes the rollout to (per device), or ``None``.
        update_batch_source: The key that set it, for messages (e.g. ``SelectiveSampleReplay.batch_size``).
        critic_steps: A critic's optimizer steps per rollout (``model.critic_steps``), or ``None``.
        max_tokens_per_micro_batch: ``model.max_tokens_per_micro_batch``, or ``None``. A budget replaces
            ``micro_batch_size`` in the forwards, so the check that a micro-batch fits a mini-batch is
            not made (the budget itself is checked by ``RLMethod``).

    Example:
        >>> plan = plan_update(prompts=4, prompts_source="data.batch_size=4", group_size=8, micro_batch_size=4,
        ...                    global_mini_batch_size=64, world_size=4)
        >>> plan.rollout_size, plan.mini_batch_size, plan.policy_steps_per_epoch
        (32, 16, 2)
    """
    rollout_size = prompts * group_size
    update_size = update_batch_size or rollout_size
    source = update_batch_source if update_batch_size else f"{prompts_source} prompts x group_size={group_size}"
    if update_batch_size and update_batch_size > rollout_size:
        raise ValueError(
            f"{update_batch_source}={update_batch_size} is larger than the rollout of {rollout_size} samples "
            f"({prompts_source} prompts x group_size={group_size}); lower it or leave it null"
        )
    named = None
    if global_mini_batch_size is not None:
        mini_batch_size = per_device(global_mini_batch_size, "model.global_mini_batch_size", world_size, num_nodes)
        named = f"mini_batch_size={mini_batch_size} (model.global_mini_batch_size={global_mini_batch_size} / {world_size} devices)"
    mini = mini_batch_size or update_size
    named = named or f"mini_batch_size={mini}"
    if update_size % mini:
        raise ValueError(
            f"{named} does not divide the update batch of {update_size} samples ({source}); pick a divisor of "
            f"{update_size}"
        )
    if micro_batch_size > mini and mini_batch_size is not None and max_tokens_per_micro_batch is None:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} is larger than {named}: a micro-batch is a slice of a mini-batch; "
            f"set micro_batch_size to a divisor of {mini}"
        )
    if critic_steps is not None and update_size % critic_steps:
        raise ValueError(
            f"critic_steps={critic_steps} does not divide the update batch of {update_size} samples ({source}); "
            f"pick a divisor of {update_size}"
        )
    return UpdatePlan(
        rollout_size, update_size, mini_batch_size, micro_batch_size, critic_steps, max_tokens_per_micro_batch
    )
