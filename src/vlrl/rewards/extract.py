"""Final-answer extraction from model responses.

``extract_answer`` looks for, in order of preference:

1. the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched by a scan
   so that nested groups such as ``\\boxed{\\frac{1}{2}}`` come back whole;
2. the content of the last ``<answer>...</answer>`` (an unclosed final ``<answer>`` gives the rest
   of the text);
3. the text after the last "Answer:" / "the answer is" / "final answer is", cut at the end of the
   line or sentence.

A reward that pays for the box alone (``AccuracyReward(boxed_only=True)``: VL-Rethinker, Open
Vision Reasoner) takes step 1 only, through ``extract_boxed``.

Every step is a linear scan, so a 100k-character response costs milliseconds, and nothing here
raises on malformed input: an unbalanced ``\\boxed{`` is skipped in favour of an earlier complete
one or the next fallback.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_boxed", "extract_tagged", "extract_answer_phrase"]

_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape pair, or a structural brace
_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*")
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|correct\s+answer|answer)\s*(?:is|:|=|would\s+be|should\s+be)\s*:?",
    re.IGNORECASE,
)
# A sentence ends at ". ", "! " or "? " (or such a mark at the end), not at a decimal point.
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_MAX_PHRASE_CHARS = 200


def _match_braces(text: str) -> dict[int, int]:
    """Map each ``{`` index to the index of its closing ``}``, in one pass.

    Escaped braces (``\\{``, ``\\}``) are literal characters, not groups. Unclosed ``{`` and stray
    ``}`` are left out of the map.
    """
    matches: dict[int, int] = {}
    stack: list[int] = []
    for token in _BRACE_TOKEN.finditer(text):
        if token.group(0) == "{":
            stack.append(token.start())
        elif token.group(0) == "}" and stack:
            matches[stack.pop()] = token.start()
    return matches


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}``/``\\fbox{}`` in ``text``, or None.

    ``\\boxed 5`` (no braces) gives the following token.

    Example:
        >>> extract_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
        '\\\\frac{1}{2}'
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    matches = _match_braces(text)
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            end = matches.get(start)
            if end is not None:
                return text[start + 1 : end].strip()
        else:
            token = re.match(r"[^\s$}]+", text[start : start + _MAX_PHRASE_CHARS])
            if token:
                return token.group(0)
    return None


def extract_tagged(text: str, tag: str = "answer") -> str | None:
    """The content of the last ``<tag>...</tag>``; an unclosed last ``<tag>`` gives the rest.

    Example:
        >>> extract_tagged("<think>hmm</think><answer> 42 </answer>")
        '42'
    """
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    start = text.rfind(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    content = text[start:] if end < 0 else text[start:end]
    return content.strip() or None


def extract_answer_phrase(text: str) -> str | None:
    """The text after the last "answer is"/"Answer:" phrase, up to the end of line or sentence.

    Example:
        >>> extract_answer_phrase("Adding up, the answer is 3.5 cm. Done.")
        '3.5 cm'
    """
    last = None
    for match in _ANSWER_PHRASE.finditer(text):
        last = match
    if last is None:
        return None
    tail = text[last.end() : last.end() + _MAX_PHRASE_CHARS]
    tail = tail.lstrip()
    line = tail.split("\n", 1)[0]
    if not line.strip() and "\n" in tail:  # "Answer:\n42"
        line = tail.lstrip().split("\n", 1)[0]
    sentence = _SENTENCE_END.search(line)
    if sentence:
        line = line[: sentence.start()]
    answer = _strip_math_delimiters(line.strip().strip("*").rstrip(".,;:").strip())
    return answer or None


def _strip_math_delimiters(text: str) -> str:
    """``$x$``, ``\\(x\\)``, ``\\[x\\]`` -> ``x``; anything else unchanged."""
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            inner = text[len(left) : -len(right)]
            return text if left in inner else inner.strip()
    return text


def extract_answer(text: str) -> str | None:
    """The final answer stated in a response, or None if it states none.

    Args:
        text: a model response.

    Returns:
        The content of the last ``\\boxed{}``, else of the last ``<answer>`` tag, else the text after
        the last "answer is"-style phrase; None if there is none of these.

    Example:
        >>> extract_answer(r"First \\boxed{2}, no: \\boxed{\\frac{3}{4}}")
        '\\\\frac{3}{4}'
        >>> extract_answer("<think>...</think><answer>B</answer>")
        'B'
        >>> extract_answer("So the answer is 12 apples.")
        '12 apples'
    """
    if not isinstance(text, str) or not text:
        return None
    for extractor in (extract_boxed, extract_tagged, extract_answer_phrase):
        answer = extractor(text)
        if answer:
            return answer
    return None
