"""Tests of answer extraction, grading, reward functions and the reward runner (CPU, fast)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vlrl.rewards import (
    AccuracyReward,
    BoxedFormatReward,
    RewardFunction,
    TagFormatReward,
    ThinkFormatReward,
    correct_by_rewards,
    extract_answer,
    extract_boxed,
    is_correct,
    score,
)

GRADING_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "grading" / "mathv_gemini_pro_cot.jsonl"
HOSTILE = [
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{10!!!!}",
    r"\boxed{2^{100000}}",
    "x" * 100_000 + r"\boxed{" + "1" * 100_000 + "}",
    "{" * 100_000,
    r"\boxed{" * 50_000,
    r"\boxed{" + "{" * 5_000 + "1" + "}" * 5_000 + "}",
    r"\boxed{" + r"\frac{" * 300 + "1" + "}{2}" * 300 + "}",
    "the answer is " + "(" * 100_000,
]


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{ 3 }.", "3"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not groups
        (r"\boxed{\sqrt{\frac{a^{2}}{b}}} and more text", r"\sqrt{\frac{a^{2}}{b}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5 apples", "5"),
        (r"ok \boxed{4} but then \boxed{5", "4"),  # unclosed last box: the last complete one
        (r"\boxed{a}}}{{", "a"),
        ("<think>2+2</think><answer> 4 </answer>", "4"),
        ("<answer>1</answer> then <answer>Image 2 is better</answer>", "Image 2 is better"),
        ("<answer>cut off", "cut off"),
        ("<answer>x</answer> but \\boxed{y}", "y"),  # a box wins over tags
        ("The answer is 12 apples. Next question.", "12 apples"),
        ("Answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
        ("The answer is 3.5 cm.", "3.5 cm"),
        ("the answer is 1.\nFinal answer:\n  (C)\n", "(C)"),
        ("Therefore, the final answer is **B**.", "B"),
        ("no answer here", None),
        ("", None),
        (r"\boxed{", None),
        (r"\boxed{}", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_boxed_ignores_non_latex() -> None:
    assert extract_boxed("no box") is None
    assert extract_boxed(r"\boxed{x} \boxed{y}") == "y"


def test_extraction_is_linear_on_long_inputs() -> None:
    for text in HOSTILE:
        start = time.perf_counter()
        extract_answer(text)
        assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------- grading

# Real Gemini-Pro responses on MATH-V with their correctness labels (response, gold, options,
# label). Plain math-verify (verify(parse(gold), parse(response))) misjudges 12 of these 21:
# mathv-2, 473, 818, 458, 468, 94, 1145, 1487, 1979, 2954, 2955, 2903.
REAL_CASES = [
    pytest.param(
        "The bike with the highest price is bike A.\n"
        "The price of the bikes are:\nA - 950 Lt\n"
        "B - 590 Lt\nC - 905 Lt\nD - 899 Lt\nE - 509 Lt\n"
        "\\boxed{A}",
        "A",
        ["A", "B", "C", "D", "E"],
        True,
        id="mathv-2",
    ),
    pytest.param(
        "The kite with the longest string is kite A.\n"
        "The string of kite A is made up of 9 small segments. The string of kite "
        "B is made up of 7 small segments. The string of kite C is made up of "
        "8 small segments. The string of kite D is made up of 8 small segments. "
        "The string of kite E is made up of 8 small segments.\n"
        "Therefore, the kite with the longest string is kite A.\n"
        "\n\\boxed{A}",
        "C",
        ["A", "B", "C", "D", "E"],
        False,
        id="mathv-3",
    ),
    pytest.param(
        "The numbers in the table are increasing by 5 in each column. The missing "
        "piece must also have numbers that increase by 5 in each column. Only "
        "piece (C) has this property.\n\n\\boxed{C}",
        "C",
        ["A)", "B)", "C)", "D)", "E)"],
        True,
        id="mathv-473",
    ),
    pytest.param(
        "Maria is 1/8 of the way from the starting point to Bianca. The distance "
        "between Maria and Bianca is 100m. So, the total distance Maria must walk "
        "is 100m * 8 = 800m.\n\nThe answer is (C).",
        "C",
        [
            "$300 \\mathrm{~m}$",
            "$400 \\mathrm{~m}$",
            "$800 \\mathrm{~m}$",
            "$1 \\mathrm{~km}$",
            "$700 \\mathrm{~m}$",
        ],
        True,
        id="mathv-818",
    ),
    pytest.param(
        "The kangaroo is in the circle and in the square but not in the triangle.\nThe answer is (B).",
        "B",
        [
            "In the circle and in the triangle but not in the square.",
            "In the circle and in the square but not in the triangle.",
            "In the triangle and in the square but not in the circle.",
            "In the circle but in neither the square or the triangle.",
            "In the square but in neither the circle or the triangle.",
        ],
        True,
        id="mathv-458",
    ),
    pytest.param(
        "(D)\n\nExplanation: Square C has 3 quadrilaterals (4-sided figures), 3 circles and 4 hearts.",
        "D",
        ["A)", "B)", "C)", "D)", "E)"],
        True,
        id="mathv-468",
    ),
    pytest.param(
        "The flagpole is \\(16-6=10 \\text{ m}\\) above the sandcastle. Half of "
        "it is \\(5 \\text{ m}\\). The sandcastle is \\(5+6=11 \\text{ m}\\) high.\n"
        "\n\\boxed{\\text{A}}",
        "A",
        [
            "$11 \\mathrm{~m}$",
            "$12 \\mathrm{~m}$",
            "$13 \\mathrm{~m}$",
            "$14 \\mathrm{~m}$",
            "$15 \\mathrm{~m}$",
        ],
        True,
        id="mathv-94",
    ),
    pytest.param(
        "The number in the shaded cell is the product of the numbers in the two "
        "cells above it. Therefore, the number in the shaded cell is \\(12 \\times "
        "15 = 180\\). None of the answer choices match 180, so the answer is (F) "
        "None of the above.\n\n\\boxed{\\text{F}}",
        "A",
        ["154", "100", "90", "88", "60"],
        False,
        id="mathv-164",
    ),
    pytest.param(
        "The area of a triangle is given by \\(A = \\frac{1}{2}bh\\), where \\(b\\) "
        "is the base and \\(h\\) is the height. Since the triangle is isosceles, "
        "we know that the two angles at the base are congruent. This means that "
        "the two sides opposite of those angles are also congruent. Since the "
        "white and gray stripes are equally wide, the area of the white stripes "
        "is half of the area of the triangle, which is \\(\\frac{1}{2}\\). Therefore, "
        "the fraction of the area of the triangle that is white is \\(\\frac{1}{2}\\).\n"
        "\n\\(\\boxed{ \\frac{1}{2} }\\)",
        "A",
        [
            "$\\frac{1}{2}$",
            "$\\frac{1}{3}$",
            "$\\frac{2}{3}$",
            "$\\frac{3}{4}$",
            "$\\frac{2}{5}$",
        ],
        True,
        id="mathv-1145",
    ),
    pytest.param(
        "If there are \\(n\\) vertical beams, then there are \\(n-1\\) spaces "
        "between them. Each space requires 4 horizontal beams to fill, so the "
        "total number of beams is \\(n + 4(n-1) = 5n - 4\\). If the fence has "
        "\\(99\\) beams, then \\(5n-4 = 99\\), so \\(n = 20\\). Therefore, the "
        "fence is made up of \\(20\\) vertical beams and \\(4(20-1) = 76\\) horizontal "
        "beams, for a total of \\(20 + 76 = \\boxed{96}\\) beams.",
        "B",
        ["95", "96", "97", "98", "99"],
        True,
        id="mathv-1487",
    ),
    pytest.param(
        "Let \\(r\\) be the radius of each hemisphere. Since the diameter of the "
        "cube is 2, the diagonal of each face is also 2. Since the diameter of "
        "each hole is also 2, the diagonal of each hole is also 2. Since the diagonal "
        "of each face is the hypotenuse of a right triangle with one leg equal "
        "to the radius of the hemisphere, we have:\n"
        "\n$$r^2 + r^2 = 2^2$$\n\n$$2r^2 = 4$$\n"
        "\n$$r^2 = 2$$\n\n$$r = \\sqrt{2}$$\n\nTherefore, the diameter of each "
        "hole is \\(\\boxed{\\sqrt{2}}\\).",
        "B",
        ["1", "$\\sqrt{2}$", "$2-\\sqrt{2}$", "$3-\\sqrt{2}$", "$3-\\sqrt{3}$"],
        True,
        id="mathv-1979",
    ),
    pytest.param(
        "Let the radius of the third circle be \\(x\\). Since the third circle "
        "is tangent to the first two circles, we have\n"
        "$$x+1=4-x$$\n\nSolving for \\(x\\), we get \\(x=\\frac{3}{5}\\).\n"
        "\nTherefore, the answer is (B).",
        "D",
        [
            "$\\frac{1}{3}$",
            "$\\frac{2}{5}$",
            "$\\frac{5}{12}$",
            "$\\frac{4}{9}$",
            "$\\frac{1}{2}$",
        ],
        False,
        id="mathv-2445",
    ),
    pytest.param(
        "Gerda starts at point 1 and walks along the path. She first sees the "
        "letter K, then N, then G, then O, and finally A. So the word that is "
        'formed is "K N G O A".\n\n\\boxed{B}',
        "A",
        ["KNAO", "KNGO", "KNR", "AGRO", "KAO"],
        False,
        id="mathv-55",
    ),
    pytest.param(
        "90 − 80 = 10\n80 − 70 = 10\n70 − ? = 10\n"
        "? = 70 − 10 = 60\n60 − 50 = 10\n50 − 40 = 10\n"
        "40 − 30 = 10\n30 − 20 = 10\n\nThe answer is 60.\n"
        "\n\\boxed{60}",
        "60",
        None,
        True,
        id="mathv-1",
    ),
    pytest.param(
        "There are 14 bricks missing in the wall.\n"
        "\nExplanation:\n\nCount all the bricks that are missing in the wall.\n"
        "\nThere are \\boxed{14} bricks missing in the wall.",
        "6",
        None,
        False,
        id="mathv-7",
    ),
    pytest.param(
        "The circumference of the whole circle is \\(2\\pi r = 2\\pi (4) = 8\\pi\\) "
        "inches.\n\nThe circumference of the shaded sector is \\(\\frac{3}{4} "
        "\\cdot 8\\pi = 6\\pi\\) inches.\n\nTherefore, the length of the arc on "
        "the discarded quarter-circle is \\(8\\pi - 6\\pi = 2\\pi\\) inches.\n"
        "\n\\(\\boxed{2\\pi}\\)",
        "2\\pi",
        None,
        True,
        id="mathv-2954",
    ),
    pytest.param(
        "The point $(3,4)$ is reflected in the $x$-axis to the point $(3,-4)$.\n"
        "\nThe $x$-coordinate of the image is the same as the $x$-coordinate of "
        "the original point.\n\nThe $y$-coordinate of the image is the opposite "
        "of the $y$-coordinate of the original point.\n"
        "\nSo, the coordinates of the image are $(3,-4)$.\n"
        "\n\\boxed{(3,-4)}",
        "(3,-4)",
        None,
        True,
        id="mathv-2955",
    ),
    pytest.param(
        "The radius of the circle is 5, since the distance from the center \\( "
        "(3, 1) \\) to the point \\( (8, 1) \\) is 5. The area of the circle is "
        "\\(\\pi r^2 = \\pi (5)^2 = 25\\pi \\).\n"
        "\n\\(\\boxed{25\\pi}\\)",
        "25\\pi",
        None,
        True,
        id="mathv-2903",
    ),
    pytest.param(
        "Since $ABCD$ is a square, then $$\\angle BAD=90^\\circ.$$ Since $AED$ "
        "is an equilateral triangle, then $$\\angle EAD=60^\\circ.$$\n"
        "\nLet $$\\angle EAB=\\theta.$$ Then $$\\angle EAD=\\angle BAD-\\angle "
        "EAB,$$ that is, $$60^\\circ=90^\\circ-\\theta,$$ and so $$\\theta=30^\\circ.$$\n"
        "\nTherefore, the measure of angle $BAE$ is \\(30^\\circ\\).\n"
        "\n\\boxed{30^\\circ}",
        "30",
        None,
        True,
        id="mathv-3029",
    ),
    pytest.param(
        "<google.generativeai.types.generation_types.GenerateContentResponse object at 0x10f869910>",
        "18",
        None,
        False,
        id="mathv-1645",
    ),
    pytest.param(
        "A cube with one face missing can be folded from any of the four squares "
        "that do not share an edge with the attached square.\n"
        "\n\\(\\boxed{4}\\)",
        "6",
        None,
        False,
        id="mathv-2122",
    ),
]


@pytest.mark.parametrize(("response", "answer", "options", "label"), REAL_CASES)
def test_is_correct_on_real_responses(response: str, answer: str, options: list[str] | None, label: bool) -> None:
    assert is_correct(response, answer, options) is label


@pytest.mark.parametrize(
    ("response", "answer", "choices", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", None, True),
        (r"\boxed{1/2}", r"\frac{1}{2}", None, True),
        (r"\boxed{\dfrac{3}{6}}", r"\frac12", None, True),
        (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", None, True),
        (r"\boxed{5 \text{ cm}}", "5", None, True),
        (r"\boxed{5\mathrm{~cm}^2}", "5", None, True),
        (r"\boxed{50\%}", "50", None, True),
        (r"\boxed{30^\circ}", "30", None, True),
        (r"\boxed{30°}", "30", None, True),
        (r"\boxed{1,000}", "1000", None, True),
        (r"\boxed{x=3}", "3", None, True),
        (r"\boxed{(1,2)}", "(1, 2)", None, True),
        (r"\boxed{\text{blue}}", "Blue", None, True),
        (r"\boxed{6}", "5", None, False),
        (r"\boxed{0.33}", r"\frac{1}{3}", None, False),
        ("no final answer", "5", None, False),
        # multiple choice: letters, option texts, gold as letter or as text
        ("The answer is (B).", "B", ["2", "4", "6"], True),
        ("Answer: C. 6", "C", ["2", "4", "6"], True),
        (r"\boxed{(B) 4}", "B", ["2", "4", "6"], True),
        (r"\boxed{\text{(B)}}", "B", ["2", "4", "6"], True),
        ("<answer>Option B</answer>", "B", ["x", "y"], True),
        (r"\boxed{4}", "B", ["2", "4", "6"], True),
        (r"\boxed{\frac{8}{2}}", "B", ["$2$", "$4$", "$6$"], True),
        (r"\boxed{B}", "4", ["2", "4", "6"], True),
        (r"\boxed{6}", "B", ["2", "4", "6"], False),
        (r"\boxed{C}", "4", ["2", "4", "6"], False),
        (r"\boxed{(A) 4}", "B", ["2", "4", "6"], False),  # the letter decides
        (r"\boxed{F}", "A", ["1", "2", "3", "4", "5"], False),  # no such option
        (r"\boxed{D}", "D", None, True),  # a gold letter without option texts
        (r"\boxed{E}", "D", None, False),
        ("(D)\n\nbecause the square has four sides.", "D", ["A", "B", "C", "D", "E"], True),
    ],
)
def test_is_correct_synthetic(response: str, answer: str, choices: list[str] | None, expected: bool) -> None:
    assert is_correct(response, answer, choices) is expected


def test_is_correct_never_raises_on_bad_input() -> None:
    assert is_correct(None, "1") is False  # type: ignore[arg-type]
    assert is_correct(r"\boxed{1}", None) is False  # type: ignore[arg-type]
    assert is_correct(r"\boxed{1}", "", []) is False


@pytest.mark.timeout(60)
def test_is_correct_on_hostile_inputs_returns_quickly() -> None:
    for text in HOSTILE:
        for answer, choices in (("5", None), ("B", ["1", "2", "3"])):
            start = time.perf_counter()
            assert is_correct(text, answer, choices) is False
            assert time.perf_counter() - start < 3.0, text[:40]
        start = time.perf_counter()
        assert is_correct(r"\boxed{5}", text) is False  # a hostile gold answer
        assert time.perf_counter() - start < 3.0, text[:40]


@pytest.mark.timeout(60)
def test_is_correct_off_the_main_thread() -> None:
    cases = [(r"\boxed{\frac{1}{2}}", "0.5", None), (r"\boxed{7}", "8", None)]
    cases += [param.values[:3] for param in REAL_CASES[:8]]
    expected = [is_correct(*case) for case in cases]
    with ThreadPoolExecutor(max_workers=2) as pool:
        in_threads = list(pool.map(lambda case: is_correct(*case), cases))
        hostile = list(pool.map(lambda text: is_correct(text, "5"), HOSTILE))
    assert in_threads == expected
    assert expected[:2] == [True, False]
    assert not any(hostile)


@pytest.mark.timeout(120)
def test_agreement_with_labels_on_the_full_file() -> None:
    """``is_correct`` agrees with >= 97% of the 3040 labels (the whole file: about 10-15 s)."""
    if not GRADING_FILE.is_file():
        pytest.skip(f"labelled grading data not found at {GRADING_FILE} (shared data folder absent)")
    rows = [json.loads(line) for line in GRADING_FILE.read_text().splitlines() if line.strip()]
    assert len(rows) == 3040
    agree = sum(
        is_correct(row["response"], row["answer"], row["options"] or None) == row["label_correct"] for row in rows
    )
    assert agree / len(rows) >= 0.97


# --------------------------------------------------------------------------- reward functions


def _call(reward: RewardFunction, completions: list[str], **overrides) -> list[float]:
    n = len(completions)
    kwargs = {"answers": ["4"] * n, "choices": [None] * n, "finish_reasons": ["stop"] * n}
    return reward(completions, **(kwargs | overrides), prompts=["ignored"] * n)


def test_accuracy() -> None:
    completions = [r"\boxed{4}", r"\boxed{5}", r"\boxed{4}", r"\boxed{4}", "The answer is (B)."]
    answers = ["4", "4", "4", "4", "B"]
    choices = [None, None, None, None, ["2", "4"]]
    reasons = ["stop", "stop", "length", "stop", "stop"]
    kwargs = {"answers": answers, "choices": choices, "finish_reasons": reasons}
    assert _call(AccuracyReward(), completions, **kwargs) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert _call(AccuracyReward(truncated_score=-0.5), completions, **kwargs)[2] == -0.5
    assert _call(AccuracyReward(truncated_score=None), completions, **kwargs)[2] == 1.0


def test_accuracy_boxed_only_grades_the_last_box_alone() -> None:
    """OVR / VL-Rethinker: only the last complete \\boxed{} counts; the lenient fallbacks score 0."""
    completions = [
        "So the answer is 12.",  # an "answer is" phrase
        "<answer>12</answer>",  # an answer tag
        "The options are listed.\n(B)",  # a lone option letter on a line
        r"First \boxed{13}. No: \boxed{12}",  # the last box is right
        r"\boxed{12}. So the answer is 13.",  # a phrase after the box does not count
        r"\boxed{13}. So the answer is 12.",  # nor does it rescue a wrong box
        r"\boxed{}. So the answer is 12.",  # an empty box is no box
        r"\boxed{12",  # an unclosed box is no box
        r"\boxed{12}",  # right, but truncated
    ]
    answers = ["12", "12", "B", "12", "12", "12", "12", "12", "12"]
    choices = [None, None, ["3", "12"], None, None, None, None, None, None]
    reasons = ["stop"] * 8 + ["length"]
    kwargs = {"answers": answers, "choices": choices, "finish_reasons": reasons}
    assert _call(AccuracyReward(), completions, **kwargs) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    strict = AccuracyReward(boxed_only=True)
    assert _call(strict, completions, **kwargs) == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert strict.correct(completions, **kwargs) == [False, False, False, True, True, False, False, False, False]
    loose_on_length = AccuracyReward(truncated_score=None, boxed_only=True)
    assert loose_on_length.correct(completions, **kwargs)[-1] is True  # graded like any other response
    with pytest.raises(ValueError, match="boxed_only='yes'"):
        AccuracyReward(boxed_only="yes")


def test_correct_by_rewards_asks_every_reward_that_defines_correct() -> None:
    texts = [r"\boxed{4}", "So the answer is 4.", r"\boxed{4}"]
    kwargs = {"answers": ["4"] * 3, "choices": [None] * 3, "finish_reasons": ["stop", "stop", "length"]}
    # no reward defines correct: is_correct on responses that ended with EOS
    assert correct_by_rewards([BoxedFormatReward()], texts, **kwargs) == [True, True, False]
    assert correct_by_rewards([], texts, **kwargs) == [True, True, False]
    assert BoxedFormatReward().correct(texts, **kwargs) is None
    # the accuracy reward's own definition, whatever else is in the list
    assert correct_by_rewards([BoxedFormatReward(), AccuracyReward(boxed_only=True)], texts, **kwargs) == [
        True,
        False,
        False,
    ]
    # every reward that defines correct must agree
    assert correct_by_rewards([AccuracyReward(), AccuracyReward(name="strict", boxed_only=True)], texts, **kwargs) == [
        True,
        False,
        False,
    ]


def test_format_rewards() -> None:
    think = [
        "<think>2+2</think> It is 4.",
        " <think>a</think>\n\\boxed{4}",
        "<think>2+2</think>",
        "It is 4.",
        "<think>a</think>b</think>c",
        "<think>a<think>b</think>c",
    ]
    assert _call(ThinkFormatReward(), think) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    boxed = [r"so \boxed{4}", r"\fbox{4}", r"so \boxed{4", r"\boxed{}", "4"]
    assert _call(BoxedFormatReward(), boxed) == [1.0, 1.0, 0.0, 0.0, 0.0]
    tags = [
        "<think>x</think>\n<answer>Image 1 is better</answer>",
        "<answer>y</answer>",
        "<think>x</think><answer>y</answer> trailing",
    ]
    assert _call(TagFormatReward(), tags) == [1.0, 0.0, 0.0]
    assert _call(TagFormatReward(r"\d+$"), ["abc 12", "12 abc"]) == [1.0, 0.0]


def test_reward_names_and_weights() -> None:
    assert AccuracyReward().name == "accuracy"
    assert ThinkFormatReward().name == "think_format"
    assert BoxedFormatReward(name="boxed", weight=0.5).name == "boxed"
    assert BoxedFormatReward(weight=2).weight == 2.0
    with pytest.raises(ValueError, match="weight"):
        AccuracyReward(weight=math.nan)
    with pytest.raises(ValueError, match="name"):
        AccuracyReward(name="")
    with pytest.raises(ValueError, match="pattern"):
        TagFormatReward("(")


# --------------------------------------------------------------------------- runner


class Constant(RewardFunction):
    """Returns a fixed list (or whatever it is given), for runner tests."""

    def __init__(self, values, name: str | None = None, weight: float = 1.0) -> None:
        super().__init__(name, weight)
        self.values = values

    def __call__(self, completions, *, answers, choices, finish_reasons, **kwargs):
        return self.values


class Raises(RewardFunction):
    def __call__(self, completions, *, answers, choices, finish_reasons, **kwargs):
        raise RuntimeError("reward backend down")


class Hangs(RewardFunction):
    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def __call__(self, completions, *, answers, choices, finish_reasons, **kwargs):
        self.release.wait(30)
        return [1.0] * len(completions)


def _score(reward_fns, completions, **kwargs):
    n = len(completions)
    return score(reward_fns, completions, answers=["4"] * n, choices=[None] * n, finish_reasons=["stop"] * n, **kwargs)


def test_score_weights_and_components() -> None:
    completions = [r"\boxed{4}", r"\boxed{5}", "4"]
    scores = _score(
        [AccuracyReward(), BoxedFormatReward(weight=0.5), Constant([1, 2, 3], "c", -1)], completions, images=[None] * 3
    )
    assert scores.components["accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert scores.components["boxed_format"].tolist() == [1.0, 1.0, 0.0]
    assert scores.components["c"].tolist() == [1.0, 2.0, 3.0]  # unweighted
    assert scores.total.tolist() == pytest.approx([0.5, -1.5, -3.0])
    assert scores.failures == {"accuracy": 0, "boxed_format": 0, "c": 0}
    assert scores.total.shape == (3,)


def test_score_contains_a_raising_reward(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vlrl.rewards.runner"):
        for _ in range(3):
            scores = _score([Raises(name="flaky"), Constant([1.0, 1.0])], ["a", "b"], failure_score=-1.0)
    assert scores.components["flaky"].tolist() == [-1.0, -1.0]
    assert scores.failures == {"flaky": 1, "constant": 0}
    assert scores.total.tolist() == [0.0, 0.0]
    warnings = [r.getMessage() for r in caplog.records if "'flaky'" in r.getMessage()]
    assert len(warnings) == 1  # once per reward and kind, not per call or sample
    assert "RuntimeError: reward backend down" in warnings[0]


@pytest.mark.timeout(30)
def test_score_stops_waiting_for_a_hanging_reward() -> None:
    release = threading.Event()
    try:
        start = time.perf_counter()
        scores = _score([Hangs(release), Constant([1.0, 0.0])], ["a", "b"], time_budget_s=0.5)
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert elapsed < 1.5
    assert scores.failures == {"hangs": 1, "constant": 0}
    assert scores.components["hangs"].tolist() == [0.0, 0.0]
    assert scores.total.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0], [0.0, 0.0]),  # wrong length
        ([1.0, 2.0, 3.0], [0.0, 0.0]),
        ("ab", [0.0, 0.0]),  # not numbers
        (None, [0.0, 0.0]),
        ([1.0, math.nan], [1.0, 0.0]),  # non-finite entries are replaced
        ([math.inf, 2.0], [0.0, 2.0]),
    ],
)
def test_score_validates_return_values(values, expected) -> None:
    scores = _score([Constant(values)], ["a", "b"])
    assert scores.failures == {"constant": 1}
    assert scores.components["constant"].tolist() == expected


def test_score_rejects_caller_errors() -> None:
    with pytest.raises(ValueError, match="twice"):
        _score([Constant([1.0]), Constant([2.0])], ["a"])
    with pytest.raises(ValueError, match="answers"):
        score([Constant([1.0])], ["a"], answers=[], choices=[None], finish_reasons=["stop"])


def test_score_on_an_empty_batch() -> None:
    scores = _score([AccuracyReward()], [])
    assert scores.total.shape == (0,)
    assert scores.failures == {"accuracy": 0}


@pytest.mark.timeout(60)
def test_score_with_hostile_completions_returns_quickly() -> None:
    start = time.perf_counter()
    scores = _score([AccuracyReward(), BoxedFormatReward(), ThinkFormatReward()], HOSTILE, time_budget_s=20.0)
    assert time.perf_counter() - start < 10.0
    assert scores.components["accuracy"].tolist() == [0.0] * len(HOSTILE)
    assert sum(scores.failures.values()) == 0
