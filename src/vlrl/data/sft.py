"""Data for supervised fine-tuning: each row becomes a whole conversation ending with what is learnt.

A row is either

- a chat ``messages`` list that ends with the assistant turn(s) to learn (earlier assistant turns
  are learnt too), or
- a ``question`` (rendered through the prompt template like an RL prompt) plus its target: the
  ``response`` field (map another column onto it with ``column_mapping``), or else the ``answer``.

An optional ``weight`` field (a number >= 0, default 1) scales that row's loss, e.g. the
reward-times-importance weight of an offline trajectory.

``SFTDataModule`` is ``RLDataModule`` with these rows checked when they are read (a row without a
target, or with a bad weight, is an error naming the file, row and field, or is skipped and counted
with ``on_bad_row: skip``) and with the target appended to each prompt's messages as the final
assistant turn. Its batches are ``PromptBatch`` like the RL datamodule's; ``answers`` stay the gold
answers, so generation accuracy can be measured on the same rows.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from vlrl.data.datamodule import PromptDataset, RLDataModule, Split
from vlrl.data.errors import DataError
from vlrl.data.prompts import Prompt
from vlrl.data.schema import Row

TARGET_FIELD = "response"
WEIGHT_FIELD = "weight"


def ends_with_assistant(messages: list[dict[str, Any]] | None) -> bool:
    """Whether a chat ends with an assistant turn (the turn a model is trained to produce)."""
    return bool(messages) and messages[-1].get("role") == "assistant"


def row_target(row: Row) -> str | None:
    """The text appended as the assistant turn of ``row``; ``None`` if its messages already end with one.

    Raises:
        DataError: the row has nothing to learn, or its ``response`` is not a string.
    """
    if ends_with_assistant(row.messages):
        return None
    response = row.extras.get(TARGET_FIELD)
    if response is not None and not isinstance(response, str):
        raise DataError(
            f"is a {type(response).__name__}, expected a string",
            f"write '{TARGET_FIELD}' as the target text",
            where=row.where,
            field=TARGET_FIELD,
            reason="wrong_type",
        )
    if response and response.strip():
        return response
    if not row.answer:
        raise DataError(
            "is missing: the row has no target to learn",
            f"give the row a '{TARGET_FIELD}' (map your target column onto it with `column_mapping`) or an "
            "'answer', or end its 'messages' with an assistant turn",
            where=row.where,
            field=TARGET_FIELD,
            reason="missing_target",
        )
    return row.answer


def row_weight(row: Row) -> float:
    """The loss weight of ``row`` (1 unless it has a ``weight`` field).

    Raises:
        DataError: the weight is not a finite number >= 0.
    """
    value = row.extras.get(WEIGHT_FIELD)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DataError(
            f"is {value!r}, expected a finite number >= 0",
            f"write '{WEIGHT_FIELD}' as a number such as 1.0, or leave it out for weight 1",
            where=row.where,
            field=WEIGHT_FIELD,
            reason="bad_weight",
        )
    return float(value)


class ConversationDataset(PromptDataset):
    """``PromptDataset`` whose messages end with the assistant turn(s) to learn; rows are already checked."""

    def __getitem__(self, index: int) -> Prompt:
        prompt = super().__getitem__(index)
        target = row_target(self.rows[index])
        if target is not None:
            prompt.messages.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
        return prompt


class SFTDataModule(RLDataModule):
    """Conversations for supervised fine-tuning (``vlrl.methods.SFT``), from the same sources as RL.

    Takes the arguments of ``RLDataModule``; its batch (``batch_size`` per device, or
    ``global_batch_size`` over all devices) is the samples of one optimizer step. A ``question`` row
    learns its ``response`` field (else its ``answer``) as the assistant turn after the templated
    prompt; a ``messages`` row that ends with an assistant turn is learnt as given (every assistant
    turn); an optional ``weight`` field (a number >= 0) scales the row's loss. Rows without a target,
    or with a bad weight, fail the run with their file, row and field, or are skipped and counted
    with ``on_bad_row: skip``.
    """

    def _load(self, split: Split) -> PromptDataset:
        loaded = super()._load(split)
        rows, skipped = [], Counter()
        for row in loaded.rows:
            try:
                row_target(row)
                row_weight(row)
            except DataError as error:
                if self.on_bad_row == "error":
                    raise
                skipped[error.reason] += 1
                continue
            rows.append(row)
        if skipped:
            for reason, count in skipped.items():
                key = f"{split}/{reason}"
                self.skipped_rows[key] = self.skipped_rows.get(key, 0) + count
            rank_zero_warn(f"Skipped {sum(skipped.values())} {split} row(s) without a usable SFT target or weight")
        if not rows:
            raise DataError(
                f"{split} source {self.sources[split]!r} has no row with a target to learn",
                f"give rows a '{TARGET_FIELD}' or an 'answer', or messages ending with an assistant turn",
                reason="config",
                skippable=False,
            )
        return ConversationDataset(rows, self.prompt_template, self.system_prompt, self.min_pixels, self.max_pixels)
