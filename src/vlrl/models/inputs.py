"""From chat messages to model inputs, and from per-sample inputs to one padded batch.

A prompt is encoded once by the processor (its chat template, image tokens, pixel values) into an
``EncodedPrompt``; the rollout engine and the trainer then build their batches from the same
encodings with ``collate``, so generation and the recomputed log-probs see identical inputs
(token ids, attention masks, ``mm_token_type_ids``, image grids).

Layout of a collated batch: prompts left-padded to ``P``, then responses right-padded to ``T``::

    [pad pad p p p p | r r r EOS pad]      attention 0 on pads, positions follow the mask

``cut_at_stop`` turns what ``generate`` returned into that response layout; ``map_micro_batches`` runs a
no-gradient forward (log-probs, values) over micro-batches and joins the results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from PIL import Image
from transformers import ProcessorMixin

from vlrl.types import EncodedPrompt

# Per-token keys a processor may return; everything else is per-image and concatenated on dim 0.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")

Batch = TypeVar("Batch")


def encode_prompt(processor: Any, messages: list[dict], images: list[Image.Image]) -> EncodedPrompt:
    """Render ``messages`` with the processor's chat template and encode text and images."""
    is_processor = isinstance(processor, ProcessorMixin)
    if images and not is_processor:
        raise ValueError(
            f"a prompt has {len(images)} image(s) but the model has a text tokenizer only; "
            "use a vision-language model or drop the images from the data"
        )
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if is_processor:
        enc = processor(text=[text], images=images or None, return_tensors="pt")
    else:
        enc = processor([text], return_tensors="pt", add_special_tokens=False)
    token_inputs = {k: v for k, v in enc.items() if k in TOKEN_KEYS}
    media_inputs = {k: v for k, v in enc.items() if k not in TOKEN_KEYS and isinstance(v, torch.Tensor)}
    return EncodedPrompt(token_inputs=token_inputs, media_inputs=media_inputs, images=list(images))


def extend_prompt(prompt: EncodedPrompt, tokens: torch.Tensor) -> EncodedPrompt:
    """``prompt`` followed by plain text ``tokens`` (e.g. a response prefix to continue from)."""
    tokens = tokens.view(1, -1).to(prompt.token_inputs["input_ids"].dtype)
    token_inputs = {}
    for key, value in prompt.token_inputs.items():
        fill = tokens if key == "input_ids" else torch.full_like(tokens, 1 if key == "attention_mask" else 0)
        token_inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    return EncodedPrompt(token_inputs, prompt.media_inputs, images=prompt.images, vision=prompt.vision)  # same images


def collate(
    prompts: list[EncodedPrompt],
    pad_id: int,
    responses: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One model-input batch: prompts left-padded, optional responses appended (right-padded).

    Args:
        prompts: ``N`` encoded prompts.
        pad_id: Token id used for padding.
        responses: ``[N, T]`` response token ids to append, or ``None`` (a generation batch).
        response_mask: ``[N, T]`` 1 on real response tokens; defaults to all ones.
    """
    width = max(p.length for p in prompts)
    out: dict[str, list[torch.Tensor]] = {}
    for p in prompts:
        pad = width - p.length
        for key, value in p.token_inputs.items():
            fill = pad_id if key == "input_ids" else 0
            out.setdefault(key, []).append(torch.nn.functional.pad(value, (pad, 0), value=fill))
    batch = {k: torch.cat(v, dim=0) for k, v in out.items()}  # [N, P]
    if responses is not None:
        mask = torch.ones_like(responses) if response_mask is None else response_mask.to(responses.dtype)
        for key in batch:
            if key == "input_ids":
                extra = responses
            elif key == "attention_mask":
                extra = mask
            else:
                extra = torch.zeros_like(responses)
            batch[key] = torch.cat([batch[key], extra.to(batch[key].dtype)], dim=1)  # [N, P + T]
    media: dict[str, list[torch.Tensor]] = {}
    for p in prompts:
        for key, value in p.media_inputs.items():
            media.setdefault(key, []).append(value)
    batch.update({k: torch.cat(v, dim=0) for k, v in media.items()})
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Move a batch; floating-point media (pixel values) take the model's dtype."""
    return {
        k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
        for k, v in batch.items()
    }


def cut_at_stop(
    response: torch.Tensor, stop_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated tokens ``[n, T]`` cut after each row's first stop token.

    Example:
        ``[[5, 2, 7], [5, 6, 7]]`` with stop id 2 and pad 0 gives ids ``[[5, 2, 0], [5, 6, 7]]``, mask
        ``[[1, 1, 0], [1, 1, 1]]`` and stopped ``[True, False]``.

    Returns:
        The ids with ``pad_id`` after the stop token ``[n, T]``, the float mask ``[n, T]`` (1 up to and
        including the stop token; all 1 for a row without one) and whether each row stopped ``[n]``.
    """
    is_stop = torch.isin(response, torch.tensor(stop_ids, dtype=response.dtype, device=response.device))  # [n, T]
    stopped = is_stop.any(dim=1)  # [n]
    first_stop = torch.where(stopped, is_stop.int().argmax(dim=1), response.shape[1] - 1)  # [n]
    positions = torch.arange(response.shape[1], device=response.device)  # [T]
    mask = (positions <= first_stop[:, None]).float()  # [n, T]
    return torch.where(mask.bool(), response, torch.full_like(response, pad_id)), mask, stopped


@torch.no_grad()
def map_micro_batches(fn: Callable[[Batch], torch.Tensor], batches: Iterable[Batch]) -> torch.Tensor:
    """``fn`` on each micro-batch without autograd, the results joined along dim 0 (rows in batch order).

    For the forwards whose results are constants of the update (reference and trainer log-probs,
    critic values). No batches give an empty 1-d tensor.
    """
    parts = [fn(batch) for batch in batches]
    return torch.cat(parts) if parts else torch.zeros(0)
