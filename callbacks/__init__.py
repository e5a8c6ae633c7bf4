"""Lightning callbacks of vlrl (installed as ``vlrl.callbacks``)."""

from vlrl.callbacks.base import RLCallback

__all__ = ["RLCallback"]
