"""What a callback may rely on inside a training step: the ``RLCallback`` hooks and the module's public attributes.

A method's ``training_step`` calls, on every rank and for every callback that is an
``RLCallback``, in the order the callbacks are configured:

- ``on_rollout_end`` right after sampling, before rewards (e.g. to extend or replace samples);
- ``on_advantages_computed`` after advantages, before the update (e.g. to reshape the update batch).

Each receives the step's ``Rollout`` and returns the one the step goes on with. Everything else a
callback needs comes from Lightning's own hooks and the documented attributes of the module, named
here as protocols (``RolloutLength``), so that a callback checks what it uses rather than which
method class it runs under.

This module sits beside ``vlrl.types``, below ``vlrl.methods`` and ``vlrl.callbacks``: methods call
the hooks and callbacks implement them without either importing the other. ``vlrl.callbacks.RLCallback``
is this class.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning.pytorch as pl

from vlrl.types import Rollout

__all__ = ["RLCallback", "RolloutLength"]


class RLCallback(pl.Callback):
    """Base class for callbacks that act inside the RL step. Override either hook.

    A callback that reshapes the update batch to a fixed size (``on_advantages_computed``) says so with
    ``update_batch_size`` (samples per device; ``None``: it keeps the rollout's size), so the step's batch
    sizes are checked against it before any weights load (``vlrl.methods.plan``).
    """

    @property
    def update_batch_size(self) -> int | None:
        return None

    def on_rollout_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollout: Rollout) -> Rollout:
        return rollout

    def on_advantages_computed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollout: Rollout) -> Rollout:
        return rollout


@runtime_checkable
class RolloutLength(Protocol):
    """A module whose training rollouts sample at most ``max_new_tokens`` tokens, a limit a callback may set
    between steps (``vlrl.methods.RLMethod`` and so every RL method; e.g. ``SequenceLengthCurriculum``)."""

    max_new_tokens: int
