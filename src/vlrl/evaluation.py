"""Validation and test as benchmarks score them: grading, per-sample predictions, accuracy per benchmark and category.

Every method's ``evaluate`` grades its answers with ``Evaluation.grade`` and hands one ``Prediction``
per row to ``Evaluation.add``. At the end of the epoch ``Evaluation.finish`` gathers the predictions of
all ranks (a row that a distributed sampler served twice counts once), and writes, under
``<output_dir>/<stage>-step<global_step>/``:

- ``predictions.jsonl``: one line per row: id, benchmark, the response, the answer read from it, the
  gold answer, whether it is right, its categories and what the method adds (RACRO's reasoner answer,
  a judge's verdicts in both orders);
- ``summary.csv`` and ``summary.md``: accuracy and count per benchmark, and per value of each of the
  benchmark's categories (MathVista's skills, tasks and grades; MATH-V's subjects and levels; ...).

The Markdown table is printed at the end of ``test``. Accuracy is logged as ``{stage}/accuracy``,
``{stage}/accuracy/<benchmark>`` and ``{stage}/<benchmark>/<category>/<value>``.

Rows carry what grading needs in ``extras`` (``vlrl.data`` benchmark sources set these; a JSONL row may
give them as fields): ``answer_type``, ``precision``, ``unit``, ``closest_option`` (MathVista's: the option
nearest to an answer that names none) and ``breakdown``, a mapping of category name to a value or a list
of values (a row counts under each).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from vlrl.rewards.answer_extraction import grade_with_extraction
from vlrl.rewards.grading import Grade
from vlrl.types import PromptBatch

GradingMode = Literal["benchmark", "reward"]


@dataclass
class Prediction:
    """One evaluated row."""

    id: str
    data_source: str
    response: str
    answer: str
    extracted: str | None  # the answer read from the response; None when it states none
    correct: bool
    breakdown: dict[str, Any] = field(default_factory=dict)  # category -> value or list of values
    details: dict[str, Any] = field(default_factory=dict)  # what the method adds (captions, verdicts, ...)


@dataclass
class SummaryRow:
    """Accuracy of the rows of ``benchmark`` whose ``category`` has ``value`` (``category`` "all": every row)."""

    benchmark: str
    category: str
    value: str
    count: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0


def predictions(
    batch: PromptBatch,
    responses: list[str],
    grades: list[Grade],
    details: list[dict[str, Any]] | None = None,
) -> list[Prediction]:
    """One ``Prediction`` per row of ``batch``: its response and grade (and the method's ``details``)."""
    extras = batch.extras or [{} for _ in range(len(batch))]
    return [
        Prediction(
            id=batch.ids[i],
            data_source=batch.data_sources[i],
            response=responses[i],
            answer=batch.answers[i],
            extracted=grades[i].extracted,
            correct=bool(grades[i].correct),
            breakdown=dict(extras[i].get("breakdown") or {}),
            details=details[i] if details is not None else {},
        )
        for i in range(len(batch))
    ]


def summarize(rows: list[Prediction]) -> list[SummaryRow]:
    """Accuracy per benchmark ("all" rows first), then per value of each category, sorted by name."""
    counts: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        keys = [(row.data_source, "all", "all")]
        for category, values in row.breakdown.items():
            for value in values if isinstance(values, list | tuple) else [values]:
                if value is not None and value != "":
                    keys.append((row.data_source, str(category), str(value)))
        for key in keys:
            counts[key][0] += 1
            counts[key][1] += int(row.correct)
    order = sorted(counts, key=lambda k: (k[0], k[1] != "all", k[1], _natural(k[2])))
    return [SummaryRow(*key, count=counts[key][0], correct=counts[key][1]) for key in order]


def _natural(text: str) -> tuple:
    """Sort key putting "level 2" before "level 10"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def summary_csv(summary: list[SummaryRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["benchmark", "category", "value", "count", "correct", "accuracy"])
    for row in summary:
        writer.writerow([row.benchmark, row.category, row.value, row.count, row.correct, f"{row.accuracy:.4f}"])
    return out.getvalue()


def summary_markdown(summary: list[SummaryRow], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| benchmark | category | value | n | accuracy |", "|---|---|---|---:|---:|"]
    for row in summary:
        name = row.value if row.category != "all" else "**all**"
        lines.append(f"| {row.benchmark} | {row.category} | {name} | {row.count} | {100 * row.accuracy:.1f} |")
    return "\n".join(lines) + "\n"


class Evaluation:
    """How validation and test grade answers and what they report.

    Args:
        grading: ``benchmark`` (default): answers are read as the benchmarks' own evaluation reads them
            (``vlrl.rewards.grade_answer(mode="benchmark")``: letter + option text, unmarked final
            answers, MathVista's units and precision); ``reward``: the strict reading a policy is paid by.
        extractor: A model that reads the answer where the rules read none (e.g.
            ``vlrl.rewards.ModelExtractor`` with the benchmark's extraction prompt); off by default.
        output_dir: Folder of the predictions and summary files; default ``<trainer.log_dir>/eval`` (the
            logger's version folder), or ``<trainer.default_root_dir>/eval`` without a logger.
        write_predictions: Write ``predictions.jsonl`` and the summaries (rank 0); false logs metrics only.
        print_summary: Print the summary table at the end of ``test`` (and of ``validate``).
    """

    def __init__(
        self,
        grading: GradingMode = "benchmark",
        extractor: Any = None,
        output_dir: str | None = None,
        write_predictions: bool = True,
        print_summary: bool = True,
    ) -> None:
        if grading not in ("benchmark", "reward"):
            raise ValueError(f"evaluation.grading={grading!r}: use 'benchmark' or 'reward'")
        self.grading = grading
        self.extractor = extractor
        self.output_dir = output_dir
        self.write_predictions = write_predictions
        self.print_summary = print_summary
        self.pending: dict[str, list[Prediction]] = defaultdict(list)
        self.last_written: Path | None = None  # the folder of the last report

    def setup(self, device: torch.device) -> None:
        """Load the extractor's model, if any (before the first evaluation batch)."""
        if self.extractor is not None and callable(getattr(self.extractor, "setup", None)):
            self.extractor.setup(device)

    # ------------------------------------------------------------------------------- grading
    def grade(self, responses: list[str], batch: PromptBatch, rows: list[int] | None = None) -> list[Grade]:
        """Grades of ``responses`` against rows ``rows`` of ``batch`` (default: one response per row, in order)."""
        rows = list(range(len(batch))) if rows is None else rows
        extras = batch.extras or [{} for _ in range(len(batch))]
        return grade_with_extraction(
            responses,
            [batch.answers[i] for i in rows],
            [batch.choices[i] for i in rows],
            [batch.questions[i] if batch.questions else "" for i in rows],
            [{"mode": self.grading, **self.grading_options(extras[i])} for i in rows],
            self.extractor if self.grading == "benchmark" else None,  # the strict reading reads marked answers only
        )

    def grading_options(self, extras: dict[str, Any]) -> dict[str, Any]:
        """The benchmark's grading fields of a row (benchmark mode only; the strict reading ignores them)."""
        if self.grading != "benchmark":
            return {}
        precision = extras.get("precision")
        return {
            "answer_type": extras.get("answer_type"),
            "precision": int(precision) if precision is not None else None,
            "unit": extras.get("unit"),
            "closest_option": bool(extras.get("closest_option", False)),
        }

    # ----------------------------------------------------------------------------- reporting
    def add(self, stage: str, rows: list[Prediction]) -> None:
        """Keep the predictions of a batch of ``stage`` until ``finish``."""
        self.pending[stage].extend(rows)

    def finish(self, stage: str, trainer: Any) -> list[SummaryRow] | None:
        """Gather ``stage``'s predictions over ranks, write and print the report; None if nothing was evaluated.

        Every rank must call it (it is a collective with several ranks); all get the same summary.
        """
        rows = self.pending.pop(stage, [])
        world = trainer.world_size if trainer is not None else 1
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[Prediction]] = [[] for _ in range(world)]
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        unique = list({(row.data_source, row.id): row for row in rows}.values())  # sampler padding counts once
        if not unique:
            return None
        summary = summarize(unique)
        if trainer is None or getattr(trainer, "sanity_checking", False):
            return summary
        step = trainer.global_step
        folder = self.folder(trainer, stage, step)  # on every rank: ``trainer.log_dir`` is a collective
        if not trainer.is_global_zero:
            return summary
        where = ""
        if self.write_predictions:
            try:
                self.last_written = self.write(unique, summary, folder)
                where = f"\n(predictions: {self.last_written})"
            except OSError as error:  # a lost report must not end a run; the figures are still logged
                rank_zero_warn(f"{error}; the {stage} report of step {step} is not written")
        if self.print_summary and trainer.state.fn in ("test", "validate"):  # not at each validation of a fit
            rank_zero_info("\n" + summary_markdown(summary, f"{stage} at step {step}: {len(unique)} rows") + where)
        return summary

    def folder(self, trainer: Any, stage: str, step: int) -> Path:
        # default: next to the logger's files (a version folder per run), else in the run's folder
        root = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or trainer.default_root_dir) / "eval"
        return root / f"{stage}-step{step}"

    @staticmethod
    def write(rows: list[Prediction], summary: list[SummaryRow], folder: Path) -> Path:
        """Write ``predictions.jsonl``, ``summary.csv`` and ``summary.md`` into ``folder`` (each whole or not at all)."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            files = {
                "predictions.jsonl": "".join(json.dumps(asdict(row), ensure_ascii=False) + "\n" for row in rows),
                "summary.csv": summary_csv(summary),
                "summary.md": summary_markdown(summary),
            }
            for name, text in files.items():
                tmp = folder / f".{name}.tmp"
                tmp.write_text(text, encoding="utf-8")
                tmp.replace(folder / name)
        except OSError as error:
            raise OSError(
                f"cannot write the evaluation report to {folder}: {error.strerror or error}; set "
                "model.init_args.evaluation.init_args.output_dir to a folder you can write, or free space"
            ) from error
        return folder


def metrics(summary: list[SummaryRow], stage: str) -> dict[str, float]:
    """The logged figures of ``summary``: overall accuracy, per benchmark, and per category value."""
    total = sum(r.count for r in summary if r.category == "all")
    right = sum(r.correct for r in summary if r.category == "all")
    out = {f"{stage}/accuracy": right / max(total, 1)}
    for row in summary:
        if row.category == "all":
            out[f"{stage}/accuracy/{row.benchmark}"] = row.accuracy
        else:
            out[f"{stage}/{row.benchmark}/{row.category}/{row.value}"] = row.accuracy
    return out


__all__ = ["Evaluation", "Prediction", "SummaryRow", "metrics", "predictions", "summarize"]
