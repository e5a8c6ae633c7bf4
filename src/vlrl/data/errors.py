"""Where a row came from, and the error raised when a row (or a source) is unusable."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

SKIP_HINT = "or set `on_bad_row: skip` on the datamodule to skip such rows"


@dataclass(frozen=True)
class RowLocation:
    """A row's place in its source: ``file`` (a path or a dataset name) and a 1-based ``row``.

    ``unit`` says whether ``row`` counts lines of a text file (JSONL) or records of a table.
    """

    file: str
    row: int
    unit: Literal["line", "row"] = "row"

    def __str__(self) -> str:
        return f"{self.file} {self.unit} {self.row}"


class DataError(ValueError):
    """A row that cannot be used, or a source that cannot be read.

    The message names the place (file and line/row), the field and the fix. ``reason`` is a short
    key (``missing_answer``, ``unreadable_image`` ...) under which skipped rows are counted.
    """

    def __init__(
        self,
        problem: str,
        fix: str,
        *,
        where: RowLocation | str | None = None,
        field: str | None = None,
        reason: str = "invalid",
        skippable: bool = True,
    ) -> None:
        self.where = where
        self.field = field
        self.reason = reason
        self.problem = problem
        self.fix = fix
        self.skippable = skippable
        place = f"{where}: " if where is not None else ""
        subject = f"field '{field}' " if field else ""
        self.detail = f"{place}{subject}{problem}. Fix: {fix}"  # without the hint to skip
        hint = f"; {SKIP_HINT}" if skippable and isinstance(where, RowLocation) else ""
        super().__init__(f"{self.detail}{hint}.")

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        """Pickled with every argument, so that the error raised in a data worker process arrives whole."""
        kwargs = {"where": self.where, "field": self.field, "reason": self.reason, "skippable": self.skippable}
        return partial(DataError, **kwargs), (self.problem, self.fix)
