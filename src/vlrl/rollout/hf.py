"""Rollout with Hugging Face ``generate``, sharing the policy's weights (CPU, debugging, small runs).

Sampling is true sampling unless configured otherwise (``top_k=0``: HF's default of 50 is not
applied), vision special tokens are never sampled, and log-probs are taken from the raw logits at
the sampling temperature (not from the processed scores), so they are the log-probs the trainer
recomputes. ``update_weights`` has nothing to do: the engine generates with the module itself.
"""

from __future__ import annotations

import torch

from vlrl.algorithms import token_logprobs
from vlrl.models.inputs import collate, to_device
from vlrl.models.loading import tokenizer_of
from vlrl.rollout.base import Generation, Sampling, generation_config
from vlrl.types import EncodedPrompt

# Config attributes naming vision special tokens, across model families.
VISION_TOKEN_ATTRS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "image_token_index",
    "video_token_index",
)


class HFEngine:
    """Samples with ``model.generate`` in batches.

    Args:
        max_batch_size: Most sequences per ``generate`` call (``None``: all at once).
        suppress_vision_tokens: Never sample image/video/vision-boundary tokens (a random or
            lightly trained VLM otherwise emits them, and they break re-encoding).
    """

    def __init__(self, max_batch_size: int | None = None, suppress_vision_tokens: bool = True) -> None:
        self.max_batch_size = max_batch_size
        self.suppress_vision_tokens = suppress_vision_tokens
        self.model: torch.nn.Module | None = None

    def bind(self, model: torch.nn.Module, processor: object) -> None:
        self.model = model
        tok = tokenizer_of(processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen_eos = model.generation_config.eos_token_id
        stop = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        self.stop_ids = sorted(i for i in stop if i is not None)
        config = model.config
        ids = {getattr(config, a, None) for a in VISION_TOKEN_ATTRS}
        self.suppress_ids = sorted(i for i in ids if isinstance(i, int)) if self.suppress_vision_tokens else []

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation runs on the training module's own weights."""

    @torch.no_grad()
    def generate(self, prompts: list[EncodedPrompt], sampling: Sampling, seed: int | None = None) -> Generation:
        if self.model is None:
            raise RuntimeError("HFEngine.generate called before bind(model, processor)")
        size = self.max_batch_size or len(prompts)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                chunks = [self._generate(prompts[i : i + size], sampling, device) for i in range(0, len(prompts), size)]
        finally:
            self.model.train(was_training)
        return _concat(chunks, self.pad_id)

    def _generate(self, prompts: list[EncodedPrompt], sampling: Sampling, device: torch.device) -> Generation:
        batch = to_device(collate(prompts, self.pad_id), device, self.model.dtype)
        greedy = sampling.temperature == 0
        config = generation_config(
            sampling,
            self.stop_ids,
            self.pad_id,
            suppress_tokens=self.suppress_ids or None,
            return_dict_in_generate=True,
            output_logits=True,
        )
        out = self.model.generate(**batch, generation_config=config)
        width = batch["input_ids"].shape[1]
        response = out.sequences[:, width:].cpu()  # [n, T]
        logits = torch.stack(out.logits, dim=1).float()  # [n, T, V] raw, before any processor
        logprobs = token_logprobs(logits, response.to(logits.device), 1.0 if greedy else sampling.temperature).cpu()
        is_stop = torch.isin(response, torch.tensor(self.stop_ids))  # [n, T]
        stopped = is_stop.any(dim=1)
        first_stop = torch.where(stopped, is_stop.int().argmax(dim=1), response.shape[1] - 1)
        mask = (torch.arange(response.shape[1]) <= first_stop[:, None]).float()  # [n, T]
        response = torch.where(mask.bool(), response, torch.full_like(response, self.pad_id))
        return Generation(
            response_ids=response,
            response_mask=mask,
            logprobs=logprobs * mask,
            finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
        )


def _concat(chunks: list[Generation], pad_id: int) -> Generation:
    """Join per-chunk generations, padding to the longest response and trimming unused columns."""
    width = max(int(c.response_mask.sum(dim=1).max().item()) if c.response_mask.numel() else 0 for c in chunks)
    width = max(width, 1)

    def fit(t: torch.Tensor, value: float) -> torch.Tensor:
        t = t[:, :width]
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Generation(
        response_ids=torch.cat([fit(c.response_ids, pad_id) for c in chunks]),
        response_mask=torch.cat([fit(c.response_mask, 0.0) for c in chunks]),
        logprobs=torch.cat([fit(c.logprobs, 0.0) for c in chunks]),
        finish_reasons=[r for c in chunks for r in c.finish_reasons],
    )
