"""Agreement of ``vlrl.rewards.is_correct`` with human-checked correctness labels.

Reads a JSONL file of labelled responses (fields ``id``, ``answer``, ``options``, ``response``,
``label_correct``; by default the 3040 Gemini-Pro chain-of-thought responses on MATH-V in the
``shared/data`` folder beside the repository), grades every response with ``is_correct`` and with
plain math-verify (``verify(parse(answer), parse(response))``), and prints the agreement of each
with the labels, overall and per category (multiple choice / free-form), the wall time, and the
rows where ``is_correct`` disagrees with the label.

MathVista output files (``output_*.json``: pid -> the benchmark's row with a model's ``response`` and
MathVista's own ``true_false``) are read too; in benchmark mode their ``answer_type``, ``precision``
and ``unit`` go to the grader and multiple-choice rows use MathVista's closest-option rule.
``--mode`` picks the grading mode (``reward``, strict, the default; ``benchmark``); ``--all`` prints
one table: every shared MATH-V and MathVista file, both modes.

Run (with vlrl installed)::

    python benchmarks/grading_agreement.py                 # all disagreements listed
    python benchmarks/grading_agreement.py --show 10       # only the first 10
    python benchmarks/grading_agreement.py path/to/file.jsonl --skip-baseline
    python benchmarks/grading_agreement.py ../shared/data/mathvista/output_claude.json --mode benchmark --skip-baseline
    python benchmarks/grading_agreement.py --all
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from math_verify import parse, verify

from vlrl.rewards import extract_answer, is_correct

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_PATH = SHARED / "grading" / "mathv_gemini_pro_cot.jsonl"
ALL_FILES = [
    *(SHARED / "grading" / name for name in ("mathv_gemini_pro_cot.jsonl", "mathv_chatgpt35_cot_caption.jsonl")),
    SHARED / "grading" / "mathv_sphinx_moe.jsonl",
    *(SHARED / "mathvista" / f"output_{name}.json" for name in ("claude", "idefics_9b_instruct")),
    SHARED / "mathvista" / "output_chatgpt_2shot_solution.json",
]


def _none(value):
    return None if value in (None, "", "None") else value


def load_rows(path: Path) -> list[dict]:
    """Labelled rows of a JSONL file (MATH-V style) or a MathVista output file (``.json``)."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for pid, row in json.loads(path.read_text()).items():
        precision = _none(row.get("precision"))
        rows.append(
            {
                "id": str(row.get("pid", pid)),
                "answer": str(row["answer"]),
                "options": _none(row.get("choices")) or [],
                "response": row.get("response") or "",
                "label_correct": str(row["true_false"]) == "True",
                "benchmark": {
                    "answer_type": _none(row.get("answer_type")),
                    "precision": int(float(precision)) if precision is not None else None,
                    "unit": _none(row.get("unit")),
                    "closest_option": bool(_none(row.get("choices"))),
                },
            }
        )
    return rows


def grade(row: dict, mode: str) -> bool:
    """``is_correct`` on one row; the benchmark's own fields only in benchmark mode."""
    extra = row.get("benchmark", {}) if mode == "benchmark" else {}
    return is_correct(row["response"], row["answer"], row["options"] or None, mode=mode, **extra)


def plain_math_verify(response: str, answer: str) -> bool:
    """The baseline: math-verify's own extraction on the whole response."""
    try:
        return bool(verify(parse(answer), parse(response)))
    except Exception:  # noqa: BLE001 - a crash of the baseline counts as "incorrect"
        return False


def grade_rows(
    rows: list[dict], *, baseline: bool, mode: str = "reward"
) -> tuple[list[bool], list[bool] | None, float, float]:
    """Grade every row; returns (is_correct results, baseline results, seconds for each)."""
    start = time.perf_counter()
    ours = [grade(r, mode) for r in rows]
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
    parser.add_argument("--mode", choices=("reward", "benchmark"), default="reward", help="is_correct's grading mode")
    parser.add_argument("--all", action="store_true", help="agreement of every shared file in both modes")
    args = parser.parse_args()
    if args.all:
        print(f"{'file':<38} {'rows':>5} {'reward mode':>12} {'benchmark mode':>15}")
        for path in ALL_FILES:
            rows = load_rows(path)
            cells = [sum(grade(r, m) == r["label_correct"] for r in rows) / len(rows) for m in ("reward", "benchmark")]
            print(f"{path.name:<38} {len(rows):>5} {cells[0]:>12.3f} {cells[1]:>15.3f}")
        return
    if not args.path.is_file():
        parser.error(f"{args.path} not found: pass the path of the labelled JSONL file")
    rows = load_rows(args.path)
    ours, plain, ours_s, plain_s = grade_rows(rows, baseline=not args.skip_baseline, mode=args.mode)
    print(f"{args.path.name}: {len(rows)} rows\n")
    print_agreement(rows, ours, plain)
    print(f"\nwall time: is_correct {ours_s:.1f} s ({1000 * ours_s / len(rows):.1f} ms/row)", end="")
    print(f", plain math-verify {plain_s:.1f} s" if plain is not None else "")
    print_disagreements(rows, ours, args.show)


if __name__ == "__main__":
    main()
