"""DAPO's treatment of over-long responses (Yu et al. 2025): overlong filtering and soft overlong punishment.

A response cut off by the length limit has no final answer, so its reward says little about its reasoning.
DAPO offers two fixes, which ``GRPO`` switches on separately:

- **Overlong filtering**: truncated samples are left out of the loss (their tokens' mask is 0); they still
  count in their group's advantage baseline.
- **Soft overlong punishment**: a length penalty added to the reward, 0 up to ``L_max − L_cache`` tokens,
  falling linearly to −1 at ``L_max`` (the paper: ``L_max`` 20480, ``L_cache`` 4096).
"""

from __future__ import annotations

from torch import Tensor


def soft_overlong_penalty(lengths: Tensor, max_length: int, cache_length: int, factor: float = 1.0) -> Tensor:
    """DAPO's length-aware reward term ``R_len``, times ``factor``.

    ``R_len = 0`` for ``|y| <= L_max − L_cache``, ``((L_max − L_cache) − |y|) / L_cache`` for
    ``L_max − L_cache < |y| <= L_max``, and ``−1`` beyond.

    Example: ``L_max = 20``, ``L_cache = 4``: lengths ``[10, 16, 17, 19, 20, 25]`` give
    ``[0, 0, −0.25, −0.75, −1, −1]``.

    Args:
        lengths: ``[N]`` response lengths in tokens.
        max_length: ``L_max``, the response length limit (``sampling.max_new_tokens``).
        cache_length: ``L_cache``, the span before ``L_max`` over which the penalty grows (0 < it <= ``L_max``).
        factor: Scale of the penalty (verl's ``penalty_factor``; 1 in the paper).

    Returns:
        ``[N]`` float penalties in ``[−factor, 0]``.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"cache_length={cache_length} must be in (0, max_length={max_length}]: the penalty grows over the "
            "last cache_length tokens before max_length"
        )
    expected = max_length - cache_length
    excess = (expected - lengths.float()) / cache_length  # [N], negative past the expected length
    return excess.clamp(-1.0, 0.0) * factor


def overlong_filter(mask: Tensor, truncated: Tensor) -> Tensor:
    """``mask`` with the rows of truncated samples set to 0: those samples leave the loss.

    Args:
        mask: ``[N, T]`` tokens trained on.
        truncated: ``[N]`` bool, True for samples stopped by the length limit (finish reason ``length``).

    Returns:
        ``[N, T]`` the filtered mask, ``mask``'s dtype.
    """
    keep = (~truncated.bool()).to(mask.device).unsqueeze(-1)  # [N, 1]
    return mask * keep.to(mask.dtype)
