"""Typed containers passed between the stages of a training step.

``PromptBatch`` is what the datamodule yields: raw rows (chat messages and PIL images), not yet
tokenised, because tokenisation belongs to the policy's processor. ``Rollout`` is what a rollout
engine returns and what the rest of the step (callbacks, rewards, advantages, losses) reads and
extends. Tensor fields carry a shape comment; ``N = B * G`` is the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from itertools import accumulate
from typing import Any

import torch
from PIL import Image


@dataclass
class PromptBatch:
    """A batch of ``B`` prompts, as read from the data (one entry per prompt in every list)."""

    ids: list[str]
    messages: list[list[dict[str, Any]]]  # chat messages; image slots are {"type": "image"} parts
    images: list[list[Image.Image]]  # the images each prompt refers to, in order
    answers: list[str]  # gold answers ("" where a method needs none)
    choices: list[list[str] | None]  # option texts of multiple-choice questions
    data_sources: list[str]
    extras: list[dict[str, Any]] = field(default_factory=list)  # method-specific row fields
    questions: list[str] = field(default_factory=list)  # raw question texts (no template, no options);
    # for rows given as chat messages, the text of the last user turn

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: list[int]) -> PromptBatch:
        """The prompts at ``index`` (repeats allowed), as a new batch."""
        return PromptBatch(
            ids=[self.ids[i] for i in index],
            messages=[self.messages[i] for i in index],
            images=[self.images[i] for i in index],
            answers=[self.answers[i] for i in index],
            choices=[self.choices[i] for i in index],
            data_sources=[self.data_sources[i] for i in index],
            extras=[self.extras[i] for i in index] if self.extras else [],
            questions=[self.questions[i] for i in index] if self.questions else [],
        )

    @classmethod
    def concat(cls, batches: list[PromptBatch]) -> PromptBatch:
        """The prompts of ``batches`` one after another, as one batch.

        ``extras`` and ``questions`` are kept if any batch has them (``{}`` / ``""`` for the rows of
        a batch that has none).
        """
        has_extras = any(b.extras for b in batches)
        has_questions = any(b.questions for b in batches)
        return cls(
            ids=[x for b in batches for x in b.ids],
            messages=[x for b in batches for x in b.messages],
            images=[x for b in batches for x in b.images],
            answers=[x for b in batches for x in b.answers],
            choices=[x for b in batches for x in b.choices],
            data_sources=[x for b in batches for x in b.data_sources],
            extras=[x for b in batches for x in (b.extras or [{} for _ in b.ids])] if has_extras else [],
            questions=[x for b in batches for x in (b.questions or ["" for _ in b.ids])] if has_questions else [],
        )


@dataclass
class EncodedPrompt:
    """One prompt after the processor: what both the rollout engine and the trainer feed the model.

    ``token_inputs`` hold per-token tensors of shape ``[1, P]`` (``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` ...); ``media_inputs`` hold per-image tensors concatenated along dim 0
    (``pixel_values``, ``image_grid_thw``, ``image_sizes`` ...), empty for a text-only prompt.
    """

    token_inputs: dict[str, torch.Tensor]
    media_inputs: dict[str, torch.Tensor]
    images: list[Image.Image] = field(default_factory=list)  # the prompt's images as given to the processor
    # (an engine that runs its own processor, such as vLLM, encodes them again)
    vision: dict[Any, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False, compare=False)
    # image features of a frozen vision tower, kept by the first pass that computed them (vlrl.models.vision)

    @property
    def length(self) -> int:
        return int(self.token_inputs["input_ids"].shape[-1])


@dataclass
class Rollout:
    """``N = B * G`` sampled responses and everything the update needs about them.

    Samples of one prompt are contiguous (``group_index`` says which prompt). Responses are
    right-padded; ``response_mask`` is 1 on tokens that are trained on (generated tokens up to and
    including EOS). Fields computed later in the step (rewards, advantages, reference log-probs,
    returns, importance weights) start as ``None``; every per-sample field is indexed by ``select``
    and joined by ``concat`` with the samples.

    What the algorithms pass between the stages of the step has a typed field; what callbacks know
    about single samples (e.g. ``rethought``, ``rethink_trigger``, ``replayed``, RACRO's
    ``reasoner_texts``) goes in ``facts``, one list entry per sample. Rewards receive ``facts`` as
    one keyword (``facts=``), never spread into their other keywords (see ``reward_inputs``).
    """

    prompts: list[EncodedPrompt]  # N entries (the same object repeated for the G samples of a prompt)
    response_ids: torch.Tensor  # [N, T] int64, right-padded with the pad id
    response_mask: torch.Tensor  # [N, T] float, 1 on trained tokens
    logprobs: torch.Tensor  # [N, T] behaviour log-probs of the sampled tokens (0 on padding)
    texts: list[str]  # N decoded responses (special tokens removed)
    finish_reasons: list[str]  # N of "stop" (EOS reached) or "length" (truncated)
    group_index: torch.Tensor  # [N] int64, index of the prompt within the PromptBatch
    batch: PromptBatch  # the B prompts the samples answer
    rewards: torch.Tensor | None = None  # [N]
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    advantages: torch.Tensor | None = None  # [N] (group) or [N, T] (GAE)
    values: torch.Tensor | None = None  # [N, T] critic values at generation time
    ref_logprobs: torch.Tensor | None = None  # [N, T]
    loss_mask: torch.Tensor | None = None  # [N, T] float; set when the loss trains on fewer tokens than
    # response_mask holds (e.g. inserted rethinking triggers); None = response_mask
    returns: torch.Tensor | None = None  # [N, T] the critic's regression targets (GAE returns; PPO)
    engine_logprobs: torch.Tensor | None = None  # [N, T] the rollout engine's log-probs, kept where `logprobs`
    # is replaced by the trainer's (truncated importance sampling, GRPO's importance_correction="tis")
    is_weights: torch.Tensor | None = None  # [N, T] truncated importance weights trainer / engine (TIS)
    facts: dict[str, list[Any]] = field(default_factory=dict)  # name -> N per-sample values added by callbacks
    stats: dict[str, float] = field(default_factory=dict)  # step-level figures to log; not per sample

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def group_size(self) -> int:
        """Samples per prompt (``G``); 1 if the rollout is empty."""
        return max(1, len(self) // max(1, len(self.batch)))

    @property
    def train_mask(self) -> torch.Tensor:
        """``[N, T]`` tokens the loss is taken over: ``loss_mask`` if set, else ``response_mask``."""
        return self.response_mask if self.loss_mask is None else self.loss_mask

    def reward_inputs(self, index: list[int] | None = None) -> dict[str, Any]:
        """What the rewards of the samples at ``index`` (default: all) are given besides their texts and finish reasons.

        The keywords of the reward protocol (``vlrl.rewards.functions``): each sample's prompt's
        ``answers``, ``choices``, ``data_sources``, ``questions`` (None if the batch has none) and
        ``images``, and ``facts``, the samples' entries of ``Rollout.facts`` under one keyword, so a
        fact named like a keyword (``answers``, ``images``) cannot shadow it.
        """
        items = list(range(len(self))) if index is None else list(index)
        groups = [int(self.group_index[i]) for i in items]
        batch = self.batch
        return {
            "answers": [batch.answers[g] for g in groups],
            "choices": [batch.choices[g] for g in groups],
            "data_sources": [batch.data_sources[g] for g in groups],
            "questions": [batch.questions[g] for g in groups] if batch.questions else None,
            "images": [batch.images[g] for g in groups],
            "facts": {k: [_fact(k, v)[i] for i in items] for k, v in self.facts.items()},
        }

    def select(self, index: torch.Tensor | list[int]) -> Rollout:
        """The samples at ``index`` (repeats allowed), with every per-sample field indexed alike."""
        idx = torch.as_tensor(index, dtype=torch.long)
        items = idx.tolist()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("batch", "stats"):
                out[f.name] = value
            elif isinstance(value, torch.Tensor):
                out[f.name] = value[idx]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in items]
            elif f.name == "facts":
                out[f.name] = {k: [_fact(k, v)[i] for i in items] for k, v in value.items()}
            elif isinstance(value, dict):  # reward_components: name -> [N]
                out[f.name] = {k: v[idx] for k, v in value.items()}
            else:
                out[f.name] = value
        return replace(self, **out)

    @classmethod
    def concat(cls, rollouts: list[Rollout], pad_id: int) -> Rollout:
        """The samples of ``rollouts`` one after another, as one rollout (e.g. current + replayed samples).

        Every sample keeps its own ``EncodedPrompt`` (token ids and image tensors), so samples of
        different steps train together. ``[n, T]`` tensors are right-padded to the widest ``T``
        (token ids with ``pad_id``, everything else with 0); ``group_index`` is shifted so that it
        points into the concatenated ``batch``. ``loss_mask`` is kept if any rollout sets it (the
        others contribute their ``response_mask``). Per-sample fields computed later in the step
        (rewards, advantages, values, reference log-probs, returns, engine log-probs, importance
        weights) must be set in all rollouts or in none. ``reward_components`` keep the names every
        rollout has; ``facts`` missing from a rollout are ``None`` for its samples; ``stats`` are
        those of the first rollout.
        """
        if not rollouts:
            raise ValueError("Rollout.concat needs at least one rollout")
        width = max(int(r.response_ids.shape[1]) for r in rollouts)
        offsets = list(accumulate([len(r.batch) for r in rollouts[:-1]], initial=0))  # first row of each batch
        out: dict[str, Any] = {
            "prompts": [p for r in rollouts for p in r.prompts],
            "response_ids": torch.cat([_pad_width(r.response_ids, width, pad_id) for r in rollouts]),
            "response_mask": torch.cat([_pad_width(r.response_mask, width, 0) for r in rollouts]),
            "logprobs": torch.cat([_pad_width(r.logprobs, width, 0) for r in rollouts]),
            "texts": [t for r in rollouts for t in r.texts],
            "finish_reasons": [f for r in rollouts for f in r.finish_reasons],
            "group_index": torch.cat([r.group_index + o for r, o in zip(rollouts, offsets, strict=True)]),
            "batch": PromptBatch.concat([r.batch for r in rollouts]),
            "stats": rollouts[0].stats,
        }
        for name in LATER_FIELDS:
            present = [getattr(r, name) is not None for r in rollouts]
            if any(present) and not all(present):
                raise ValueError(f"Rollout.concat: `{name}` is set in some rollouts and None in others")
            out[name] = torch.cat([_pad_width(getattr(r, name), width, 0) for r in rollouts]) if all(present) else None
        if any(r.loss_mask is not None for r in rollouts):
            out["loss_mask"] = torch.cat([_pad_width(r.train_mask, width, 0) for r in rollouts])
        common = set.intersection(*(set(r.reward_components) for r in rollouts))
        out["reward_components"] = {
            k: torch.cat([r.reward_components[k] for r in rollouts])
            for k in rollouts[0].reward_components
            if k in common
        }
        names = list(dict.fromkeys(k for r in rollouts for k in r.facts))
        out["facts"] = {
            k: [x for r in rollouts for x in (_fact(k, r.facts[k]) if k in r.facts else [None] * len(r))] for k in names
        }
        return cls(**out)


# per-sample tensor fields computed after the rollout: set in every rollout ``Rollout.concat`` joins, or in none
LATER_FIELDS = ("rewards", "advantages", "values", "ref_logprobs", "returns", "engine_logprobs", "is_weights")


def _pad_width(value: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """``[n]`` unchanged; ``[n, T]`` right-padded with ``fill`` to ``[n, width]``."""
    if value.dim() < 2:
        return value
    return torch.nn.functional.pad(value, (0, width - value.shape[1]), value=fill)


def _fact(name: str, value: Any) -> list[Any]:
    """``Rollout.facts[name]``, checked to be a list (one entry per sample)."""
    if not isinstance(value, list):
        raise TypeError(
            f"Rollout.facts[{name!r}] is a {type(value).__name__}; facts are lists with one entry per sample "
            "(a per-token tensor the update needs belongs in a typed Rollout field)"
        )
    return value
