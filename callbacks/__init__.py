"""Lightning callbacks of vlrl (installed as ``vlrl.callbacks``)."""

from vlrl.callbacks.averaging import CheckpointAveraging
from vlrl.callbacks.base import RLCallback
from vlrl.callbacks.curriculum import SequenceLengthCurriculum
from vlrl.callbacks.preemption import Preemption
from vlrl.callbacks.replay import SelectiveSampleReplay
from vlrl.callbacks.rethinking import ForcedRethinking
from vlrl.callbacks.samples import RolloutSamples
from vlrl.callbacks.throughput import Throughput
from vlrl.checkpointing import RandomState

__all__ = [
    "CheckpointAveraging",
    "ForcedRethinking",
    "Preemption",
    "RandomState",
    "RLCallback",
    "RolloutSamples",
    "SelectiveSampleReplay",
    "SequenceLengthCurriculum",
    "Throughput",
]
