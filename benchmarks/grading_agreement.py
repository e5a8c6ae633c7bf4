"""Agreement of ``vlrl.rewards.is_correct`` with human-checked correctness labels.

Reads a JSONL file of labelled responses (fields ``id``, ``answer``, ``options``, ``response``,
``label_correct``; by default the 3040 Gemini-Pro chain-of-thought responses on MATH-V in the
``shared/data`` folder beside the repository), grades every response with ``is_correct`` and with
plain math-verify (``verify(parse(answer), parse(response))``), and prints the agreement of each
with the labels, overall and per category (multiple choice / free-form), the wall time, and the
rows where ``is_correct`` disagrees with the label.

Run (with vlrl installed)::

    python benchmarks/grading_agreement.py                 # all disagreements listed
    python benchmarks/grading_agreement.py --show 10       # only the first 10
    python benchmarks/grading_agreement.py path/to/file.jsonl --skip-baseline
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from math_verify import parse, verify

from vlrl.rewards import extract_answer, is_correct

DEFAULT_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grading" / "mathv_gemini_pro_cot.jsonl"


def plain_math_verify(response: str, answer: str) -> bool:
    """The baseline: math-verify's own extraction on the whole response."""
    try:
        return bool(verify(parse(answer), parse(response)))
    except Exception:  # noqa: BLE001 - a crash of the baseline counts as "incorrect"
        return False


def grade_rows(rows: list[dict], *, baseline: bool) -> tuple[list[bool], list[bool] | None, float, float]:
    """Grade every row; returns (is_correct results, baseline results, seconds for each)."""
    start = time.perf_counter()
    ours = [is_correct(r["response"], r["answer"], r["options"] or None) for r in rows]
    ours_s = time.perf_counter() - start
    if not baseline:
        return ours, None, ours_s, 0.0
    start = time.perf_counter()
    plain = [plain_math_verify(r["response"], r["answer"]) for r in rows]
    return ours, plain, ours_s, time.perf_counter() - start


def print_agreement(rows: list[dict], ours: list[bool], plain: list[bool] | None) -> None:
    """Agreement with the labels, overall and per category, for each grader."""
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_category["multiple-choice" if row["options"] else "free-form"].append(i)
    by_category["all"] = list(range(len(rows)))
    graders = {"is_correct": ours} | ({"plain math-verify": plain} if plain is not None else {})
    print(f"{'category':<16} {'rows':>6} {'labelled correct':>17}  " + "  ".join(f"{g:>20}" for g in graders))
    for category in ("multiple-choice", "free-form", "all"):
        index = by_category[category]
        positives = sum(rows[i]["label_correct"] for i in index)
        cells = []
        for results in graders.values():
            agree = sum(results[i] == rows[i]["label_correct"] for i in index)
            cells.append(f"{agree:>6}/{len(index)} = {agree / max(len(index), 1):.4f}")
        print(f"{category:<16} {len(index):>6} {positives:>17}  " + "  ".join(f"{c:>20}" for c in cells))


def print_disagreements(rows: list[dict], ours: list[bool], show: int | None) -> None:
    """The rows where ``is_correct`` disagrees with the label: id, gold, extracted prediction, label."""
    disagreements = [row for row, result in zip(rows, ours, strict=True) if result != row["label_correct"]]
    listed = disagreements if show is None else disagreements[:show]
    print(
        f"\n{len(disagreements)} disagreements" + (f" (first {len(listed)} listed)" if listed != disagreements else "")
    )
    for row in listed:
        prediction = extract_answer(row["response"])
        if prediction is not None and len(prediction) > 80:
            prediction = prediction[:77] + "..."
        kind = "MC" if row["options"] else "free"
        print(
            f"  id={row['id']:<6} {kind:<4} gold={row['answer']!r:<14} label={row['label_correct']!s:<5} pred={prediction!r}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH, help="labelled JSONL file")
    parser.add_argument("--show", type=int, default=None, help="list only the first N disagreements")
    parser.add_argument("--skip-baseline", action="store_true", help="don't run plain math-verify")
    args = parser.parse_args()
    if not args.path.is_file():
        parser.error(f"{args.path} not found: pass the path of the labelled JSONL file")
    rows = [json.loads(line) for line in args.path.read_text().splitlines() if line.strip()]
    ours, plain, ours_s, plain_s = grade_rows(rows, baseline=not args.skip_baseline)
    print(f"{args.path.name}: {len(rows)} rows\n")
    print_agreement(rows, ours, plain)
    print(f"\nwall time: is_correct {ours_s:.1f} s ({1000 * ours_s / len(rows):.1f} ms/row)", end="")
    print(f", plain math-verify {plain_s:.1f} s" if plain is not None else "")
    print_disagreements(rows, ours, args.show)


if __name__ == "__main__":
    main()
