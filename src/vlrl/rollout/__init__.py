"""Rollout engines: sample responses and their behaviour log-probs."""

from vlrl.rollout.base import Generation, RolloutEngine, Sampling
from vlrl.rollout.hf import HFEngine

__all__ = ["Generation", "HFEngine", "RolloutEngine", "Sampling"]
