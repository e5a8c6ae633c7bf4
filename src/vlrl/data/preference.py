"""Pairwise preference data for a judge model (UnifiedReward-Think): pairs in, judging prompts out.

A pair row holds a prompt, two candidates and which one is better:

- generation task: ``caption`` (or ``prompt``) and two ``images``; ``label`` "Image 1 is better" or
  "Image 2 is better";
- understanding task: ``question`` (or ``prompt``), zero or more ``images``, two candidate
  answers in ``responses``; ``label`` "Answer 1 is better" or "Answer 2 is better". Instead of
  ``responses`` + ``label`` a row may give ``chosen`` and ``rejected`` (texts, or objects with a
  ``response`` field): their order is then fixed by a hash of the row id, so the better answer is
  first in about half of the pairs.

``task`` (``generation``/``understanding``) may be given; otherwise it is ``understanding`` when
the row has candidate answers and ``generation`` when it has none. ``label`` may also be the
number of the better candidate (1 or 2). Labels are compared after normalising case, whitespace
and surrounding punctuation. A tie ("both are equally good") is not a label: such rows are
rejected like any other bad row. An optional ``response`` field holds a judgement to learn
(cold-start SFT rows); other fields are kept as metadata.

``PreferencePairs`` wraps any source of such rows (``Files``, ``HFDataset``, ``SyntheticPairs``)
and turns each into a chat row for the judge: one user turn with the images and the judging
prompt of its task (both templates are constructor arguments), ``answer`` = the label and
``data_source`` = the task, so accuracy is reported per task kind. A bad pair is reported with its
file, row and field, or skipped and counted (``on_bad_row: skip``), as for any row. The judge chat
works with ``RLDataModule`` (GRPO, evaluation, rejection sampling) and ``SFTDataModule`` (the
``response`` becomes the assistant turn).

Position bias: each chat row also carries ``swapped_messages``, the same judging chat with the
two candidates in the other order (answers swapped in the prompt; for a generation pair the prompt is
the same and the images change places). ``swap_candidates`` turns a batch of pairs into that other
order, with the labels flipped, so a judge can be asked both ways (order-swap evaluation).

``SyntheticPairs`` draws an offline pairwise task from the embedded synthetic renderer, with
templated (not distilled) chain-of-thought judgements in ``response``.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterator
from itertools import islice
from typing import Any, Literal

from vlrl.data.errors import DataError, RowLocation
from vlrl.data.prompts import check_template_fields, prompt_text
from vlrl.data.sources import RawRecord, Source
from vlrl.data.synthetic import COLOURS, SHAPES, SPLIT_BUCKETS, _bucket, check_args, make_rows, render
from vlrl.types import PromptBatch

Task = Literal["generation", "understanding"]
TASKS: tuple[Task, ...] = ("generation", "understanding")
LABELS: dict[str, tuple[str, str]] = {
    "generation": ("Image 1 is better", "Image 2 is better"),
    "understanding": ("Answer 1 is better", "Answer 2 is better"),
}
TEXT_FIELDS = ("caption", "question", "prompt")
OTHER_LABEL: dict[str, str] = {a: b for first, second in LABELS.values() for a, b in ((first, second), (second, first))}
TIE_WORDS = ("tie", "equal", "both", "same", "neither")
_STRIP = string.whitespace + string.punctuation + "“”‘’"

GENERATION_PROMPT = (
    "You are given a caption and two images generated from it, Image 1 and Image 2.\n"
    "Caption: {caption}\n\n"
    "Judge which image matches the caption better. Think it through inside <think> and </think>: for each image, "
    "evaluate semantic consistency with the caption, aesthetics and authenticity, score each dimension from 1 to 10, "
    "and add the scores up to a total score per image. Then give your verdict inside <answer> and </answer>, "
    'exactly "Image 1 is better" or "Image 2 is better".'
)
UNDERSTANDING_PROMPT = (
    "You are given a question about the image and two candidate answers.\n"
    "Question: {question}\n\nAnswer 1: {answer1}\n\nAnswer 2: {answer2}\n\n"
    "Judge which answer is better. Think it through inside <think> and </think>: for each answer, evaluate semantic "
    "accuracy, correctness and clarity, score each dimension from 1 to 10, and add the scores up to a total score "
    "per answer. Then give your verdict inside <answer> and </answer>, exactly "
    '"Answer 1 is better" or "Answer 2 is better".'
)


def normalise_label(text: str) -> str:
    """A verdict in comparable form: lower case, single spaces, no surrounding whitespace or punctuation.

    >>> normalise_label("  **Image 1 is  BETTER.** ")
    'image 1 is better'
    """
    return " ".join(text.split()).strip(_STRIP).lower()


def named_position(verdict: str | None) -> int | None:
    """Which candidate a verdict names: 1, 2, or ``None`` (no verdict, or not one of the labels).

    >>> named_position(" image 2 is BETTER."), named_position("Answer 1 is better"), named_position("both")
    (2, 1, None)
    """
    if verdict is None:
        return None
    text = normalise_label(verdict)
    return next(
        (i + 1 for labels in LABELS.values() for i, label in enumerate(labels) if text == normalise_label(label)), None
    )


def swap_candidates(batch: PromptBatch) -> PromptBatch:
    """The pairs of ``batch`` with their two candidates in the other order and their labels flipped.

    Reads each row's ``swapped_messages`` (``PreferencePairs`` writes it); a generation pair's two
    images change places, an understanding pair keeps its images. Swapping twice gives the batch back.

    Raises:
        ValueError: a row without ``swapped_messages`` (not a ``PreferencePairs`` row).
    """
    extras = batch.extras or [{} for _ in batch.ids]
    missing = [pair_id for pair_id, extra in zip(batch.ids, extras, strict=True) if "swapped_messages" not in extra]
    if missing:
        raise ValueError(
            f"rows {missing[:3]} have no 'swapped_messages', so their candidates cannot be swapped; order-swap "
            "judging needs pair rows read through vlrl.data.PreferencePairs"
        )
    swapped_extras = []
    for extra, messages in zip(extras, batch.messages, strict=True):
        swapped = {**extra, "swapped_messages": messages}
        if "responses" in extra:
            swapped["responses"] = list(extra["responses"])[::-1]
        swapped_extras.append(swapped)
    return PromptBatch(
        ids=list(batch.ids),
        messages=[extra["swapped_messages"] for extra in extras],
        images=[
            list(images)[::-1] if extra.get("task") == "generation" else list(images)
            for images, extra in zip(batch.images, extras, strict=True)
        ],
        answers=[OTHER_LABEL[answer] for answer in batch.answers],
        choices=list(batch.choices),
        data_sources=list(batch.data_sources),
        extras=swapped_extras,
        questions=list(batch.questions),
    )


def pair_label(value: Any, task: Task, where: RowLocation | None = None) -> str:
    """The canonical label of a pair (``LABELS[task][0]`` or ``[1]``) from what a row gives.

    Accepts the label text in any case/spacing/punctuation, or the number of the better candidate.

    Raises:
        DataError: a tie, a label of the other task, or anything else.
    """
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (1, 2):
        return LABELS[task][int(value) - 1]
    text = normalise_label(value) if isinstance(value, str) else ""
    if text in ("1", "2"):
        return LABELS[task][int(text) - 1]
    for label in LABELS[task]:
        if text == normalise_label(label):
            return label
    other = next(t for t in TASKS if t != task)
    expected = f"{LABELS[task][0]!r} or {LABELS[task][1]!r} (or 1 / 2)"
    if any(text == normalise_label(label) for label in LABELS[other]):
        raise DataError(
            f"is {value!r}, a label of the {other} task, but the row is a {task} pair",
            f"label a {task} pair with {expected}, or set 'task' to {other!r} if that is what the row is",
            where=where,
            field="label",
            reason="wrong_label",
        )
    if value == 0 or any(word in text.split() for word in TIE_WORDS):
        raise DataError(
            f"is {value!r}, a tie; a tie is not a label for pairwise training",
            f"drop tied pairs from the data, or label them {expected}",
            where=where,
            field="label",
            reason="tie_label",
        )
    raise DataError(
        f"is {value!r}",
        f"write the label as {expected}",
        where=where,
        field="label",
        reason="missing_label" if value is None else "wrong_label",
    )


def _candidate_text(value: Any, name: str, where: RowLocation) -> str:
    if isinstance(value, dict):
        value = value.get("response")
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"is {_short(value)}, not a non-empty text",
            f"give '{name}' as the candidate's text (or an object with a 'response' text)",
            where=where,
            field=name,
            reason="missing_candidate",
        )
    return value.strip()


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _candidates(record: dict[str, Any], where: RowLocation) -> tuple[list[str] | None, Any]:
    """The two candidate answers (None for a generation pair) and the raw label."""
    if "chosen" in record or "rejected" in record:
        if "responses" in record or record.get("label") is not None:
            raise DataError(
                "has both 'chosen'/'rejected' and 'responses'/'label'",
                "give either 'chosen' and 'rejected', or 'responses' and 'label'",
                where=where,
                field="chosen",
                reason="wrong_type",
            )
        chosen = _candidate_text(record.get("chosen"), "chosen", where)
        rejected = _candidate_text(record.get("rejected"), "rejected", where)
        key = str(record.get("id") if record.get("id") is not None else where).encode()
        chosen_first = hashlib.sha256(key).digest()[0] % 2 == 0
        return ([chosen, rejected], 1) if chosen_first else ([rejected, chosen], 2)
    responses = record.get("responses")
    if responses is None:
        return None, record.get("label")
    if not isinstance(responses, list | tuple) or len(responses) != 2:
        raise DataError(
            f"is {_short(responses)}, not a list of two candidate answers",
            "give 'responses' as [answer 1, answer 2] (ties and single answers are not pairs)",
            where=where,
            field="responses",
            reason="missing_candidate",
        )
    return [_candidate_text(r, "responses", where) for r in responses], record.get("label")


def _prompt_text(record: dict[str, Any], where: RowLocation) -> str:
    given = [name for name in TEXT_FIELDS if record.get(name) is not None]
    if len(given) != 1 or not isinstance(record[given[0]], str) or not record[given[0]].strip():
        problem = f"has {given}" if len(given) > 1 else "is missing or empty"
        raise DataError(
            problem,
            "give exactly one non-empty text: 'caption' (generation pairs), 'question' (understanding pairs) or "
            "'prompt'; map other column names onto them with the inner source's `column_mapping`",
            where=where,
            field="/".join(TEXT_FIELDS),
            reason="missing_question",
        )
    return record[given[0]].strip()


def _task(record: dict[str, Any], has_candidates: bool, where: RowLocation) -> Task:
    task = record.get("task")
    if task is None:
        return "understanding" if has_candidates else "generation"
    if task not in TASKS:
        raise DataError(f"is {task!r}", f"write 'task' as one of {list(TASKS)}", where=where, field="task")
    if (task == "understanding") != has_candidates:
        need = "two candidate answers" if task == "understanding" else "no candidate answers (it compares images)"
        raise DataError(
            f"is {task!r} but the row has {'no' if not has_candidates else 'two'} candidate answers",
            f"an {task} pair has {need}; fix 'task' or the candidates",
            where=where,
            field="task",
            reason="wrong_type",
        )
    return task


class PreferencePairs(Source):
    """Pairwise preference rows of another source, as chat rows for a judge (see the module docstring).

    Args:
        source: Where the pair rows come from (``vlrl.data.Files``, ``vlrl.data.HFDataset``,
            ``vlrl.data.SyntheticPairs``); its ``column_mapping`` and ``limit`` apply first.
        generation_prompt: Judging prompt of a generation pair (two images), with the field
            ``{caption}``; write a literal brace as ``{{`` or ``}}``.
        understanding_prompt: Judging prompt of an understanding pair, with the fields
            ``{question}`` (followed by lettered options for a multiple-choice question),
            ``{answer1}`` and ``{answer2}``.
        system_prompt: Text of a system turn put before each judging prompt (``None``: none).
    """

    def __init__(
        self,
        source: Source,
        generation_prompt: str = GENERATION_PROMPT,
        understanding_prompt: str = UNDERSTANDING_PROMPT,
        system_prompt: str | None = None,
    ) -> None:
        check_template_fields("generation_prompt", generation_prompt, {"caption"})
        check_template_fields("understanding_prompt", understanding_prompt, {"question", "answer1", "answer2"})
        super().__init__()
        self.source = source
        self.generation_prompt = generation_prompt
        self.understanding_prompt = understanding_prompt
        self.system_prompt = system_prompt

    def __repr__(self) -> str:
        return f"PreferencePairs({self.source!r})"

    def default_name(self) -> str:
        return self.source.name

    def records(self) -> Iterator[RawRecord]:
        raw = list(islice(self.source.records(), self.source.limit))
        self.source._check_mapping(raw)
        for record in raw:
            value = record.value
            if not isinstance(value, DataError):
                try:
                    value = self.judge_record(self.source._mapped(value), record.where)
                except DataError as error:
                    value = error
            yield RawRecord(record.where, value, record.base_dir)

    def judge_record(self, record: Any, where: RowLocation) -> dict[str, Any]:
        """One pair row as a schema row: the judging chat, ``answer`` = label, ``data_source`` = task."""
        if not isinstance(record, dict):
            raise DataError(
                f"the row is a {type(record).__name__}, not an object with named fields",
                "write each pair as a JSON object with a prompt, two candidates and a label",
                where=where,
                reason="wrong_type",
            )
        values = dict(record)
        text = _prompt_text(values, where)
        responses, raw_label = _candidates(values, where)
        task = _task(values, responses is not None, where)
        images = values.pop("images", values.pop("image", None))
        images = [] if images is None else list(images) if isinstance(images, list | tuple) else [images]
        if task == "generation" and len(images) != 2:
            raise DataError(
                f"has {len(images)} image(s); a generation pair compares exactly two",
                "give the two candidate images as 'images': [image 1, image 2]",
                where=where,
                field="images",
                reason="image_mismatch",
            )
        label = pair_label(raw_label, task, where)
        choices = values.pop("choices", values.pop("options", None)) or None
        if task == "generation":
            user_texts = [self.generation_prompt.format(caption=text)] * 2  # the images change places instead
        else:
            question = prompt_text(text, choices, "{question}")
            user_texts = [
                self.understanding_prompt.format(question=question, answer1=first, answer2=second)
                for first, second in (responses, responses[::-1])
            ]
        system = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}][
            : bool(self.system_prompt)
        ]
        chats = [
            [*system, {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": t}]}]
            for t in user_texts
        ]
        for name in (*TEXT_FIELDS, "chosen", "rejected", "responses", "label", "task", "messages", "swapped_messages"):
            values.pop(name, None)
        metadata = {"dataset": values.pop("data_source", None), "gold_answer": values.pop("answer", None)}
        return {
            **values,
            **{k: v for k, v in metadata.items() if v is not None},
            "images": images,
            "messages": chats[0],
            "swapped_messages": chats[1],
            "answer": label,
            "data_source": task,
            "task": task,
            "prompt": text,
            "choices": choices,
            **({"responses": responses} if responses is not None else {}),
        }


# ------------------------------------------------------------------------------ synthetic pairs

UNDERSTANDING_KINDS = ("color", "shape", "position", "count")
WRONG_ANSWERS: dict[str, list[str]] = {
    "color": list(COLOURS),
    "shape": list(SHAPES),
    "position": ["left", "right", "top", "bottom"],
    "count": ["1", "2", "3"],
}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _generation_pair(split: str, index: int, seed: int, image_size: int) -> dict[str, Any]:
    """A caption ("a red square") and two drawings, one of them right; the judgement is templated."""
    s = image_size
    for attempt in range(1000):
        rng = random.Random(f"vlrl-pairs/{seed}/{split}/{index}/{attempt}")
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if rng.random() < 0.5:
            wrong = (rng.choice([c for c in COLOURS if c != colour]), shape)
        else:
            wrong = (colour, rng.choice([x for x in SHAPES if x != shape]))
        size = rng.randint(round(0.6 * s), round(0.9 * s))
        x0, y0 = rng.randint(0, s - size), rng.randint(0, s - size)
        items = (("shape", shape, colour, x0, y0, size), ("shape", wrong[1], wrong[0], x0, y0, size))
        caption = f"a {colour} {shape}"
        if _bucket("pair-generation", items, caption, s) in SPLIT_BUCKETS[split]:
            break
    better = 1 if rng.random() < 0.5 else 2
    drawn = items if better == 1 else items[::-1]
    named = [f"a {item[2]} {item[1]}" for item in drawn]
    consistency = [9 if i + 1 == better else 3 for i in range(2)]
    totals = [c + 7 + 8 for c in consistency]
    think = (
        f"Image 1 shows {named[0]}, Image 2 {named[1]}; the caption asks for {caption}. "
        f"Consistency {consistency[0]} vs {consistency[1]}, aesthetics 7 vs 7, authenticity 8 vs 8: "
        f"total {totals[0]} vs {totals[1]}."
    )
    return {
        "id": f"{split}-gen-{index:05d}",
        "task": "generation",
        "caption": caption,
        "images": [render((item,), s) for item in drawn],
        "label": LABELS["generation"][better - 1],
        "response": f"<think>{think}</think>\n<answer>{LABELS['generation'][better - 1]}</answer>",
    }


def _understanding_pairs(split: str, size: int, seed: int, image_size: int, kinds: list[str]) -> list[dict[str, Any]]:
    """Questions of the synthetic task with the right answer and a wrong one; the judgement is templated."""
    if size == 0:
        return []
    scenes = make_rows(split, size, seed, kinds, image_size)
    described = make_rows(split, size, seed, kinds, image_size, text_only=True)
    pairs = []
    for index, (row, text_row) in enumerate(zip(scenes, described, strict=True)):
        rng = random.Random(f"vlrl-pairs/{seed}/{split}/understanding/{index}")
        gold, kind = row["answer"], row["data_source"]
        wrong = OPPOSITE.get(gold) if kind == "position" else rng.choice([a for a in WRONG_ANSWERS[kind] if a != gold])
        better = 1 if rng.random() < 0.5 else 2
        answers = [gold, wrong] if better == 1 else [wrong, gold]
        description = text_row["question"].removesuffix(row["question"]).strip()
        accuracy = [9 if i + 1 == better else 2 for i in range(2)]
        totals = [2 * a + 8 for a in accuracy]
        think = (
            f"{description} So the answer is {gold}. Answer 1 says {answers[0]}, Answer 2 says {answers[1]}. "
            f"Accuracy {accuracy[0]} vs {accuracy[1]}, correctness {accuracy[0]} vs {accuracy[1]}, clarity 8 vs 8: "
            f"total {totals[0]} vs {totals[1]}."
        )
        pairs.append(
            {
                "id": f"{split}-und-{index:05d}",
                "task": "understanding",
                "question": row["question"],
                "images": row["images"],
                "responses": answers,
                "label": LABELS["understanding"][better - 1],
                "response": f"<think>{think}</think>\n<answer>{LABELS['understanding'][better - 1]}</answer>",
            }
        )
    return pairs


def make_pairs(
    split: Literal["train", "val", "test"],
    size: int,
    seed: int = 0,
    tasks: list[str] | None = None,
    image_size: int = 56,
    kinds: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Draw ``size`` pair rows of one split; tasks take turns (row ``i`` is of ``tasks[i % len(tasks)]``).

    Generation pairs: caption "a <colour> <shape>" and two drawings that differ in colour or shape.
    Understanding pairs: a synthetic scene, its question (of the question ``kinds``, taking turns;
    default all of ``UNDERSTANDING_KINDS``), the right and a wrong answer. The better
    candidate is first in about half of the pairs. ``response`` is a templated chain-of-thought
    judgement (per-dimension scores, totals, verdict), not one distilled from a model.
    """
    check_args(split, size, None, image_size)
    tasks = list(TASKS) if tasks is None else list(tasks)
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks={tasks} must be a non-empty list drawn from {list(TASKS)}")
    kinds = check_kinds(kinds)
    count = {t: sum(tasks[i % len(tasks)] == t for i in range(size)) for t in TASKS}
    understanding = iter(_understanding_pairs(split, count["understanding"], seed, image_size, kinds))
    generation = iter(_generation_pair(split, i, seed, image_size) for i in range(count["generation"]))
    return [next(generation if tasks[i % len(tasks)] == "generation" else understanding) for i in range(size)]


def check_kinds(kinds: list[str] | None) -> list[str]:
    """The question kinds of understanding pairs (default all of ``UNDERSTANDING_KINDS``), checked."""
    if kinds is None:
        return list(UNDERSTANDING_KINDS)
    if not kinds or any(k not in UNDERSTANDING_KINDS for k in kinds):
        raise ValueError(f"kinds={kinds} must be a non-empty list drawn from {list(UNDERSTANDING_KINDS)}")
    return list(kinds)


class SyntheticPairs(Source):
    """An offline pairwise preference task drawn from the synthetic renderer (see ``make_pairs``).

    Yields pair rows; wrap it in ``vlrl.data.PreferencePairs`` to get judging prompts. Each row has a
    templated chain-of-thought judgement in ``response`` (cold-start SFT data).

    Args:
        split: Which split to draw; splits never share a scene.
        size: Number of pairs.
        seed: Seed of the drawing (same seed, same pairs).
        tasks: Task kinds to include (default both: ``generation``, ``understanding``).
        image_size: Side of the square images in pixels.
        kinds: Question kinds of the understanding pairs (default all: ``color``, ``shape``,
            ``position``, ``count``).
    """

    def __init__(
        self,
        split: Literal["train", "val", "test"],
        size: int,
        seed: int = 0,
        tasks: list[str] | None = None,
        image_size: int = 56,
        kinds: list[str] | None = None,
    ) -> None:
        super().__init__(data_source="synthetic_pairs")
        check_args(split, size, None, image_size)
        if tasks is not None and (not tasks or any(t not in TASKS for t in tasks)):
            raise ValueError(f"tasks={tasks} must be a non-empty list drawn from {list(TASKS)}")
        self.split, self.size, self.seed, self.tasks, self.image_size = split, size, seed, tasks, image_size
        self.kinds = check_kinds(kinds)

    def __repr__(self) -> str:
        return f"SyntheticPairs({self.split}, size={self.size}, seed={self.seed})"

    def default_name(self) -> str:
        return "synthetic_pairs"

    def records(self) -> Iterator[RawRecord]:
        where = f"synthetic_pairs[{self.split}]"
        for number, row in enumerate(
            make_pairs(self.split, self.size, self.seed, self.tasks, self.image_size, self.kinds), 1
        ):
            yield RawRecord(RowLocation(where, number, "row"), row, None)
