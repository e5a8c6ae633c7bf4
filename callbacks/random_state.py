"""``RandomState``: the global random generators of every rank, saved in checkpoints and restored on resume.

The generators are Python's ``random``, NumPy's legacy global generator, torch's CPU generator and
the CUDA generators of this process's devices, one state per rank. vlrl's own randomness does not
depend on them (rollout sampling, mini-batch order, the data order, sample replay and rethinking are
seeded from the configured seed and the step), but dropout, a reward function calling ``random`` or
a user callback do, and without it a resumed run draws from the state ``seed_everything`` left at
start-up instead of the state at the step it resumes from. The states are stored as plain tensors
and integers, so a checkpoint still loads with ``torch.load(..., weights_only=True)``.

In YAML (``lightning-cli`` adds it by default)::

    trainer:
      callbacks:
        - class_path: vlrl.callbacks.RandomState
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["RandomState", "random_state", "set_random_state"]


def random_state() -> dict[str, Any]:
    """The global generators' states as plain values (tensors, ints, floats): weights-only loadable."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Restore the global generators from ``random_state()``'s output."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class RandomState(pl.Callback):
    """Saves the global random generators of every rank in checkpoints and restores them on resume.

    No arguments: ``lightning-cli`` adds it to every run (see the module docstring for why).
    """

    def __init__(self) -> None:
        self._restored: dict[int, dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Called on every rank when a checkpoint is written: gathers each rank's state."""
        mine = random_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
            return {"ranks": dict(enumerate(states))}
        return {"ranks": {0: mine}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict["ranks"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore now, after everything that ran between loading the checkpoint and the first step."""
        if self._restored is None:
            return
        state = self._restored.get(trainer.global_rank)
        if state is None:  # resumed on more ranks than saved: the new ranks keep their seeded start
            rank_zero_warn(
                f"RandomState: the checkpoint holds random states of {len(self._restored)} rank(s); rank "
                f"{trainer.global_rank} keeps its fresh state"
            )
        else:
            set_random_state(state)
        self._restored = None
