"""PPO with a learned critic and GAE: stage 2 of Open Vision Reasoner (the Open-Reasoner-Zero recipe).

Per step: ``B`` prompts × ``G`` samples from the policy; a critic with its own weights (a backbone
plus a scalar value head, ``vlrl.models.value``, initialised from a checkpoint, by default the
policy's) values every response state; the sequence reward is placed on the last response token;
GAE with ``γ``, ``λ`` (default 1 and 1, so ``A_t = R − V_t``) gives token advantages ``[N, T]``,
normalised over all response tokens of the rollout. The policy then takes the PPO-clip loss and the
critic the clipped value loss, each with its own optimizer, learning rate, schedule and number of
optimizer steps per rollout (default 1 and 4). No KL, no entropy bonus.

Decisions where the sources leave room:

- A value ``V_t`` is that of the state before response token ``t``: the critic's output at the
  position whose logits predict token ``t``. The value after the last token is 0, also for a
  response cut off by the length limit (no bootstrapping: the recipe scores such a response 0).
- Critic steps: the rollout is shuffled and split into ``critic_steps`` equal mini-batches, one
  optimizer step each (Open-Reasoner-Zero's ``critic_update_steps``); the policy's steps follow
  ``mini_batch_size`` / ``epochs`` as in every method (default: one step per rollout).
- ``global_step`` counts policy optimizer steps only (critic steps do not advance it), so
  ``max_steps``, checkpoint cadence and ``SequenceLengthCurriculum`` count rollouts by default.
- Advantage normalisation uses the statistics of each device's samples (not gathered across devices).

Run: ``lightning-cli fit --config configs/demo/ovr_rl.yaml`` (tiny models on CPU, after the demo cold
start) or ``lightning-cli fit --config configs/ovr_rl.yaml`` (Qwen2.5-VL-7B).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from vlrl.algorithms import (
    AggregationMode,
    aggregate_loss,
    gae,
    kl_in_reward,
    masked_mean,
    policy_loss,
    value_clip_fraction,
    value_loss,
)
from vlrl.algorithms import normalize_advantages as whiten
from vlrl.methods.base import RLMethod
from vlrl.models.inputs import map_micro_batches
from vlrl.models.loading import Policy, tokenizer_of
from vlrl.models.precision import check_master_weights
from vlrl.models.sharding import shard_model
from vlrl.models.value import ValueModel, load_value_model
from vlrl.types import Rollout


class PPO(RLMethod):
    """Proximal Policy Optimization with a critic and generalised advantage estimation.

    Args:
        critic: The critic's backbone, loaded like a policy and topped with a fresh scalar value head
            (zero-initialised). Default: the policy's settings (same checkpoint, dtype, LoRA,
            freezing). Its weights are separate from the policy's and saved in the same checkpoint.
        critic_optimizer: Optimizer factory for the critic's trainable parameters.
        critic_lr_scheduler: Scheduler of the critic's optimizer, stepped after every critic step.
        critic_steps: Critic optimizer steps per rollout: the rollout is shuffled and split into this
            many equal mini-batches (it must divide prompts per step × ``group_size``).
        gamma: GAE discount ``γ`` in [0, 1].
        lam: GAE ``λ`` in [0, 1]; with ``gamma = lam = 1`` the advantage is ``R − V_t``.
        normalize_advantages: Whiten the advantages over all response tokens of the rollout
            (subtract the mean, divide by the std).
        value_clip: Clip range ``ε`` of the value loss around the values at rollout time
            (``null`` = unclipped squared error).
        eps_low: Lower clip range of the policy ratio (``1 − eps_low``).
        eps_high: Upper clip range of the policy ratio (``1 + eps_high``).
        loss_aggregation: How the policy and the value losses are reduced: ``token-mean`` (over all
            tokens of the update batch), ``seq-mean-token-mean``, ``seq-mean-token-sum`` or
            ``seq-mean-token-sum-norm``.
        **kwargs: The arguments of ``RLMethod``: policy, rewards, rollout_engine, sampling,
            group_size, mini_batch_size, micro_batch_size, epochs, optimizer, lr_scheduler, ... (the
            optimizer, scheduler, mini-batch size and epochs are the policy's).
    """

    def __init__(
        self,
        *args,
        critic: Policy | None = None,
        critic_optimizer: OptimizerCallable = torch.optim.AdamW,
        critic_lr_scheduler: LRSchedulerCallable | None = None,
        critic_steps: int = 4,
        gamma: float = 1.0,
        lam: float = 1.0,
        normalize_advantages: bool = True,
        value_clip: float | None = 0.2,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        loss_aggregation: AggregationMode = "token-mean",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1 (critic optimizer steps per rollout), got {critic_steps}")
        for key, value in (("gamma", gamma), ("lam", lam)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value}; the paper's setting is 1.0")
        if value_clip is not None and value_clip <= 0:
            raise ValueError(f"value_clip must be > 0 or null (no clipping), got {value_clip}")
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low} and {eps_high}")
        self.critic = critic or replace(self.policy)
        self.critic_optimizer_factory = critic_optimizer
        self.critic_scheduler_factory = critic_lr_scheduler
        self.critic_steps = critic_steps
        self.gamma, self.lam = gamma, lam
        self.normalize_advantages = normalize_advantages
        self.value_clip = value_clip
        self.eps_low, self.eps_high = eps_low, eps_high
        self.loss_aggregation = loss_aggregation
        self.critic_model: ValueModel | None = None

    # ----------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        super().configure_model()
        if self.critic_model is not None:
            return
        self.critic_model, processor = load_value_model(self.critic)
        self.critic_model.train()
        if self.device_mesh is not None:  # ModelParallelStrategy: the critic is sharded like the policy
            shard_model(self.critic_model, self.device_mesh, self.compute_dtype)
        if len(tokenizer_of(processor)) != len(self.tokenizer):
            raise ValueError(
                f"critic.model_path={self.critic.model_path!r} has a vocabulary of {len(tokenizer_of(processor))} "
                f"tokens, the policy {len(self.tokenizer)}: the critic reads the policy's tokens, so give it a "
                "checkpoint of the same model family (by default it is the policy's own)"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        check_master_weights(self.critic_model, "critic", self.trainer.precision)

    def configure_optimizers(self) -> list[dict[str, Any]]:
        """The policy's optimizer first (its steps are ``global_step``), then the critic's."""
        critic = self.optimizer_config(
            self.critic_model, self.critic_optimizer_factory, self.critic_scheduler_factory, "critic"
        )
        return [super().configure_optimizers(), critic]

    # ------------------------------------------------------------------------- values, advantages
    def critic_values(self, rollout: Rollout) -> torch.Tensor:
        """Values ``[n, T]`` of the states before each response token, ``V(prompt, response[:t])``."""
        batch = self.model_inputs(rollout, self.critic_model.dtype, model=self.critic_model.backbone)
        values = self.critic_model(**batch.inputs)  # [n, P + T'] padded, [1, L] packed
        return batch.unpack(batch.responses(values))  # [n, T], 0 after each response's last token

    @torch.no_grad()
    def compute_values(self, rollout: Rollout) -> torch.Tensor:
        mask = rollout.train_mask  # [N, T]
        values = map_micro_batches(lambda m: self.critic_values(m).to(mask.device), self.micro_batches(rollout))
        return values * mask  # [N, T], 0 off the response tokens

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        mask = rollout.train_mask  # [N, T]
        # the sequence reward on the last response token, 0 elsewhere (kl_in_reward without a KL term)
        token_rewards = kl_in_reward(rollout.rewards, torch.zeros_like(mask), mask, coef=0.0)  # [N, T]
        advantages, returns = gae(token_rewards, rollout.values, mask, self.gamma, self.lam)  # [N, T] each
        rollout.returns = returns  # [N, T] the critic's regression targets, selected with the samples
        rollout.stats["critic/values"] = masked_mean(rollout.values, mask).item()
        rollout.stats["critic/returns"] = masked_mean(returns, mask).item()
        return whiten(advantages, mask) if self.normalize_advantages else advantages  # [N, T]

    # ---------------------------------------------------------------------------------- losses
    def loss_terms(self, rollout: Rollout) -> dict[str, Any]:
        """The clipped surrogate on the token advantages of GAE (entropy measured, not trained on)."""
        return dict(policy_term=partial(policy_loss, eps_low=self.eps_low, eps_high=self.eps_high))

    def critic_loss(
        self, rollout: Rollout, num_tokens: torch.Tensor, num_sequences: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped value loss of one micro-batch (a ``MicroLoss``) and its metrics."""
        values = self.critic_values(rollout)  # [n, T]
        mask = rollout.train_mask.to(values.device)  # [n, T]
        old = rollout.values.to(values.device)  # [n, T] values at rollout time
        returns = rollout.returns.to(values.device)  # [n, T]
        per_token = value_loss(values, old, returns, mask, clip_eps=self.value_clip)  # [n, T]
        stats = {"critic/loss": masked_mean(per_token.detach(), mask)}
        if self.value_clip is not None:
            stats["critic/clip_frac"] = value_clip_fraction(values.detach(), old, returns, mask, self.value_clip)
        return self.aggregate(per_token, mask, num_tokens, num_sequences), stats

    def aggregate(
        self, per_token: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor, num_sequences: int
    ) -> torch.Tensor:
        return aggregate_loss(
            per_token,
            mask,
            self.loss_aggregation,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            max_len=self.sampling.max_new_tokens,
        )

    # ---------------------------------------------------------------------------------- updates
    def check_critic_steps(self, n: int) -> None:
        if n % self.critic_steps:
            raise ValueError(
                f"critic_steps={self.critic_steps} does not divide the update batch of {n} samples "
                f"(prompts per step x group_size={self.group_size}); pick a divisor of {n}"
            )

    def update(self, rollout: Rollout) -> dict[str, float]:
        """The policy's steps (``RLMethod.update``), then ``critic_steps`` critic steps on the same rollout."""
        stats = super().update(rollout)
        n = len(rollout)
        self.check_critic_steps(n)  # a last, smaller batch (drop_last off) can still miss it
        optimizer, scheduler = self.optimizer_and_scheduler(1)
        step = partial(self.critic_step, optimizer=optimizer, scheduler=scheduler)
        stats.update(self.mini_batch_steps(rollout, n // self.critic_steps, 1, step, key="critic mini-batch size"))
        return stats

    def critic_step(self, mini: Rollout, optimizer, scheduler) -> dict[str, float]:
        """One critic optimizer step on a mini-batch (it does not advance ``global_step``)."""
        stats = self.accumulate_gradients(mini, self.critic_loss)
        stats.update(self.step_optimizer(optimizer, scheduler, prefix="critic", advance_global_step=False))
        return stats
