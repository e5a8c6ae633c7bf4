"""GRPO: group-relative advantages and the clipped policy loss, optionally with a KL to a reference.

Per step: ``B`` prompts × ``G`` samples; the advantage of a sample is its reward relative to its
group (std-normalised by default, mean-only as in VL-Rethinker / Dr. GRPO, or leave-one-out); the
loss is the PPO-clip objective with asymmetric clip range and optional dual clip, aggregated over
the update batch (token-mean by default), plus ``kl_coef`` × a KL estimate to a frozen reference
(the adapter-disabled policy under LoRA). An optional entropy bonus is subtracted.

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

from vlrl.algorithms import group_advantages, policy_loss, truncated_importance_weights
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
            division); ``loo`` leave-one-out baseline.
        eps_low: Lower clip range of the ratio (``1 − eps_low``).
        eps_high: Upper clip range of the ratio (``1 + eps_high``); > eps_low is "clip-higher".
        dual_clip: Dual-clip constant ``c`` > 1 bounding the loss of negative-advantage tokens
            (``None`` = off).
        loss_aggregation: ``token-mean`` (over all tokens of the update batch, across micro-batches
            and devices), ``seq-mean-token-mean``, ``seq-mean-token-sum`` or
            ``seq-mean-token-sum-norm`` (divide by ``sampling.max_new_tokens``; Dr. GRPO).
        kl_coef: Weight of the KL to the reference in the loss (0 = no reference model is loaded).
        kl_estimator: ``k1``, ``k2`` or ``k3``.
        reference: The frozen reference policy; default: the initial policy weights (under LoRA,
            the policy with its adapters disabled, so no second model is loaded).
        entropy_coef: Weight of an entropy bonus (0 = off).
        importance_correction: Rollout-engine / trainer log-prob mismatch: ``none``; ``measure``
            recomputes the trainer's log-probs of every rollout and logs the mismatch
            (``rollout/engine_mismatch_*``) without changing the loss; ``tis`` also uses them as
            ``π_old`` of the ratio and weights each token's policy term by
            ``min(π_trainer / π_engine, tis_cap)``. For vLLM rollouts; with HF ``generate`` both agree.
        tis_cap: Truncation ``C`` > 0 of the importance weights (``tis``; 2 in the paper).
        **kwargs: The arguments of ``RLMethod``: policy, rewards, rollout_engine, sampling,
            group_size, mini_batch_size, micro_batch_size, epochs, optimizer, lr_scheduler, ...
    """

    def __init__(
        self,
        *args,
        advantage: Literal["std", "mean", "loo"] = "std",
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = None,
        loss_aggregation: Literal[
            "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
        ] = "token-mean",
        kl_coef: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        reference: Policy | None = None,
        entropy_coef: float = 0.0,
        importance_correction: Literal["none", "measure", "tis"] = "none",
        tis_cap: float = 2.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if advantage == "std" and self.group_size < 2:
            raise ValueError(
                f"advantage='std' needs group_size >= 2 (got {self.group_size}): a group of one has no "
                "spread, so every advantage would be 0. Raise group_size or use advantage='mean'."
            )
        if dual_clip is not None and dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (got {dual_clip}) or null")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0 (got {kl_coef}); 0 loads no reference model")
        if importance_correction not in ("none", "measure", "tis"):
            raise ValueError(f"importance_correction={importance_correction!r} must be 'none', 'measure' or 'tis'")
        if tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 (got {tis_cap}); the paper uses 2.0")
        self.advantage = advantage
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

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        return group_advantages(rollout.rewards, rollout.group_index, mode=self.advantage)  # [N]

    @torch.no_grad()
    def prepare_update(self, rollout: Rollout) -> None:
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
        """The clipped surrogate (asymmetric clip, optional dual clip), TIS weights, KL to the reference, entropy."""
        return dict(
            policy_term=partial(policy_loss, eps_low=self.eps_low, eps_high=self.eps_high, dual_clip=self.dual_clip),
            is_weights=rollout.is_weights if self.importance_correction == "tis" else None,
            ref_logprobs=rollout.ref_logprobs if self.kl_coef > 0 else None,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            entropy_coef=self.entropy_coef,
        )
