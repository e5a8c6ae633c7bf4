"""Precision of trained and frozen models: float32 master weights, half-precision compute.

At the learning rates of the papers (1e-6 .. 5e-6) an AdamW update of a weight of size ~0.02 is about
1e-6, far below bfloat16's resolution there (~1e-4): stored in bf16, most updates round away. So the
weights being trained and the optimizer state are float32, and only the compute is bf16:

- one device: ``trainer.precision: bf16-mixed`` with ``policy.dtype: float32`` (autocast);
- FSDP2: the same two keys; ``shard_model`` keeps float32 shards and gathers them in bf16 for forward
  and backward (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)``);
- FSDP1: ``configs/trainer/fsdp.yaml`` sets the strategy's ``mixed_precision`` the same way;
- LoRA: ``policy.dtype: bfloat16`` for the frozen base; peft keeps the adapters in float32;
- QLoRA: NF4 base, ``policy.dtype`` is the compute dtype, adapters float32.

Frozen models (a KL reference, a reasoner, a judge) may stay bf16. ``trainer.precision: bf16-true``
casts the whole module, trained weights included, to bf16: ``check_master_weights`` warns about it.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

HALF = (torch.bfloat16, torch.float16)


def compute_dtype(precision: str | int | None) -> torch.dtype | None:
    """The dtype forward and backward run in under Lightning's ``trainer.precision`` (``None``: float32).

    Example:
        >>> compute_dtype("bf16-mixed"), compute_dtype("16-true"), compute_dtype("32-true")
        (torch.bfloat16, torch.float16, None)
    """
    name = str(precision)
    if name.startswith("bf16"):
        return torch.bfloat16
    if name.startswith("16"):
        return torch.float16
    return None


def frozen_dtype_name(trained_dtype: str, compute: torch.dtype | None) -> str:
    """The dtype (a ``Policy.dtype`` name) for a frozen copy of a trained model: the compute dtype when it is
    half precision (the frozen model only runs forward, in that dtype anyway), else the trained dtype."""
    return str(compute).removeprefix("torch.") if compute is not None else trained_dtype


def check_master_weights(model: torch.nn.Module, name: str, precision: str | int | None) -> float:
    """Warn when trainable parameters of ``model`` are stored in half precision; return their fraction.

    Args:
        model: The trained model (after the strategy set it up, so after any ``bf16-true`` cast; an FSDP2
            parameter's dtype is its shards').
        name: Its config key in messages (``policy``, ``critic``).
        precision: ``trainer.precision``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in trainable)
    half = sum(p.numel() for p in trainable if p.dtype in HALF)
    fraction = half / total if total else 0.0
    if half:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable if p.dtype in HALF})
        rank_zero_warn(
            f"{fraction:.0%} of the {name}'s trainable parameters are stored in {'/'.join(dtypes)} "
            f"(trainer.precision={precision}, {name}.dtype): at learning rates near 1e-6 most optimizer updates round "
            f"away. Keep float32 master weights with bf16 compute: `trainer.precision: bf16-mixed` and "
            f"`{name}.dtype: float32` (under LoRA the adapters are float32 already; use bf16-mixed, not bf16-true)."
        )
    return fraction
