"""``SequenceLengthCurriculum``: raise the response length limit of training rollouts at given steps.

Open Vision Reasoner trains with a maximum response length of 24k tokens for iterations 0–300, 32k
up to 700 and 48k after. At the start of every training step the callback sets the module's
``max_new_tokens`` (the rollout's limit; ``vlrl.hooks.RolloutLength``) to the length the schedule
gives for ``trainer.global_step``, and logs it as ``curriculum/max_new_tokens``. Steps are
``global_step``: policy optimizer steps, which is one per rollout with the default ``mini_batch_size``
and ``epochs``.

The length in force is part of the checkpoint (the callback's ``state_dict``): a resumed run starts
with it before its first step, then follows the configured schedule from the restored step. Schedule
steps at or beyond ``trainer.max_steps`` are allowed (with a warning naming them), so a long
schedule can run in stages (OVR: ``max_steps: 300``, then resume with ``max_steps: 900``) and a
shortened trial run (``--trainer.max_steps 2``) keeps the config's schedule.

In YAML::

    trainer:
      callbacks:
        - class_path: vlrl.callbacks.SequenceLengthCurriculum
          init_args:
            schedule: {0: 24576, 300: 32768, 700: 49152}
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import lightning.pytorch as pl

from vlrl.hooks import RolloutLength

log = logging.getLogger(__name__)

OVR_SCHEDULE = {0: 24576, 300: 32768, 700: 49152}


class SequenceLengthCurriculum(pl.Callback):
    """Sets the rollout's ``max_new_tokens`` from a ``{step: length}`` schedule at the start of each step.

    Args:
        schedule: ``{step: max_new_tokens}``: from ``step`` on (until the next entry), training rollouts
            sample up to this many tokens. Default: Open Vision Reasoner's ``{0: 24576, 300: 32768,
            700: 49152}``.
        initial: The length before the schedule's first step, for a schedule without an entry for
            step 0 (leave it null when there is one).
    """

    def __init__(self, schedule: dict[int, int] | None = None, initial: int | None = None) -> None:
        schedule = dict(OVR_SCHEDULE if schedule is None else schedule)
        if not schedule:
            raise ValueError("SequenceLengthCurriculum.schedule is empty: give {step: max_new_tokens}, e.g. {0: 1024}")
        bad = {s: n for s, n in schedule.items() if not isinstance(s, int) or not isinstance(n, int) or s < 0 or n < 1}
        if bad:
            raise ValueError(
                f"SequenceLengthCurriculum.schedule has bad entries {bad}: steps must be integers >= 0 and "
                "lengths (max_new_tokens) integers >= 1"
            )
        if 0 in schedule and initial is not None:
            raise ValueError(
                f"SequenceLengthCurriculum: initial={initial} and schedule[0]={schedule[0]} both give the length "
                "at step 0; remove initial"
            )
        if 0 not in schedule and initial is None:
            raise ValueError(
                f"SequenceLengthCurriculum.schedule={schedule} has no entry for step 0, so the length before step "
                f"{min(schedule)} is undefined: add `0: LENGTH` to the schedule or set `initial: LENGTH`"
            )
        if initial is not None and initial < 1:
            raise ValueError(f"SequenceLengthCurriculum.initial must be >= 1, got {initial}")
        if initial is not None:
            schedule[0] = initial
        self.steps = sorted(int(s) for s in schedule)
        self.lengths = [int(schedule[s]) for s in self.steps]
        self.current: int | None = None  # the length in force (restored from a checkpoint)

    def length_at(self, step: int) -> int:
        """The scheduled ``max_new_tokens`` at ``step``."""
        return self.lengths[bisect.bisect_right(self.steps, step) - 1]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, RolloutLength):
            raise TypeError(
                f"SequenceLengthCurriculum sets the rollout length of an RL method (a module with a settable "
                f"max_new_tokens, vlrl.hooks.RolloutLength, as vlrl.methods.RLMethod has), got "
                f"{type(pl_module).__name__}; remove the callback from this run"
            )
        late = [s for s in self.steps if 0 <= trainer.max_steps <= s]
        if stage == "fit" and late:  # a staged run (resumed with a higher max_steps) or a short trial run
            log.warning(
                "SequenceLengthCurriculum: schedule step(s) %s are at or beyond trainer.max_steps=%d and will not "
                "be reached in this run; the schedule is kept, so a run resumed with a higher max_steps uses them",
                late,
                trainer.max_steps,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.current is None:
            return
        pl_module.max_new_tokens = self.current  # the restored length, until the first step applies the schedule
        scheduled = self.length_at(trainer.global_step)
        if scheduled != self.current:
            log.warning(
                "SequenceLengthCurriculum: the checkpoint ran with max_new_tokens=%d, the schedule gives %d at "
                "step %d; following the schedule from the next step",
                self.current,
                scheduled,
                trainer.global_step,
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.current = self.length_at(trainer.global_step)
        pl_module.max_new_tokens = self.current
        pl_module.log("curriculum/max_new_tokens", float(self.current), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = state_dict["max_new_tokens"]
