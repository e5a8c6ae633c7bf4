"""Dynamic sampling (DAPO, Yu et al. 2025): update only on groups whose advantages are not all zero.

A group whose samples all get the same reward has advantages exactly 0 (``group_advantages``) and adds no
policy gradient, while it still dilutes a token-mean loss. After advantages are computed
(``on_advantages_computed``), this callback

1. drops the groups with zero advantage (``vlrl.algorithms.zero_advantage``, the rule the replay and the
   ``advantage/zero_group_frac`` metric share);
2. while fewer than the step's number of prompts are left, draws another batch of prompts, samples and
   scores it through the module's own steps 1-4 (``RLMethod.sample``: the ``on_rollout_end`` callbacks,
   the rewards, values and advantages) and keeps its non-zero groups, up to ``max_draws`` batches per step
   in all (the step's own included; verl's ``max_num_gen_batches``);
3. keeps the first groups found up to the step's number of prompts (surplus groups of the last draw are
   dropped, as in verl).

Decisions where the paper leaves room:

- **Where the extra prompts come from.** A second resumable stream over the training rows
  (a ``vlrl.data.ResumableLoader`` built by ``data.train_dataloader()``, so sharded like the step's loader), in its own shuffled order (seed
  ``seed``, default ``data.seed + 1``). Its position is part of the checkpoint (``state_dict``), and the
  step's loader still hands out one batch per step, so ``max_steps``, epochs and the data position mean
  what they mean without dynamic sampling, and a resumed run draws the same extra prompts.
- **When ``max_draws`` is reached** and groups are still missing, the update batch is filled with
  zero-advantage groups (of the step's own prompts first) rather than stopping the run: they add no
  gradient, as in plain GRPO, and the update batch keeps its size, so mini-batch sizes keep dividing it.
  ``dynamic_sampling/filled_groups`` counts them.
- **Several devices** draw the same number of batches per step (a draw is made while any device still
  misses groups), so collective operations inside generation and scoring stay matched.

Metrics (``Rollout.stats``, logged each step): ``dynamic_sampling/draws`` (prompt batches sampled this
step, the step's own included), ``dynamic_sampling/zero_group_frac`` (fraction of the sampled groups that
were dropped), ``dynamic_sampling/filled_groups`` and ``dynamic_sampling/prompts_drawn`` (extra prompts,
cumulative). ``perf/rollout_s`` and ``perf/rollout_tokens`` add up every draw.

Run: ``lightning-cli fit --config configs/demo/dapo.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from vlrl.algorithms import zero_advantage
from vlrl.data import ResumableLoader, RLDataModule
from vlrl.hooks import RLCallback
from vlrl.types import PromptBatch, Rollout

if TYPE_CHECKING:
    from vlrl.methods.base import RLMethod

PERF_STATS = ("perf/rollout_s", "perf/rollout_tokens")  # figures of ``RLMethod.sample`` summed over the draws


class DynamicSampling(RLCallback):
    """Keeps only groups with non-zero advantage, drawing more prompts until the update batch is full (DAPO).

    Args:
        max_draws: Most prompt batches sampled in one step, the step's own included (>= 1; verl's
            ``max_num_gen_batches``; 1 only drops nothing and draws nothing).
        seed: Seed of the order of the extra prompts; default ``data.seed + 1`` (another order than the
            step's own prompts).
    """

    def __init__(self, max_draws: int = 10, seed: int | None = None) -> None:
        if max_draws < 1:
            raise ValueError(f"max_draws={max_draws} must be >= 1 (prompt batches per step, the step's own included)")
        self.max_draws = max_draws
        self.seed = seed
        self.prompts_drawn = 0  # extra prompts drawn so far (this rank)
        self._loader: ResumableLoader | None = None
        self._iterator: Iterator[PromptBatch] | None = None
        self._state: dict[str, Any] | None = None  # a checkpoint's loader state, applied when the loader is built

    # --------------------------------------------------------------------------------- the hook
    def on_advantages_computed(self, trainer: pl.Trainer, pl_module: RLMethod, rollout: Rollout) -> Rollout:
        out, stats = self.fill(rollout, lambda: pl_module.sample(self.next_batch(trainer)), pl_module)
        out.stats.update(stats)  # logged by the step
        return out

    def fill(
        self, rollout: Rollout, draw: Callable[[], Rollout], pl_module: RLMethod
    ) -> tuple[Rollout, dict[str, float]]:
        """The update batch for ``rollout``: its non-zero groups, then those of further draws (``draw()`` returns
        a sampled and scored ``Rollout``), ``len(rollout.batch)`` groups in all; and the metrics."""
        if rollout.advantages is None:
            raise ValueError("DynamicSampling runs after the advantages are computed; this rollout has none")
        target = len(rollout.batch)
        rollouts, kept, zero = [rollout], [], []  # kept / zero: (rollout number, group) in the order found
        perf = {k: rollout.stats.get(k, 0.0) for k in PERF_STATS}
        sampled_groups = 0
        while True:
            latest = rollouts[-1]
            nonzero, empty = split_groups(latest)
            kept += [(len(rollouts) - 1, g) for g in nonzero]
            zero += [(len(rollouts) - 1, g) for g in empty]
            sampled_groups += len(nonzero) + len(empty)
            missing = float(len(kept) < target)
            if len(rollouts) >= self.max_draws or not pl_module.all_reduce(torch.tensor(missing), op="max").item():
                break
            extra = draw()
            self.prompts_drawn += len(extra.batch)
            for k in PERF_STATS:
                perf[k] += extra.stats.get(k, 0.0)
            rollouts.append(extra)
        chosen = kept[:target]
        filled = max(0, target - len(chosen))
        chosen += zero[:filled]
        parts = []
        for r, part in enumerate(rollouts):
            groups = [g for i, g in chosen if i == r]
            if groups:
                parts.append(take_groups(part, groups))
        out = Rollout.concat(parts, pl_module.pad_id) if len(parts) > 1 else parts[0]
        out.stats = {**rollout.stats, **perf}
        stats = {
            "dynamic_sampling/draws": float(len(rollouts)),
            "dynamic_sampling/zero_group_frac": len(zero) / max(sampled_groups, 1),
            "dynamic_sampling/filled_groups": float(filled),
            "dynamic_sampling/prompts_drawn": float(self.prompts_drawn),
        }
        return out, stats

    # ------------------------------------------------------------------------------ the prompts
    def next_batch(self, trainer: pl.Trainer) -> PromptBatch:
        """The next batch of the extra-prompt stream (a new epoch of it when one ends)."""
        if self._loader is None:
            self._loader = self.build_loader(trainer.datamodule)
        if self._iterator is None:
            self._iterator = iter(self._loader)
        try:
            return next(self._iterator)
        except StopIteration:  # the stream's epoch is over: its next epoch starts
            self._iterator = iter(self._loader)
            return next(self._iterator)

    def build_loader(self, datamodule: Any) -> ResumableLoader:
        """A loader like the step's (``datamodule.train_dataloader()``: rows, batch size, sharding) in the order of
        ``seed``, at the position of the checkpoint when one was loaded."""
        if not isinstance(datamodule, RLDataModule):
            raise TypeError(
                f"DynamicSampling draws extra prompts from an RLDataModule, got {type(datamodule).__name__}; "
                "configure data: class_path: vlrl.data.RLDataModule"
            )
        loader = datamodule.train_dataloader()
        loader.sampler.seed = datamodule.seed + 1 if self.seed is None else self.seed
        if self._state is not None:
            loader.load_state_dict(self._state)
            self._state = None
        return loader

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The extra-prompt stream's position (the same on every rank: all draw alike) and the prompts drawn."""
        loader = self._loader.state_dict() if self._loader is not None else self._state
        return {"loader": loader, "prompts_drawn": self.prompts_drawn}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.prompts_drawn = int(state_dict["prompts_drawn"])
        self._state, self._iterator = state_dict["loader"], None
        if self._loader is not None and self._state is not None:
            self._loader.load_state_dict(self._state)
            self._state = None


def split_groups(rollout: Rollout) -> tuple[list[int], list[int]]:
    """The groups (indices into ``rollout.batch``) with some non-zero advantage, and those with none, in order."""
    zero = zero_advantage(rollout.advantages)  # [N]
    nonzero, empty = [], []
    for g in range(len(rollout.batch)):
        members = rollout.group_index == g  # [N]
        if members.any():
            (empty if bool(zero[members].all()) else nonzero).append(g)
    return nonzero, empty


def take_groups(rollout: Rollout, groups: list[int]) -> Rollout:
    """The samples of ``groups`` (indices into ``rollout.batch``), with a batch of those prompts alone."""
    where = {g: j for j, g in enumerate(groups)}
    index = [i for i, g in enumerate(rollout.group_index.tolist()) if g in where]
    out = rollout.select(index)
    out.batch = rollout.batch.select(groups)
    out.group_index = torch.tensor([where[g] for g in out.group_index.tolist()], dtype=torch.long)  # [n]
    return out
