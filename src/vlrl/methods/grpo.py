"""GRPO and its family: group-relative advantages and the clipped policy loss, optionally with a KL to a reference.

Per step: ``B`` prompts × ``G`` samples; the advantage of a sample is its reward relative to its
group (std-normalised by default, mean-only as in VL-Rethinker / Dr. GRPO, or leave-one-out); the
loss is the PPO-clip objective with asymmetric clip range and optional dual clip, aggregated over
the update batch (token-mean by default), plus ``kl_coef`` × a KL estimate to a frozen reference
(the adapter-disabled policy under LoRA). An optional entropy bonus is subtracted.

The 2026 family is a choice of keys of this one class (``vlrl.algorithms`` has the formulas):

- GSPO / GSPO-token: ``policy_term: gspo`` / ``gspo-token`` (sequence ratio clipped at ``eps_low``/``eps_high``,
  e.g. 3e-4 / 4e-4) with ``loss_aggregation: seq-mean-token-mean``; ``configs/gspo.yaml``.
- CISPO: ``policy_term: cispo``, the importance weight capped at ``1 + eps_high``, token-mean.
- DAPO: ``eps_high: 0.28`` (clip-higher), token-mean, ``overlong_cache`` (soft overlong punishment) and/or
  ``overlong_filter``, and the ``vlrl.callbacks.DynamicSampling`` callback; ``configs/dapo.yaml``.
- REINFORCE++ / REINFORCE++-baseline: ``advantage: reinforce++`` / ``reinforce++-baseline``, normalised over
  the rollout of all devices.
- Off-policy sequence mask: ``off_policy_delta``. k3+ KL: ``kl_estimator: k3+``.

With a rollout engine other than HF ``generate`` (vLLM), the engine's log-probs differ slightly from the
trainer's. ``importance_correction: tis`` (truncated importance sampling, Yao et al. 2025) recomputes
the trainer's log-probs of each rollout before the step's updates, uses them as ``π_old`` of the PPO
ratio and weights each token's policy term by ``min(π_trainer / π_engine, tis_cap)``; ``measure`` only
logs the mismatch. Replayed samples (``SelectiveSampleReplay``) get the same treatment, their stored
log-probs playing the engine's part: the ratio is then taken to the current weights and the weight
corrects for the older policy that sampled them (decoupled PPO), truncated at ``tis_cap``.

Under FSDP2 (``configs/trainer/fsdp2.yaml``) the KL reference model, when one is loaded (``kl_coef > 0``
without LoRA), is sharded like the policy rather than replicated: each GPU then holds 1/N of it, not a
whole copy, and frees the gathered blocks after each forward.

Run: ``lightning-cli fit --config configs/demo/grpo.yaml`` (tiny model, CPU) or
``lightning-cli fit --config configs/grpo.yaml`` (Qwen2.5-VL-7B).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any, Literal

import torch

from vlrl.algorithms import (
    batch_advantages,
    cispo_loss,
    group_advantages,
    gspo_loss,
    policy_loss,
    soft_overlong_penalty,
    truncated_importance_weights,
)
from vlrl.algorithms import overlong_filter as drop_truncated
from vlrl.methods.base import RLMethod
from vlrl.models.inputs import map_micro_batches
from vlrl.models.loading import Policy
from vlrl.models.precision import frozen_dtype_name
from vlrl.models.sharding import shard_model
from vlrl.types import Rollout


class GRPO(RLMethod):
    """Group Relative Policy Optimization.

    Args:
        advantage: ``std`` (r − mean)/(std + eps) over the group; ``mean`` r − mean (no std
            division); ``loo`` leave-one-out baseline; ``reinforce++`` (r − mean)/(std + eps) over the
            whole rollout of all devices (REINFORCE++); ``reinforce++-baseline`` the group mean subtracted
            first, then divided by the std over the rollout of all devices.
        policy_term: The per-token policy loss: ``ppo-clip`` (PPO's clipped ratio); ``gspo`` (GSPO's
            length-normalised sequence ratio, clipped per sequence); ``gspo-token`` (that ratio's value with
            each token's own gradient); ``cispo`` (``−sg(min(ρ, 1 + eps_high))·A·log π``, CISPO).
        eps_low: Lower clip range of the ratio (``1 − eps_low``); of the sequence ratio under GSPO (3e-4 in
            the paper). Not used by ``cispo``.
        eps_high: Upper clip range of the ratio (``1 + eps_high``); > eps_low is "clip-higher" (DAPO: 0.28;
            GSPO: 4e-4). Under ``cispo`` the importance weight is capped at ``1 + eps_high``.
        dual_clip: Dual-clip constant ``c`` > 1 bounding the loss of negative-advantage tokens
            (``None`` = off).
        loss_aggregation: ``token-mean`` (over all tokens of the update batch, across micro-batches
            and devices), ``seq-mean-token-mean``, ``seq-mean-token-sum`` or
            ``seq-mean-token-sum-norm`` (divide by ``sampling.max_new_tokens``; Dr. GRPO).
        kl_coef: Weight of the KL to the reference in the loss (0 = no reference model is loaded).
        kl_estimator: ``k1``, ``k2``, ``k3``, or ``k3+`` (the k3 value with the k2 gradient, whose gradient is
            unbiased for the KL).
        reference: The frozen reference policy; default: the initial policy weights (under LoRA,
            the policy with its adapters disabled, so no second model is loaded).
        entropy_coef: Weight of an entropy bonus (0 = off).
        importance_correction: Rollout-engine / trainer log-prob mismatch: ``none``; ``measure``
            recomputes the trainer's log-probs of every rollout and logs the mismatch
            (``rollout/engine_mismatch_*``) without changing the loss; ``tis`` also uses them as
            ``π_old`` of the ratio and weights each token's policy term by
            ``min(π_trainer / π_engine, tis_cap)``. For vLLM rollouts; with HF ``generate`` both agree.
        tis_cap: Truncation ``C`` > 0 of the importance weights (``tis``; 2 in the paper).
        off_policy_delta: Off-policy sequence mask: a sequence with a negative advantage whose mean
            ``log π_old − log π_θ`` over its tokens exceeds this is left out of the policy loss (``null`` = off).
        overlong_filter: Leave samples cut off by the length limit out of the loss (DAPO's overlong
            filtering); they still count in their group's advantages.
        overlong_cache: DAPO's soft overlong punishment: ``L_cache`` tokens before ``L_max`` =
            ``sampling.max_new_tokens`` over which a penalty falling from 0 to ``−overlong_penalty`` is added
            to the reward (logged as ``reward/overlong``); 0 = off. The paper: 4096 of 20480.
        overlong_penalty: The penalty at ``L_max`` (verl's ``penalty_factor``).
        **kwargs: The arguments of ``RLMethod``: policy, rewards, rollout_engine, sampling,
            group_size, mini_batch_size, micro_batch_size, epochs, optimizer, lr_scheduler, ...
    """

    def __init__(
        self,
        *args,
        advantage: Literal["std", "mean", "loo", "reinforce++", "reinforce++-baseline"] = "std",
        policy_term: Literal["ppo-clip", "gspo", "gspo-token", "cispo"] = "ppo-clip",
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = None,
        loss_aggregation: Literal[
            "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
        ] = "token-mean",
        kl_coef: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3", "k3+"] = "k3",
        reference: Policy | None = None,
        entropy_coef: float = 0.0,
        importance_correction: Literal["none", "measure", "tis"] = "none",
        tis_cap: float = 2.0,
        off_policy_delta: float | None = None,
        overlong_filter: bool = False,
        overlong_cache: int = 0,
        overlong_penalty: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if advantage in ("std", "reinforce++-baseline") and self.group_size < 2:
            raise ValueError(
                f"advantage={advantage!r} needs group_size >= 2 (got {self.group_size}): a group of one has no "
                "spread, so every advantage would be 0. Raise group_size or use advantage='mean' or 'reinforce++'."
            )
        if policy_term not in ("ppo-clip", "gspo", "gspo-token", "cispo"):
            raise ValueError(f"policy_term={policy_term!r} must be 'ppo-clip', 'gspo', 'gspo-token' or 'cispo'")
        if policy_term != "ppo-clip" and dual_clip is not None:
            raise ValueError(
                f"dual_clip={dual_clip} belongs to policy_term='ppo-clip', not {policy_term!r}: set it null"
            )
        if off_policy_delta is not None and off_policy_delta < 0:
            raise ValueError(f"off_policy_delta must be >= 0 or null (got {off_policy_delta})")
        if not 0 <= overlong_cache <= self.sampling.max_new_tokens:
            raise ValueError(
                f"overlong_cache={overlong_cache} must be in [0, sampling.max_new_tokens={self.sampling.max_new_tokens}]"
                " (0 = no soft overlong punishment; the paper: 4096 of 20480)"
            )
        if overlong_penalty < 0:
            raise ValueError(f"overlong_penalty must be >= 0 (got {overlong_penalty}); it is subtracted at L_max")
        if dual_clip is not None and dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (got {dual_clip}) or null")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0 (got {kl_coef}); 0 loads no reference model")
        if importance_correction not in ("none", "measure", "tis"):
            raise ValueError(f"importance_correction={importance_correction!r} must be 'none', 'measure' or 'tis'")
        if tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 (got {tis_cap}); the paper uses 2.0")
        self.advantage = advantage
        self.policy_term = policy_term
        self.off_policy_delta = off_policy_delta
        self.overlong_filter = overlong_filter
        self.overlong_cache, self.overlong_penalty = overlong_cache, overlong_penalty
        self.eps_low, self.eps_high, self.dual_clip = eps_low, eps_high, dual_clip
        self.loss_aggregation = loss_aggregation
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.reference = reference
        self.entropy_coef = entropy_coef
        self.importance_correction, self.tis_cap = importance_correction, tis_cap
        self._ref_model: list[torch.nn.Module] = []  # kept out of the module tree: never trained or saved

    def configure_model(self) -> None:
        super().configure_model()
        if self.kl_coef > 0 and self.policy.lora is None and not self._ref_model:
            # frozen: held in the compute dtype (bf16 under bf16-mixed), not in the policy's float32 masters
            dtype = frozen_dtype_name(self.policy.dtype, self.compute_dtype)
            reference = self.reference or Policy(self.policy.model_path, dtype=dtype)
            ref, _ = reference.load()
            if self.device_mesh is not None:  # FSDP2: sharded like the policy (see the module docstring)
                shard_model(ref, self.device_mesh, self.compute_dtype, frozen=True)
            self._ref_model.append(ref.eval().requires_grad_(False))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._ref_model:
            self._ref_model[0].to(self.device)

    @property
    def entropy_needs_grad(self) -> bool:
        return self.entropy_coef != 0

    def score(self, rollout: Rollout) -> Rollout:
        """The rewards, plus DAPO's soft overlong punishment when ``overlong_cache`` is set (``reward/overlong``)."""
        rollout = super().score(rollout)
        if self.overlong_cache:
            lengths = rollout.response_mask.sum(dim=1)  # [N]
            max_length = self.sampling.max_new_tokens
            penalty = soft_overlong_penalty(lengths, max_length, self.overlong_cache, self.overlong_penalty)  # [N]
            rollout.rewards = rollout.rewards + penalty.to(rollout.rewards)  # [N]
            rollout.reward_components["overlong"] = penalty
        return rollout

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        if self.advantage not in ("reinforce++", "reinforce++-baseline"):
            return group_advantages(rollout.rewards, rollout.group_index, mode=self.advantage)  # [N]
        rewards, groups = rollout.rewards.float(), rollout.group_index  # [N], [N]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        if world > 1:  # the batch statistics are those of all devices' samples
            rewards = self.all_gather(rewards.to(self.device)).cpu()  # [W, N]
            groups = self.all_gather(groups.to(self.device)).cpu()  # [W, N]
            groups = groups + torch.arange(world).unsqueeze(-1) * (int(groups.max()) + 1)  # [W, N] distinct labels
        advantages = batch_advantages(
            rewards.flatten(), groups.flatten(), baseline=self.advantage == "reinforce++-baseline"
        )  # [W * N]
        return advantages.view(world, -1)[rank] if world > 1 else advantages  # [N]

    @torch.no_grad()
    def prepare_update(self, rollout: Rollout) -> None:
        if self.overlong_filter:
            truncated = torch.tensor([reason == "length" for reason in rollout.finish_reasons])  # [N]
            rollout.loss_mask = drop_truncated(rollout.train_mask, truncated)  # [N, T]
        if self.kl_coef > 0:
            rollout.ref_logprobs = self.reference_logprobs(rollout)  # [N, T]
        if self.importance_correction != "none":
            self.correct_engine_mismatch(rollout)

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``[N, T]`` log-probs of the rollout under the reference (the adapter-disabled policy under LoRA)."""
        model = self._ref_model[0] if self._ref_model else self.model
        adapters_off = self.policy.lora is not None and not self._ref_model
        with self.model.disable_adapter() if adapters_off else nullcontext():
            return map_micro_batches(lambda m: self.policy_logprobs(model, m)[0], self.micro_batches(rollout))  # [N, T]

    def correct_engine_mismatch(self, rollout: Rollout) -> None:
        """Measure the engine / trainer mismatch of ``rollout``; under ``tis``, set the trainer's log-probs as
        ``π_old`` (the engine's kept in ``Rollout.engine_logprobs``) and the weights in ``Rollout.is_weights``.

        Runs before the step's first update, so the trainer's log-probs are those of the sampling weights.
        """
        trainer = map_micro_batches(
            lambda m: self.policy_logprobs(self.model, m)[0].float().cpu(), self.micro_batches(rollout)
        )  # [N, T]
        trainer = trainer * rollout.response_mask  # [N, T], 0 on padding like the engine's
        engine = rollout.logprobs  # [N, T]
        out = truncated_importance_weights(trainer, engine.float(), rollout.train_mask, cap=self.tis_cap)
        figures = {
            "rollout/engine_mismatch_mean_abs_log_ratio": out.mean_abs_log_ratio.item(),
            "rollout/engine_mismatch_max_abs_log_ratio": out.max_abs_log_ratio.item(),
            "rollout/engine_mismatch_kl": out.kl.item(),
            "rollout/engine_mismatch_truncated_frac": out.truncated_fraction.item(),
        }
        rollout.stats.update(figures)
        if self._trainer is not None:
            self.log_dict(figures, batch_size=1)
        if self.importance_correction == "tis":
            rollout.engine_logprobs = engine  # [N, T]
            rollout.is_weights = out.weights  # [N, T], selected with the samples
            rollout.logprobs = trainer

    def loss_terms(self, rollout: Rollout) -> dict[str, Any]:
        """The policy term (PPO clip with asymmetric clip and optional dual clip, GSPO, GSPO-token or CISPO), TIS
        weights, KL to the reference, entropy, off-policy sequence mask."""
        if self.policy_term == "ppo-clip":
            term = partial(policy_loss, eps_low=self.eps_low, eps_high=self.eps_high, dual_clip=self.dual_clip)
        elif self.policy_term == "cispo":
            term = partial(cispo_loss, max_weight=1.0 + self.eps_high)
        else:
            level = "token" if self.policy_term == "gspo-token" else "sequence"
            term = partial(gspo_loss, eps_low=self.eps_low, eps_high=self.eps_high, level=level)
        return dict(
            policy_term=term,
            off_policy_delta=self.off_policy_delta,
            is_weights=rollout.is_weights if self.importance_correction == "tis" else None,
            ref_logprobs=rollout.ref_logprobs if self.kl_coef > 0 else None,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            entropy_coef=self.entropy_coef,
        )
