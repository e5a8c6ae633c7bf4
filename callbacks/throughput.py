"""``Throughput``: training tokens per second and model FLOPs utilisation (MFU) of the RL step.

The step itself logs ``perf/rollout_s``, ``perf/rollout_tokens_per_s`` (sampled tokens per second of
generation) and ``perf/step_s``; this callback adds, per step:

- ``perf/train_tokens_per_s``: prompt + response tokens of the update batch (padding excluded),
  times ``epochs``, per second of the update (from the end of the advantages to the end of the step:
  reference log-probs, forward/backward passes, optimizer steps, weight sync);
- ``perf/flops_per_s``: the step's model FLOPs (below) per second of the whole step;
- ``perf/mfu``: ``perf/flops_per_s`` over the device's peak, when the peak is known.

FLOPs are counted with the usual dense-transformer estimate, ``2·N`` per token for a forward pass and
``6·N`` for forward + backward (attention's sequence-length term is left out), separately for the
language model and the vision tower:

- generation: ``2·N_lm`` per prompt token (prefill) and per sampled token, plus ``2·N_vis`` per visual
  patch of the prompt's images;
- training, per epoch: ``6·N_lm`` per prompt + response token and ``6·N_vis`` per patch (``2·N_vis``
  when the vision tower is frozen: no weight gradients and nothing to back-propagate into);
- a reference pass (``kl_coef > 0``): ``2·N_lm`` per token and ``2·N_vis`` per patch.

``N_lm`` counts the parameters outside the vision tower except the input embedding table (a lookup,
not a matmul); ``N_vis`` the vision tower's (its projector included). Tokens and patches are this
device's, and the peak is one device's, so MFU is per device. The peak table holds dense bf16
figures; for another precision pass ``peak_flops``. On CPU (or an unknown GPU) without
``peak_flops``, ``perf/mfu`` is not logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from vlrl.hooks import RLCallback
from vlrl.types import EncodedPrompt, Rollout

# Dense bf16 peak FLOP/s by GPU name (first match wins, so the more specific names come first).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)

# Attribute names of the vision tower (with its projector) across model families.
VISION_MODULES = ("visual", "vision_tower", "vision_model", "multi_modal_projector")


@dataclass
class ParamCounts:
    """Parameters of the language model (``language``) and of the vision tower (``vision``)."""

    language: int
    vision: int
    vision_trainable: bool


@dataclass
class StepWork:
    """What one RL step ran: tokens and visual patches of generation and of the update."""

    prompt_tokens: int = 0  # prefilled prompt tokens, over all samples
    sampled_tokens: int = 0
    rollout_patches: int = 0
    train_tokens: int = 0  # prompt + response tokens of the update batch, one epoch
    train_patches: int = 0
    epochs: int = 1
    reference_passes: int = 0


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    """Split ``model``'s parameters into the vision tower's and the language model's (input embeddings excluded)."""
    vision_ids: set[int] = set()
    trainable = False
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_MODULES:
            for p in module.parameters():
                vision_ids.add(id(p))
                trainable = trainable or p.requires_grad
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_ids = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    vision = language = 0
    for p in {id(p): p for p in model.parameters()}.values():  # tied weights once
        if id(p) in vision_ids:
            vision += p.numel()
        elif id(p) not in embedding_ids:
            language += p.numel()
    return ParamCounts(language=language, vision=vision, vision_trainable=trainable)


def step_flops(params: ParamCounts, work: StepWork) -> float:
    """Model FLOPs of one step (see the module docstring for the counting rules)."""
    lm, vis = params.language, params.vision
    generation = 2 * lm * (work.prompt_tokens + work.sampled_tokens) + 2 * vis * work.rollout_patches
    train_vision = (6 if params.vision_trainable else 2) * vis
    training = work.epochs * (6 * lm * work.train_tokens + train_vision * work.train_patches)
    reference = work.reference_passes * (2 * lm * work.train_tokens + 2 * vis * work.train_patches)
    return float(generation + training + reference)


def visual_patches(prompt: EncodedPrompt, patch_size: int | None) -> int:
    """Patches the vision tower sees for ``prompt``'s images: Qwen-VL grids, else pixels / patch area."""
    media = prompt.media_inputs
    if "image_grid_thw" in media:
        return int(media["image_grid_thw"].prod(dim=-1).sum())
    pixels = media.get("pixel_values")
    if pixels is None or not patch_size or pixels.dim() < 4:
        return 0
    return int(pixels.numel() // (pixels.shape[-3] * patch_size * patch_size))


def peak_flops_of(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` from ``PEAK_FLOPS``; ``None`` on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


class Throughput(RLCallback):
    """Logs ``perf/train_tokens_per_s``, ``perf/flops_per_s`` and ``perf/mfu`` every step.

    Place it after callbacks that change the rollout (its hooks see the rollout as they leave it).

    Args:
        peak_flops: Peak FLOP/s of one device for the MFU. Default: the dense bf16 peak of the GPU
            from a table by name (H100/H200 989e12, A100 312e12, ...); on CPU or an unknown GPU
            MFU is then not logged.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 FLOP/s (e.g. 989e12 for an H100) or null, got {peak_flops}")
        self.peak_flops = peak_flops
        self.params: ParamCounts | None = None
        self.patch_size: int | None = None
        self.work = StepWork()
        self.step_start = self.update_start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        self.params = count_parameters(model)
        vision_config = getattr(model.config, "vision_config", None)
        self.patch_size = getattr(vision_config, "patch_size", None)
        if self.peak_flops is None:
            self.peak_flops = peak_flops_of(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.work = StepWork()
        self.step_start = time.perf_counter()

    def on_rollout_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollout: Rollout) -> Rollout:
        self.work.prompt_tokens = sum(p.length for p in rollout.prompts)
        self.work.sampled_tokens = int(rollout.response_mask.sum())
        self.work.rollout_patches = sum(visual_patches(p, self.patch_size) for p in rollout.prompts)
        return rollout

    def on_advantages_computed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollout: Rollout) -> Rollout:
        self.work.train_tokens = sum(p.length for p in rollout.prompts) + int(rollout.response_mask.sum())
        self.work.train_patches = sum(visual_patches(p, self.patch_size) for p in rollout.prompts)
        self.work.epochs = int(getattr(pl_module, "epochs", 1))
        self.work.reference_passes = int(getattr(pl_module, "kl_coef", 0.0) > 0)
        self.update_start = time.perf_counter()
        return rollout

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.work.train_tokens or self.params is None:  # nothing was updated (e.g. every sample dropped)
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        flops_per_s = step_flops(self.params, self.work) / max(now - self.step_start, 1e-9)
        metrics = {
            "perf/train_tokens_per_s": self.work.epochs * self.work.train_tokens / max(now - self.update_start, 1e-9),
            "perf/flops_per_s": flops_per_s,
        }
        if self.peak_flops:
            metrics["perf/mfu"] = flops_per_s / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
