"""Evaluation reports: grading as benchmarks grade, accuracy per benchmark and category, predictions and summaries."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from tests.test_grpo import make_data, make_module, quiet_trainer
from vlrl.cli import main
from vlrl.evaluation import Evaluation, Prediction, metrics, predictions, summarize, summary_markdown
from vlrl.rewards import grade_answer
from vlrl.rewards.grading import Grade
from vlrl.types import PromptBatch

REPO = Path(__file__).resolve().parents[1]


def batch_of(rows: list[dict]) -> PromptBatch:
    return PromptBatch(
        ids=[r["id"] for r in rows],
        messages=[[] for _ in rows],
        images=[[] for _ in rows],
        answers=[r["answer"] for r in rows],
        choices=[r.get("choices") for r in rows],
        data_sources=[r.get("data_source", "mathvista") for r in rows],
        extras=[r.get("extras", {}) for r in rows],
        questions=[r.get("question", "") for r in rows],
    )


def prediction(id: str, correct: bool, source: str = "mathvista", **breakdown) -> Prediction:
    return Prediction(id, source, "r", "a", None, correct, breakdown=breakdown)


def test_summary_counts_a_row_under_each_of_its_values():
    rows = [
        prediction("1", True, skill=["arithmetic", "algebraic"], grade="high school"),
        prediction("2", False, skill=["arithmetic"], grade="high school"),
        prediction("3", True, skill=["statistical"], grade="college"),
        prediction("4", False, "mathvision", level="2"),
        prediction("5", True, "mathvision", level="10"),
    ]
    table = {(r.benchmark, r.category, r.value): (r.count, r.correct) for r in summarize(rows)}
    # MathVista: 3 rows, 2 right; row 1 counts under both of its skills
    assert table[("mathvista", "all", "all")] == (3, 2)
    assert table[("mathvista", "skill", "arithmetic")] == (2, 1)
    assert table[("mathvista", "skill", "algebraic")] == (1, 1)
    assert table[("mathvista", "grade", "high school")] == (2, 1)
    assert table[("mathvision", "level", "2")] == (1, 0)
    figures = metrics(summarize(rows), "test")
    assert figures["test/accuracy"] == pytest.approx(3 / 5)  # over rows, not over benchmarks
    assert figures["test/accuracy/mathvista"] == pytest.approx(2 / 3)
    assert figures["test/mathvista/skill/arithmetic"] == pytest.approx(0.5)
    # levels sort as numbers, "all" first
    levels = [r.value for r in summarize(rows) if r.benchmark == "mathvision"]
    assert levels == ["all", "2", "10"]
    markdown = summary_markdown(summarize(rows))
    assert "| mathvista | skill | arithmetic | 2 | 50.0 |" in markdown


def test_benchmark_grading_reads_letter_and_text_and_uses_the_rows_precision():
    rows = [
        # the MathVista form most models use: the letter and the option's text
        {"id": "1", "answer": "5", "choices": ["4", "5", "6"], "extras": {"answer_type": "text"}},
        # MathVista float with precision 1: 1.24 reads as 1.2
        {"id": "2", "answer": "1.2", "extras": {"answer_type": "float", "precision": 1}},
        # no answer stated
        {"id": "3", "answer": "7", "extras": {"answer_type": "integer"}},
    ]
    responses = ["Thus, the answer is B (5).", "The distance is 1.24 m, so the answer is 1.24.", "I cannot tell."]
    batch = batch_of(rows)
    benchmark = Evaluation().grade(responses, batch)
    strict = Evaluation(grading="reward").grade(responses, batch)
    assert [g.correct for g in benchmark] == [True, True, False]
    assert benchmark[2].extracted is None
    assert [g.correct for g in strict] == [True, False, False]  # strict: no precision rule, 1.24 is not 1.2


class ScriptedExtractor:
    """Stands in for a model-based extractor: answers from a table, records what it was asked."""

    def __init__(self, answers: dict[str, str | None]) -> None:
        self.answers, self.asked = answers, []

    def extract(self, questions: list[str], responses: list[str]) -> list[str | None]:
        self.asked.extend(responses)
        return [self.answers.get(r) for r in responses]


def test_the_extractor_reads_only_what_the_rules_could_not():
    rows = [
        {"id": "1", "answer": "7", "extras": {"answer_type": "integer"}, "question": "How many?"},
        {"id": "2", "answer": "3", "extras": {"answer_type": "integer"}, "question": "How many?"},
        {"id": "3", "answer": "3", "extras": {"answer_type": "integer"}, "question": "How many?"},
    ]
    responses = ["The answer is 7.", "Three squares, I think.", "No idea."]
    extractor = ScriptedExtractor({"Three squares, I think.": "3", "No idea.": None})
    grades = Evaluation(extractor=extractor).grade(responses, batch_of(rows))
    assert extractor.asked == ["Three squares, I think.", "No idea."]  # the first was read by the rules
    assert [g.correct for g in grades] == [True, True, False]
    assert [g.extracted for g in grades] == ["7", "3", None]


class FakeTrainer:
    """What ``Evaluation.finish`` reads of a trainer (one rank, outside a fit)."""

    world_size, global_step, is_global_zero, sanity_checking = 1, 7, True, False

    def __init__(self, root: Path) -> None:
        self.default_root_dir, self.log_dir = str(root), None

        class State:
            fn = "test"

        self.state = State()


def test_finish_counts_a_row_served_twice_once_and_writes_the_files(tmp_path, caplog):
    evaluation = Evaluation()
    batch = batch_of(
        [
            {"id": "a", "answer": "5", "extras": {"breakdown": {"skill": ["arithmetic"]}}},
            {"id": "b", "answer": "6", "extras": {"breakdown": {"skill": ["arithmetic", "logic"]}}},
        ]
    )
    grades = [Grade(True, "5"), Grade(False, "2")]
    evaluation.add("test", predictions(batch, ["5", "2"], grades, [{"caption": "x"}, {"caption": "y"}]))
    evaluation.add("test", predictions(batch.select([0]), ["5"], grades[:1]))  # a sampler's padding repeats a row
    with caplog.at_level(logging.INFO):
        summary = evaluation.finish("test", FakeTrainer(tmp_path))
    assert [(r.category, r.value, r.count, r.correct) for r in summary] == [
        ("all", "all", 2, 1),
        ("skill", "arithmetic", 2, 1),
        ("skill", "logic", 1, 0),
    ]
    folder = tmp_path / "eval" / "test-step7"
    lines = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["correct"], r["extracted"]) for r in lines] == [("a", True, "5"), ("b", False, "2")]
    assert lines[1]["breakdown"] == {"skill": ["arithmetic", "logic"]} and lines[1]["details"] == {"caption": "y"}
    table = list(csv.DictReader(io.StringIO((folder / "summary.csv").read_text())))
    assert table[0] == {
        "benchmark": "mathvista",
        "category": "all",
        "value": "all",
        "count": "2",
        "correct": "1",
        "accuracy": "0.5000",
    }
    assert (folder / "summary.md").read_text().startswith("| benchmark |")
    assert "| mathvista | skill | logic | 1 | 0.0 |" in caplog.text  # printed at the end of test
    assert evaluation.finish("test", FakeTrainer(tmp_path)) is None  # nothing pending: reset after the report


def test_an_unwritable_report_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="evaluation.init_args.output_dir"):
        Evaluation.write([], [], blocker / "eval")


def test_an_unknown_grading_mode_is_refused():
    with pytest.raises(ValueError, match="evaluation.grading='lenient'"):
        Evaluation(grading="lenient")


def mathvista_like(folder: Path) -> Path:
    """Rows with MathVista's grading fields and categories, as any JSONL source may carry them."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (answer, choices, skills) in enumerate(
        [
            ("5", ["4", "5", "6"], ["arithmetic reasoning"]),
            ("1.2", None, ["scientific reasoning", "algebraic reasoning"]),
            ("3", None, ["arithmetic reasoning"]),
        ]
    ):
        Image.new("RGB", (56, 56), (40 * i, 90, 200)).save(folder / "images" / f"{i}.png")
        rows.append(
            {
                "id": f"pid{i}",
                "images": [f"images/{i}.png"],
                "question": "What is shown?",
                "answer": answer,
                "choices": choices,
                "data_source": "mathvista",
                "answer_type": "float" if answer == "1.2" else "text" if choices else "integer",
                "precision": 1 if answer == "1.2" else None,
                "breakdown": {"skill": skills, "grade": "college"},
            }
        )
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_lightning_cli_test_prints_the_skill_table_and_writes_predictions(tmp_path, caplog):
    data = mathvista_like(tmp_path / "mathvista")
    out = tmp_path / "run"
    args = [
        "test",
        "--config",
        str(REPO / "configs/demo/grpo.yaml"),
        f"--trainer.default_root_dir={out}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--data.init_args.test=vlrl.data.Files",
        f"--data.init_args.test.init_args.path={data}",
        "--data.init_args.eval_batch_size=2",
        "--model.init_args.eval_sampling.max_new_tokens=8",
    ]
    with caplog.at_level(logging.INFO):
        main(args)
    folder = out / "eval" / "test-step0"
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["pid0", "pid1", "pid2"]
    for row, gold in zip(sorted(rows, key=lambda r: r["id"]), ["5", "1.2", "3"], strict=True):
        assert row["answer"] == gold and row["breakdown"]["grade"] == "college"
        regraded = grade_answer(
            row["response"],
            gold,
            ["4", "5", "6"] if gold == "5" else None,
            mode="benchmark",
            answer_type="float" if gold == "1.2" else "text" if gold == "5" else "integer",
            precision=1 if gold == "1.2" else None,
        )
        assert (row["correct"], row["extracted"]) == (regraded.correct, regraded.extracted)
    assert "| mathvista | skill | arithmetic reasoning | 2 |" in caplog.text
    assert "| mathvista | skill | algebraic reasoning | 1 |" in caplog.text
    summary = list(csv.DictReader(io.StringIO((folder / "summary.csv").read_text())))
    assert {(r["category"], r["value"]) for r in summary} >= {("all", "all"), ("grade", "college")}


def test_validate_then_fit_on_the_same_module(tmp_path):
    """``validate`` runs in inference mode and ``fit``'s validation does not: the report works after both."""
    module, data = make_module(), make_data()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1, val_check_interval=1, default_root_dir=tmp_path)
    trainer.validate(module, datamodule=data)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    assert "val/accuracy" in trainer.callback_metrics
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["val-step0", "val-step1"]


FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"
# each eval overlay over a demo method on its benchmark's fixture in the release's form
EVAL_RUNS = {
    "mathvista": ("grpo.yaml", "mathvista/testmini.json"),
    "mathvision": ("grpo.yaml", "mathvision/data/testmini.jsonl"),
    "mathverse": ("grpo.yaml", "mathverse/testmini.json"),
    "wemath": ("grpo.yaml", "wemath/testmini.json"),
    "mmmu": ("grpo.yaml", "mmmu/validation.jsonl"),
    "dynamath": ("grpo.yaml", "dynamath/dataset.json"),
    "logicvista": ("grpo.yaml", "logicvista/dataset.json"),
    "vl_rewardbench": ("unified_reward_think/grpo.yaml", "vl_rewardbench/test.jsonl"),
}


def test_every_eval_overlay_has_a_fixture_run():
    assert sorted(EVAL_RUNS) == sorted(p.stem for p in (REPO / "configs" / "eval").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", sorted(EVAL_RUNS))
def test_eval_overlay_tests_the_tiny_model_on_the_benchmark_fixture(benchmark, tmp_path):
    method, fixture = EVAL_RUNS[benchmark]
    out = tmp_path / "run"
    main(
        [
            "test",
            "--config",
            str(REPO / "configs" / "demo" / method),
            "--config",
            str(REPO / "configs" / "eval" / f"{benchmark}.yaml"),
            f"--trainer.default_root_dir={out}",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--model.init_args.policy.model_path=tiny:qwen2_5_vl",
            f"--data.init_args.test.init_args.path={FIXTURES / fixture}",
            "--data.init_args.eval_batch_size=4",
            "--model.init_args.eval_sampling.max_new_tokens=4",
        ]
    )
    rows = [json.loads(line) for line in (out / "eval" / "test-step0" / "predictions.jsonl").read_text().splitlines()]
    assert rows and {r["data_source"] for r in rows} == {benchmark}
    summary = list(csv.DictReader(io.StringIO((out / "eval" / "test-step0" / "summary.csv").read_text())))
    assert summary[0]["category"] == "all" and int(summary[0]["count"]) == len(rows)
    assert len(summary) > 1, "the benchmark's categories are reported"


def test_a_report_that_cannot_be_written_warns_and_keeps_the_figures(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    evaluation = Evaluation(output_dir=str(blocker / "eval"))
    batch = batch_of([{"id": "a", "answer": "5"}])
    evaluation.add("test", predictions(batch, ["5"], [Grade(True, "5")]))
    with pytest.warns(UserWarning, match="the test report of step 7 is not written"):
        summary = evaluation.finish("test", FakeTrainer(tmp_path))
    assert metrics(summary, "test")["test/accuracy"] == 1.0
