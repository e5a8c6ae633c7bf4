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

__all__ = [
    "all_boxed",
    "extract_answer",
    "extract_answer_phrase",
    "extract_boxed",
    "extract_tagged",
    "extract_unmarked",
    "read_final_answer",
]

_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape pair, or a structural brace
_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*")
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|correct\s+answer|answer)\s*(?:is|:|=|would\s+be|should\s+be)\s*:?",
    re.IGNORECASE,
)
# Benchmark reading also takes "the correct option is", "the final value is", "答案是" ... in the last paragraph.
_WIDE_PHRASE = re.compile(
    r"(?:(?:answer|option(?:\s+letter)?|choice|value|result|solution|number)\s*(?:is|:|=|would\s+be|should\s+be)\s*:?"
    r"|答案(?:选项)?\s*(?:是|为|:)|选项\s*(?:是|为))",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])|(?<![\w.])[-+]?\.\d+")
_PAREN_LETTER = re.compile(r"\(([A-J])\)")
# "... is D", "the choice that matches this is B", "答案:C", "选项B是正确答案", or a letter alone
_FINAL_LETTER = re.compile(r"(?:^|\bis|\boption|\bchoice|:|为|是)\s*\(?([A-J])\)?\s*$|选项\s*\(?([A-J])\)?")
_ECHO = re.compile(r"\n\s*(?:Hint|Question)\s*:")  # a model that goes on to repeat the prompt
_ECHOED_HINT = re.compile(r"\b(?:hint|question)\s*:|e\.g\.", re.IGNORECASE)
_FULL_WIDTH = str.maketrans({"（": "(", "）": ")", "：": ":", "，": ",", "．": "."})
_BARE_ANSWER_CHARS = 40  # a whole response this short, on one line, of few words, is the answer itself
_BARE_ANSWER_WORDS = 3
# A sentence ends at ". ", "! " or "? " (or such a mark at the end), not at a decimal point.
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|。")
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


def all_boxed(text: str) -> list[str]:
    """The contents of every complete ``\\boxed{}``/``\\fbox{}`` in ``text``, in order.

    ``\\boxed 5`` (no braces) gives the following token; an unclosed ``\\boxed{`` is left out.

    Example:
        >>> all_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
        ['1', '\\\\frac{1}{2}']
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return []
    matches = _match_braces(text)
    found = []
    for start in starts:
        if start < len(text) and text[start] == "{":
            end = matches.get(start)
            if end is not None:
                found.append(text[start + 1 : end].strip())
        else:
            token = re.match(r"[^\s$}]+", text[start : start + _MAX_PHRASE_CHARS])
            if token:
                found.append(token.group(0))
    return found


def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}``/``\\fbox{}`` in ``text``, or None.

    Example:
        >>> extract_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
        '\\\\frac{1}{2}'
    """
    boxed = all_boxed(text)
    return boxed[-1] if boxed else None


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
    return _phrase_tail(text, _ANSWER_PHRASE)


def _phrase_tail(text: str, phrase: re.Pattern[str]) -> str | None:
    """The text after the last match of ``phrase``, up to the end of its line or sentence."""
    last = None
    for match in phrase.finditer(text):
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


def _sentences(text: str) -> list[str]:
    """The sentences of ``text`` from the last one back, without echoed prompt hints."""
    pieces = []
    for line in text.splitlines():
        start = 0
        for end in _SENTENCE_END.finditer(line):
            pieces.append(line[start : end.start()])
            start = end.end()
        pieces.append(line[start:])
    return [p.strip() for p in reversed(pieces) if p.strip() and not _ECHOED_HINT.search(p)]


def _named_option(sentence: str, choices: list[str]) -> str | None:
    """The letter or the one option text a sentence names, or None."""
    letters = set(_PAREN_LETTER.findall(sentence))
    final = _FINAL_LETTER.search(sentence.strip().rstrip("*").strip())
    if final:
        letters.add(final.group(1) or final.group(2))
    if len(letters) == 1:
        return letters.pop()
    if letters:
        return None
    named = {
        option
        for option in choices
        if option.strip() and re.search(rf"(?<!\w){re.escape(option.strip())}(?!\w)", sentence, re.IGNORECASE)
    }
    if len(named) > 1:  # "yes" inside "yes, but ..." and "yes": keep the longest, which holds the others
        longest = max(named, key=len)
        named = {longest} if all(o.lower() in longest.lower() for o in named) else named
    return named.pop() if len(named) == 1 else None


def extract_unmarked(text: str, choices: list[str] | None = None, numeric: bool = False) -> str | None:
    """The final answer of a response that does not mark it, as benchmarks' extractors read it.

    A whole response of one short line of at most three words is its own answer. Otherwise the
    sentences are searched from the last one back: for multiple choice (``choices`` given) the first
    that names one ``(B)``-style letter, ends on a letter ("... is D", a letter alone) or names
    exactly one option text (whole words, any case) gives it; for a numeric answer the last number
    of the last sentence holding one; else None.

    Example:
        >>> extract_unmarked("The smallest bar in the chart has a value of 1.", numeric=True)
        '1'
        >>> extract_unmarked("So the squirrels will likely decrease.", ["increase", "decrease"])
        'decrease'
    """
    if not isinstance(text, str) or not text.strip():
        return None
    stripped = _strip_math_delimiters(text.strip().strip("*").rstrip(".").strip())
    if len(stripped) <= _BARE_ANSWER_CHARS and "\n" not in stripped and len(stripped.split()) <= _BARE_ANSWER_WORDS:
        return stripped or None
    for sentence in _sentences(text):
        if choices:
            named = _named_option(sentence, choices)
            if named:
                return named
        elif numeric:
            numbers = _NUMBER.findall(sentence)
            if numbers:
                return numbers[-1]
    return None


def read_final_answer(text: str, choices: list[str] | None = None, numeric: bool = False) -> str | None:
    """The final answer as a benchmark's evaluation reads it: marked answers first, then unmarked ones.

    Full-width brackets and colons are read as ASCII, and a response that goes on to repeat the
    prompt ("Hint: ...", "Question: ...") is read up to the first repetition that follows an answer. Then, in order: ``extract_answer`` (box,
    ``<answer>`` tag, "answer is"), wider phrases in the last paragraph ("the correct option is",
    "the final value is", "答案是"), ``extract_unmarked``.

    Args:
        text: a model response.
        choices: option texts of a multiple-choice question (None otherwise).
        numeric: whether the gold answer is a number (an unmarked answer is then the last number).

    Example:
        >>> read_final_answer("The correct option letter is (B) No.")
        '(B) No'
        >>> read_final_answer("所以答案是A。", ["1", "2"])
        'A'
    """
    if not isinstance(text, str) or not text:
        return None
    text = text.translate(_FULL_WIDTH)
    cuts = [0] + [m.start() for m in _ECHO.finditer(text)] + [len(text)]
    segments = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if text[a:b].strip()]
    if len(segments) > 1:  # the prompt repeated: read the first part that answers (else the first part)
        text = next((segment for segment in segments if extract_answer(segment)), segments[0])
    marked = extract_answer(text)
    if marked:
        return marked
    last_paragraph = re.split(r"\n\s*\n", text.strip())[-1]
    return _phrase_tail(last_paragraph, _WIDE_PHRASE) or extract_unmarked(text, choices, numeric)
