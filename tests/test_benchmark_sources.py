"""Benchmark sources: each benchmark's release (JSON/JSONL + images) and its Hugging Face forms, in one contract."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from vlrl.data import (
    MMMU,
    DataError,
    DynaMath,
    LogicVista,
    MathVerse,
    MathVision,
    MathVista,
    RLDataModule,
    Row,
    VLRewardBench,
    WeMath,
)
from vlrl.data.benchmarks import DYNAMATH_GUIDE, MATHVERSE_VERSIONS, mathvista_query
from vlrl.data.preference import UNDERSTANDING_PROMPT

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
MATHV_PREFIX = (
    'Please solve the problem and put your answer in one "\\boxed{}". If it is a multiple choice question, only '
    'one letter is allowed in the "\\boxed{}".\n'
)


def _png(colour: tuple[int, int, int] = (0, 90, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _text(row: Row) -> str:
    """The user text of a row given as chat messages (its image parts first)."""
    content = row.messages[-1]["content"]
    assert [part["type"] for part in content] == ["image"] * len(row.images) + ["text"]
    return content[-1]["text"]


def _by_id(rows: list[Row]) -> dict[str, Row]:
    return {row.id: row for row in rows}


def _parquet(rows: list[dict[str, Any]], features: datasets.Features, path: Path) -> Path:
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


# --- MathVista ---------------------------------------------------------------------------------------------


def test_mathvista_release_json() -> None:
    rows = _by_id(MathVista(str(FIXTURES / "mathvista" / "testmini.json")).load().rows)
    assert list(rows) == ["1", "2", "3", "108", "506"]
    assert {r.data_source for r in rows.values()} == {"mathvista"}
    one, two, three = rows["1"], rows["2"], rows["3"]
    assert (one.answer, one.choices) == ("1.2", None)
    assert {k: one.extras[k] for k in ("answer_type", "precision", "unit")} == {
        "answer_type": "float",
        "precision": 1,
        "unit": None,
    }
    assert one.extras["breakdown"] == {
        "skill": ["scientific reasoning"],
        "task": "textbook question answering",
        "grade": "college",
        "context": "scientific figure",
        "category": "math-targeted-vqa",
        "source": "SciBench",
    }
    assert (two.extras["answer_type"], two.extras["precision"], two.extras["unit"]) == ("integer", None, "g")
    assert rows["108"].extras["precision"] == 2 and rows["506"].extras["answer_type"] == "list"
    assert rows["506"].answer == "[2014, 2016]"
    # multiple choice: the gold is the option text, the options are in letter order
    assert three.choices == ["135°", "140°", "145°", "150°"] and three.answer == "145°"
    assert three.extras["answer_type"] == "text" and three.extras["question_type"] == "multi_choice"
    assert three.extras["closest_option"] is True  # MathVista takes the nearest option of an unmatched answer
    # the release has no `query`: it is built as MathVista's build_query.py builds it (data/query.json, pid 2)
    assert _text(two) == (
        "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at "
        "the end.\nQuestion: what is the total volume of the measuring cup? (Unit: g)"
    )
    assert _text(three).startswith("Hint: Please answer the question and provide the correct option letter, e.g., A")
    assert _text(three).endswith("\nChoices:\n(A) 135°\n(B) 140°\n(C) 145°\n(D) 150°")
    assert _text(one).startswith("Hint: Please answer the question requiring a floating-point number with one decimal")
    assert two.images == [str(FIXTURES / "mathvista" / "images" / "2.jpg")] and two.image_sizes == [(8, 8)]
    assert two.question == "what is the total volume of the measuring cup?"


def test_relative_paths_start_at_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES)
    rows = MathVista("mathvista/testmini.json").load().rows + MathVision("mathvision/data/testmini.jsonl").load().rows
    assert rows[0].images == [str(FIXTURES / "mathvista" / "images" / "1.jpg")]
    assert rows[-1].images == [str(FIXTURES / "mathvision" / "images" / "75.jpg")]


def test_mathvista_question_mode_and_hub_parquet(tmp_path: Path) -> None:
    release = json.loads((FIXTURES / "mathvista" / "testmini.json").read_text())
    question = _by_id(MathVista(str(FIXTURES / "mathvista"), prompt="question").load().rows)["3"]
    assert question.messages is None and question.question == release["3"]["question"]
    assert question.choices == ["135°", "140°", "145°", "150°"]
    # the Hugging Face form: decoded_image, precision as a float, and a `query` column that is used as given
    records = [{**r, "decoded_image": _png(), "query": f"the query of {pid}"} for pid, r in release.items()]
    features = datasets.Features(
        {
            "pid": datasets.Value("string"),
            "question": datasets.Value("string"),
            "image": datasets.Value("string"),
            "decoded_image": datasets.Image(),
            "choices": datasets.Sequence(datasets.Value("string")),
            "unit": datasets.Value("string"),
            "precision": datasets.Value("float64"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
            "metadata": {name: datasets.Value("string") for name in ("category", "context", "grade", "source", "task")}
            | {"skills": datasets.Sequence(datasets.Value("string"))},
            "query": datasets.Value("string"),
        }
    )
    for record in records:
        record["metadata"] = {k: record["metadata"][k] for k in features["metadata"]}
    path = _parquet(records, features, tmp_path / "testmini-00000-of-00001.parquet")
    rows = _by_id(MathVista(str(path)).load().rows)
    assert list(rows) == ["1", "2", "3", "108", "506"]
    assert _text(rows["108"]) == "the query of 108"
    assert rows["1"].extras["precision"] == 1 and isinstance(rows["1"].extras["precision"], int)
    assert rows["2"].extras["precision"] is None and rows["2"].extras["unit"] == "g"
    assert rows["3"].answer == "145°" and rows["3"].extras["breakdown"]["skill"] == [
        "geometry reasoning",
        "algebraic reasoning",
    ]
    assert isinstance(rows["1"].images[0], bytes)


def test_mathvista_query_builder_matches_the_release() -> None:
    """pid 1 of MathVista's data/query.json: hint first, a float with one decimal, no unit, no choices."""
    release = json.loads((FIXTURES / "mathvista" / "testmini.json").read_text())["1"]
    query = mathvista_query(release["question"], None, None, "free_form", "float", 1.0)
    assert query.startswith(
        "Hint: Please answer the question requiring a floating-point number with one decimal place and provide the "
        "final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: When a spring does work"
    )
    assert query.endswith("by what distance $d$ is the spring compressed?")


def test_mathvista_broken_rows(tmp_path: Path) -> None:
    release = json.loads((FIXTURES / "mathvista" / "testmini.json").read_text())
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "3.jpg").write_bytes((FIXTURES / "mathvista" / "images" / "3.jpg").read_bytes())
    path = _write_json(tmp_path / "testmini.json", {"3": {**release["3"], "answer": "146°"}})
    with pytest.raises(DataError, match=r"testmini.json row 1: field 'answer' is '146°', not one of the choices"):
        MathVista(str(path)).load()
    broken = {**release["3"]}
    del broken["question_type"]
    _write_json(path, {"3": broken, "2": release["2"]})
    loaded = MathVista(str(path)).load("skip")
    assert loaded.skipped == {"missing_field": 1, "missing_image": 1}
    assert "row 1: field 'question_type' is missing" in loaded.first_error["missing_field"]


# --- MATH-V ------------------------------------------------------------------------------------------------


def test_mathvision_repository_layout() -> None:
    rows = _by_id(MathVision(str(FIXTURES / "mathvision"), split="testmini").load().rows)
    assert list(rows) == ["23", "90", "75"]
    free, text_options, letter_options = rows["23"], rows["90"], rows["75"]
    assert (free.answer, free.choices, free.extras["answer_type"]) == ("140", None, "text")
    assert free.extras["breakdown"] == {"subject": "combinatorial geometry", "level": "1"}
    assert free.images == [str(FIXTURES / "mathvision" / "images" / "23.jpg")]  # data/ beside images/
    assert _text(free) == (
        MATHV_PREFIX + "Tom bought a chocolate heart (see the picture) to Mary on her birthday.\n"
        "How many grams did the chocolate weigh, if each square weighs 10 grams?"
    )
    options = ["5-4-3-2-1", "5-2-3-4-1", "5-4-2-3-1", "5-3-2-1-4", "5-2-3-1-4"]
    assert text_options.choices == options and text_options.answer == "5-2-3-1-4"  # gold "E"
    assert text_options.extras["answer_type"] == "multi_choice"
    assert _text(text_options).endswith(
        "In which order are they collected?\n(A) 5-4-3-2-1\n(B) 5-2-3-4-1\n(C) 5-4-2-3-1\n(D) 5-3-2-1-4\n(E) 5-2-3-1-4"
    )
    assert letter_options.answer == "D" and letter_options.choices == list("ABCDE")
    assert _text(letter_options).endswith("Which point is on his drawing?")  # letter options are not listed
    question = _by_id(MathVision(str(FIXTURES / "mathvision"), split="testmini", prompt="question").load().rows)
    assert question["90"].messages is None and question["90"].question.endswith("<image1>")


def test_mathvision_saved_dataset_and_broken_answer(tmp_path: Path) -> None:
    lines = (FIXTURES / "mathvision" / "data" / "testmini.jsonl").read_text().splitlines()
    records = [{**json.loads(line), "decoded_image": _png()} for line in lines]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "image": datasets.Value("string"),
            "decoded_image": datasets.Image(),
            "answer": datasets.Value("string"),
            "solution": datasets.Value("string"),
            "level": datasets.Value("int64"),
            "subject": datasets.Value("string"),
        }
    )
    datasets.DatasetDict({"testmini": datasets.Dataset.from_list(records, features=features)}).save_to_disk(
        str(tmp_path / "saved")
    )
    rows = _by_id(MathVision(str(tmp_path / "saved"), split="testmini").load().rows)
    assert rows["90"].answer == "5-2-3-1-4" and rows["90"].extras["breakdown"]["level"] == "2"
    assert isinstance(rows["23"].images[0], bytes)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**json.loads(lines[1]), "answer": "F"}) + "\n")
    with pytest.raises(
        DataError, match=r"bad.jsonl line 1: field 'answer' is 'F', not the letter of one of the 5 options \(A-E\)"
    ):
        MathVision(str(bad)).load()


# --- MathVerse ---------------------------------------------------------------------------------------------


def test_mathverse_versions_queries_and_images() -> None:
    rows = _by_id(MathVerse(str(FIXTURES / "mathverse")).load().rows)
    versions = ["text_dominant", "text_lite", "vision_intensive", "vision_dominant", "vision_only"]
    assert list(rows) == [f"{3421 + i}_{v}" for i, v in enumerate(versions)]
    dominant, only = rows["3421_text_dominant"], rows["3425_vision_only"]
    assert (dominant.answer, dominant.choices, dominant.extras["answer_type"]) == ("14", None, "text")
    assert dominant.extras["breakdown"] == {
        "version": "Text Dominant",
        "subject": "Solid Geometry",
        "subfield": "Length",
    }
    assert _text(dominant).startswith("Please first conduct reasoning, and then answer the question and provide the")
    assert only.images == [str(FIXTURES / "mathverse" / "images" / "images_version_6" / "image_685.png")]
    assert _text(only).startswith("According to the question shown in the image, please first conduct reasoning")
    selected = MathVerse(str(FIXTURES / "mathverse"), versions=["Vision Only", "text_lite"], query="wo").load().rows
    assert [r.id for r in selected] == ["3422_text_lite", "3425_vision_only"]
    assert _text(selected[0]).startswith("Please directly answer the question and provide the final value")
    # question mode: a question that is all in the image gives its query
    question = _by_id(MathVerse(str(FIXTURES / "mathverse"), prompt="question").load().rows)
    assert question["3422_text_lite"].question.startswith("The radius is 3 cm. Find L.")
    assert question["3425_vision_only"].question.startswith("According to the question shown in the image")
    with pytest.raises(ValueError, match=r"unknown version\(s\) \['Text Heavy'\]"):
        MathVerse(str(FIXTURES / "mathverse"), versions=["Text Heavy"])


def test_mathverse_text_only_options_and_parquet(tmp_path: Path) -> None:
    rows = MathVerse(str(FIXTURES / "mathverse"), split="testmini_text_only", prompt="question").load().rows
    choice = rows[0]
    assert choice.id == "1_text_only" and choice.images == []
    assert choice.choices == ["40°", "60°", "120°", "140°"] and choice.answer == "140°"  # gold "D"
    assert choice.question.endswith("then the size of angle CED is ()")  # the options left the question
    assert choice.extras["answer_type"] == "multi_choice"
    records = json.loads((FIXTURES / "mathverse" / "testmini.json").read_text())
    features = datasets.Features(
        {
            **{name: datasets.Value("string") for name in ("sample_index", "problem_index", "problem_version")},
            "question": datasets.Value("string"),
            "image": datasets.Image(),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "metadata": {name: datasets.Value("string") for name in ("split", "source", "subject", "subfield")},
            "query_wo": datasets.Value("string"),
            "query_cot": datasets.Value("string"),
        }
    )
    path = _parquet([{**r, "image": _png()} for r in records], features, tmp_path / "testmini.parquet")
    parquet_rows = MathVerse(str(path), versions=["Vision Dominant"]).load().rows
    assert [r.id for r in parquet_rows] == ["3424_vision_dominant"] and isinstance(parquet_rows[0].images[0], bytes)
    bad = _write_json(tmp_path / "testmini.json", [{**records[0], "problem_version": "Text Heavy"}])
    with pytest.raises(DataError, match=r"row 1: field 'problem_version' is 'Text Heavy', not a MathVerse version"):
        MathVerse(str(bad)).load()
    assert set(MATHVERSE_VERSIONS) >= {r.extras["breakdown"]["version"] for r in rows}


# --- We-Math -----------------------------------------------------------------------------------------------


def test_wemath_subproblems_steps_and_options(tmp_path: Path) -> None:
    rows = WeMath(str(FIXTURES / "wemath" / "testmini.json")).load().rows
    assert [r.id for r in rows] == ["2steps_1:2steps_1", "2steps_1:2steps_2", "2steps_1:2steps_multi"]
    assert [r.answer for r in rows] == ["14", "12", "12"]  # golds C, B, A
    assert rows[0].choices == ["7", "12", "14", "24", "No correct answer"]
    assert [r.extras["breakdown"] for r in rows] == [
        {"knowledge": "Area of Rectangles", "steps": "1"},
        {"knowledge": "Area of Rectangles", "steps": "1"},
        {"knowledge": "Area of Rectangles", "steps": "2"},
    ]
    assert (rows[2].extras["problem"], rows[2].extras["key"]) == ("2steps_1", "2steps_multi")
    assert rows[0].images == [str(FIXTURES / "wemath" / "2steps" / "image" / "1-1.png")]
    text = _text(rows[1])
    assert text.startswith("Now, we require you to solve a multiple-choice math question.")
    assert "\nQuestion: As shown in the figure, the rectangle is 4 m long and 3 m wide. Its area is ( ) m².\n" in text
    assert "\nOption: A. 7;B. 12;C. 14; D. 24; E. No correct answer\n" in text
    assert text.endswith("<Thought process>: <<your thought process>> <Answer>: <<your option>>")
    broken = json.loads((FIXTURES / "wemath" / "testmini.json").read_text())[0]
    del broken["key"]
    path = _write_json(tmp_path / "testmini.json", [broken])
    with pytest.raises(DataError, match=r"row 1: field 'key' is missing"):
        WeMath(str(path)).load()


# --- MMMU --------------------------------------------------------------------------------------------------

MMMU_FEATURES = datasets.Features(
    {
        **{
            name: datasets.Value("string")
            for name in ("id", "question", "options", "explanation", "img_type", "answer", "topic_difficulty")
        },
        "question_type": datasets.Value("string"),
        "subfield": datasets.Value("string"),
        **{f"image_{k}": datasets.Image() for k in range(1, 8)},
    }
)


def _mmmu_records() -> list[dict[str, Any]]:
    records = []
    for line in (FIXTURES / "mmmu" / "validation.jsonl").read_text().splitlines():
        record = json.loads(line)
        shown = max(int(k) for k in re.findall(r"<image (\d)>", record["question"] + record["options"]))
        records.append({**record, **{f"image_{k}": _png((30 * k, 0, 0)) if k <= shown else None for k in range(1, 8)}})
    return records


def test_mmmu_parquet_multi_image_and_subjects(tmp_path: Path) -> None:
    path = _parquet(_mmmu_records(), MMMU_FEATURES, tmp_path / "validation-00000-of-00001.parquet")
    rows = _by_id(MMMU(str(path)).load().rows)
    math, art, physics = rows["validation_Math_1"], rows["validation_Art_Theory_2"], rows["validation_Physics_3"]
    assert (math.answer, math.choices, math.extras["answer_type"]) == ("6", ["6", "12", "24", "7"], "multi_choice")
    assert math.extras["breakdown"] == {
        "subject": "Math",
        "subfield": "Geometry",
        "difficulty": "Easy",
        "discipline": "Science",
    }
    assert _text(math) == (
        "What is the area of the triangle shown?\n\n(A) 6\n(B) 12\n(C) 24\n(D) 7\n\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert len(art.images) == 2 and art.answer == "<image 2>" and art.choices == ["<image 1>", "<image 2>"]
    assert art.extras["breakdown"]["discipline"] == "Art and Design"
    assert (physics.answer, physics.choices, physics.extras["answer_type"]) == ("19.6", None, "text")
    assert _text(physics) == (
        "A ball falls from rest for 2 s. How far does it fall, in m (g = 9.8 m/s^2)?\n\n"
        "Answer the question using a single word or phrase."
    )
    assert [r.id for r in MMMU(str(path), subjects=["Physics"]).load().rows] == ["validation_Physics_3"]
    question = MMMU(str(path), prompt="question").load().rows[0]
    assert question.messages is None and question.question.startswith("<image 1> What is the area")
    with pytest.raises(ValueError, match=r"unknown subject\(s\) \['Maths'\]"):
        MMMU(str(path), subjects=["Maths"])


def test_mmmu_hub_snapshot_folder(tmp_path: Path) -> None:
    """A downloaded snapshot keeps each subject's shards in its own folder; only the split's shards are read."""
    records = _mmmu_records()
    for subject, record in (("Math", records[0]), ("Physics", records[2])):
        (tmp_path / subject).mkdir()
        _parquet([record], MMMU_FEATURES, tmp_path / subject / "validation-00000-of-00001.parquet")
        _parquet(
            [{**record, "id": record["id"].replace("validation", "dev")}],
            MMMU_FEATURES,
            tmp_path / subject / "dev-00000-of-00001.parquet",
        )
    assert [r.id for r in MMMU(str(tmp_path)).load().rows] == ["validation_Math_1", "validation_Physics_3"]
    assert [r.id for r in MMMU(str(tmp_path), split="dev", subjects=["Physics"]).load().rows] == ["dev_Physics_3"]


def test_mmmu_saved_dataset_and_broken_options(tmp_path: Path) -> None:
    records = _mmmu_records()
    data = datasets.DatasetDict({"validation": datasets.Dataset.from_list(records, features=MMMU_FEATURES)})
    data.save_to_disk(str(tmp_path / "saved"))
    assert len(MMMU(str(tmp_path / "saved")).load().rows) == 3
    records[0]["options"] = "['6', '12'"
    path = _parquet(records[:1], MMMU_FEATURES, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 1: field 'options' is \"\['6', '12'\", not a list"):
        MMMU(str(path)).load()


# --- DynaMath ----------------------------------------------------------------------------------------------


def test_dynamath_release_json() -> None:
    rows = _by_id(DynaMath(str(FIXTURES / "dynamath")).load().rows)
    assert list(rows) == ["1", "2", "5"]
    period, text, choice = rows["1"], rows["2"], rows["5"]
    assert (period.answer, period.extras["answer_type"], period.extras["precision"]) == ("2.0944", "float", 3)
    assert period.extras["breakdown"] == {"subject": "analytic geometry", "level": "high school"}
    assert _text(period) == (
        "## Question\nWhat is the period of this function? Answer the question with a floating-point number.Please "
        "answer in a floating-point number." + DYNAMATH_GUIDE + '{\n    "solution": "[Detailed step-by-step '
        'explanation]",\n    "short answer": "[Concise Answer]"\n}'
    )
    assert (text.answer, text.extras["answer_type"], text.extras["precision"]) == ("May", "text", None)
    assert choice.choices == ["yes", "no"] and choice.answer == "no"  # gold "B"
    assert choice.question == "Is Dark Magenta greater than Rosy Brown?"
    assert "variant" not in choice.extras
    assert period.images == [str(FIXTURES / "dynamath" / "image" / "image1.png")]


def test_dynamath_variant_split_and_duplicate_ids(tmp_path: Path) -> None:
    release = json.loads((FIXTURES / "dynamath" / "dataset.json").read_text())
    records = [
        {
            "id": key,
            "question": r["question"],
            "image": r["image"],
            "decoded_image": _png(),
            "ground_truth": r["answer"],
            "answer_type": r["answer_type"],
            "subject": r["subject"],
            "knowledge_level": r["level"],
        }
        for key, r in release.items()
    ]
    features = datasets.Features(
        {name: datasets.Value("string") for name in records[0] if name != "decoded_image"}
        | {"decoded_image": datasets.Image()}
    )
    dataset = datasets.Dataset.from_list(records, features=features)
    datasets.DatasetDict({"sample_variant3": dataset}).save_to_disk(str(tmp_path / "saved"))
    rows = _by_id(DynaMath(str(tmp_path / "saved"), split="sample_variant3").load().rows)
    assert rows["5"].answer == "no" and rows["5"].extras["variant"] == "sample_variant3"
    assert rows["1"].extras["breakdown"]["level"] == "high school"
    path = _parquet(records + records[:1], features, tmp_path / "sample_all.parquet")
    with pytest.raises(DataError, match=r"sample_all.parquet row 4: field 'id' is '1', the id of .* row 1 too"):
        DynaMath(str(path)).load()


# --- LogicVista --------------------------------------------------------------------------------------------


def test_logicvista_release_json(tmp_path: Path) -> None:
    rows = _by_id(LogicVista(str(FIXTURES / "logicvista" / "dataset.json")).load().rows)
    assert list(rows) == ["v1_0", "v1_1", "v1_100"]
    assert [r.answer for r in rows.values()] == ["C", "A, C", "A"]
    assert {r.choices for r in rows.values()} == {None}
    assert rows["v1_0"].extras["breakdown"] == {"skill": ["inductive"], "capability": ["diagram"]}
    assert rows["v1_0"].extras["answer_type"] == "multi_choice"
    assert _text(rows["v1_100"]).endswith("(A) Set A (B) Set B (C) Neither set A nor set B")
    assert rows["v1_1"].images == [str(FIXTURES / "logicvista" / "images" / "v1_1.png")]
    release = json.loads((FIXTURES / "logicvista" / "dataset.json").read_text())
    path = _write_json(tmp_path / "dataset.json", {"v1_382": {**release["v1_0"], "question": ""}})
    with pytest.raises(DataError, match=r"dataset.json row 1: field 'question' is empty"):
        LogicVista(str(path), image_dir=str(FIXTURES / "logicvista")).load()


# --- VL-RewardBench ----------------------------------------------------------------------------------------

VLRB_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "query": datasets.Value("string"),
        "response": datasets.Sequence(datasets.Value("string")),
        "image": datasets.Image(),
        "human_ranking": datasets.Sequence(datasets.Value("int64")),
        "models": datasets.Sequence(datasets.Value("string")),
        **{name: datasets.Value("string") for name in ("judge", "rationale", "query_source")},
    }
)


def _vlrb_parquet(tmp_path: Path, change: dict[str, Any] | None = None) -> Path:
    records = [json.loads(line) for line in (FIXTURES / "vl_rewardbench" / "test.jsonl").read_text().splitlines()]
    records = [{**r, "image": _png(), **(change or {})} for r in records]
    return _parquet(records, VLRB_FEATURES, tmp_path / "test-00000-of-00001.parquet")


def test_vl_rewardbench_pairs_as_judge_chats(tmp_path: Path) -> None:
    path = _vlrb_parquet(tmp_path)
    rows = _by_id(VLRewardBench(str(path)).load().rows)
    assert list(rows) == ["RLAIF-V_101", "mathverse_202", "wildvision_303"]
    cups, angle, weather = rows.values()
    assert (cups.answer, angle.answer) == ("Answer 1 is better", "Answer 2 is better")  # human_ranking 0 = better
    assert {r.data_source for r in rows.values()} == {"vl_rewardbench"}
    assert cups.extras["breakdown"] == {"source": "rlaif-v", "category": "hallucination"}
    assert angle.extras["breakdown"] == {"source": "reasoning_tasks", "category": "reasoning"}
    assert weather.extras["breakdown"] == {"source": "wildvision-battle", "category": "general"}
    assert cups.extras["responses"] == [
        "There are two cups on the table.",
        "There are three cups and a teapot on the table.",
    ]
    text = _text(cups)
    assert text.startswith(" You are a highly capable multimodal AI assistant tasked with evaluating answers")
    assert "\n\nQuestion: How many cups are on the table?\n\nAnswer 1: There are two cups on the table.\n\n" in text
    swapped = cups.extras["swapped_messages"][0]["content"][-1]["text"]
    assert "Answer 1: There are three cups and a teapot on the table.\n\nAnswer 2: There are two cups" in swapped
    assert len(cups.images) == 1 and cups.extras["task"] == "understanding"
    method = VLRewardBench(str(path), prompt="question").load().rows[0]
    assert _text(method) == UNDERSTANDING_PROMPT.format(
        question="How many cups are on the table?",
        answer1="There are two cups on the table.",
        answer2="There are three cups and a teapot on the table.",
    )
    tied = _vlrb_parquet(tmp_path, {"human_ranking": [0, 0]})
    with pytest.raises(DataError, match=r"row 1: field 'human_ranking' is \[0, 0\], not a ranking of two responses"):
        VLRewardBench(str(tied)).load()


# --- the datamodule ----------------------------------------------------------------------------------------


def test_datamodule_test_split_carries_benchmark_extras() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RLDataModule, "data")
    path = str(FIXTURES / "mathvista" / "testmini.json")
    for prompt in ("benchmark", "question"):
        config = parser.parse_object(
            {
                "data": {
                    "test": {"class_path": "vlrl.data.MathVista", "init_args": {"path": path, "prompt": prompt}},
                    "eval_batch_size": 5,
                    "prompt_template": "{question}\n\nPlease reason step by step.",
                }
            }
        )
        data = parser.instantiate_classes(config).data
        data.setup("test")
        batch = next(iter(data.test_dataloader()))
        assert batch.ids == ["1", "2", "3", "108", "506"] and set(batch.data_sources) == {"mathvista"}
        assert [e["answer_type"] for e in batch.extras] == ["float", "integer", "text", "float", "list"]
        assert [e["precision"] for e in batch.extras] == [1, None, None, 2, None]
        assert [e["unit"] for e in batch.extras] == [None, "g", None, None, None]
        assert batch.extras[2]["breakdown"]["skill"] == ["geometry reasoning", "algebraic reasoning"]
        assert batch.answers[2] == "145°" and batch.choices[2] == ["135°", "140°", "145°", "150°"]
        assert batch.images[1][0].size == (8, 8)
        text = batch.messages[2][-1]["content"][-1]["text"]
        if prompt == "benchmark":  # the benchmark's own query; the method template does not apply
            assert text.startswith("Hint: ") and "Please reason step by step" not in text
            assert text.count("145°") == 1
        else:  # raw question and lettered options, then the method's template
            assert text.endswith("\nA. 135°\nB. 140°\nC. 145°\nD. 150°\n\nPlease reason step by step.")
        assert batch.questions[1] == "what is the total volume of the measuring cup?"


def test_docstring_examples_hold() -> None:
    import doctest

    from vlrl.data import benchmarks

    results = doctest.testmod(benchmarks)
    assert results.attempted >= 5 and results.failed == 0
