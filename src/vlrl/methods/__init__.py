"""RL methods, one LightningModule each."""

from vlrl.methods.base import RLMethod
from vlrl.methods.grpo import GRPO

__all__ = ["GRPO", "RLMethod"]
