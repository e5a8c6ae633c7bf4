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
from functools import lru_cache

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from sympy import Basic, Integer, Pow, factorial, preorder_traversal

from vlrl.rewards.extract import extract_answer

__all__ = ["is_correct", "math_equal", "choice_letter"]

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
_LETTER_LEAD = re.compile(r"^\(([A-J])\)|^([A-J])(?:[.:)]|\s+-)\s")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)$")
_LETTER_LINE = re.compile(r"^[ \t*]*\(?([A-J])\)?[.:]?[ \t*]*$", re.MULTILINE)
_OPTION_WORD = re.compile(r"^(?:option|choice)\s*:?\s*", re.IGNORECASE)


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


def choice_letter(pred: str, choices: list[str] | None) -> str | None:
    """The option letter a predicted answer names: ``B``, ``(B)``, ``B.``, "option B", or the option text.

    Example:
        >>> choice_letter("(C) 15", ["5", "10", "15"])
        'C'
        >>> choice_letter("10", ["5", "10", "15"])
        'B'
    """
    n_letters = len(choices) if choices else 5
    valid = LETTERS[:n_letters]
    text = _TEXT_WRAPPER.sub(r"\1", pred).replace("$", "").strip()
    text = _OPTION_WORD.sub("", text).strip()
    for pattern in (_LETTER_ALONE, _LETTER_LEAD):
        match = pattern.match(text)
        if match:
            letter = next(g for g in match.groups() if g)
            return letter if letter in valid else None
    if not choices:
        return None
    target = _normalize_text(pred)
    for letter, option in zip(valid, choices, strict=False):
        if _normalize_text(option) == target:
            return letter
    for letter, option in zip(valid, choices, strict=False):
        if math_equal(option, pred):
            return letter
    return None


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


def _grade(response: str, answer: str, choices: list[str] | None) -> bool:
    pred = extract_answer(response)
    gold_letter = _gold_letter(answer, choices)
    if gold_letter is not None:
        if pred is None:  # a multiple-choice answer may stand alone on a line: "(D)"
            lines = _LETTER_LINE.findall(response)
            return bool(lines) and lines[-1] == gold_letter
        letter = choice_letter(pred, choices)
        if letter is not None:
            return letter == gold_letter
        gold_text = choices[LETTERS.index(gold_letter)] if choices else answer
        return math_equal(gold_text, pred)
    if pred is None:
        return False
    return math_equal(answer, pred)


def is_correct(response: str, answer: str, choices: list[str] | None = None) -> bool:
    """Whether ``response`` states the gold ``answer`` as its final answer.

    Safe to call from any thread; never raises (any internal error grades ``False``).

    Args:
        response: the model's full response.
        answer: the gold answer: a value (``"\\\\frac{1}{2}"``, ``"60"``) or, for multiple choice,
            a letter or the option text.
        choices: the option texts of a multiple-choice question, in letter order; None otherwise.

    Returns:
        True if the final answer is equivalent to the gold answer.

    Example:
        >>> is_correct("... so the total is \\\\boxed{\\\\frac{6}{4}}", "1.5")
        True
        >>> is_correct("The answer is (B).", "B", ["2", "3", "4"])
        True
    """
    if not isinstance(response, str) or not isinstance(answer, str):
        return False
    try:
        return bool(_grade(response, answer, choices or None))
    except (Exception, TimeoutException):  # noqa: BLE001 - grading must never take a training step down
        log.debug("grading failed", exc_info=True)
        return False
