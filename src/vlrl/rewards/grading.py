"""Answer grading: is a response's final answer equal to the gold answer?

``is_correct`` extracts the final answer (``vlrl.rewards.extract``) and compares it with the gold:

- free-form answers: math-verify (``parse``/``verify``) decides equivalence of numbers, fractions,
  LaTeX, intervals, with units, ``\\text{}``, percent and degree signs stripped; a normalised string
  comparison catches non-mathematical answers.
- multiple choice (``choices`` given, or a gold letter A-E): the predicted letter is read from
  ``\\boxed{B}``, ``(B)``, ``B.``, "option B" or "the answer is B"; a predicted option *text* is
  matched to its letter; a gold option text is matched against a predicted letter and vice versa.

Safety: math-verify times out with ``signal.alarm``, which only works in the main thread. Off the
main thread its timeouts are switched off and the caller bounds the time (``vlrl.rewards.runner``
stops waiting for a reward call at its time budget). Independently of that, inputs are capped
before they reach the parser and sympy (length, nesting depth, number of nodes) and expressions
that would take sympy forever to evaluate (towers of powers, huge factorials) are compared as
strings only, so hostile answers grade in milliseconds. Every exception becomes ``False``.

Measured with ``python benchmarks/grading_agreement.py`` on 3040 labelled MATH-V responses.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from sympy import Basic, Integer, Pow, factorial, preorder_traversal

from vlrl.rewards.extract import extract_answer, read_final_answer

__all__ = ["MODES", "Grade", "Mode", "choice_letter", "closest_option", "grade_answer", "is_correct", "math_equal"]

Mode = Literal["reward", "benchmark"]
MODES: tuple[str, ...] = ("reward", "benchmark")


@dataclass(frozen=True)
class Grade:
    """A graded response: whether it is right, and the answer read from it.

    ``extracted`` is the option letter for a recognised multiple-choice answer, else the answer text
    as read; None when the response states no answer.
    """

    correct: bool
    extracted: str | None


log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
MAX_PARSE_CHARS = 400  # longer strings are compared as text only
MAX_NESTING = 10
MAX_NODES = 400
MAX_NUMERIC_EXPONENT = 10_000  # for a rational base: 2**10000 is cheap
MAX_SYMBOLIC_EXPONENT = 100  # for any other base: (x + 1)**9999 would be expanded
MAX_FACTORIAL_ARG = 2_000
_MAIN_TIMEOUT_S = 5

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
_LETTER_ALONE = re.compile(r"^\(?\s*([A-J])\s*\)?\s*[.:]?$")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)$")
_LETTER_LINE = re.compile(r"^[ \t*]*\(?([A-J])\)?[.:]?[ \t*]*$", re.MULTILINE)
_OPTION_WORD = re.compile(r"^(?:option|choice)\s*:?\s*", re.IGNORECASE)
_LETTER_WITH_VALUE = (  # "(B) 5", "B. 5", "B: 5", "B) 5", "B - 5", "B (5)"
    re.compile(r"^\(([A-J])\)\s*[.:,]?\s*(.+)$", re.DOTALL),
    re.compile(r"^([A-J])(?:[.:)]|\s+-)\s+(.+)$", re.DOTALL),
    re.compile(r"^([A-J])\s+\((.+)\)$", re.DOTALL),
)
_LETTER_PART = re.compile(r"^\(([A-J])\)|^([A-J])(?:$|[.:)]|\s+-|\s+\()")
_HEDGE_SPLIT = re.compile(r"\s*(?:,|;|/|&|\bor\b|\band\b)\s*", re.IGNORECASE)
_BOX_PAIR = re.compile(  # two boxes joined by "or", "and", a comma or a slash
    r"\\boxed\{([^{}]*)\}\$?\s*(?:,|/|\bor\b|\band\b|\\(?:text|mbox)\{\s*or\s*\})\s*\$?\s*\\boxed\{([^{}]*)\}"
)
_OR = re.compile(r"\s(?:or|\\lor)\s|\\text\{\s*or\s*\}", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+")


def _timeouts() -> tuple[dict[str, int | None], dict[str, int | None]]:
    """math-verify timeout kwargs for ``parse`` and ``verify``: off outside the main thread."""
    seconds = _MAIN_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    return {"parsing_timeout": seconds}, {"timeout_seconds": seconds}


def _nesting_depth(text: str) -> int:
    """Deepest nesting of ``{}``, ``()`` and ``[]`` together (the parser slows down with depth)."""
    depth = deepest = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(depth - 1, 0)
    return deepest


def _is_tame(expr: object) -> bool:
    """False for expressions sympy could spend unbounded time on (power towers, huge factorials)."""
    if not isinstance(expr, Basic):
        return True
    for count, node in enumerate(preorder_traversal(expr)):
        if count > MAX_NODES:
            return False
        if isinstance(node, Pow):
            exponent = node.exp
            if exponent.is_Number:
                limit = MAX_NUMERIC_EXPONENT if node.base.is_Rational else MAX_SYMBOLIC_EXPONENT
                if abs(exponent) > limit:
                    return False
            elif not exponent.free_symbols:  # unevaluated constant exponent such as 9**(9**9)
                return False
        elif isinstance(node, factorial):
            arg = node.args[0]
            if not isinstance(arg, Integer) or arg > MAX_FACTORIAL_ARG:
                return False
    return True


def _parse(text: str) -> tuple:
    """math-verify parse of a short string that holds just an answer; () when unsafe or unparsable."""
    if len(text) > MAX_PARSE_CHARS or _nesting_depth(text) > MAX_NESTING:
        return ()
    return _parse_cached(text)


@lru_cache(maxsize=8192)
def _parse_cached(text: str) -> tuple:
    """Cached: a gold answer and its options are parsed once for all the samples of a group."""
    parse_kwargs, _ = _timeouts()
    parsed = parse(f"\\boxed{{{text}}}", **parse_kwargs)
    return tuple(p for p in parsed if _is_tame(p))


def _as_number(text: str) -> float | None:
    """``text`` as a float if it is a plain decimal number (``"12"``, ``"-0.5"``, ``"1,000"``)."""
    match = _PLAIN_NUMBER.match(text)
    return float(match.group(0).replace(",", "")) if match else None


def _normalize_text(text: str) -> str:
    """Lower-case text with LaTeX wrappers, ``$``, spaces and trailing punctuation removed."""
    text = _TEXT_WRAPPER.sub(r"\1", text)
    text = text.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\,", "")
    text = text.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    return re.sub(r"\s+", "", text).strip(".,;:!").lower()


def math_equal(gold: str, pred: str) -> bool:
    """Whether two answer strings are equal as text or as mathematics (math-verify).

    Example:
        >>> math_equal("\\\\frac{1}{2}", "0.5")
        True
    """
    if not gold or not pred:
        return False
    gold_norm, pred_norm = _normalize_text(gold), _normalize_text(pred)
    if gold_norm == pred_norm:
        return True
    gold_number, pred_number = _as_number(gold_norm), _as_number(pred_norm)
    if gold_number is not None and pred_number is not None:  # fast path, no sympy
        return abs(gold_number - pred_number) <= 1e-6 * max(1.0, abs(gold_number))
    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    _, verify_kwargs = _timeouts()
    return verify(list(gold_parsed), list(pred_parsed), **verify_kwargs)


def _numbers(text: str) -> list[float]:
    """The plain decimal numbers in ``text``, in order (``"96 m^2"`` -> ``[96.0, 2.0]``)."""
    return [float(n.replace(",", "")) for n in _NUMBER.findall(_TEXT_WRAPPER.sub(r"\1", text))]


def _names_option(text: str, option: str) -> bool:
    """Whether ``text`` states the option text ``option`` (as text or as the same mathematics)."""
    return _normalize_text(text) == _normalize_text(option) or math_equal(option, text)


def _agrees(value: str, letter: str, choices: list[str] | None) -> bool:
    """Whether the value written after a letter ("(C) 96 m^2") agrees with that option's text.

    It disagrees when it states another option's text, or when both hold numbers and the numbers
    differ; prose after the letter ("B, because ...") and options that are bare letters agree.
    """
    if not choices:
        return True
    option = choices[LETTERS.index(letter)]
    if _normalize_text(option) in ("", letter.lower()) or _names_option(value, option):
        return True
    if any(_names_option(value, other) for other in choices if other != option):
        return False
    value_numbers, option_numbers = _numbers(value), _numbers(option)
    return not (value_numbers and option_numbers and value_numbers != option_numbers)


def _read_choice(pred: str, choices: list[str] | None) -> tuple[str | None, bool]:
    """(letter, named) of a predicted answer: ``named`` is True when it names option letters at all.

    ``(None, True)`` is an answer that names options but no single valid one: several letters ("A or
    B", "(A), (C)"), a letter that does not exist, or a letter whose value contradicts its option.
    ``(None, False)`` names no option.
    """
    n_letters = len(choices) if choices else 5
    valid = LETTERS[:n_letters]
    text = _TEXT_WRAPPER.sub(r"\1", pred).replace("$", "").strip()
    text = _OPTION_WORD.sub("", text).strip()
    parts = [p for p in _HEDGE_SPLIT.split(text) if p]
    lettered = {m.group(1) or m.group(2) for p in parts if (m := _LETTER_PART.match(p))}
    if len(parts) > 1 and len(lettered) > 1:  # a list of options is no answer
        return None, True
    match = _LETTER_ALONE.match(text)
    if match:
        letter = match.group(1)
        return (letter, True) if letter in valid else (None, True)
    for pattern in _LETTER_WITH_VALUE:
        match = pattern.match(text)
        if match:
            letter, value = match.group(1), match.group(2).strip()
            if letter not in valid or not _agrees(value, letter, choices):
                return None, True
            return letter, True
    if not choices:
        return None, False
    target = _normalize_text(pred)
    for letter, option in zip(valid, choices, strict=False):
        if _normalize_text(option) == target:
            return letter, False
    for letter, option in zip(valid, choices, strict=False):
        if math_equal(option, pred):
            return letter, False
    return None, False


def choice_letter(pred: str, choices: list[str] | None) -> str | None:
    """The option letter a predicted answer names: ``B``, ``(B)``, ``B.``, "option B", or the option text.

    None when it names none, several ("A or B"), or a letter whose value contradicts its option.

    Example:
        >>> choice_letter("(C) 15", ["5", "10", "15"])
        'C'
        >>> choice_letter("10", ["5", "10", "15"])
        'B'
        >>> choice_letter("(C) 10", ["5", "10", "15"]) is None
        True
    """
    return _read_choice(pred, choices)[0]


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance of two strings (insertions, deletions and substitutions cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def closest_option(pred: str, choices: list[str]) -> str:
    """The letter of the option closest to ``pred`` in edit distance (the first of equals): MathVista's
    reading of an answer that names no option; a ``(X)`` letter in ``pred`` is what is compared.

    Example:
        >>> closest_option("smaller", ["larger than", "equal to", "smaller than"])
        'C'
        >>> closest_option("(C) Cannot be determined", ["Yes", "No"])
        'B'
    """
    letter = re.search(r"\(([a-zA-Z])\)", pred)
    text = letter.group(1).upper() if letter else pred.strip()
    distances = [_edit_distance(text, option) for option in choices]
    return LETTERS[distances.index(min(distances))]


def _no_such_letter(pred: str, choices: list[str]) -> bool:
    """Whether ``pred`` starts with an option letter beyond the last option ("(C) ..." of two options)."""
    match = _LETTER_PART.match(_OPTION_WORD.sub("", pred.replace("$", "").strip()))
    return match is not None and LETTERS.index(match.group(1) or match.group(2)) >= len(choices)


def _gold_letter(answer: str, choices: list[str] | None) -> str | None:
    """The gold option letter: the answer itself if it is a letter, else the option it equals."""
    stripped = answer.strip().strip("()").strip()
    n_letters = len(choices) if choices else 5
    if len(stripped) == 1 and stripped in LETTERS[:n_letters]:
        return stripped
    if choices:
        target = _normalize_text(answer)
        for letter, option in zip(LETTERS, choices, strict=False):
            if _normalize_text(option) == target:
                return letter
    return None


def _hedged(pred: str, answer: str) -> bool:
    """Whether a free-form answer offers alternatives ("3 or 4") that the gold answer does not."""
    return _OR.search(pred) is not None and _OR.search(answer) is None


def _boxes_disagree(response: str) -> bool:
    """Whether the last two ``\\boxed{}`` are offered as alternatives ("\\boxed{3} or \\boxed{4}", a hedge);
    a later box after other words ("\\boxed{13}. No: \\boxed{12}") is a correction, not a hedge."""
    pairs = list(_BOX_PAIR.finditer(response))
    if not pairs:
        return False
    last = pairs[-1]  # it must hold the final box
    return last.end() >= response.rfind("\\boxed") and last.group(1).strip() != last.group(2).strip()


def _strip_unit(pred: str, unit: str | None) -> str:
    """``pred`` without the benchmark's unit word after the value (``"12 years"`` -> ``"12"``)."""
    if not unit:
        return pred
    return re.sub(rf"\s*(?:\\(?:text|mathrm)\s*\{{\s*)?{re.escape(unit.strip())}\}}?\s*$", "", pred.strip()).strip()


def _value_of(pred: str) -> float | None:
    """The number a predicted answer states: a plain number, one number in a phrase, or math-verify's value."""
    number = _as_number(_normalize_text(pred))
    if number is not None:
        return number
    numbers = _numbers(pred)
    if len(numbers) == 1 and not re.search(r"\\frac|\\sqrt|\^|/|\\pi", pred):
        return numbers[0]
    for parsed in _parse(pred):
        try:
            if isinstance(parsed, Basic) and parsed.is_number:
                return float(parsed.evalf())
        except (TypeError, ValueError):
            continue
    return None


def _numeric_equal(gold: str, pred: str, answer_type: str, precision: int | None) -> bool:
    """MathVista's numeric rule: an integer answer is the predicted value cut to an integer, a float
    answer is rounded to ``precision`` decimals, and both are compared with the gold."""
    value, gold_value = _value_of(pred), _as_number(_normalize_text(gold))
    if value is None or gold_value is None:
        return False
    if answer_type == "integer":
        return int(value) == int(gold_value)
    digits = 2 if precision is None else int(precision)
    return round(value, digits) == round(gold_value, digits)


def _grade(
    response: str,
    answer: str,
    choices: list[str] | None,
    mode: Mode,
    answer_type: str | None,
    precision: int | None,
    unit: str | None,
    closest: bool,
) -> Grade:
    gold_letter = _gold_letter(answer, choices)
    numeric = gold_letter is None and _value_of(answer) is not None
    if mode == "reward":
        if _boxes_disagree(response):
            return Grade(False, extract_answer(response))
        pred = extract_answer(response)
        if pred is None and gold_letter is not None:  # a multiple-choice answer may stand alone on a line: "(D)"
            lines = _LETTER_LINE.findall(response)
            pred = lines[-1] if lines else None
    else:
        pred = read_final_answer(response, choices, numeric)
        if pred is not None and numeric and _value_of(_strip_unit(pred, unit)) is None:
            pred = None  # no number where one is asked ("I cannot tell."): unread, for a model extractor to try
    if pred is None:
        return Grade(False, None)
    if gold_letter is not None:
        letter, named = _read_choice(pred, choices)
        if mode == "benchmark" and closest and choices and letter is None and _no_such_letter(pred, choices):
            letter = closest_option(pred, choices)  # MathVista reads "(C) Cannot be determined" of 2 options so
            return Grade(letter == gold_letter, letter)
        if letter is not None or named:
            return Grade(letter == gold_letter, letter or pred)
        gold_text = choices[LETTERS.index(gold_letter)] if choices else answer
        if math_equal(gold_text, pred):
            return Grade(True, gold_letter)
        if mode == "benchmark" and closest and choices:
            letter = closest_option(pred, choices)
            return Grade(letter == gold_letter, letter)
        return Grade(False, pred)
    if _hedged(pred, answer):
        return Grade(False, pred)
    pred = _strip_unit(pred, unit) if mode == "benchmark" else pred
    if mode == "benchmark" and answer_type in ("integer", "float"):
        return Grade(_numeric_equal(answer, pred, answer_type, precision), pred)
    return Grade(math_equal(answer, pred), pred)


def grade_answer(
    response: str,
    answer: str,
    choices: list[str] | None = None,
    *,
    mode: Mode = "reward",
    answer_type: str | None = None,
    precision: int | None = None,
    unit: str | None = None,
    closest_option: bool = False,
) -> Grade:
    """Grade ``response`` against the gold ``answer``: whether it is right, and the answer it gives.

    Arguments as ``is_correct``; never raises (any internal error grades wrong, with no answer read).

    Example:
        >>> grade_answer("Thus, the answer is B (5).", "5", ["4", "5", "6"], mode="benchmark")
        Grade(correct=True, extracted='B')
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a grading mode; use 'reward' (strict) or 'benchmark'")
    if not isinstance(response, str) or not isinstance(answer, str):
        return Grade(False, None)
    try:
        return _grade(response, answer, choices or None, mode, answer_type, precision, unit, closest_option)
    except (Exception, TimeoutException):  # noqa: BLE001 - grading must never take a training step down
        log.debug("grading failed", exc_info=True)
        return Grade(False, None)


def is_correct(
    response: str,
    answer: str,
    choices: list[str] | None = None,
    *,
    mode: Mode = "reward",
    answer_type: str | None = None,
    precision: int | None = None,
    unit: str | None = None,
    closest_option: bool = False,
) -> bool:
    """Whether ``response`` states the gold ``answer`` as its final answer.

    Safe to call from any thread; never raises (any internal error grades ``False``).

    Args:
        response: the model's full response.
        answer: the gold answer: a value (``"\\frac{1}{2}"``, ``"60"``) or, for multiple choice,
            a letter or the option text.
        choices: the option texts of a multiple-choice question, in letter order; None otherwise.
        mode: ``"reward"`` (strict: what a policy is paid for) reads only a marked answer (last
            ``\\boxed{}``, ``<answer>``, "the answer is", a letter alone on a line) and grades wrong
            hedges ("3 or 4", "A or B", two different boxes on the final line); ``"benchmark"``
            reads answers as benchmarks' own evaluation does: also "the correct option is", unmarked
            final answers (the last sentence's number, the option named), and MathVista's numeric
            rules. A letter whose value contradicts its option ("(C) 96", option C is 144) is wrong
            in both modes.
        answer_type: the benchmark's answer type (MathVista: ``integer``, ``float``, ``text``,
            ``list``); in benchmark mode an ``integer`` answer is the predicted value cut to an
            integer and a ``float`` one is rounded to ``precision`` decimals.
        precision: decimals a ``float`` answer is rounded to (MathVista's ``precision``; default 2).
        unit: the benchmark's unit of the answer (``"years"``), removed after a predicted value in
            benchmark mode.
        closest_option: in benchmark mode, read a multiple-choice answer that names no option as the
            option closest to it in edit distance, as MathVista's evaluation does (it then credits
            some answers such as "cannot be determined"); never in reward mode.

    Returns:
        True if the final answer is equivalent to the gold answer.

    Example:
        >>> is_correct("... so the total is \\\\boxed{\\\\frac{6}{4}}", "1.5")
        True
        >>> is_correct("The answer is (B).", "B", ["2", "3", "4"])
        True
        >>> is_correct("The bar has a value of 1.", "1")
        False
        >>> is_correct("The bar has a value of 1.", "1", mode="benchmark")
        True
    """
    return grade_answer(
        response,
        answer,
        choices,
        mode=mode,
        answer_type=answer_type,
        precision=precision,
        unit=unit,
        closest_option=closest_option,
    ).correct
