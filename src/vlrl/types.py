"""Typed containers passed between the stages of a training step.

``PromptBatch`` is what the datamodule yields: raw rows (chat messages and PIL images), not yet
tokenised, because tokenisation belongs to the policy's processor. ``Rollout`` is what a rollout
engine returns and what the rest of the step (callbacks, rewards, advantages, losses) reads and
extends. Tensor fields carry a shape comment; ``N = B * G`` is the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
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


@dataclass
class EncodedPrompt:
    """One prompt after the processor: what both the rollout engine and the trainer feed the model.

    ``token_inputs`` hold per-token tensors of shape ``[1, P]`` (``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` ...); ``media_inputs`` hold per-image tensors concatenated along dim 0
    (``pixel_values``, ``image_grid_thw``, ``image_sizes`` ...), empty for a text-only prompt.
    """

    token_inputs: dict[str, torch.Tensor]
    media_inputs: dict[str, torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.token_inputs["input_ids"].shape[-1])


@dataclass
class Rollout:
    """``N = B * G`` sampled responses and everything the update needs about them.

    Samples of one prompt are contiguous (``group_index`` says which prompt). Responses are
    right-padded; ``response_mask`` is 1 on tokens that are trained on (generated tokens up to and
    including EOS). Fields computed later in the step (rewards, advantages, reference log-probs)
    start as ``None``.
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
    extras: dict[str, Any] = field(default_factory=dict)  # per-sample lists/tensors added by callbacks
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
            elif isinstance(value, dict):
                out[f.name] = {k: _index(v, idx, items) for k, v in value.items()}
            else:
                out[f.name] = value
        return replace(self, **out)


def _index(value: Any, idx: torch.Tensor, items: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value[idx]
    if isinstance(value, list):
        return [value[i] for i in items]
    raise TypeError(f"Rollout.extras values must be per-sample tensors or lists, got {type(value).__name__}")
