"""Evaluation metrics (torchmetrics, so they reduce correctly across devices)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class AccuracyBySource(Metric):
    """Accuracy overall and per data source.

    Sources are registered on first sight; every rank must see the same source names (pass
    ``sources`` up front when the evaluation data is split across devices).

    Example:
        >>> m = AccuracyBySource()
        >>> m.update([True, False, True], ["color", "color", "count"])
        >>> {k: round(v.item(), 2) for k, v in m.compute().items()}
        {'accuracy': 0.67, 'accuracy/color': 0.5, 'accuracy/count': 1.0}
    """

    full_state_update = False

    def __init__(self, sources: list[str] | None = None, max_sources: int = 64) -> None:
        super().__init__()
        self.names: list[str] = list(sources or [])
        self.max_sources = max_sources
        self.add_state("correct", default=torch.zeros(max_sources), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(max_sources), dist_reduce_fx="sum")

    def update(self, correct: list[bool] | torch.Tensor, sources: list[str]) -> None:
        hits, seen = torch.zeros_like(self.correct), torch.zeros_like(self.total)  # [max_sources]
        for ok, source in zip(torch.as_tensor(correct).tolist(), sources, strict=True):
            if source not in self.names:
                if len(self.names) == self.max_sources:
                    raise ValueError(f"more than {self.max_sources} data sources; raise max_sources")
                self.names.append(source)
            i = self.names.index(source)
            hits[i] += float(ok)
            seen[i] += 1.0
        # out of place: states reset under ``trainer.validate``'s inference mode are inference tensors,
        # which a later ``fit`` (no inference mode) may read but not update in place
        self.correct = self.correct + hits
        self.total = self.total + seen

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"accuracy": self.correct.sum() / self.total.sum().clamp(min=1)}
        for i, name in enumerate(self.names):
            if self.total[i] > 0:
                out[f"accuracy/{name}"] = self.correct[i] / self.total[i]
        return out
