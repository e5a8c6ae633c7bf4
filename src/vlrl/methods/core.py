"""The policy core every method composes: load, shard, bind, optimize, decode, seed, evaluate.

``PolicyModule`` is the LightningModule under both the RL methods (``RLMethod``) and supervised
fine-tuning (``SFT``, and so SOPHIA and the SFT stages of OVR and UnifiedReward-Think), so that every
method loads, shards, steps, resumes and evaluates alike:

- ``configure_model``: ``policy.load()`` -> FSDP2 units under ``ModelParallelStrategy`` (gathered in the
  compute dtype of ``trainer.precision``, float32 shards) -> ``rollout_engine.bind``;
- ``on_fit_start``: the trained weights are checked for half-precision storage;
- ``configure_optimizers`` / ``optimizer_config``: the optimizer over the trainable parameters;
- ``step_optimizer``: the guarded step (clip, NaN/inf guard, step, zero, scheduler);
- ``decode``, ``seed_for`` (a stream of ``vlrl.seeding``), ``all_reduce``;
- ``evaluation`` (``vlrl.evaluation.Evaluation``): grading of validation and test answers as the benchmarks
  grade them, and at the end of each the report: accuracy per benchmark and category, logged, and a
  predictions file with summary tables.

What is trained and how the loss is made stays in the method: ``RLMethod.training_step`` is the RL step,
``SFT.training_step`` the SFT step.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer

from vlrl.errors import ConfigError
from vlrl.evaluation import Evaluation, predictions
from vlrl.evaluation import metrics as eval_metrics
from vlrl.models.loading import Policy, decode_responses, pad_token_id, tokenizer_of
from vlrl.models.precision import check_master_weights, compute_dtype
from vlrl.models.sharding import shard_model
from vlrl.rewards.grading import Grade
from vlrl.rollout import HFEngine, RolloutEngine
from vlrl.seeding import stream_seed
from vlrl.types import PromptBatch

log = logging.getLogger(__name__)


class NonFiniteGradientsError(RuntimeError):
    """Raised when too many optimizer steps in a row had NaN/inf gradients."""


class NonFiniteGuard:
    """Measures and clips the gradient norm before an optimizer step; drops NaN/inf gradients.

    A NaN or inf anywhere in the gradients (on any rank) makes the norm non-finite; the gradients are
    then set to ``None``, so the optimizer step that follows changes neither the weights nor the
    optimizer's moments, but it still counts (``global_step``, the scheduler), which keeps schedules,
    checkpoint cadence and the data position aligned. ``max_in_a_row`` such steps in a row raise
    ``NonFiniteGradientsError``. ``PolicyModule.step_optimizer`` runs it for every method. Under a precision plugin with
    a gradient scaler (``16-mixed``) the scaler already skips such steps and adapts its scale, so the
    guard leaves them to it.

    Args:
        max_in_a_row: Non-finite steps in a row (per optimizer name) that stop the run.
    """

    def __init__(self, max_in_a_row: int = 3) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps={max_in_a_row} must be >= 1 (1: stop at the first NaN/inf)")
        self.max_in_a_row = max_in_a_row
        self.in_a_row: dict[str, int] = defaultdict(int)

    def clip_or_drop(
        self, module: pl.LightningModule, optimizer, max_grad_norm: float | None, name: str
    ) -> dict[str, float]:
        """Clip ``optimizer``'s gradients to ``max_grad_norm`` (None: measure only), or drop them if not finite.

        Returns ``{name}/grad_norm`` (before clipping) and ``{name}/nonfinite_skipped`` (1.0 if dropped).
        """
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)  # 16-mixed plugins (AMP, FSDP) hold one
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
        bad = torch.tensor(0.0 if scaler is not None or bool(torch.isfinite(norm)) else 1.0, device=module.device)
        if module.trainer.world_size > 1:  # ranks must agree: all step or none
            bad = module.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bool(bad):
            self.in_a_row[name] = 0
            return {f"{name}/grad_norm": float(norm), f"{name}/nonfinite_skipped": 0.0}
        optimizer.zero_grad(set_to_none=True)
        self.in_a_row[name] += 1
        where = f"{name} step at global_step {module.global_step}"
        if self.in_a_row[name] >= self.max_in_a_row:
            raise NonFiniteGradientsError(
                f"{self.in_a_row[name]} optimizer steps in a row had NaN/inf gradients (the last: {where}); the "
                "run stops to keep the last checkpoint good. Look for NaN/inf rewards, losses or inputs (logged "
                "metrics), lower the learning rate or set max_grad_norm; max_nonfinite_steps sets how many in a "
                "row are tolerated"
            )
        log.warning("NaN/inf gradients in the %s: update skipped (%d in a row)", where, self.in_a_row[name])
        return {f"{name}/grad_norm": float(norm), f"{name}/nonfinite_skipped": 1.0}


def check_optimizer(optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None, key: str) -> None:
    """Build ``optimizer`` (and ``lr_scheduler`` on it) over one dummy parameter, so that a bad setting (a negative
    lr, betas out of range) fails at construction, before any weights load; ``ConfigError`` names ``key``."""
    try:  # torch's checks of hyper-parameters raise ValueError
        dummy = optimizer([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as error:
        raise ConfigError(f"{key}: {error}; fix its init_args (e.g. lr > 0)") from error
    if lr_scheduler is None or not isinstance(dummy, torch.optim.Optimizer):
        return
    try:
        lr_scheduler(dummy)
    except ValueError as error:
        raise ConfigError(f"lr_scheduler: {error}; fix its init_args") from error


class PolicyModule(pl.LightningModule):
    """The policy core shared by every method (manual optimization); subclasses document their own arguments.

    Args:
        policy: The model being trained (path, dtype, LoRA, quantization, freezing).
        rollout_engine: Generates from the policy; default: HF ``generate`` on the policy itself.
        optimizer: Optimizer factory for the trainable parameters.
        lr_scheduler: Learning-rate scheduler factory, stepped after every optimizer step.
        max_grad_norm: Clip the gradient norm to this value (``None`` = no clipping).
        seed: The run's seed; every random stream of the method derives from it (``vlrl.seeding``).
        max_nonfinite_steps: An optimizer step whose gradients hold NaN/inf is skipped (weights and
            optimizer state unchanged, counted as ``update/nonfinite_skipped``); this many in a row stop the
            run with an error.
        evaluation: How validation and test grade and report (``vlrl.evaluation.Evaluation``: benchmark
            grading, optional model-based answer extraction, the predictions and summary files).
    """

    def __init__(
        self,
        policy: Policy,
        rollout_engine: RolloutEngine | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        seed: int = 0,
        max_nonfinite_steps: int = 3,
        evaluation: Evaluation | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.rollout_engine = rollout_engine or HFEngine()
        check_optimizer(optimizer, lr_scheduler, "optimizer")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.model: torch.nn.Module | None = None
        self.processor: Any = None
        self.evaluation = evaluation or Evaluation()

    # ----------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model, self.processor = self.policy.load()
        self.model.train()  # from_pretrained returns eval mode; dropout (if any) belongs to training
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 units, before the optimizer is built
            shard_model(self.model, self.device_mesh, self.compute_dtype)
        self.rollout_engine.bind(self.model, self.processor)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype of forward and backward under ``trainer.precision`` (``None``: the parameters' own)."""
        return compute_dtype(self.trainer.precision) if self._trainer is not None else None

    def on_fit_start(self) -> None:
        check_master_weights(self.model, "policy", self.trainer.precision)

    @property
    def tokenizer(self):
        return tokenizer_of(self.processor)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.processor)

    # ------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        return self.optimizer_config(self.model, self.optimizer_factory, self.scheduler_factory, "policy")

    @staticmethod
    def optimizer_config(
        module: torch.nn.Module,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        name: str,
    ) -> dict[str, Any]:
        """Lightning's optimizer entry for the trainable parameters of ``module`` (named ``name`` in errors)."""
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"no trainable parameters in the {name}: check {name}.freeze_vision / {name}.lora")
        config: dict[str, Any] = {"optimizer": optimizer(params)}
        if lr_scheduler is not None:
            config["lr_scheduler"] = {"scheduler": lr_scheduler(config["optimizer"]), "interval": "step"}
        return config

    def optimizer_and_scheduler(self, index: int = 0) -> tuple[Any, Any]:
        """The ``index``-th optimizer of ``configure_optimizers`` (0: the policy's) and its scheduler or None."""
        optimizers = self.optimizers()
        optimizer = (optimizers if isinstance(optimizers, list) else [optimizers])[index]
        schedulers = self.lr_schedulers()
        schedulers = [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]
        raw = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        return optimizer, next((s for s in schedulers if s.optimizer is raw), None)

    def step_optimizer(
        self, optimizer, scheduler, prefix: str = "update", advance_global_step: bool = True
    ) -> dict[str, float]:
        """Clip the gradients of ``optimizer``'s parameters, step it, zero them, step its scheduler.

        Only the policy's steps advance ``global_step`` (Lightning counts every ``LightningOptimizer.step``):
        with ``advance_global_step=False`` (a critic's optimizer) the step goes through the strategy
        directly, with the same precision handling and hooks, but uncounted. Metrics are named
        ``{prefix}/grad_norm``, ``{prefix}/nonfinite_skipped`` and ``{prefix}/lr``.
        """
        stats = self.nonfinite.clip_or_drop(self, optimizer, self.max_grad_norm, prefix)  # NaN/inf: no update
        if advance_global_step:
            optimizer.step()
        else:
            raw = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            self.trainer.strategy.optimizer_step(raw, closure=lambda: None)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        stats[f"{prefix}/lr"] = optimizer.param_groups[0]["lr"]
        return stats

    # --------------------------------------------------------------------------------- helpers
    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``value`` (as float, on this device) reduced over all ranks with ``op`` (``sum``, ``max``, ...)."""
        value = value.float().to(self.device)
        if self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op=op)

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """The texts of ``[N, T]`` right-padded responses (``vlrl.models.loading.decode_responses``)."""
        return decode_responses(self.processor, response_ids, response_mask)

    def seed_for(self, purpose: str, step: int | None = None) -> int:
        """The seed of ``purpose``'s stream at ``step`` (default: the current ``global_step``) on this rank."""
        return stream_seed(self.seed, purpose, self.global_step if step is None else step, self.global_rank)

    # ----------------------------------------------------------------------------- evaluation
    def on_validation_start(self) -> None:
        self.evaluation.setup(self.device)

    def on_test_start(self) -> None:
        self.evaluation.setup(self.device)

    def on_validation_epoch_end(self) -> None:
        self.report("val")

    def on_test_epoch_end(self) -> None:
        self.report("test")

    def record(
        self,
        stage: str,
        batch: PromptBatch,
        responses: list[str],
        grades: list[Grade],
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        """Keep the graded ``responses`` to ``batch`` (one per row) for the end-of-epoch report."""
        self.evaluation.add(stage, predictions(batch, responses, grades, details))

    def report(self, stage: str) -> None:
        """Log ``{stage}/accuracy``, per benchmark and per category, from every rank's predictions; write the files."""
        summary = self.evaluation.finish(stage, self.trainer if self._trainer is not None else None)
        if summary is None:
            return
        values = eval_metrics(summary, stage)
        # the same figures on every rank (gathered before); synced so that any rank may monitor them
        self.log(f"{stage}/accuracy", values.pop(f"{stage}/accuracy"), prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
