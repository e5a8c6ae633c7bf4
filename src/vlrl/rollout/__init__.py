"""Rollout engines: sample responses and their behaviour log-probs."""

from vlrl.rollout.base import Generation, RolloutEngine, Sampling
from vlrl.rollout.hf import HFEngine
from vlrl.rollout.vllm import VLLMEngine  # vLLM itself is imported when the engine starts

__all__ = ["Generation", "HFEngine", "RolloutEngine", "Sampling", "VLLMEngine"]
