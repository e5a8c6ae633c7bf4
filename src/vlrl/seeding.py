"""Every random stream of a run, derived in one place.

A run has one configured ``seed``; each purpose that draws random numbers (the rollout sampling,
the rethinking continuation, the replay draws, the mini-batch shuffles, a reasoner's sampling, ...)
asks ``stream_seed(seed, purpose, step, rank)`` for its own seed. The four numbers are mixed by
NumPy's ``SeedSequence`` (a hash designed for this), so two streams that differ in any of them get
unrelated seeds: rank 1's rollout is not rank 0's rethinking, and step 5 of one purpose is not step 4
of another, as they would be with an affine formula such as ``seed + step * k + rank``.

The seed is a pure function of its arguments, so a resumed run (which restores ``global_step``)
draws exactly what the uninterrupted one drew.

Engines that need several streams from one seed (one per request) add the request's index: seeds
are below ``2**62``, so ``seed + i`` stays a valid 64-bit seed.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

SEED_BITS = 62


def stream_seed(seed: int, purpose: str, step: int = 0, rank: int = 0) -> int:
    """The seed of the random stream for ``purpose`` at ``step`` on ``rank`` of a run seeded ``seed``.

    Args:
        seed: The run's configured seed (any integer, negative included).
        purpose: What the stream is for, e.g. ``"rollout"``, ``"rethinking"``, ``"replay"``.
        step: The optimizer step (or predict batch) the draws belong to; 0 for a stream that lives
            across steps (a stateful generator).
        rank: The global rank drawing.

    Example:
        >>> stream_seed(0, "rollout", 3, 1) == stream_seed(0, "rollout", 3, 1)
        True
        >>> stream_seed(0, "rollout", 0, 1) != stream_seed(0, "rethinking", 0, 0)
        True
    """
    if step < 0 or rank < 0:
        raise ValueError(f"stream_seed: step={step} and rank={rank} must be >= 0")
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, int(seed < 0), zlib.crc32(purpose.encode()), step, rank]
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> (64 - SEED_BITS)


def generator(seed: int, purpose: str, step: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``stream_seed(seed, purpose, step, rank)``."""
    return torch.Generator().manual_seed(stream_seed(seed, purpose, step, rank))
