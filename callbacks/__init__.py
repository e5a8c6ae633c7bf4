"""Lightning callbacks of vlrl (installed as ``vlrl.callbacks``).

``RLCallback``, the base class of the callbacks that act inside the RL step, is defined in ``vlrl.hooks``
(below ``vlrl.methods``, which calls its hooks) and importable from here.
"""

from vlrl.callbacks.averaging import CheckpointAveraging
from vlrl.callbacks.curriculum import SequenceLengthCurriculum
from vlrl.callbacks.dynamic_sampling import DynamicSampling
from vlrl.callbacks.preemption import Preemption
from vlrl.callbacks.random_state import RandomState
from vlrl.callbacks.replay import SelectiveSampleReplay
from vlrl.callbacks.rethinking import ForcedRethinking
from vlrl.callbacks.samples import RolloutSamples
from vlrl.callbacks.throughput import Throughput
from vlrl.hooks import RLCallback

__all__ = [
    "CheckpointAveraging",
    "DynamicSampling",
    "ForcedRethinking",
    "Preemption",
    "RandomState",
    "RLCallback",
    "RolloutSamples",
    "SelectiveSampleReplay",
    "SequenceLengthCurriculum",
    "Throughput",
]
