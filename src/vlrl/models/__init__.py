"""Model loading (HF Auto classes, LoRA/QLoRA, freezing) and the tiny offline model factory."""

from vlrl.models.loading import LoRA, Policy, apply_lora, freeze, tokenizer_of, vision_modules
from vlrl.models.sharding import BlockWrapPolicy, FSDP2Strategy, shard_model
from vlrl.models.tiny import resolve_model_path
from vlrl.models.value import ValueModel, load_value_model

__all__ = [
    "BlockWrapPolicy",
    "FSDP2Strategy",
    "LoRA",
    "Policy",
    "ValueModel",
    "apply_lora",
    "freeze",
    "load_value_model",
    "resolve_model_path",
    "shard_model",
    "tokenizer_of",
    "vision_modules",
]
