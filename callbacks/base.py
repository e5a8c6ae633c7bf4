"""``RLCallback``, the base class of callbacks that act inside the RL step (defined in ``vlrl.hooks``).

Import it as ``vlrl.callbacks.RLCallback``; the hooks and their order are described in ``vlrl.hooks``.
"""

from vlrl.hooks import RLCallback

__all__ = ["RLCallback"]
