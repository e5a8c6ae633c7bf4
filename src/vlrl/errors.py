"""Errors that a vlrl run reports as one line.

``lightning-cli`` prints vlrl's own errors (these classes, the other error classes of vlrl, and the
``ValueError``/``TypeError``/``RuntimeError``/``OSError`` that vlrl code raises on purpose) as one line
without a traceback; ``--debug`` or ``VLRL_DEBUG=1`` shows the traceback (``vlrl.cli``).
"""

from __future__ import annotations

__all__ = ["AllRanksError", "ConfigError"]


class ConfigError(ValueError):
    """A setting that cannot work, found before training starts; the message names the key, the value and the fix."""


class AllRanksError(RuntimeError):
    """An error that every rank raises at the same point of a step, after the ranks agreed on it.

    Only such an error lets ``Preemption`` write a checkpoint from ``on_exception`` when there are several
    ranks: a sharded (or any collective) save needs every rank to take part, and an error raised on one
    rank alone leaves the others elsewhere (in a collective of the step, or running on).
    """
