"""Forced Rethinking (VL-Rethinker, arXiv 2504.08837): some responses are made to reconsider their answer.

Right after the rollout (``on_rollout_end``, before rewards), eligible responses are selected at
random; each is cut back (or not), a rethinking trigger such as ``"\\n\\nWait, does it seem right?"``
is appended, and the policy continues from there through the module's rollout engine. A rethought
response whose final answer is correct replaces the original sample (``keep_only_correct``), at
most ``max_per_prompt`` per prompt. Its response is kept prefix + trigger + continuation.

1. Eligible: ended with EOS, at least ``min_room`` tokens left below the length limit; in groups
   whose accuracy is above ``skip_wrong_above_accuracy``, wrong responses are not eligible.
   Each eligible response is selected with probability ``fraction``.
2. Cut: with probability ``truncate_prob``, before the last occurrence of the first of
   ``cut_markers`` found ("Wait", else "\\boxed", else the last paragraph break); otherwise (or if
   no marker occurs) the trigger follows the whole response.
3. Trigger: with probability ``generic_prob`` one of ``triggers`` by weight; otherwise
   ``correct_trigger`` if the original response was correct, else ``wrong_trigger``.
4. Continue: sampled at ``temperature``, ``min_continuation_tokens`` to
   ``min(max_continuation_tokens, room)`` new tokens.
5. Keep (see above), with behaviour log-probs for the whole new response.

Decisions where the paper leaves room:

- Behaviour log-probs: the kept prefix keeps the log-probs it was sampled with; the trigger (never
  sampled) and the continuation get the policy's log-probs at the training temperature, computed
  under ``no_grad`` with ``RLMethod.policy_logprobs``. The engine's continuation log-probs are at
  the continuation temperature, which would make the first ratio of the update differ from 1.
- "Correct" (the group-accuracy rule of step 1, the trigger of step 3, ``keep_only_correct``) is what
  the module's rewards count as correct (``vlrl.rewards.correct_by_rewards``): for VL-Rethinker's
  ``AccuracyReward(boxed_only=True)`` + ``InvalidResponsePenalty``, a right last ``\\boxed{}`` in a
  response that ended with EOS and says "wait" at most 5 times (trigger included), so every kept
  sample scores as correct. With no reward that defines correct: ``is_correct`` on a response that
  ended with EOS (a continuation cut off by the length limit is not correct).
- With a critic (PPO) the values are computed after this hook, on the rethought responses.
- A cut in the text becomes a cut in the tokens at the last token boundary at or before it, so the
  prefix tokens stay exactly the sampled ones.

Each rank rethinks its own samples, so ranks make different numbers of ``generate`` and forward
calls: fine under DDP (no collective in either); not under a strategy that shards the weights
(FSDP), where every forward is a collective.

Per sample, the rollout gets ``facts``: ``rethought`` (bool), ``rethink_trigger`` (the trigger
text, ``""`` if none), ``rethink_trigger_at`` (character offset of the trigger in the response
text, -1 if none) and ``rethink_original`` (the replaced response text, ``None`` if none), which
the rewards receive in ``facts`` (``NativeWaitBonus`` leaves the trigger's waits out); and
``stats``: ``rethink/eligible``, ``rethink/selected``, ``rethink/correct`` (selected whose
continuation is correct) and ``rethink/kept``.

Run: ``lightning-cli fit --config configs/demo/vl_rethinker.yaml``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch

from vlrl.hooks import RLCallback
from vlrl.models.inputs import extend_prompt, map_micro_batches
from vlrl.rewards import correct_by_rewards
from vlrl.rollout import Generation, Sampling
from vlrl.seeding import stream_seed
from vlrl.types import Rollout

if TYPE_CHECKING:
    from vlrl.methods.base import RLMethod

DEFAULT_TRIGGERS = {"\n\nWait": 0.4, "\n\nWait, does it seem right?": 0.6}
DEFAULT_CUT_MARKERS = ("Wait", "\\boxed", "\n\n")


@dataclass
class RethinkPlan:
    """How one selected sample is rethought: which tokens are kept and which trigger follows them."""

    index: int  # the sample in the rollout
    prefix_ids: torch.Tensor  # [k] the kept response tokens (no EOS)
    prefix_logprobs: torch.Tensor  # [k] their behaviour log-probs
    trigger: str
    trigger_ids: torch.Tensor  # [m]
    cap: int  # most continuation tokens


@dataclass
class Rethought:
    """A rethought response, assembled: kept prefix + trigger + continuation."""

    plan: RethinkPlan
    response_ids: torch.Tensor  # [L]
    logprobs: torch.Tensor  # [L] behaviour log-probs (prefix: sampled; trigger and continuation: policy)
    text: str
    trigger_at: int  # character offset of the trigger in ``text``
    finish_reason: str
    correct: bool


def cut_position(text: str, markers: tuple[str, ...] | list[str]) -> int | None:
    """Where to cut ``text``: before the last occurrence of the first marker that occurs (not at 0).

    Example:
        >>> cut_position("x = 2. Wait, x = 3. \\\\boxed{3}", ["Wait", "\\\\boxed", "\\n\\n"])
        7
        >>> cut_position("x = 3.\\n\\nSo \\\\boxed{3}", ["Wait", "\\\\boxed", "\\n\\n"])
        11
        >>> cut_position("x is 3", ["Wait"]) is None
        True
    """
    for marker in markers:
        at = text.rfind(marker)
        if at > 0:
            return at
    return None


def tokens_before(tokenizer, ids: torch.Tensor, char_pos: int) -> int:
    """The largest ``k`` such that the decoded ``ids[:k]`` is at most ``char_pos`` characters long."""
    lo, hi = 0, len(ids)
    while lo < hi:  # decoded length grows with k: binary search for the last k that fits
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) <= char_pos:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ForcedRethinking(RLCallback):
    """Extends some responses with a rethinking trigger and lets the policy continue (VL-Rethinker).

    Args:
        fraction: Probability that an eligible response is rethought.
        min_room: Fewest tokens that must be left below the length limit for a response to be eligible.
        skip_wrong_above_accuracy: In groups whose accuracy is above this, wrong responses are not
            eligible (1.0 = never skip).
        truncate_prob: Probability of cutting the response back before the trigger.
        cut_markers: Where to cut, in order of preference: before the last occurrence of the first
            marker the response contains ("Wait", else "\\boxed", else a paragraph break).
        generic_prob: Probability of a trigger drawn from ``triggers`` (else the correctness-aware one).
        triggers: Generic triggers and their weights; default ``{"\\n\\nWait": 0.4,
            "\\n\\nWait, does it seem right?": 0.6}``.
        correct_trigger: Trigger for an originally correct response (when no generic one is drawn).
        wrong_trigger: Trigger for an originally wrong response (when no generic one is drawn).
        temperature: Sampling temperature of the continuation (top-p/top-k: the module's).
        min_continuation_tokens: Fewest new tokens before EOS is allowed.
        max_continuation_tokens: Most new tokens (also bounded by the room left).
        max_response_tokens: Length limit of a rethought response (prefix + trigger +
            continuation); default: the module's ``max_new_tokens``, as in the paper.
        keep_only_correct: Replace the original only if the rethought response is correct by the
            module's rewards (see the module docstring).
        max_per_prompt: Most rethought samples kept per prompt.
        mask_trigger: Leave the trigger tokens out of the loss (``Rollout.loss_mask``).
        require_eos: Only responses that ended with EOS are eligible (the paper). Off lets
            truncated responses be rethought too (e.g. for a demo with a random model).
        seed: Seed of the selection, cut and trigger draws and of the continuation sampling
            (combined with the step and rank, so a resumed run draws as the uninterrupted one).
    """

    def __init__(
        self,
        fraction: float = 0.65,
        min_room: int = 1024,
        skip_wrong_above_accuracy: float = 0.7,
        truncate_prob: float = 0.5,
        cut_markers: tuple[str, ...] = DEFAULT_CUT_MARKERS,
        generic_prob: float = 0.5,
        triggers: dict[str, float] | None = None,
        correct_trigger: str = "\n\nWait, let's double check",
        wrong_trigger: str = "\n\nWait, there might be a mistake",
        temperature: float = 0.9,
        min_continuation_tokens: int = 30,
        max_continuation_tokens: int = 1024,
        max_response_tokens: int | None = None,
        keep_only_correct: bool = True,
        max_per_prompt: int = 2,
        mask_trigger: bool = False,
        require_eos: bool = True,
        seed: int = 0,
    ) -> None:
        for key, value in (
            ("fraction", fraction),
            ("skip_wrong_above_accuracy", skip_wrong_above_accuracy),
            ("truncate_prob", truncate_prob),
            ("generic_prob", generic_prob),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}={value} must be a probability in [0, 1]")
        for key, value, least in (
            ("min_room", min_room, 0),
            ("min_continuation_tokens", min_continuation_tokens, 0),
            ("max_continuation_tokens", max_continuation_tokens, 1),
            ("max_per_prompt", max_per_prompt, 1),
        ):
            if value < least:
                raise ValueError(f"{key}={value} must be >= {least}")
        if min_continuation_tokens > max_continuation_tokens:
            raise ValueError(
                f"min_continuation_tokens={min_continuation_tokens} is above "
                f"max_continuation_tokens={max_continuation_tokens}; lower the first or raise the second"
            )
        if max_response_tokens is not None and max_response_tokens < 1:
            raise ValueError(f"max_response_tokens={max_response_tokens} must be >= 1 or null (the module's limit)")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy continuation)")
        triggers = dict(DEFAULT_TRIGGERS if triggers is None else triggers)
        if not triggers or any(not (w > 0 and math.isfinite(w)) for w in triggers.values()):
            raise ValueError(f"triggers={triggers!r}: give at least one trigger text with a positive weight")
        cut_markers = tuple(cut_markers)
        for key, text in (
            [("correct_trigger", correct_trigger), ("wrong_trigger", wrong_trigger)]
            + [("triggers", t) for t in triggers]
            + [("cut_markers", m) for m in cut_markers]
        ):
            if not text:
                raise ValueError(f"{key} holds an empty string; give the text (e.g. '\\n\\nWait')")
        self.fraction = fraction
        self.min_room = min_room
        self.skip_wrong_above_accuracy = skip_wrong_above_accuracy
        self.truncate_prob = truncate_prob
        self.cut_markers = cut_markers
        self.generic_prob = generic_prob
        self.triggers = triggers
        self.correct_trigger = correct_trigger
        self.wrong_trigger = wrong_trigger
        self.temperature = temperature
        self.min_continuation_tokens = min_continuation_tokens
        self.max_continuation_tokens = max_continuation_tokens
        self.max_response_tokens = max_response_tokens
        self.keep_only_correct = keep_only_correct
        self.max_per_prompt = max_per_prompt
        self.mask_trigger = mask_trigger
        self.require_eos = require_eos
        self.seed = seed

    # --------------------------------------------------------------------------------- the hook
    def on_rollout_end(self, trainer: pl.Trainer, pl_module: RLMethod, rollout: Rollout) -> Rollout:
        step, rank = pl_module.global_step, pl_module.global_rank
        rng = random.Random(stream_seed(self.seed, "rethinking", step, rank))
        limit = self.max_response_tokens or pl_module.max_new_tokens
        correct = self.grade(pl_module, rollout)
        eligible = self.eligible(rollout, correct, limit)
        selected = [i for i in range(len(rollout)) if eligible[i] and rng.random() < self.fraction]
        plans = [self.plan(rollout, i, correct[i], pl_module.tokenizer, rng, limit) for i in selected]
        plans = [p for p in plans if p.cap > 0]
        continuation_seed = stream_seed(self.seed, "rethinking/continuation", step, rank)
        rethought = self.rethink(pl_module, rollout, plans, continuation_seed) if plans else []
        kept = self.keep(rollout, rethought)
        out = self.merge(rollout, kept, pl_module.pad_id)
        out.stats.update(
            {
                "rethink/eligible": float(sum(eligible)),
                "rethink/selected": float(len(selected)),
                "rethink/correct": float(sum(r.correct for r in rethought)),
                "rethink/kept": float(len(kept)),
            }
        )
        return out

    # ------------------------------------------------------------------------------ the pieces
    def grade(self, pl_module: RLMethod, rollout: Rollout) -> list[bool]:
        """Whether each original response is correct, as the module's rewards define it."""
        return self.judge(pl_module, rollout, list(range(len(rollout))), rollout.texts, rollout.finish_reasons)

    @staticmethod
    def judge(
        pl_module: RLMethod,
        rollout: Rollout,
        indices: list[int],
        texts: list[str],
        finish_reasons: list[str],
        triggers: list[str] | None = None,
    ) -> list[bool]:
        """Whether ``texts`` (responses to the prompts of samples ``indices``) are correct by ``pl_module.rewards``.

        The rewards get what the step's scoring gives them (``Rollout.reward_inputs``, with the facts of
        earlier callbacks and ``triggers`` as ``facts["rethink_trigger"]``; see
        ``vlrl.rewards.correct_by_rewards``), so a sample is judged here exactly as its reward will judge it.
        """
        inputs = rollout.reward_inputs(indices)
        inputs["facts"]["rethink_trigger"] = triggers or [""] * len(texts)
        return correct_by_rewards(pl_module.rewards, texts, finish_reasons=finish_reasons, **inputs)

    def eligible(self, rollout: Rollout, correct: list[bool], limit: int) -> list[bool]:
        """Which samples may be rethought (see the module docstring, step 1)."""
        lengths = rollout.response_mask.sum(dim=1).long().tolist()  # [N]
        groups = rollout.group_index.tolist()
        accuracy: dict[int, list[bool]] = {}
        for g, c in zip(groups, correct, strict=True):
            accuracy.setdefault(g, []).append(c)
        out = []
        for i, (length, g) in enumerate(zip(lengths, groups, strict=True)):
            group_acc = sum(accuracy[g]) / len(accuracy[g])
            ok = (not self.require_eos or rollout.finish_reasons[i] == "stop") and limit - length >= self.min_room
            out.append(ok and (correct[i] or group_acc <= self.skip_wrong_above_accuracy))
        return out

    def choose_trigger(self, correct: bool, rng: random.Random) -> str:
        """A generic trigger with probability ``generic_prob``, else the one for a correct/wrong response."""
        if rng.random() < self.generic_prob:
            return rng.choices(list(self.triggers), weights=list(self.triggers.values()))[0]
        return self.correct_trigger if correct else self.wrong_trigger

    def plan(self, rollout: Rollout, i: int, correct: bool, tokenizer, rng: random.Random, limit: int) -> RethinkPlan:
        """Cut and trigger of sample ``i`` (steps 2 and 3)."""
        length = int(rollout.response_mask[i].sum())
        stopped = rollout.finish_reasons[i] == "stop"
        ids = rollout.response_ids[i, : length - 1 if stopped else length]  # [k0] without the EOS
        keep = len(ids)
        if rng.random() < self.truncate_prob:
            at = cut_position(rollout.texts[i], self.cut_markers)
            if at is not None:
                keep = tokens_before(tokenizer, ids, at)
        trigger = self.choose_trigger(correct, rng)
        trigger_ids = torch.tensor(tokenizer.encode(trigger, add_special_tokens=False), dtype=ids.dtype)  # [m]
        room = limit - keep - len(trigger_ids)
        return RethinkPlan(
            index=i,
            prefix_ids=ids[:keep],
            prefix_logprobs=rollout.logprobs[i, :keep],
            trigger=trigger,
            trigger_ids=trigger_ids,
            cap=min(self.max_continuation_tokens, room),
        )

    def rethink(self, pl_module: RLMethod, rollout: Rollout, plans: list[RethinkPlan], seed: int) -> list[Rethought]:
        """Continue every planned response through the rollout engine (step 4) and assemble it."""
        prompts = [extend_prompt(rollout.prompts[p.index], torch.cat([p.prefix_ids, p.trigger_ids])) for p in plans]
        cap = max(p.cap for p in plans)
        base = pl_module.sampling
        sampling = Sampling(
            temperature=self.temperature,
            top_p=base.top_p,
            top_k=base.top_k,
            max_new_tokens=cap,
            min_new_tokens=min(self.min_continuation_tokens, cap),
        )
        # One call for all: a continuation sampled up to the largest cap and then cut at its own cap
        # is distributed as one sampled with that cap.
        generation = pl_module.rollout_engine.generate(prompts, sampling, seed=seed)
        responses, finishes = self._assemble(plans, generation)
        logprobs = self._behaviour_logprobs(pl_module, rollout, plans, responses)
        tokenizer = pl_module.tokenizer
        texts, starts = [], []
        for plan, ids in zip(plans, responses, strict=True):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            at = len(tokenizer.decode(plan.prefix_ids, skip_special_tokens=True))
            if text[at : at + len(plan.trigger)] != plan.trigger:  # a token boundary decoded differently
                at = text.find(plan.trigger.strip(), max(0, at - len(plan.trigger)))
            texts.append(text)
            starts.append(at)
        indices, triggers = [p.index for p in plans], [p.trigger for p in plans]
        correct = self.judge(pl_module, rollout, indices, texts, finishes, triggers)
        return [
            Rethought(plan, ids, lp, text, at, finish, ok)
            for plan, ids, lp, text, at, finish, ok in zip(
                plans, responses, logprobs, texts, starts, finishes, correct, strict=True
            )
        ]

    @staticmethod
    def _assemble(plans: list[RethinkPlan], generation: Generation) -> tuple[list[torch.Tensor], list[str]]:
        """Prefix + trigger + continuation (cut at each plan's cap) token ids, and finish reasons."""
        responses, finishes = [], []
        for j, plan in enumerate(plans):
            n = int(generation.response_mask[j].sum())
            finish = generation.finish_reasons[j]
            if n > plan.cap:
                n, finish = plan.cap, "length"
            continuation = generation.response_ids[j, :n].to(plan.prefix_ids.dtype)  # [n]
            responses.append(torch.cat([plan.prefix_ids, plan.trigger_ids, continuation]))  # [L]
            finishes.append(finish)
        return responses, finishes

    @torch.no_grad()
    def _behaviour_logprobs(
        self, pl_module: RLMethod, rollout: Rollout, plans: list[RethinkPlan], responses: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Per response ``[L]``: the prefix's sampled log-probs, then the policy's for trigger and continuation."""
        width = max(len(r) for r in responses)
        ids = torch.full((len(responses), width), pl_module.pad_id, dtype=responses[0].dtype)  # [n, W]
        mask = torch.zeros(len(responses), width)  # [n, W]
        for j, r in enumerate(responses):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1.0
        new = replace(rollout.select([p.index for p in plans]), response_ids=ids, response_mask=mask, loss_mask=None)
        recomputed = map_micro_batches(  # [n, W]
            lambda micro: pl_module.policy_logprobs(pl_module.model, micro)[0].float().cpu(),
            pl_module.micro_batches(new),
        )
        out = []
        for j, (plan, r) in enumerate(zip(plans, responses, strict=True)):
            k = len(plan.prefix_ids)
            out.append(torch.cat([plan.prefix_logprobs.float(), recomputed[j, k : len(r)]]))  # [L]
        return out

    def keep(self, rollout: Rollout, rethought: list[Rethought]) -> list[Rethought]:
        """The rethought samples that replace their originals (correct ones, at most ``max_per_prompt`` a prompt)."""
        per_group: dict[int, int] = {}
        kept = []
        for r in rethought:
            g = int(rollout.group_index[r.plan.index])
            if (r.correct or not self.keep_only_correct) and per_group.get(g, 0) < self.max_per_prompt:
                per_group[g] = per_group.get(g, 0) + 1
                kept.append(r)
        return kept

    def merge(self, rollout: Rollout, kept: list[Rethought], pad_id: int) -> Rollout:
        """The rollout with the kept rethought samples in place of their originals, and the facts."""
        n = len(rollout)
        width = max([rollout.response_ids.shape[1]] + [len(r.response_ids) for r in kept])

        def widen(t: torch.Tensor, fill: float) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)  # [N, W], a new tensor

        ids, mask, logprobs = (
            widen(rollout.response_ids, pad_id),
            widen(rollout.response_mask, 0),
            widen(rollout.logprobs, 0),
        )
        loss_mask = widen(rollout.train_mask, 0) if self.mask_trigger or rollout.loss_mask is not None else None
        texts, finishes = list(rollout.texts), list(rollout.finish_reasons)
        facts = {
            "rethought": [False] * n,
            "rethink_trigger": [""] * n,
            "rethink_trigger_at": [-1] * n,
            "rethink_original": [None] * n,
        }
        for r in kept:
            i, length = r.plan.index, len(r.response_ids)
            ids[i], mask[i], logprobs[i] = pad_id, 0.0, 0.0
            ids[i, :length], mask[i, :length], logprobs[i, :length] = r.response_ids, 1.0, r.logprobs
            if loss_mask is not None:
                loss_mask[i] = mask[i]
                if self.mask_trigger:
                    start = len(r.plan.prefix_ids)
                    loss_mask[i, start : start + len(r.plan.trigger_ids)] = 0.0
            facts["rethink_original"][i] = texts[i]
            facts["rethought"][i] = True
            facts["rethink_trigger"][i] = r.plan.trigger
            facts["rethink_trigger_at"][i] = r.trigger_at
            texts[i], finishes[i] = r.text, r.finish_reason
        return replace(
            rollout,
            response_ids=ids,
            response_mask=mask,
            logprobs=logprobs,
            loss_mask=loss_mask,
            texts=texts,
            finish_reasons=finishes,
            facts={**rollout.facts, **facts},
        )
