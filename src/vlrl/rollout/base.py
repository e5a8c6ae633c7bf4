"""The rollout engine protocol: what a method needs from whatever samples its responses.

An engine turns encoded prompts into sampled responses with their behaviour log-probs (of the raw
distribution at the sampling temperature, no top-k/top-p renormalisation) and finish reasons. After
each optimizer step the method calls ``update_weights`` so the next rollout samples from the new
policy. The HF ``generate`` engine shares the policy's weights; a vLLM engine keeps its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import GenerationConfig

from vlrl.types import EncodedPrompt


@dataclass
class Sampling:
    """How responses are sampled.

    Args:
        temperature: Softmax temperature; 0 means greedy decoding.
        top_p: Nucleus sampling mass (1.0 = off).
        top_k: Keep the k most likely tokens (0 = off, i.e. true sampling).
        max_new_tokens: Maximum response length in tokens.
        min_new_tokens: Minimum response length before EOS is allowed.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def generation_config(sampling: Sampling, stop_ids: list[int], pad_id: int, **extra: Any) -> GenerationConfig:
    """HF ``GenerationConfig`` for ``sampling`` (``temperature == 0`` means greedy; ``top_k=0`` keeps it off)."""
    greedy = sampling.temperature == 0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else sampling.top_k,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        **extra,
    )


@dataclass
class Generation:
    """What an engine returns for ``N`` prompts (one response each)."""

    response_ids: torch.Tensor  # [N, T] right-padded with the pad id
    response_mask: torch.Tensor  # [N, T] float, 1 on generated tokens up to and including EOS
    logprobs: torch.Tensor  # [N, T] float32 behaviour log-probs, 0 on padding
    finish_reasons: list[str]  # N of "stop" | "length"


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses for encoded prompts. Implementations: ``HFEngine``; vLLM on GPU."""

    def bind(self, model: torch.nn.Module, processor: object) -> None:
        """Attach the policy (called once the policy is loaded, on every rank)."""

    def generate(self, prompts: list[EncodedPrompt], sampling: Sampling, seed: int | None = None) -> Generation:
        """One response per prompt (repeat a prompt G times for G samples)."""

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
