"""The vision tower once per distinct prompt, its output shared by every sample that shows the images.

The ``G`` samples of a prompt share its images, yet a plain batch of ``G`` copies runs the vision tower
on each copy: ``G`` times in the rollout's prefill and again in every training pass. ``with_shared_vision``
encodes the distinct prompts of a batch in one vision call and hands the features to the model as
transformers' precomputed ``mm_encoder_outputs``, in place of the pixels. Prompts are told apart by
their media tensors: the samples of a group hold the same ``EncodedPrompt``, and ``extend_prompt`` (a
continuation) keeps its media, so they count once.

- Frozen tower (``policy.freeze_vision``, no adapter on it): the features are constants of the run. The
  first pass that needs them (the rollout) keeps them on the prompt (``EncodedPrompt.vision``, keyed by
  the tower, dtype and device that made them), and every later sample and pass of the step reads them:
  one vision forward per distinct image per step.
- Trained tower: one vision forward per distinct prompt per micro-batch, under autograd. The samples of
  a prompt read the same output tensor, so the gradient reaching the tower is the sum over them, as it
  is when each copy runs the tower.

The features of a prompt are those its own pixels give in a batch of distinct images, so they equal
the per-copy path's up to float rounding (``tests/test_vision_once.py``). Models whose forward takes no
``mm_encoder_outputs`` and batches with videos keep the plain path (the batch is returned unchanged).
Under FSDP the vision tower is its own unit (``vlrl.models.sharding``), so calling it before the root
forward gathers its shards, as HF ``generate`` already does.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlrl.models.loading import vision_modules
from vlrl.types import EncodedPrompt

PIXELS = "pixel_values"
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")
# parameters outside the vision modules that shape image features (LLaVA-OneVision's row separator)
FEATURE_PARAMETERS = ("image_newline",)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def supports_shared_vision(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes precomputed image features (``mm_encoder_outputs``) and can make them."""
    base = base_model(model)
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        # FSDP2 gathers a tower's shards in the root's forward; a call to the tower outside it breaks the
        # lazy initialisation of the shards (sharded runs keep the per-sample path until this is wired in)
        return False
    takes = "mm_encoder_outputs" in inspect.signature(base.forward).parameters
    return takes and callable(getattr(base, "get_image_features", None)) and bool(vision_modules(base))


def tower_is_trained(model: torch.nn.Module) -> bool:
    """Whether any parameter that image features depend on is trained (tower, projector, adapters on them)."""
    base = base_model(model)
    if any(p.requires_grad for m in vision_modules(base) for p in m.parameters()):
        return True
    return any(p.requires_grad for n, p in base.named_parameters() if n.rsplit(".", 1)[-1] in FEATURE_PARAMETERS)


def distinct_prompts(prompts: list[EncodedPrompt]) -> tuple[list[EncodedPrompt], list[int]]:
    """The prompts with distinct pixels, in first-seen order, and for each prompt the index of its own.

    Example:
        Samples ``[a, a, b, a2]`` where ``a2 = extend_prompt(a, ...)`` give ``[a, b]`` and ``[0, 0, 1, 0]``.
    """
    first: dict[int, int] = {}
    unique: list[EncodedPrompt] = []
    index = []
    for p in prompts:
        key = id(p.media_inputs[PIXELS])
        if key not in first:
            first[key] = len(unique)
            unique.append(p)
        index.append(first[key])
    return unique, index


def image_features(
    model: torch.nn.Module, prompts: list[EncodedPrompt], device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, ...]]:
    """Per prompt, the features of its images (one ``[tokens, hidden]`` tensor each), from one vision call.

    ``prompts`` must be distinct (``distinct_prompts``). With a frozen tower the features are read from
    and kept on the prompts (``EncodedPrompt.vision``) and computed without autograd; with a trained tower
    they are computed here under the caller's grad mode.
    """
    base = base_model(model)
    trained = tower_is_trained(base)
    key = (id(vision_modules(base)[0]), dtype, str(device))
    missing = [p for p in prompts if trained or key not in p.vision]
    if missing:
        signature = inspect.signature(base.get_image_features).parameters
        media: dict[str, Any] = {}
        for name in missing[0].media_inputs:
            if name in signature:
                value = torch.cat([p.media_inputs[name] for p in missing])  # images of all prompts on dim 0
                media[name] = value.to(device, dtype=dtype if value.is_floating_point() else None)
        with torch.no_grad() if not trained else contextlib.nullcontext():  # trained: the caller's grad mode
            out = base.get_image_features(**media, return_dict=True).pooler_output  # one tensor per image
        start = 0
        for p in missing:
            count = images_of(p)
            p.vision[key] = tuple(out[start : start + count])
            start += count
        if start != len(out):
            raise RuntimeError(f"the vision tower returned {len(out)} image features for {start} images")
    features = [p.vision[key] for p in prompts]
    if trained:  # a trained tower's features belong to this pass only
        for p in prompts:
            p.vision.pop(key, None)
    return features


def images_of(prompt: EncodedPrompt) -> int:
    """How many images a prompt's media inputs hold (rows of its per-image grid or size tensor)."""
    for name in ("image_grid_thw", "image_sizes"):
        if name in prompt.media_inputs:
            return int(prompt.media_inputs[name].shape[0])
    raise ValueError(
        f"cannot count the images of a prompt with media inputs {sorted(prompt.media_inputs)}: expected "
        "image_grid_thw or image_sizes; this model family needs the plain vision path"
    )


def with_shared_vision(
    model: torch.nn.Module, prompts: list[EncodedPrompt], batch: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """``batch`` (the collated ``prompts``, one row each) with its pixels replaced by shared image features.

    Returned unchanged for a model without ``mm_encoder_outputs``, a batch without images or one with
    videos. Otherwise ``pixel_values`` goes and ``mm_encoder_outputs={"image": ...}`` holds, row by row,
    the features of each row's prompt; rows of one prompt share the tensors.
    """
    if PIXELS not in batch or any(k in batch for k in VIDEO_KEYS) or not supports_shared_vision(model):
        return batch
    # text-only rows (a VLM batch may mix them in) have no images: they add no features and keep their tokens
    unique, index = distinct_prompts([p for p in prompts if PIXELS in p.media_inputs])
    pixels = batch[PIXELS]
    features = image_features(model, unique, pixels.device, pixels.dtype)
    per_row = tuple(f for i in index for f in features[i])  # the images of every row, in row order
    out: dict[str, Any] = {k: v for k, v in batch.items() if k != PIXELS}
    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=per_row)}
    return out
