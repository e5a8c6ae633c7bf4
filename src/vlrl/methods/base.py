"""The RL step every method shares, as a LightningModule with manual optimization.

``training_step`` reads like the step of DESIGN.md::

    prompts -> rollout (G samples each) -> on_rollout_end callbacks -> rewards -> (critic values)
    -> advantages -> on_advantages_computed callbacks -> reference log-probs -> mini-batch updates
    -> weights to the rollout engine -> metrics

A method subclasses ``RLMethod`` once and fills in ``compute_advantages`` and ``loss_terms`` (its
policy term and coefficients for ``vlrl.algorithms.policy_objective``, the one loss path; and, if it
changes what is generated or how it is scored, ``generate`` / ``score``; if it has a critic,
``compute_values`` and a second optimizer); it does not reorder the step. Loading, sharding, the
guarded optimizer step, decoding, seeds and accuracy logging come from ``vlrl.methods.core``; the
batch sizes of a step are derived and checked once in ``setup`` (``vlrl.methods.plan``).

``global_step`` counts *policy* optimizer steps: with the default ``mini_batch_size`` (the whole
rollout) and one epoch, that is one per rollout. ``configure_optimizers`` returns the policy's
optimizer first; steps of any further optimizer (a critic's) go through the strategy with
``step_optimizer(..., advance_global_step=False)`` and do not advance ``global_step``, so
``max_steps``, checkpoint cadence and step-based schedules mean the same with or without a critic.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from vlrl.algorithms import AggregationMode, entropy_from_logits, policy_objective, token_logprobs, zero_advantage
from vlrl.data import RLDataModule
from vlrl.data.datamodule import per_device
from vlrl.evaluation import Evaluation
from vlrl.hooks import RLCallback
from vlrl.methods.core import PolicyModule
from vlrl.methods.plan import UpdatePlan, plan_update
from vlrl.models.inputs import encode_prompt
from vlrl.models.loading import Policy
from vlrl.models.packing import (
    ResponseBatch,
    budget_slices,
    mrope_index,
    prompt_groups,
    prompt_once_logits,
    response_lengths,
)
from vlrl.models.sharding import fsdp_units, is_fsdp1
from vlrl.models.vision import base_model, with_shared_vision
from vlrl.rewards import RewardFunction, score
from vlrl.rewards.runner import FailureStreaks
from vlrl.rollout import RolloutEngine, Sampling
from vlrl.types import EncodedPrompt, PromptBatch, Rollout

log = logging.getLogger(__name__)

# The loss of one micro-batch: (micro, num_tokens, num_sequences) -> (loss, metrics); see ``accumulate_gradients``.
MicroLoss = Callable[[Rollout, torch.Tensor, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class RLMethod(PolicyModule):
    """The RL step shared by the RL methods; subclasses document the method-specific arguments.

    Args:
        policy: The model being trained (path, dtype, LoRA, quantization, freezing).
        rewards: Reward functions; the reward of a sample is their weighted sum.
        rollout_engine: Samples responses; default: HF ``generate`` on the policy itself.
        sampling: Sampling settings for training rollouts.
        eval_sampling: Sampling settings for validation/test (default greedy, same length).
        group_size: Samples per prompt (``G``).
        mini_batch_size: Samples per optimizer step on each device; must divide prompts per step × ``G``.
            Default: the whole rollout (one optimizer step per rollout and epoch).
        global_mini_batch_size: Samples per optimizer step over all devices (e.g. RACRO's 128 prompts ×
            4 captions = 512), so that the optimizer steps per rollout stay the paper's on any number of
            devices; each device takes it / (``trainer.devices`` × ``trainer.num_nodes``). Set this or
            ``mini_batch_size``, not both; pair it with ``data.global_batch_size``.
        micro_batch_size: Samples per forward/backward pass (gradient accumulation inside a
            mini-batch); only memory depends on it, not the result.
        max_tokens_per_micro_batch: Cut the training forwards (update, old, reference log-probs, critic
            values) by tokens instead of ``micro_batch_size``: prompt + response tokens of one forward,
            rows x (longest prompt + longest response) when padded, their sum when packed. The samples
            of a prompt stay together where they fit; a sample over the budget runs alone (warned once).
            Only memory and speed depend on it, not the result. ``null``: ``micro_batch_size`` samples.
        packing: Padding-free training forwards: the samples of a micro-batch packed into one row with
            per-sample positions (Qwen-VL's 3-D RoPE per sample) and attention kept inside each sample
            (``vlrl.models.packing``; flash-attention's variable-length kernel with
            ``attn_implementation: flash_attention_2``, a block-diagonal mask with sdpa/eager). The same
            log-probs as the padded forward; it pays off when the lengths of a micro-batch's prompts and
            responses differ (long-tailed responses, mixed image counts), above all on GPU with
            flash-attention, and with ``max_tokens_per_micro_batch`` (a budget of real tokens). On CPU
            with sdpa the mask is dense ``L x L``, so packing many samples costs more than it saves.
        prompt_once: Padded training forwards run each distinct prompt once (with its images) and only
            the responses once per sample, reading a copy of the prompt's key/value cache
            (``vlrl.models.packing.prompt_once_logits``): the same log-probs and gradients, without
            ``G - 1`` of every group's prompt forwards (most of a VLM sample's tokens are its prompt's).
            Used where a prompt repeats in a micro-batch, with or without ``gradient_checkpointing``;
            FSDP (1 and 2) and ``packing`` run one full row per sample instead.
        epochs: Passes over each rollout.
        optimizer: Optimizer factory for the trainable parameters.
        lr_scheduler: Learning-rate scheduler factory, stepped after every optimizer step.
        max_grad_norm: Clip the gradient norm to this value (``None`` = no clipping).
        reward_time_budget_s: Time allowed to each reward function's call in a step; late or failing
            rewards score 0 and are counted in ``reward/failures``.
        max_reward_failure_steps: A reward that gives no usable score (raises, times out, crashes,
            returns no finite value) this many steps in a row, on any device, stops the run with an
            error naming it; null never stops.
        seed: Seed of the rollout sampling (combined with the step, so a resumed run samples
            as the uninterrupted one would).
        max_nonfinite_steps: An optimizer step whose gradients hold NaN/inf is skipped (weights and
            optimizer state unchanged, counted as ``update/nonfinite_skipped``); this many in a row
            stop the run with an error.
        evaluation: How validation and test grade and report (``vlrl.evaluation.Evaluation``; default:
            benchmark grading, the predictions and summary files under ``<trainer.log_dir>/eval``).
    """

    critic_steps: int | None = None  # critic optimizer steps per rollout; a method with a critic sets it
    loss_aggregation: AggregationMode = "token-mean"  # how ``loss`` aggregates; methods take it as an argument

    def __init__(
        self,
        policy: Policy,
        rewards: list[RewardFunction],
        rollout_engine: RolloutEngine | None = None,
        sampling: Sampling | None = None,
        eval_sampling: Sampling | None = None,
        group_size: int = 8,
        mini_batch_size: int | None = None,
        global_mini_batch_size: int | None = None,
        micro_batch_size: int = 8,
        epochs: int = 1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        reward_time_budget_s: float = 120.0,
        seed: int = 0,
        max_nonfinite_steps: int = 3,
        max_reward_failure_steps: int | None = 50,
        evaluation: Evaluation | None = None,
        max_tokens_per_micro_batch: int | None = None,
        packing: bool = False,
        prompt_once: bool = True,
    ) -> None:
        super().__init__(
            policy=policy,
            rollout_engine=rollout_engine,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            max_grad_norm=max_grad_norm,
            seed=seed,
            max_nonfinite_steps=max_nonfinite_steps,
            evaluation=evaluation,
        )
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if micro_batch_size < 1 or epochs < 1:
            raise ValueError(f"micro_batch_size and epochs must be >= 1, got {micro_batch_size} and {epochs}")
        for key, value in (("mini_batch_size", mini_batch_size), ("global_mini_batch_size", global_mini_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or null, got {value}")
        if mini_batch_size is not None and global_mini_batch_size is not None:
            raise ValueError(
                f"mini_batch_size={mini_batch_size} (per device) and global_mini_batch_size={global_mini_batch_size} "
                "(over all devices) are both set: keep one and set the other to null"
            )
        self.rewards = rewards
        self.sampling = sampling or Sampling()
        self.eval_sampling = eval_sampling or Sampling(temperature=0.0, max_new_tokens=self.sampling.max_new_tokens)
        self.group_size = group_size
        self.mini_batch_size = mini_batch_size  # per device; derived in ``setup`` from global_mini_batch_size
        self.global_mini_batch_size = global_mini_batch_size
        self.micro_batch_size = micro_batch_size
        if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch < 1:
            raise ValueError(
                f"max_tokens_per_micro_batch must be >= 1 (tokens of one forward) or null, got {max_tokens_per_micro_batch}"
            )
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.packing = packing
        self.prompt_once = prompt_once
        self._warned_over_budget = False
        self.epochs = epochs
        self.reward_time_budget_s = reward_time_budget_s
        self.reward_failures = FailureStreaks(max_reward_failure_steps)

    # ----------------------------------------------------------------------------------- setup
    @property
    def max_new_tokens(self) -> int:
        """Response length limit of training rollouts (callbacks may change it between steps)."""
        return self.sampling.max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:
        self.sampling.max_new_tokens = int(value)

    def setup(self, stage: str) -> None:
        """Derive and check the update plan (``vlrl.methods.plan``) before ``configure_model`` loads any weights."""
        if self._trainer is None:
            return
        datamodule = self.trainer.datamodule
        if stage == "fit" and isinstance(datamodule, RLDataModule):
            self.plan_update(datamodule.batch_size, datamodule.describe_batch())
        elif self.global_mini_batch_size is not None:
            world_size, num_nodes = self.trainer.world_size, self.trainer.num_nodes
            key = "model.global_mini_batch_size"
            self.mini_batch_size = per_device(self.global_mini_batch_size, key, world_size, num_nodes)

    def plan_update(self, prompts: int, prompts_source: str) -> UpdatePlan:
        """The update plan of a step of ``prompts`` prompts per device (named ``prompts_source`` in errors), with
        the callbacks' update batch and the critic's steps; sets the per-device ``mini_batch_size``."""
        reshaping = [c for c in self.trainer.callbacks if isinstance(c, RLCallback) and c.update_batch_size]
        plan = plan_update(
            prompts=prompts,
            prompts_source=prompts_source,
            group_size=self.group_size,
            micro_batch_size=self.micro_batch_size,
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
            mini_batch_size=None if self.global_mini_batch_size is not None else self.mini_batch_size,
            global_mini_batch_size=self.global_mini_batch_size,
            world_size=self.trainer.world_size,
            num_nodes=self.trainer.num_nodes,
            update_batch_size=reshaping[0].update_batch_size if reshaping else None,
            update_batch_source=f"{type(reshaping[0]).__name__}.batch_size" if reshaping else "",
            critic_steps=self.critic_steps,
        )
        self.mini_batch_size = plan.mini_batch_size
        return plan

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for reward in self.rewards:  # rewards that hold a model (a judge) load it now, not inside the time budget
            if callable(getattr(reward, "setup", None)):
                reward.setup(self.device)

    # ------------------------------------------------------------------------------ the RL step
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = self.sample(batch)  # 1.-4. responses, on_rollout_end callbacks, rewards, values, advantages
        metrics = self.rollout_metrics(rollout)  # measured on what was sampled, before reshaping
        rollout = self.run_callbacks("on_advantages_computed", rollout)  # 5. e.g. dynamic sampling, sample replay
        metrics.update(rollout.stats)  # what the callbacks measured (dynamic sampling adds its draws' perf figures)
        if len(rollout) == 0:
            self.log_dict({**metrics, "update/skipped": 1.0}, prog_bar=False)
            return
        self.prepare_update(rollout)  # 6. reference log-probs
        metrics.update(self.update(rollout))  # 7. policy optimizer steps (then the critic's, if any)
        self.rollout_engine.update_weights(self.model)  # 8. the next rollout samples the new policy
        metrics["perf/rollout_tokens_per_s"] = metrics["perf/rollout_tokens"] / max(metrics["perf/rollout_s"], 1e-9)
        metrics["perf/step_s"] = time.perf_counter() - start
        self.log_metrics(metrics)  # 9.

    def sample(self, batch: PromptBatch) -> Rollout:
        """Steps 1-4 of the step for the prompts of ``batch``: ``group_size`` responses each, the
        ``on_rollout_end`` callbacks, rewards, critic values and advantages. A callback that draws more
        prompts within a step (``DynamicSampling``) samples them with this; ``Rollout.stats`` gets the
        sampling time and tokens (``perf/rollout_s``, ``perf/rollout_tokens``)."""
        start = time.perf_counter()
        rollout = self.generate(batch, self.sampling, self.group_size)  # 1. sample G responses each
        perf = {
            "perf/rollout_s": time.perf_counter() - start,
            "perf/rollout_tokens": float(rollout.response_mask.sum()),
        }
        rollout.stats.update(perf)
        rollout = self.run_callbacks("on_rollout_end", rollout)  # 2. e.g. forced rethinking
        for key, value in perf.items():  # kept when a callback hands back a rollout with stats of its own
            rollout.stats.setdefault(key, value)
        rollout = self.score(rollout)  # 3. rewards
        rollout.values = self.compute_values(rollout)  # 4. critic values (None without a critic)
        rollout.advantages = self.compute_advantages(rollout)  #    advantages (group, or GAE on the values)
        return rollout

    def generate(self, batch: PromptBatch, sampling: Sampling, group_size: int) -> Rollout:
        """Encode the prompts and sample ``group_size`` responses for each."""
        encoded = [encode_prompt(self.processor, m, imgs) for m, imgs in zip(batch.messages, batch.images, strict=True)]
        prompts = [p for p in encoded for _ in range(group_size)]
        out = self.rollout_engine.generate(
            prompts, sampling, seed=self.seed_for("rollout" if self.training else "eval")
        )
        texts = self.decode(out.response_ids, out.response_mask)
        return Rollout(
            prompts=prompts,
            response_ids=out.response_ids,
            response_mask=out.response_mask,
            logprobs=out.logprobs,
            texts=texts,
            finish_reasons=out.finish_reasons,
            group_index=torch.arange(len(batch)).repeat_interleave(group_size),
            batch=batch,
        )

    def run_callbacks(self, hook: str, rollout: Rollout) -> Rollout:
        for callback in self.trainer.callbacks if self._trainer is not None else []:
            if isinstance(callback, RLCallback):
                rollout = getattr(callback, hook)(self.trainer, self, rollout)
        return rollout

    def score(self, rollout: Rollout) -> Rollout:
        """Rewards of every sample: the weighted sum of the reward functions (callback facts as ``facts=``)."""
        scores = score(
            self.rewards,
            rollout.texts,
            finish_reasons=rollout.finish_reasons,
            time_budget_s=self.reward_time_budget_s,
            **rollout.reward_inputs(),  # answers, choices, data_sources, questions, images, facts
        )
        rollout.rewards = scores.total
        rollout.reward_components = scores.components
        rollout.stats.update({f"reward/failures/{k}": float(v) for k, v in scores.failures.items()})
        names = [fn.name for fn in self.rewards]
        unusable = torch.tensor([float(name in scores.unusable) for name in names])  # [R]
        if self._trainer is not None:  # every rank counts alike, so that all stop at the same step
            unusable = self.all_reduce(unusable, op="max")
        failed = [name for name, bad in zip(names, unusable.tolist(), strict=True) if bad]
        self.reward_failures.update({n: scores.unusable.get(n, "failed on another device") for n in failed}, names)
        return rollout

    def compute_values(self, rollout: Rollout) -> torch.Tensor | None:
        """``[N, T]`` critic values of the rollout's states, for methods with a critic; else ``None``."""
        return None

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        """``[N]`` or ``[N, T]`` advantages of the rollout's samples."""
        raise NotImplementedError

    def loss(
        self,
        rollout: Rollout,
        logprobs: torch.Tensor,
        entropy: torch.Tensor,
        num_tokens: torch.Tensor,
        num_sequences: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch (already normalised for the whole mini-batch) and its metrics: the one
        policy-loss path, ``vlrl.algorithms.policy_objective``, with the method's ``loss_terms``."""
        out = policy_objective(
            logprobs,
            rollout.logprobs,
            rollout.advantages,  # [n] or [n, T]
            rollout.train_mask,
            entropy=entropy,
            mode=self.loss_aggregation,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            max_len=self.sampling.max_new_tokens,
            **self.loss_terms(rollout),
        )
        return out.loss, out.metrics()

    def loss_terms(self, rollout: Rollout) -> dict[str, Any]:
        """The method's keyword arguments of ``policy_objective`` for ``rollout``: its ``policy_term`` (the
        clipped surrogate, or a new variant's function such as ``gspo_loss``, ``cispo_loss``), and optionally
        ``is_weights``, ``ref_logprobs``, ``kl_coef``, ``kl_estimator``, ``entropy_coef``, ``off_policy_delta``."""
        raise NotImplementedError

    @property
    def entropy_needs_grad(self) -> bool:
        """Whether the loss differentiates through the entropy (else it is only measured)."""
        return False

    def prepare_update(self, rollout: Rollout) -> None:
        """Hook for log-probs the loss needs besides the behaviour ones (e.g. the reference's)."""

    # ------------------------------------------------------------------------------ the update
    def update(self, rollout: Rollout) -> dict[str, float]:
        """``epochs`` x mini-batches of policy optimizer steps on the rollout; the mean of their metrics."""
        optimizer, scheduler = self.optimizer_and_scheduler(0)
        size = self.mini_batch_size or len(rollout)
        step = partial(self.policy_step, optimizer=optimizer, scheduler=scheduler)
        return self.mini_batch_steps(rollout, size, self.epochs, step, key="mini_batch_size")

    def mini_batch_steps(
        self, rollout: Rollout, size: int, epochs: int, step: Callable[[Rollout], dict[str, float]], key: str
    ) -> dict[str, float]:
        """Call ``step`` on every mini-batch of ``size`` samples (shuffled when smaller than the rollout),
        ``epochs`` times over; return the mean of the metrics. ``key`` names ``size`` in errors."""
        n = len(rollout)
        if n % size:
            raise ValueError(
                f"{key}={size} does not divide the update batch of {n} samples "
                f"(prompts per step x group_size={self.group_size}); pick a divisor of {n}"
            )
        shuffle = torch.Generator().manual_seed(self.seed_for(f"mini_batches/{key}"))
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=shuffle) if size < n else torch.arange(n)
            for start in range(0, n, size):
                for k, v in step(rollout.select(order[start : start + size])).items():
                    sums[k] += v
                count += 1
        return {k: v / count for k, v in sums.items()}

    def policy_step(self, mini: Rollout, optimizer, scheduler) -> dict[str, float]:
        """One policy optimizer step on a mini-batch, accumulated over micro-batches."""
        stats = self.accumulate_gradients(mini, self.policy_micro_loss)
        stats.update(self.step_optimizer(optimizer, scheduler, prefix="update"))
        return stats

    def policy_micro_loss(
        self, micro: Rollout, num_tokens: torch.Tensor, num_sequences: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy loss of one micro-batch (a ``MicroLoss``): log-probs under the policy, then ``loss``."""
        logprobs, entropy = self.policy_logprobs(self.model, micro, with_entropy=True)
        return self.loss(micro, logprobs, entropy, num_tokens, num_sequences)

    def micro_batches(self, rollout: Rollout) -> Iterator[Rollout]:
        """Consecutive slices of ``rollout`` in order: ``micro_batch_size`` samples each (the last may be
        smaller), or with ``max_tokens_per_micro_batch`` as many as fit the budget (``budget_slices``)."""
        n, budget = len(rollout), self.max_tokens_per_micro_batch
        if budget is None:
            slices = [list(range(s, min(s + self.micro_batch_size, n))) for s in range(0, n, self.micro_batch_size)]
        else:
            prompt, response = [p.length for p in rollout.prompts], response_lengths(rollout.response_mask)
            slices = budget_slices(prompt, response, rollout.group_index.tolist(), budget, self.packing)
            over = [s[0] for s in slices if len(s) == 1 and prompt[s[0]] + response[s[0]] > budget]
            if over and not self._warned_over_budget:
                self._warned_over_budget = True
                log.warning(
                    "model.max_tokens_per_micro_batch=%d: a sample of %d tokens is over it and runs alone "
                    "(warned once); raise the budget to fit the longest prompt + max_new_tokens",
                    budget,
                    max(prompt[i] + response[i] for i in over),
                )
        for index in slices:
            yield rollout.select(index)

    def accumulate_gradients(self, mini: Rollout, micro_loss: MicroLoss) -> dict[str, float]:
        """Back-propagate ``micro_loss`` over the micro-batches of ``mini``; its metrics, token-weighted.

        ``micro_loss`` gets the counts of trained tokens and of sequences with at least one trained token
        over the whole mini-batch on all devices, so that the micro-batch losses add up to the mini-batch
        loss (see ``aggregate_loss``), whatever the micro-batches. The samples of a prompt are put together
        first (one vision pass per prompt per micro-batch), and every device runs as many backward passes
        as the others (each one syncs gradients): one with fewer micro-batches (a token budget) repeats
        its last with zero weight.
        """
        world = self.trainer.world_size
        mini = mini.select(torch.sort(mini.group_index, stable=True).indices)  # the samples of a prompt together
        # token-mean over the whole mini-batch on all devices; DDP averages gradients, so scale by world
        num_tokens = self.all_reduce(mini.train_mask.sum().to(self.device))
        # the seq-mean aggregations average over sequences with at least one trained token
        non_empty = (mini.train_mask.sum(dim=1) > 0).sum()  # sequences of this rank's mini-batch
        num_sequences = int(self.all_reduce(non_empty.to(self.device)).item())
        micro_batches = list(self.micro_batches(mini))
        passes = int(self.all_reduce(torch.tensor(float(len(micro_batches))), op="max").item())
        stats: dict[str, float] = defaultdict(float)
        for k in range(passes):
            micro = micro_batches[min(k, len(micro_batches) - 1)]
            loss, parts = micro_loss(micro, num_tokens, num_sequences)
            if k >= len(micro_batches):  # a pass to match the other devices' count: no gradient, no metrics
                self.manual_backward(loss * 0.0)
                continue
            self.manual_backward(loss * world)
            weight = float(micro.train_mask.sum()) / max(float(mini.train_mask.sum()), 1.0)
            for name, v in parts.items():
                stats[name] += float(v) * weight
        return stats

    def policy_logprobs(
        self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs ``[n, T]`` of the response tokens under ``model`` (and entropies ``[n, T]``), 0 after
        each response's last real token; from a padded forward (each distinct prompt once with ``prompt_once``)
        or a packed one (``packing``), equal either way."""
        batch = self.model_inputs(rollout, model=model)
        if self.runs_prompts_once(model, batch, rollout.prompts):
            logits = prompt_once_logits(model, batch, rollout.prompts, self.pad_id, mrope_index(model))  # [n, T', V]
        else:
            inputs = with_shared_vision(model, rollout.prompts, batch.inputs)  # one tower pass per image
            # logits of the response positions only: none (and no gradient) for the prompt's
            output = model(**inputs, use_cache=False, logits_to_keep=batch.keep)
            logits = batch.responses(output.logits)  # [n, T', V] padded, [1, M, V] packed
        temperature = self.sampling.temperature or 1.0
        logprobs = batch.unpack(token_logprobs(logits, batch.targets, temperature))  # [n, T]
        entropy = None
        if with_entropy:
            with torch.enable_grad() if self.entropy_needs_grad else torch.no_grad():
                entropy = batch.unpack(entropy_from_logits(logits, temperature))  # [n, T]
        return logprobs, entropy

    def runs_prompts_once(self, model: torch.nn.Module, batch: ResponseBatch, prompts: list[EncodedPrompt]) -> bool:
        """Whether ``policy_logprobs`` runs each distinct prompt of ``batch`` once (``prompt_once``)."""
        if not self.prompt_once or batch.is_packed or len(prompt_groups(prompts)[0]) == len(prompts):
            return False  # off, packed, or no prompt repeats
        if batch.inputs["input_ids"].shape[1] - batch.width < 2:
            return False  # a one-token prompt: nothing to run before its last token
        if "cache" not in inspect.signature(base_model(model).forward).parameters:
            return False  # transformers before 5 names it past_key_values (the vLLM lane's pinned version)
        # sharded: the prompt pass's gradient arrives through the cache, not its outputs, where FSDP hooks the
        # re-gathering of a unit's shards for the backward pass
        return not fsdp_units(model) and not is_fsdp1(model)

    def model_inputs(
        self, rollout: Rollout, dtype: torch.dtype | None = None, model: torch.nn.Module | None = None
    ) -> ResponseBatch:
        """Prompts and responses of ``rollout`` as one model batch on this device: packed into one row with
        ``packing`` (3-D RoPE positions from ``model``, default the policy), else padded; media in ``dtype``
        (default: the policy's). ``ResponseBatch.responses`` picks the outputs that predict response tokens."""
        if self.packing:
            rope = mrope_index(model if model is not None else self.model)
            batch = ResponseBatch.packed(rollout.prompts, rollout.response_ids, rollout.response_mask, rope)
        else:
            batch = ResponseBatch.padded(rollout.prompts, self.pad_id, rollout.response_ids, rollout.response_mask)
        return batch.to(self.device, dtype or self.model.dtype)

    # ----------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def evaluate(self, batch: PromptBatch, stage: str) -> None:
        """One answer per prompt (``eval_sampling``), graded by ``evaluation`` and kept for its report."""
        rollout = self.generate(batch, self.eval_sampling, 1)
        self.record(stage, batch, rollout.texts, self.evaluation.grade(rollout.texts, batch))
        self.log(f"{stage}/response_length", rollout.response_mask.sum(1).mean(), batch_size=len(batch), sync_dist=True)

    # -------------------------------------------------------------------------------- metrics
    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        lengths = rollout.response_mask.sum(dim=1)
        rewards = rollout.rewards
        out = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/truncated_frac": sum(r == "length" for r in rollout.finish_reasons) / len(rollout),
        }
        for name, values in rollout.reward_components.items():
            out[f"reward/{name}"] = values.float().mean().item()
        out.update(rollout.stats)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, RLDataModule):
            out.update({f"data/skipped/{k}": float(v) for k, v in datamodule.skipped_rows.items()})
        if rollout.advantages is not None:
            groups, zero_samples = rollout.group_index, zero_advantage(rollout.advantages)  # [N], [N]
            zero = [bool(zero_samples[groups == g].all()) for g in groups.unique()]
            out["advantage/zero_group_frac"] = sum(zero) / max(len(zero), 1)
        return out

    def log_metrics(self, metrics: dict[str, float]) -> None:
        bar = {"reward/mean": "reward", "reward/accuracy": "acc", "response/length_mean": "len"}  # short names
        self.log_dict({k: v for k, v in metrics.items()}, prog_bar=False, batch_size=1)
        self.log_dict(
            {short: metrics[k] for k, short in bar.items() if k in metrics}, prog_bar=True, logger=False, batch_size=1
        )
