"""Model-based answer extraction for evaluation, with the benchmarks' own extraction prompts.

MathVista and MathVerse do not read a response's answer with rules: their evaluation asks a model
(GPT-4 in the papers) to copy the final answer out of the response with a few-shot prompt, and
grades what it copied. ``ModelExtractor`` does the same through any ``Reasoner`` backend
(``HFReasoner``, ``VLLMReasoner``, ``OpenAIReasoner`` in front of ``vllm serve`` or a hosted API),
and ``grade_with_extraction`` uses it the way vlrl's evaluation does: rules first
(``grade_answer(..., mode="benchmark")``), the model only for the responses the rules read no
answer from, and the model's answer graded by the same rules. It is off unless a config names an
extractor; no training reward uses it.

Prompts: ``prompt="mathvista"`` (default) is MathVista's extraction prompt, its five demos followed
by the benchmark's query and the response; ``"mathverse"`` is MathVerse's, six demos and the
response alone (the question is not shown); any other text is a template of one's own with a
``{response}`` and optionally a ``{question}`` placeholder. The demo texts are the benchmarks'
evaluation artifacts, kept verbatim.

Cache: each answer is stored under a hash of the prompt template, the question and the response,
appended as one JSON line to ``cache_dir/rank{r}.jsonl`` (rank ``r`` of the process group, 0
without one) after every batch, and every rank's file is read at the first ``extract``: an
interrupted evaluation, resumed, asks nothing twice. The key does not name the extraction model:
use one ``cache_dir`` per extraction model.

Faults: a row the model gives no readable answer for (``ReasonerError`` for that request, an empty,
``null`` or truncated answer) is ``None`` and counted in ``stats["failures"]``; it is not cached, so
a later run asks again. A whole batch that fails with ``ReasonerError`` is asked again row by row,
so one bad row costs only itself. ``ReasonerUnavailable`` (a server down past its outage budget)
and ``ReasonerStopped`` are raised: the evaluation must stop, not score the rows 0.

Where this departs from the benchmarks' scripts: they use the extractor's text as it is (MathVerse
removes a repeated "Extracted Answer: "); vlrl also drops a ``<think>`` block, a repeated
"Extracted answer:" in any case, and whatever follows the first blank line (a small model that runs
on into the next demo), and reads MathVerse's ``null`` as no answer.

Example (the eval config names it under the evaluation's ``extractor`` key)::

    extractor = ModelExtractor(OpenAIReasoner("http://localhost:8000/v1", "Qwen/Qwen2.5-7B-Instruct"),
                               cache_dir="runs/eval/extraction")
    grades = grade_with_extraction(responses, answers, choices, questions, kwargs, extractor)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from vlrl.rewards.grading import Grade, grade_answer
from vlrl.rewards.reasoners import Reasoner, ReasonerError, ReasonerOutput, ReasonerStopped, ReasonerUnavailable
from vlrl.rollout.base import Sampling

__all__ = [
    "EXTRACTION_PROMPTS",
    "MATHVERSE_PROMPT",
    "MATHVISTA_PROMPT",
    "ModelExtractor",
    "grade_with_extraction",
    "read_extraction",
]

log = logging.getLogger(__name__)

# MathVista's demo prompt, verbatim (pids 852, 104, 824, 506, 540):
# https://github.com/lupantech/MathVista/blob/main/evaluation/prompts/ext_ans.py
MATHVISTA_DEMOS = r"""Please read the following example. Then extract the answer from the model response and type it at the end of the prompt.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: Which number is missing?

Model response: The number missing in the sequence is 14.

Extracted answer: 14

Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.
Question: What is the fraction of females facing the camera?

Model response: The fraction of females facing the camera is 0.6, which means that six out of ten females in the group are facing the camera.

Extracted answer: 0.6

Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.
Question: How much money does Luca need to buy a sour apple candy and a butterscotch candy? (Unit: $)

Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.

Extracted answer: 1.45

Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.
Question: Between which two years does the line  graph saw its maximum peak?

Model response: The line graph saw its maximum peak between 2007 and 2008.

Extracted answer: [2007, 2008]

Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.
Question: What fraction of the shape is blue?
Choices:
(A) 3/11
(B) 8/11
(C) 6/11
(D) 3/5

Model response: The correct answer is (B) 8/11.

Extracted answer: B"""

# MathVerse's demo prompt (``demo_prompt_extract``), verbatim:
# https://github.com/ZrrSkywalker/MathVerse/blob/main/evaluation/prompts.py
MATHVERSE_DEMOS = r"""I am providing you a response from a model to a math problem, termed 'Model Response'. You should extract the answer from the response as 'Extracted Answer'. Directly output the extracted answer with no explanation.

1.
Model response: 'Rounded to two decimal places, the perimeter of the sector is approximately:

(-2, 1)'
Extracted Answer: (-2, 1)

2.
Model response: 'at those points.

Therefore, the correct option that represents the meaning of the intersection points of the graphs is:

D. They give the solutions to the equation $f(t)=g(t)$.",'
Extracted Answer: D

3.
Model response: ' at 1 (there's a closed circle at y = 1), the range in interval notation is \((-4, 1]\).

Final values:
Domain: \((-3, 3]\)
Range: \((-4, 1]\)'
Extracted Answer: Domain: \((-3, 3]\)
Range: \((-4, 1]\)

4.
Model response: 'As it stands, I cannot provide the correct option letter because there isn't enough information to solve for 'y'.'
Extracted Answer: null

5.
Model response: 'Given that AB = 17.6 meters, we can now substitute into the equation:

d = 17.6 / cos(38°)

Therefore, to one decimal place, the distance d between Ned and Bart is approximately 22.3 meters.'
Extracted answer: 22.3

6.
Model response:  have all the coefficients for the quadratic function:
\( f(x) = ax^2 + bx + c \)
\( f(x) = -1x^2 - 2x + 1 \)

Therefore, the equation for the graphed function \( f \) is:
\( f(x) = -x^2 - 2x + 1 \)"'
Extracted answer: f(x) = -x^2 - 2x + 1

7."""

# How each benchmark's script puts the demos, the question and the response together
# (MathVista ``create_test_prompt`` in evaluation/extract_answer.py, MathVerse ``create_test_prompt``
# in evaluation/extract_answer_s1.py).
MATHVISTA_PROMPT = MATHVISTA_DEMOS + "\n\n{question}\n\n{response}\n\nExtracted answer: "
MATHVERSE_PROMPT = MATHVERSE_DEMOS + "\n\nModel response: '{response}'\nExtracted Answer: "
EXTRACTION_PROMPTS: dict[str, str] = {"mathvista": MATHVISTA_PROMPT, "mathverse": MATHVERSE_PROMPT}

_PLACEHOLDER = re.compile(r"\{(question|response)\}")
_REPEATED_LABEL = re.compile(r"^(?:extracted answer\s*:\s*)+", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
THINK_CLOSE = "</think>"


def read_extraction(output: ReasonerOutput) -> str | None:
    """The answer an extraction model gave, or None where it gave none that can be read.

    None for a truncated answer (``finish_reason == "length"``: cut off, not a whole answer), an
    unclosed ``<think>`` block, an empty answer or ``null`` (MathVerse's demos answer ``null`` when
    the response states no answer).

    Examples:
        ``"Extracted answer: 14"`` gives ``"14"``; ``"<think>It says 3.</think>\\n\\n3"`` gives
        ``"3"``; ``"B\\n\\nHint: Please answer ..."`` gives ``"B"``; ``"null"`` gives None.
    """
    if output.finish_reason == "length":
        return None
    text = output.text
    if THINK_CLOSE in text:
        text = text[text.rfind(THINK_CLOSE) + len(THINK_CLOSE) :]
    elif text.lstrip().startswith("<think>"):
        return None
    text = _REPEATED_LABEL.sub("", text.strip())
    text = _BLANK_LINE.split(text, maxsplit=1)[0].strip()
    return None if not text or text.lower() == "null" else text


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ModelExtractor:
    """Reads the final answer out of a response with a model, the way MathVista's and MathVerse's evaluation does.

    (MATH-V's own ``evaluation/evaluate.py`` reads answers by rules only; for it an extractor is an
    option beyond the benchmark, for the responses the rules read nothing from.)

    ``stats`` counts, over the extractor's life: ``requests`` (rows sent to the model), ``cache_hits``
    (rows answered from the cache, a repeat of a row asked in the same call included) and
    ``failures`` (requests that gave no readable answer).

    Args:
        reasoner: The extraction model: an ``HFReasoner``, ``VLLMReasoner`` or ``OpenAIReasoner``.
        prompt: ``"mathvista"`` (MathVista's extraction prompt, its demos + question + response),
            ``"mathverse"`` (MathVerse's, demos + response), or the text of a template with a
            ``{response}`` and optionally a ``{question}`` placeholder.
        cache_dir: Folder of the answer cache (``rank{r}.jsonl`` per rank, every rank's file read);
            None keeps answers in memory only.
        sampling: How the model answers; default greedy, at most 64 new tokens (raise it for a
            reasoning model that thinks first).
        batch_size: Rows per ``generate`` call of the reasoner (the cache is written after each).
    """

    def __init__(
        self,
        reasoner: Reasoner,
        prompt: str = "mathvista",
        cache_dir: str | None = None,
        sampling: Sampling | None = None,
        batch_size: int = 32,
    ) -> None:
        template = EXTRACTION_PROMPTS.get(prompt, prompt)
        if "{response}" not in template:
            raise ValueError(
                f"prompt={prompt[:80]!r} is neither a prompt name ({', '.join(EXTRACTION_PROMPTS)}) nor a template "
                "with a {response} placeholder; name one of them or add {response} (and {question}) to the text"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 rows per reasoner call")
        self.reasoner = reasoner
        self.prompt = template
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.sampling = sampling or Sampling(temperature=0.0, max_new_tokens=64)
        self.batch_size = batch_size
        self.stats: dict[str, int] = {"requests": 0, "cache_hits": 0, "failures": 0}
        self._cache: dict[str, str] | None = None  # read at the first extract, when the rank is known

    def __repr__(self) -> str:
        return f"ModelExtractor({self.reasoner!r}, cache_dir={self.cache_dir and str(self.cache_dir)!r})"

    def setup(self, device: torch.device) -> None:
        """Load the extraction model (``Reasoner.setup``) on ``device`` where that applies."""
        self.reasoner.setup(device)

    def render(self, question: str, response: str) -> str:
        """The prompt for one row: the template with its placeholders filled in one pass."""
        values = {"question": question, "response": response}
        return _PLACEHOLDER.sub(lambda match: values[match.group(1)], self.prompt)

    def key(self, question: str, response: str) -> str:
        """The cache key of one row: a hash of the prompt template, the question and the response."""
        return hashlib.sha256(json.dumps([self.prompt, question, response]).encode()).hexdigest()

    def extract(self, questions: list[str], responses: list[str]) -> list[str | None]:
        """The answer of each response as the model reads it (None where it gave none), in order.

        Args:
            questions: The question of each row as the benchmark poses it (MathVista's ``query``).
            responses: The responses to read the answers from.
        """
        if len(questions) != len(responses):
            raise ValueError(f"extract got {len(questions)} questions for {len(responses)} responses; pass one each")
        cache = self._load()
        keys = [self.key(q, r) for q, r in zip(questions, responses, strict=True)]
        missing: dict[str, tuple[str, str]] = {}
        for key, question, response in zip(keys, questions, responses, strict=True):
            if key not in cache:
                missing.setdefault(key, (question, response))
        self.stats["cache_hits"] += len(keys) - len(missing)
        asked = list(missing.items())
        answers: dict[str, str | None] = {}
        for start in range(0, len(asked), self.batch_size):
            batch = asked[start : start + self.batch_size]
            found = self._ask([self.render(q, r) for _, (q, r) in batch])
            answers.update(zip((key for key, _ in batch), found, strict=True))
            self._store([(key, answer) for (key, _), answer in zip(batch, found, strict=True) if answer is not None])
        return [cache[key] if key in cache else answers[key] for key in keys]

    def _ask(self, prompts: list[str]) -> list[str | None]:
        """One answer per prompt; a batch that fails is asked again row by row."""
        self.stats["requests"] += len(prompts)
        chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
        try:
            outputs: list[ReasonerOutput | None] = list(self.reasoner.generate(chats, self.sampling))
        except (ReasonerUnavailable, ReasonerStopped):
            raise
        except ReasonerError as error:
            if len(chats) == 1:
                log.warning("answer extraction failed for one row: %s", error)
                outputs = [None]
            else:
                log.warning(
                    "answer extraction failed for a batch of %d rows (%s); asking row by row", len(chats), error
                )
                outputs = [self._ask_one(chat) for chat in chats]
        found = [None if output is None else read_extraction(output) for output in outputs]
        self.stats["failures"] += sum(answer is None for answer in found)
        return found

    def _ask_one(self, chat: list[dict[str, Any]]) -> ReasonerOutput | None:
        try:
            return self.reasoner.generate([chat], self.sampling)[0]
        except (ReasonerUnavailable, ReasonerStopped):
            raise
        except ReasonerError as error:
            log.warning("answer extraction failed for one row: %s", error)
            return None

    # ---------------------------------------------------------------------------------- cache
    def _load(self) -> dict[str, str]:
        if self._cache is not None:
            return self._cache
        self._cache, skipped = {}, 0
        for path in sorted(self.cache_dir.glob("rank*.jsonl")) if self.cache_dir is not None else []:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self._cache[record["key"]] = record["answer"]
                except (ValueError, KeyError, TypeError):
                    skipped += line.strip() != ""
        if skipped:
            log.warning(
                "answer cache %s: %d unreadable line(s) skipped (an interrupted write)", self.cache_dir, skipped
            )
        return self._cache

    def _store(self, answers: list[tuple[str, str]]) -> None:
        self._cache.update(answers)
        if self.cache_dir is None or not answers:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"rank{_rank()}.jsonl"
        with path.open("a+b") as file:
            if file.tell() > 0:  # append mode: at the end
                file.seek(-1, 2)
                if file.read(1) != b"\n":  # the last write was cut off: start a new line
                    file.write(b"\n")
            for key, answer in answers:
                file.write(json.dumps({"key": key, "answer": answer}).encode() + b"\n")


def grade_with_extraction(
    responses: list[str],
    answers: list[str],
    choices: list[list[str] | None],
    questions: list[str],
    grading_kwargs: list[dict[str, Any]] | None = None,
    extractor: ModelExtractor | None = None,
) -> list[Grade]:
    """Grade each response in benchmark mode; where the rules read no answer, grade the model's extraction.

    Each row is graded with ``grade_answer(response, answer, choices, mode="benchmark", **kwargs)``.
    The rows the rules read nothing from (``Grade.extracted is None``) go to ``extractor`` in one
    ``extract`` call, and the answer it gives is graded with the same call in place of the response;
    the Grade then holds what the rules read from that answer (else the answer as the model gave it).
    Without an extractor, or where the model gives no answer, the rules' Grade stands.

    Args:
        responses: The model responses.
        answers: The gold answer of each row.
        choices: The option texts of each row (None for a free-form question).
        questions: The question of each row as the benchmark poses it (shown to the extractor).
        grading_kwargs: Per row, further ``grade_answer`` keywords (``answer_type``, ``precision``,
            ``unit``, ``closest_option``; a ``mode`` replaces ``"benchmark"``); None: none.
        extractor: The model extractor; None grades by the rules alone.

    Example:
        With an extraction model that reads "1" from it, ``"The smallest bar in the chart has a value
        of one."`` (gold ``"1"``), which the rules read no number from, grades ``Grade(True, "1")``.
    """
    kwargs = grading_kwargs if grading_kwargs is not None else [{} for _ in responses]
    for name, column in (
        ("answers", answers),
        ("choices", choices),
        ("questions", questions),
        ("grading_kwargs", kwargs),
    ):
        if len(column) != len(responses):
            raise ValueError(f"{name} has {len(column)} rows for {len(responses)} responses; pass one per response")

    def grade(i: int, text: str) -> Grade:
        return grade_answer(text, answers[i], choices[i], **{"mode": "benchmark", **kwargs[i]})

    grades = [grade(i, response) for i, response in enumerate(responses)]
    unread = [i for i, g in enumerate(grades) if g.extracted is None]
    if extractor is None or not unread:
        return grades
    extracted = extractor.extract([questions[i] for i in unread], [responses[i] for i in unread])
    for i, text in zip(unread, extracted, strict=True):
        if text is not None:
            regraded = grade(i, text)
            grades[i] = Grade(regraded.correct, regraded.extracted if regraded.extracted is not None else text)
    return grades
