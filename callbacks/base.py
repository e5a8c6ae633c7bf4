"""``RLCallback``: the two places a callback may reach inside a training step.

A method's ``training_step`` calls, on every rank and for every callback that is an
``RLCallback``, in the order the callbacks are configured:

- ``on_rollout_end`` right after sampling, before rewards (e.g. to extend or replace samples);
- ``on_advantages_computed`` after advantages, before the update (e.g. to reshape the update batch).

Each receives the step's ``Rollout`` and returns the one the step goes on with. Everything else a
callback needs comes from Lightning's own hooks.
"""

from __future__ import annotations

import lightning.pytorch as pl

from vlrl.types import Rollout


class RLCallback(pl.Callback):
    """Base class for callbacks that act inside the RL step. Override either hook."""

    def on_rollout_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollout: Rollout) -> Rollout:
        return rollout

    def on_advantages_computed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollout: Rollout) -> Rollout:
        return rollout
