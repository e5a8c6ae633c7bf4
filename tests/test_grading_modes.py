"""The two grading modes of ``is_correct``: strict ``reward`` and ``benchmark`` (issue: benchmark-faithful evaluation)."""

from __future__ import annotations

import pytest

from vlrl.rewards import grade_answer, is_correct
from vlrl.rewards.extract import extract_unmarked, read_final_answer
from vlrl.rewards.grading import closest_option

MODES = ("reward", "benchmark")
AREAS = ["48 m^2", "96 m^2", "144 m^2", "192 m^2"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("response", "answer", "choices"),
    [
        (r"The area is \boxed{(C)\ 96 m^2}", "C", AREAS),  # letter C, value of option B
        (r"The area is \boxed{(C)\ 96 m^2}", "96 m^2", AREAS),  # ... wrong whichever the gold names
        ("The answer is (B) Yes.", "Yes", ["Yes", "No"]),  # the letter of No with the text of Yes
        (r"\boxed{(A) or (B)}", "A", ["1", "2", "3"]),  # a hedge between options
        (r"\boxed{A, C}", "A", ["1", "2", "3"]),  # a list of options
        (r"\boxed{3 or 4}", "3", None),  # a hedge between values
        (r"So $x = \boxed{3}$ or $x = \boxed{4}$.", "3", None),  # two boxes offered as alternatives
    ],
)
def test_hedges_lists_and_contradictions_are_wrong_in_both_modes(
    mode: str, response: str, answer: str, choices: list[str] | None
) -> None:
    assert is_correct(response, answer, choices, mode=mode) is False


@pytest.mark.parametrize("mode", MODES)
def test_letter_with_its_own_value_is_right_in_both_modes(mode: str) -> None:
    choices = ["4", "5", "6", "7", "8"]
    assert grade_answer("Thus, the answer is B (5).", "5", choices, mode=mode).extracted == "B"
    assert is_correct("Thus, the answer is B (5).", "5", choices, mode=mode)
    assert is_correct(r"\boxed{(C)\ 144 m^2}", "C", AREAS, mode=mode)
    assert is_correct(r"First \boxed{13}. No: \boxed{12}", "12", mode=mode)  # a correction, not a hedge


@pytest.mark.parametrize(
    ("response", "answer", "choices"),
    [
        ("The smallest bar in the chart has a value of 1.", "1", None),
        (
            "Fewer acorns fall, so the population of squirrels will likely decrease.",
            "decrease",
            ["increase", "decrease"],
        ),
        ("The correct option letter is (B) No.", "No", ["Yes", "No"]),
        ("根据勾股定理, AB=5。\n\n答案:C", "5", ["3", "4", "5", "6"]),
        ("70", "70", None),  # a bare answer
    ],
)
def test_benchmark_mode_reads_unmarked_answers_reward_mode_does_not(
    response: str, answer: str, choices: list[str] | None
) -> None:
    assert is_correct(response, answer, choices, mode="benchmark")
    assert not is_correct(response, answer, choices, mode="reward")


def test_mathvista_numeric_rules() -> None:
    # float, precision 1: round(1.23, 1) = 1.2 == 1.2; round(1.26, 1) = 1.3 != 1.2
    assert is_correct(r"\boxed{1.23}", "1.2", mode="benchmark", answer_type="float", precision=1)
    assert not is_correct(r"\boxed{1.26}", "1.2", mode="benchmark", answer_type="float", precision=1)
    # integer: MathVista cuts the predicted value to an integer, int(float("2.7")) = 2
    assert is_correct(r"\boxed{2.7}", "2", mode="benchmark", answer_type="integer")
    assert not is_correct(r"\boxed{2.7}", "2", mode="reward")
    # the benchmark's unit after the value
    assert is_correct("The answer is 12 years.", "12", mode="benchmark", answer_type="integer", unit="years")
    # a phrase with one value: "the 4th number, which is 5" states 5
    assert is_correct("So the answer is: 5 apples.", "5", mode="benchmark", answer_type="integer")


def test_closest_option_is_mathvistas_reading_and_off_by_default() -> None:
    # edit distances of "smaller" to the options: 10, 8, 5 -> C
    assert closest_option("smaller", ["larger than", "equal to", "smaller than"]) == "C"
    assert closest_option("(C) Cannot be determined", ["Yes", "No"]) == "B"  # "C" is 3 from Yes, 2 from No
    text = "Therefore, the correct option letter is (C) Cannot be determined."
    assert not is_correct(text, "No", ["Yes", "No"], mode="benchmark")
    assert is_correct(text, "No", ["Yes", "No"], mode="benchmark", closest_option=True)
    assert not is_correct(text, "No", ["Yes", "No"], mode="reward", closest_option=True)


def test_reading_helpers() -> None:
    assert extract_unmarked("There are 3 bars. So the total is 7 apples.", numeric=True) == "7"
    assert extract_unmarked("Both options look plausible to me here.", ["yes", "no"]) is None
    echoed = "Answer: (A) decrease.\n\nQuestion: If the fish die the fleas will\nChoices:\n(A) increase\n\nAnswer: (B)"
    assert read_final_answer(echoed, ["decrease", "increase"]) == "(A) decrease"


def test_unknown_mode_names_the_key() -> None:
    with pytest.raises(ValueError, match="mode='lenient'"):
        is_correct(r"\boxed{1}", "1", mode="lenient")  # type: ignore[arg-type]
