"""Log-probabilities of sampled tokens, computed in float32 without a full-vocabulary float32 copy.

For a vocabulary of ~150k entries a float32 log-softmax of a whole ``[N, T, V]`` batch is tens of
GiB. ``token_logprobs`` only ever needs one number per position, ``z[token] − logsumexp(z)`` with
``z = logits / temperature``, so it walks over the positions in chunks: each chunk is cast to
float32, reduced to its log-sum-exp and gathered, and freed before the next one.

Under autograd, plain chunking would not help: every chunk's float32 copy would be kept for the
backward pass. ``token_logprobs`` therefore runs as a custom autograd function that saves only the
logits as given (e.g. bf16) and the ``[N, T]`` log-sum-exp, and recomputes the softmax chunk by
chunk in the backward pass. Peak extra memory is one float32 chunk, plus the gradient of the logits
in their own dtype during backward.

The log-probs are those of the raw sampling distribution: temperature applied, no top-k/top-p
renormalisation, as in the rollout engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, *, chunk_size: int = 1024) -> Tensor:
    """Log-probs ``log softmax(logits / temperature)[token]`` of the given tokens, in float32.

    Args:
        logits: ``[N, T, V]`` scores predicting ``tokens`` (already shifted: position ``t`` predicts
            ``tokens[:, t]``). Any float dtype; a non-contiguous view (a slice of the model output)
            is read in place, not copied.
        tokens: ``[N, T]`` token ids; padding positions must hold a valid id (e.g. the pad id) and
            are masked by the caller.
        temperature: The sampling temperature the logits are divided by (> 0).
        chunk_size: About how many positions are processed at once (the float32 working set is
            ``chunk_size × V × 4`` bytes); the result does not depend on it.

    Returns:
        ``[N, T]`` float32 log-probs, differentiable with respect to ``logits``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if logits.shape[:-1] != tokens.shape or logits.dim() != 3:
        raise ValueError(
            f"expected logits [N, T, V] and tokens [N, T], got {tuple(logits.shape)} and {tuple(tokens.shape)}."
        )
    return _TokenLogprobs.apply(logits, tokens.long(), float(temperature), chunk_size)


def chunk_grid(n: int, t: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """(rows, columns) slices tiling an ``[n, t]`` grid in blocks of about ``chunk_size`` positions.

    Whole rows are grouped when a row is shorter than ``chunk_size``; longer rows are split along
    ``t``. Slicing both dims keeps every block a view of a possibly non-contiguous tensor.
    """
    rows = max(1, chunk_size // max(t, 1))
    cols = max(1, min(t, chunk_size))
    for i in range(0, n, rows):
        for j in range(0, t, cols):
            yield slice(i, i + rows), slice(j, j + cols)


def _scaled(chunk: Tensor, temperature: float) -> Tensor:
    """``chunk / temperature`` in float32; a float32 chunk at temperature 1 is used as is (no copy)."""
    z = chunk.float()
    return z if temperature == 1.0 else z / temperature


class _TokenLogprobs(torch.autograd.Function):
    """Chunked ``z[token] − logsumexp(z)`` with a chunked, recomputing backward."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int) -> Tensor:
        n, t, _ = logits.shape
        out = logits.new_empty((n, t), dtype=torch.float32)  # [N, T]
        lse = logits.new_empty((n, t), dtype=torch.float32)  # [N, T]
        for rows, cols in chunk_grid(n, t, chunk_size):
            z = _scaled(logits[rows, cols], temperature)  # [n, t, V] float32 chunk
            lse[rows, cols] = torch.logsumexp(z, dim=-1)
            picked = z.gather(-1, tokens[rows, cols].unsqueeze(-1)).squeeze(-1)  # [n, t]
            out[rows, cols] = picked - lse[rows, cols]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        n, t, _ = logits.shape
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [N, T, V]
        for rows, cols in chunk_grid(n, t, ctx.chunk_size):
            g = grad_out[rows, cols].float().unsqueeze(-1)  # [n, t, 1]
            z = _scaled(logits[rows, cols], ctx.temperature)  # [n, t, V]
            # d(z[k] − lse)/dz = onehot(k) − softmax(z), chained through z = logits / temperature;
            # one new float32 chunk, updated in place.
            grad_z = (z - lse[rows, cols].unsqueeze(-1)).exp_().mul_(-g)  # [n, t, V]
            grad_z.scatter_add_(-1, tokens[rows, cols].unsqueeze(-1), g)
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            grad_logits[rows, cols] = grad_z  # cast to the logits' dtype on assignment
        return grad_logits, None, None, None
