"""RL methods, one LightningModule each."""

from vlrl.methods.base import RLMethod
from vlrl.methods.grpo import GRPO
from vlrl.methods.ppo import PPO
from vlrl.methods.racro import RACRO
from vlrl.methods.reward_model import UnifiedRewardThink
from vlrl.methods.sft import SFT
from vlrl.methods.sophia import SOPHIA

__all__ = ["GRPO", "PPO", "RACRO", "RLMethod", "SFT", "SOPHIA", "UnifiedRewardThink"]
