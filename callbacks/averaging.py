"""``CheckpointAveraging``: the final model is the uniform average of chosen intermediate checkpoints.

Open Vision Reasoner's final model averages several checkpoints of its RL stage; which ones is
configured either as explicit global steps (``steps: [700, 800, 900]``) or as every ``N`` steps over
the last ``M`` (``every_n_steps: 50, last_n_steps: 200`` keeps the final step and every 50th step
before it inside the last 200: 900, 850, 800, 750 for a 900-step run). A window of one step
(``every_n_steps: 1, last_n_steps: 1``) keeps only the final weights, which turns the callback into
a plain Hugging Face export of the trained model.

At each chosen step the trainable parameters of ``module.model`` (all of them, or only the LoRA
adapters; frozen weights never change) are gathered to CPU and written to ``snapshot_dir``, so no
snapshot stays in accelerator memory. When ``fit`` ends, the snapshots are averaged tensor by tensor
(float64, uniform) and written as

- ``ckpt_path``: a weights-only Lightning checkpoint of the whole module with the averaged weights
  (any other weights of the module, e.g. a critic, are the final ones);
- ``hf_dir``: a Hugging Face model directory (weights, config, generation config, processor files)
  that ``from_pretrained`` and ``vllm serve`` load. Under LoRA the averaged adapter is merged into
  the base weights: ``hf_dir`` is a plain model (see ``vlrl.averaging``).

Works with every vlrl method (the trained model is ``module.model``, its processor
``module.processor``). Snapshots are gathered with ``torch.distributed.checkpoint``'s full state
dict, so sharded (FSDP) modules are gathered on rank 0, which alone writes. The list of snapshots
taken is part of the callback's checkpoint state, so a resumed run averages the same ones.
``vlrl-average`` does the same averaging for Lightning checkpoint files that already exist.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vlrl.averaging import average_state_dicts, export_hf, lightning_checkpoint, load_weights, model_state


class CheckpointAveraging(pl.Callback):
    """Average the weights of chosen training steps and write them when ``fit`` ends.

    Args:
        steps: Global steps whose weights are averaged (one rule: this, or the next two).
        every_n_steps: With ``last_n_steps``: keep the final step and every ``every_n_steps``-th
            step before it that lies within the last ``last_n_steps`` steps.
        last_n_steps: The window (in steps, ending at the final step) of ``every_n_steps``.
            The final step is ``trainer.max_steps`` (or Lightning's estimate of the total steps).
        hf_dir: Folder for the averaged model as a Hugging Face directory (``from_pretrained``, vLLM).
        ckpt_path: File for the averaged weights as a weights-only Lightning checkpoint.
        snapshot_dir: Folder for the snapshots (default: ``<default_root_dir>/averaging_snapshots``).
        keep_snapshots: Keep the snapshot files after writing the average (else they are deleted).
    """

    def __init__(
        self,
        steps: list[int] | None = None,
        every_n_steps: int | None = None,
        last_n_steps: int | None = None,
        hf_dir: str | None = None,
        ckpt_path: str | None = None,
        snapshot_dir: str | None = None,
        keep_snapshots: bool = True,
    ) -> None:
        window = (every_n_steps, last_n_steps)
        if (steps is None) == (window == (None, None)):
            raise ValueError(
                f"give either steps (got {steps}) or every_n_steps and last_n_steps (got {every_n_steps}, "
                f"{last_n_steps}), not both and not neither; e.g. `every_n_steps: 50, last_n_steps: 200`"
            )
        if steps is not None and (not steps or any(s < 1 for s in steps)):
            raise ValueError(f"steps={steps} must be a non-empty list of global steps >= 1")
        if steps is None and (None in window or min(window) < 1):
            raise ValueError(
                f"every_n_steps={every_n_steps} and last_n_steps={last_n_steps} must both be set and >= 1 "
                "(every_n_steps: 1, last_n_steps: 1 keeps only the final weights)"
            )
        if hf_dir is None and ckpt_path is None:
            raise ValueError("set hf_dir and/or ckpt_path: the averaged model has nowhere to go")
        self.steps = sorted(set(steps)) if steps is not None else None
        self.every_n_steps = every_n_steps
        self.last_n_steps = last_n_steps
        self.hf_dir = hf_dir
        self.ckpt_path = ckpt_path
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.keep_snapshots = keep_snapshots
        self.planned: list[int] = []
        self.kept: dict[int, str] = {}  # global step of a snapshot -> its file
        self.done: set[int] = set()  # planned steps already covered by a snapshot
        self._last_step = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(steps=self.steps, every=self.every_n_steps, last=self.last_n_steps)

    def chosen_steps(self, final_step: int) -> list[int]:
        """The global steps whose weights are averaged, for a run that ends at ``final_step``."""
        if self.steps is not None:
            return list(self.steps)
        count = math.ceil(self.last_n_steps / self.every_n_steps)
        return sorted(s for k in range(count) if (s := final_step - k * self.every_n_steps) >= 1)

    # ------------------------------------------------------------------------------ snapshots
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.snapshot_dir is None:
            self.snapshot_dir = Path(trainer.default_root_dir) / "averaging_snapshots"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        self.planned = self.chosen_steps(final)
        late = [s for s in self.planned if s > final]
        if late:
            rank_zero_warn(f"CheckpointAveraging: steps {late} come after the final step {final} and will not be kept")
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = [s for s in self.planned if self._last_step < s <= step and s not in self.done]
        self._last_step = step
        if not due:
            return
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(pl_module.model, options=options)  # every rank takes part in the gather
        path = self.snapshot_dir / f"step={step}.pt"
        if trainer.is_global_zero:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
        self.kept[step] = str(path)
        self.done.update(due)

    # -------------------------------------------------------------------------------- average
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.kept:
            rank_zero_warn(f"CheckpointAveraging: none of the steps {self.planned} was reached; nothing written")
            return
        full = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_global_zero:
            self.write(trainer, pl_module, full)
        trainer.strategy.barrier()

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: dict[str, torch.Tensor]) -> None:
        """Average the snapshots into the module's final state and write the outputs (rank 0)."""
        missing = [p for p in self.kept.values() if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"CheckpointAveraging: snapshot files {missing} are gone; cannot average")
        steps = sorted(self.kept)
        averaged = average_state_dicts([load_weights(self.kept[s]) for s in steps])
        state = {**full, **{f"model.{k}": v for k, v in averaged.items()}}
        if self.ckpt_path is not None:
            Path(self.ckpt_path).parent.mkdir(parents=True, exist_ok=True)
            last = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
            torch.save(lightning_checkpoint(state, steps, [self.kept[s] for s in steps], last), self.ckpt_path)
        if self.hf_dir is not None:
            export_hf(pl_module.model, pl_module.processor, model_state(state), self.hf_dir)
        rank_zero_info(f"CheckpointAveraging: averaged steps {steps} -> {self.hf_dir or ''} {self.ckpt_path or ''}")
        if not self.keep_snapshots:
            for path in self.kept.values():
                Path(path).unlink(missing_ok=True)

    # ---------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"kept": dict(self.kept), "done": sorted(self.done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.kept = {int(k): str(v) for k, v in state_dict["kept"].items()}
        self.done = set(state_dict["done"])
