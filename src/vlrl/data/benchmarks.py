"""Evaluation benchmarks read as released: one source per benchmark, rows in one contract.

Each class reads its benchmark's original release (the JSON/JSONL file with its images folder, where the
benchmark ships one) and its Hugging Face dataset (a Hub id, a downloaded Hub snapshot, a local
``save_to_disk`` folder, or Parquet files), whichever ``path`` names (see ``read_release``)::

    data:
      test:
        class_path: vlrl.data.MathVista
        init_args: {path: data/mathvista/testmini.json}     # or AI4Math/MathVista, or a parquet file

Every row carries (the evaluation reads exactly these names):

- ``id``: the benchmark's own id (MathVista ``pid``, MATH-V ``id``, ...), unique within the source;
- ``data_source``: the benchmark's short name (``mathvista``, ``mathvision``, ``mathverse``, ``wemath``,
  ``mmmu``, ``dynamath``, ``logicvista``, ``vl_rewardbench``) unless the source's ``data_source`` says otherwise;
- ``answer``: the gold answer as the benchmark grades it; for multiple choice the option text where the
  benchmark gives the options as text, else the letter; ``choices``: the option texts in letter order, or None;
- the prompt: with ``prompt: benchmark`` (the default) the row is a chat whose user text is the benchmark's own
  prompt (MathVista's ``query``, MathVerse's ``query_cot``, ...), so the datamodule's ``prompt_template`` does not
  apply and options are not shown twice; with ``prompt: question`` the row gives the raw ``question`` and
  ``choices`` and the datamodule's ``prompt_template`` (the method's template) applies. ``<image1>``-style
  markers are removed from the text in both modes, as ``vlrl.data.prompts`` does; the images come first;
- extras (``PromptBatch.extras``): ``answer_type`` (MathVista's vocabulary ``integer``/``float``/``text``/``list``
  where the benchmark has one, else ``multi_choice`` for multiple choice and ``text`` otherwise), ``precision``
  (decimals, or None), ``unit`` (or None) and ``breakdown``: the fields the benchmark's paper breaks accuracy
  down by (a list value: the row counts in each), e.g. MathVista ``{skill: [...], task, grade, context,
  category, source}``.

A record that lacks a field its benchmark always has, or whose answer names no option, is a bad row
(``DataError`` with file, row and field), failing the run or skipped and counted like any other source's.
``VLRewardBench`` gives preference pairs as ``vlrl.data.PreferencePairs`` judge chats.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import string
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from vlrl.data.errors import DataError, RowLocation
from vlrl.data.preference import PreferencePairs
from vlrl.data.prompts import strip_image_placeholders
from vlrl.data.sources import Files, HFDataset, RawRecord, Source

PromptMode = Literal["benchmark", "question"]
PROMPT_MODES = ("benchmark", "question")


@dataclass
class Item:
    """One benchmark record in the row contract, before images are resolved and the prompt mode applied."""

    id: str
    question: str  # the raw question (may be empty where the whole question is in the image)
    prompt: str  # the benchmark's own prompt text
    answer: Any  # None or "" is reported by the row validation as a missing answer
    images: list[Any] = field(default_factory=list)
    choices: list[str] | None = None
    answer_type: str = "text"
    precision: int | None = None
    unit: str | None = None
    breakdown: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def required(record: dict[str, Any], name: str, where: RowLocation) -> Any:
    """``record[name]``, which the benchmark's release always gives; a ``DataError`` if it is missing or empty."""
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(
            "is missing" if value is None else "is empty",
            f"give every row its '{name}' as the benchmark's release does (is `path` this benchmark's release?)",
            where=where,
            field=name,
            reason="missing_field",
        )
    return value


def option_text(letter: Any, choices: list[str], where: RowLocation, strict: bool = True) -> Any:
    """The text of the option ``letter`` names (``None`` passes through, to be reported as a missing answer).

    Not ``strict``: a gold that is not an option's letter (some releases give the option text, or two letters)
    is kept as given; ``strict``: it is a ``DataError``.
    """
    if letter is None or letter == "":
        return letter
    text = str(letter).strip().upper()
    index = ord(text) - ord("A") if len(text) == 1 else -1
    if 0 <= index < len(choices):
        return choices[index]
    if not strict:
        return letter
    raise DataError(
        f"is {letter!r}, not the letter of one of the {len(choices)} options (A-{string.ascii_uppercase[len(choices) - 1]})",
        "give the gold option's letter as the benchmark's release does",
        where=where,
        field="answer",
        reason="wrong_answer",
    )


def lettered(text: str, marker: str) -> list[str] | None:
    """The options of ``text`` split at ``marker`` (a regex capturing the letter), if they run A, B, C, ...

    >>> lettered("A. 3, 4;B. 4, 3; C. No correct answer", r"(?:^|;)\\s*([A-Z])\\.\\s*")
    ['3, 4', '4, 3', 'No correct answer']
    >>> lettered("(A) yes (C) no", r"(?:^|\\s)\\(([A-Z])\\)\\s*") is None
    True
    """
    parts = re.split(marker, text.strip())
    letters, texts = parts[1::2], [part.strip() for part in parts[2::2]]
    if parts[0].strip() or len(letters) < 2 or letters != list(string.ascii_uppercase[: len(letters)]):
        return None
    return texts


def split_choices(question: str, marker: str) -> tuple[str, list[str] | None]:
    """``question`` cut before its last ``Choices:`` (or ``Choice:``) block, and that block's options; or
    ``question`` unchanged and None where there is no such block.

    >>> split_choices("Which?\\nChoices:\\nA:40°\\nB:60°", r"(?:^|\\n)\\s*([A-Z])\\s*[:.]\\s*")
    ('Which?', ['40°', '60°'])
    """
    heads = list(re.finditer(r"(?i)choices?\s*:", question))
    choices = lettered(question[heads[-1].end() :], marker) if heads else None
    return (question[: heads[-1].start()].rstrip(), choices) if choices else (question, None)


def _precision(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _image(record: dict[str, Any], *names: str) -> list[Any]:
    """The first of the columns ``names`` that holds an image (decoded-image columns first), as a list."""
    for name in names:
        value = record.get(name)
        if value not in (None, ""):
            return [value]
    return []


def _is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")


def read_release(
    path: str | list[str],
    split: str,
    release_files: list[str],
    hub_configs: list[tuple[str | None, str]],
) -> Iterator[tuple[RawRecord, str | None]]:
    """The records of a benchmark wherever ``path`` points, each with its key in a keyed JSON file (else None).

    ``path`` (or each path of a list) is a release ``.json`` file (a list of records, or an object keyed by id),
    a ``.jsonl``/``.parquet`` file or a folder of them (read by ``vlrl.data.Files``), a folder holding one of
    ``release_files`` or written by ``save_to_disk`` (read by ``vlrl.data.HFDataset`` with ``split``), a
    downloaded Hub snapshot (the Parquet shards of ``split`` anywhere under the folder, see ``split_shards``), or
    a Hugging Face Hub id, read once per ``(subset, split)`` of ``hub_configs``.
    """
    for name in [path] if isinstance(path, str) else path:
        local = Path(name).expanduser()
        if local.is_dir():
            saved = HFDataset(str(local), split)
            if saved._local_saved() is not None:
                yield from ((record, None) for record in saved.records())
                continue
            release = next((local / f for f in release_files if (local / f).is_file()), None)
            shards = split_shards(local, split)
            if release is not None:
                local = release
            elif shards:
                yield from ((record, None) for record in Files([str(shard) for shard in shards]).records())
                continue
        if local.is_file() and local.suffix == ".json":
            yield from _json_records(local)
        elif local.exists():
            yield from ((record, None) for record in Files(str(local)).records())
        elif _is_hub_id(name):
            for subset, hub_split in hub_configs:
                yield from ((record, None) for record in HFDataset(name, hub_split, subset).records())
        else:
            raise DataError(
                f"path {local} does not exist",
                "give the benchmark's release file or folder, Parquet files, a `save_to_disk` folder, or a Hugging "
                "Face Hub id (owner/name); relative paths start at the working directory",
                reason="config",
                skippable=False,
            )


def split_shards(folder: Path, split: str) -> list[Path]:
    """The Parquet files of ``split`` in a downloaded Hub snapshot: ``<split>.parquet`` or
    ``<split>-00000-of-00002[-hash].parquet`` anywhere under ``folder`` (e.g. MMMU's ``Math/validation-...``).
    """
    shard = re.compile(rf"{re.escape(split)}(-\d+-of-\d+(-\w+)?)?\.parquet")
    return sorted(path for path in folder.rglob("*.parquet") if shard.fullmatch(path.name))


def _json_records(file: Path) -> Iterator[tuple[RawRecord, str | None]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"{file} is not a readable JSON file ({error})",
            "give the benchmark's release file as downloaded (UTF-8 JSON)",
            reason="config",
            skippable=False,
        ) from error
    if isinstance(data, dict):
        items: list[tuple[str | None, Any]] = [(str(key), value) for key, value in data.items()]
    elif isinstance(data, list):
        items = [(None, value) for value in data]
    else:
        raise DataError(
            f"{file} holds a JSON {type(data).__name__}, not a list of records or an object keyed by id",
            "give the benchmark's release file",
            reason="config",
            skippable=False,
        )
    for number, (key, value) in enumerate(items, start=1):
        yield RawRecord(RowLocation(str(file), number, "row"), value, file.parent), key


class Benchmark(Source):
    """Base of the benchmark sources: reads the release, maps each record through ``item``, checks ids.

    Subclasses set ``benchmark`` (the short name), ``image_roots`` (folders, relative to the data file's,
    tried in order for a relative image path) and implement ``item``, ``release_files`` and ``hub_configs``.

    Args:
        path: the release (file or folder), Parquet files, a ``save_to_disk`` folder or a Hub id.
        split: the split of a Hugging Face dataset (default: the class's ``default_split``, the one papers report).
        prompt: ``benchmark`` (the benchmark's own prompt as a chat) or ``question`` (raw question and
            choices, for the datamodule's ``prompt_template``).
        image_dir: folder that relative image paths are resolved against (default: tried in the data
            file's folder and the benchmark's usual places next to it).
        data_source: ``data_source`` of the rows (default: the benchmark's short name).
        limit: read only the first ``limit`` rows.
    """

    benchmark: ClassVar[str]
    default_split: ClassVar[str]
    image_roots: ClassVar[tuple[str, ...]] = (".",)

    def __init__(
        self,
        path: str | list[str],
        split: str | None = None,
        prompt: PromptMode = "benchmark",
        image_dir: str | None = None,
        data_source: str | None = None,
        limit: int | None = None,
    ) -> None:
        if prompt not in PROMPT_MODES:
            raise ValueError(
                f"prompt={prompt!r} must be 'benchmark' (the benchmark's own prompt) or 'question' (the raw "
                "question and choices, formatted by the datamodule's prompt_template)"
            )
        super().__init__(data_source=data_source, limit=limit)
        self.path = path
        self.split = split or self.default_split
        self.prompt = prompt
        self.image_dir = Path(image_dir).expanduser() if image_dir is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path})"

    def default_name(self) -> str:
        return self.benchmark

    def release_files(self) -> list[str]:
        """Names of the release's data files looked for in a folder given as ``path``."""
        return []

    def hub_configs(self) -> list[tuple[str | None, str]]:
        """The ``(subset, split)`` pairs read from a Hub id."""
        return [(None, self.split)]

    @abstractmethod
    def item(self, record: dict[str, Any], where: RowLocation, key: str | None) -> Item | None:
        """One record of the release in the row contract (None: not selected, e.g. another MathVerse version).

        ``key`` is the record's key in a JSON file keyed by id (None for other forms).
        """

    def records(self) -> Iterator[RawRecord]:
        seen: dict[str, RowLocation] = {}
        for record, key in read_release(self.path, self.split, self.release_files(), self.hub_configs()):
            value = record.value
            if not isinstance(value, DataError):
                try:
                    value = self._row(value, record.where, record.base_dir, key, seen)
                except DataError as error:
                    value = error
                if value is None:
                    continue
            yield RawRecord(record.where, value, record.base_dir)

    def _row(
        self, record: Any, where: RowLocation, base_dir: Path | None, key: str | None, seen: dict[str, RowLocation]
    ) -> dict[str, Any] | None:
        if not isinstance(record, dict):
            raise DataError(
                f"the row is a {type(record).__name__}, not an object with named fields",
                "give the benchmark's release file as downloaded",
                where=where,
                reason="wrong_type",
            )
        item = self.item(record, where, key)
        if item is None:
            return None
        if item.id in seen:
            raise DataError(
                f"is {item.id!r}, the id of {seen[item.id]} too",
                "read each split (or variant) of a benchmark through its own source: benchmark ids must be unique",
                where=where,
                field="id",
                reason="duplicate_id",
            )
        seen[item.id] = where
        images = [self._resolved(image, base_dir) for image in item.images]
        row = {
            "id": item.id,
            "images": images,
            "question": item.question if str(item.question).strip() else item.prompt,
            "answer": item.answer,
            "choices": item.choices,
            "answer_type": item.answer_type,
            "precision": item.precision,
            "unit": item.unit or None,
            "breakdown": {
                name: [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
                for name, value in item.breakdown.items()
                if value not in (None, "", [])
            },
            **item.extras,
        }
        if self.prompt == "benchmark":
            text = {"type": "text", "text": strip_image_placeholders(item.prompt)}
            row["messages"] = [{"role": "user", "content": [*({"type": "image"} for _ in images), text]}]
        return row

    def _resolved(self, image: Any, base_dir: Path | None) -> Any:
        """A relative image path as the first existing one under ``image_dir`` or the ``image_roots``."""
        if not isinstance(image, str) or Path(image).is_absolute() or image.startswith(("http://", "https://")):
            return image
        roots = [self.image_dir] if self.image_dir is not None else [(base_dir or Path()) / r for r in self.image_roots]
        found = next((root / image for root in roots if (root / image).is_file()), roots[0] / image)
        return os.path.abspath(found)  # absolute, so that the row validation does not join it to the folder again


# ------------------------------------------------------------------------------ MathVista

MATHVISTA_HINTS = {
    "multi_choice": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, "
    "at the end.",
    ("float", 1): "Please answer the question requiring a floating-point number with one decimal place and provide "
    "the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    ("float", 2): "Please answer the question requiring a floating-point number with two decimal places and provide "
    "the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Please answer the question requiring a Python list as an answer and provide the final list, e.g., "
    "[1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


def mathvista_query(
    question: str, choices: list[str] | None, unit: str | None, question_type: str, answer_type: str, precision: Any
) -> str:
    """MathVista's zero-shot query (its ``query`` field, as ``evaluation/build_query.py`` writes it).

    >>> print(mathvista_query("What is x?", None, "cm", "free_form", "integer", None))
    Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
    Question: What is x? (Unit: cm)
    """
    if question_type == "multi_choice":
        hint = MATHVISTA_HINTS["multi_choice"]
    else:
        hint = MATHVISTA_HINTS.get((answer_type, _precision(precision)) if answer_type == "float" else answer_type)
    parts = [f"Hint: {hint}" if hint else "", f"Question: {question}" + (f" (Unit: {unit})" if unit else "")]
    if choices:
        parts.append(
            "\n".join(
                ["Choices:", *(f"({letter}) {c}" for letter, c in zip(string.ascii_uppercase, choices, strict=False))]
            )
        )
    return "\n".join(part for part in parts if part).strip()


class MathVista(Benchmark):
    """MathVista (testmini/test): ``testmini.json`` + ``images/``, or the Hugging Face dataset.

    Schema: https://github.com/lupantech/MathVista (``data/testmini.json``, ``evaluation/build_query.py``) and
    https://huggingface.co/datasets/AI4Math/MathVista (adds ``query`` and ``decoded_image``).
    The benchmark prompt is the record's ``query``; the JSON release has none, so it is built as MathVista's
    ``build_query.py`` builds it (zero-shot: hint, question with unit, choices). ``answer`` is the gold as given
    (the option text for multiple choice); ``answer_type``, ``precision`` and ``unit`` are the record's;
    ``breakdown``: ``skill`` (a list), ``task``, ``grade``, ``context``, ``category``, ``source``.

    Args:
        path: ``testmini.json`` (or a folder holding it), Parquet files, a ``save_to_disk`` folder, or
            ``AI4Math/MathVista``.
        split: Hugging Face split (``testmini`` or ``test``); also the JSON file looked for in a folder.
        prompt: ``benchmark`` (MathVista's ``query``) or ``question`` (raw question and choices, for the
            datamodule's ``prompt_template``).
        image_dir: folder the relative image paths (``images/1.jpg``) start from (default: the JSON's folder).
        data_source: ``data_source`` of the rows (default ``mathvista``).
        limit: read only the first ``limit`` rows.
    """

    benchmark = "mathvista"
    default_split = "testmini"

    def release_files(self) -> list[str]:
        return [f"{self.split}.json", f"data/{self.split}.json"]

    def item(self, record: dict[str, Any], where: RowLocation, key: str | None) -> Item:
        question = required(record, "question", where)
        question_type = required(record, "question_type", where)
        answer_type = required(record, "answer_type", where)
        choices = list(record.get("choices") or []) or None
        answer = record.get("answer")
        if choices and answer is not None and answer not in choices:
            raise DataError(
                f"is {answer!r}, not one of the choices {choices}",
                "give the gold option's text, as MathVista's release does",
                where=where,
                field="answer",
                reason="wrong_answer",
            )
        unit, precision = record.get("unit") or None, _precision(record.get("precision"))
        meta = record.get("metadata") or {}
        query = record.get("query") or mathvista_query(question, choices, unit, question_type, answer_type, precision)
        return Item(
            id=str(record.get("pid") or key or required(record, "pid", where)),
            question=question,
            prompt=query,
            answer=answer,
            images=_image(record, "decoded_image", "image"),
            choices=choices,
            answer_type=answer_type,
            precision=precision,
            unit=unit,
            breakdown={
                "skill": list(meta.get("skills") or []),
                **{name: meta.get(name) for name in ("task", "grade", "context", "category", "source")},
            },
            # MathVista's evaluation takes the option nearest to an answer that names none
            extras={"question_type": question_type, "closest_option": bool(choices)},
        )


# ------------------------------------------------------------------------------ MATH-V

MATHV_PROMPT = (
    'Please solve the problem and put your answer in one "\\boxed{{}}". If it is a multiple choice question, only '
    'one letter is allowed in the "\\boxed{{}}".\n{question}\n{options}'
)


class MathVision(Benchmark):
    """MATH-Vision (MATH-V): ``data/test.jsonl`` / ``testmini.jsonl`` + ``images/``, or the Hugging Face dataset.

    Schema: https://github.com/mathllm/MATH-V (``data/*.jsonl``, ``models/GPT4V.py``, ``evaluation/evaluate.py``)
    and https://huggingface.co/datasets/MathLLMs/MathVision (adds ``decoded_image``).
    The benchmark prompt is MATH-V's chain-of-thought prompt: the boxed-answer instruction, the question, then
    the options as ``(A) ...`` lines (left out where the options are just the letters A-E, as in its
    merged-image prompt). ``answer`` is the gold option's text for multiple choice (the letter itself where the
    options are letters), else the gold as given; ``breakdown``: ``subject``, ``level`` ("1".."5").

    Args:
        path: ``test.jsonl``/``testmini.jsonl`` (or the repository/``data`` folder holding them), Parquet files,
            a ``save_to_disk`` folder, or ``MathLLMs/MathVision``.
        split: Hugging Face split (``test`` or ``testmini``); also the JSONL file looked for in a folder.
        prompt: ``benchmark`` (MATH-V's prompt) or ``question`` (raw question and options, for the
            datamodule's ``prompt_template``).
        image_dir: folder the relative image paths (``images/4.jpg``) start from (default: the JSONL's folder,
            else its parent, as in the repository layout).
        data_source: ``data_source`` of the rows (default ``mathvision``).
        limit: read only the first ``limit`` rows.
    """

    benchmark = "mathvision"
    image_roots = (".", "..")
    default_split = "test"

    def release_files(self) -> list[str]:
        return [f"{self.split}.jsonl", f"data/{self.split}.jsonl"]

    def item(self, record: dict[str, Any], where: RowLocation, key: str | None) -> Item:
        question = required(record, "question", where)
        options = [str(option) for option in record.get("options") or []]
        shown = "" if "".join(options) == string.ascii_uppercase[: len(options)] else options
        lines = "".join(f"({letter}) {text}\n" for letter, text in zip(string.ascii_uppercase, shown, strict=False))
        answer = record.get("answer")
        return Item(
            id=str(required(record, "id", where)),
            question=question,
            prompt=MATHV_PROMPT.format(question=question, options=lines),
            answer=option_text(answer, options, where) if options else answer,
            images=_image(record, "decoded_image", "image"),
            choices=options or None,
            answer_type="multi_choice" if options else "text",
            breakdown={"subject": record.get("subject"), "level": record.get("level")},
        )


# ------------------------------------------------------------------------------ MathVerse

MATHVERSE_VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only", "Text Only")
_MATHVERSE_CHOICE = r"(?:^|\n)\s*([A-Z])\s*[:：.]\s*"


def _version_name(text: str) -> str | None:
    wanted = text.replace("_", " ").strip().lower()
    return next((version for version in MATHVERSE_VERSIONS if version.lower() == wanted), None)


class MathVerse(Benchmark):
    """MathVerse (testmini, its problem versions): ``testmini.json`` + images, or the Hugging Face dataset.

    Schema: https://github.com/ZrrSkywalker/MathVerse (``data/testmini*.json``, ``output_templates/``) and
    https://huggingface.co/datasets/AI4Math/MathVerse (subsets ``testmini``, ``testmini_text_only``).
    Each problem comes in versions (Text Dominant, Text Lite, Vision Intensive, Vision Dominant, Vision Only;
    Text Only in ``testmini_text_only``); ``versions`` selects some. ``id`` is ``sample_index`` and the version,
    e.g. ``3421_text_dominant``. The benchmark prompt is ``query_cot`` (``query: wo`` for ``query_wo``). Options
    written into the question (``Choices:\\nA:40°\\nB:60°``) become ``choices`` (and leave the raw question) and
    the gold letter becomes the option text; where the options are only in the image the gold stays a letter.
    ``breakdown``: ``version``, ``subject``, ``subfield``.

    Args:
        path: ``testmini.json`` (or a folder holding it), Parquet files, a ``save_to_disk`` folder, or
            ``AI4Math/MathVerse``.
        split: the subset and split (``testmini`` or ``testmini_text_only``); also the JSON file looked for in
            a folder.
        versions: problem versions to read, by name or as ``text_dominant`` etc. (default all).
        query: which of the benchmark's prompts: ``cot`` (``query_cot``, reason then answer) or ``wo``
            (``query_wo``, answer directly).
        prompt: ``benchmark`` (the benchmark's query) or ``question`` (raw question and options, for the
            datamodule's ``prompt_template``; a question that is all in the image gives its query).
        image_dir: folder the relative image paths (``images_version_1-4/image_685.png``) start from (default:
            the JSON's folder, else its ``images/`` subfolder where ``images.zip`` unpacks).
        data_source: ``data_source`` of the rows (default ``mathverse``).
        limit: read only the first ``limit`` rows (of the selected versions).
    """

    benchmark = "mathverse"
    default_split = "testmini"
    image_roots = (".", "images")

    def __init__(
        self,
        path: str | list[str],
        split: str | None = None,
        versions: list[str] | None = None,
        query: Literal["cot", "wo"] = "cot",
        prompt: PromptMode = "benchmark",
        image_dir: str | None = None,
        data_source: str | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(path, split, prompt, image_dir, data_source, limit)
        if query not in ("cot", "wo"):
            raise ValueError(f"query={query!r} must be 'cot' (query_cot) or 'wo' (query_wo)")
        names = [_version_name(v) for v in versions or MATHVERSE_VERSIONS]
        if versions is not None and (not versions or None in names):
            bad = [v for v, name in zip(versions, names, strict=True) if name is None]
            raise ValueError(
                f"versions={versions} has unknown version(s) {bad}; choose from {list(MATHVERSE_VERSIONS)}"
            )
        self.versions = names
        self.query = query

    def release_files(self) -> list[str]:
        return [f"{self.split}.json", f"data/{self.split}.json"]

    def hub_configs(self) -> list[tuple[str | None, str]]:
        return [(self.split, self.split)]

    def item(self, record: dict[str, Any], where: RowLocation, key: str | None) -> Item | None:
        version = _version_name(str(required(record, "problem_version", where)))
        if version is None:
            raise DataError(
                f"is {record['problem_version']!r}, not a MathVerse version",
                f"use one of {list(MATHVERSE_VERSIONS)}",
                where=where,
                field="problem_version",
                reason="wrong_type",
            )
        if version not in self.versions:
            return None
        raw_question = record.get("question") or ""
        multi_choice = required(record, "question_type", where) == "multi-choice"
        question, choices = split_choices(raw_question, _MATHVERSE_CHOICE) if multi_choice else (raw_question, None)
        answer = record.get("answer")
        meta = record.get("metadata") or {}
        return Item(
            id=f"{required(record, 'sample_index', where)}_{version.lower().replace(' ', '_')}",
            question=question,
            prompt=required(record, f"query_{self.query}", where),
            answer=option_text(answer, choices, where, strict=False) if choices else answer,
            images=_image(record, "image"),
            choices=choices,
            answer_type="multi_choice" if multi_choice else "text",
            breakdown={"version": version, "subject": meta.get("subject"), "subfield": meta.get("subfield")},
            extras={"problem_index": str(record.get("problem_index"))},
        )


# ------------------------------------------------------------------------------ We-Math

WEMATH_PROMPT = (
    "Now, we require you to solve a multiple-choice math question. Please briefly describe your thought process "
    "and provide the final answer(option).\nQuestion: {question}\nOption: {option}\nRegarding the format, please "
    "answer following the template below, and be sure to include two <> symbols:\n"
    "<Thought process>: <<your thought process>> <Answer>: <<your option>>"
)
_WEMATH_CHOICE = r"(?:^|;)\s*([A-Z])[.．]\s*"


class WeMath(Benchmark):
    """We-Math (testmini): ``testmini.json`` + step folders of images, or the Hugging Face dataset.

    Schema: https://github.com/We-Math/We-Math (``data/testmini.json``, ``evaluation/accuracy.py``); prompt as
    in the benchmark's README inference examples. Each problem ``ID`` has one-step sub-problems (``key``
    ``2steps_1``, ``2steps_2``, ...) and the multi-step problem (``2steps_multi``); ``id`` is ``ID:key``. The
    options string (``A. 300;B. 400;...``) becomes ``choices`` and the gold letter its text. ``breakdown``:
    ``knowledge`` (the knowledge concept) and ``steps`` ("1" for a sub-problem, "2"/"3" for a multi-step
    problem: the paper's S1/S2/S3); extras ``problem`` (``ID``) and ``key`` for its four-dimensional metrics.

    Args:
        path: ``testmini.json`` (or a folder holding it), Parquet files, a ``save_to_disk`` folder, or a Hub id.
        split: Hugging Face split (``testmini``); also the JSON file looked for in a folder.
        prompt: ``benchmark`` (We-Math's prompt) or ``question`` (raw question and options, for the
            datamodule's ``prompt_template``).
        image_dir: folder the relative image paths (``2steps/image/1-1.png``) start from (default: the JSON's
            folder).
        data_source: ``data_source`` of the rows (default ``wemath``).
        limit: read only the first ``limit`` rows.
    """

    benchmark = "wemath"
    default_split = "testmini"

    def release_files(self) -> list[str]:
        return [f"{self.split}.json", f"data/{self.split}.json"]

    def item(self, record: dict[str, Any], where: RowLocation, key: str | None) -> Item:
        problem, sub = str(required(record, "ID", where)), str(required(record, "key", where))
        question, option = required(record, "question", where), str(required(record, "option", where))
        choices = lettered(option, _WEMATH_CHOICE)
        steps = problem.split("steps")[0] if sub.endswith("multi") else "1"
        return Item(
            id=f"{problem}:{sub}",
            question=question,
            prompt=WEMATH_PROMPT.format(question=question, option=option),
            answer=option_text(record.get("answer"), choices, where, strict=False) if choices else record.get("answer"),
            images=_image(record, "image", "image_path"),
            choices=choices,
            answer_type="multi_choice",
            breakdown={"knowledge": record.get("knowledge concept"), "steps": steps},
            extras={"problem": problem, "key": sub},
        )


# ------------------------------------------------------------------------------ MMMU

MMMU_DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}
MMMU_SUBJECTS = tuple(subject for subjects in MMMU_DISCIPLINES.values() for subject in subjects)
MMMU_MULTI_CHOICE = "{question}\n\n{options}\n\nAnswer with the option's letter from the given choices directly."
MMMU_OPEN = "{question}\n\nAnswer the question using a single word or phrase."
MMMU_IMAGES = tuple(f"image_{k}" for k in range(1, 8))


class MMMU(Benchmark):
    """MMMU (validation by default; 30 subjects, up to 7 images per question): the Hugging Face dataset.

    Schema: https://huggingface.co/datasets/MMMU/MMMU and https://github.com/MMMU-Benchmark/MMMU
    (``mmmu/utils/data_utils.py``, ``mmmu/configs/llava1.5.yaml``). MMMU ships only the Hugging Face form: a Hub
    id is read once per subject (its configurations); Parquet files or a ``save_to_disk`` folder hold any
    subjects. Images are the non-empty ``image_1`` .. ``image_7`` columns in order; ``<image 1>`` markers are
    removed from the question. The benchmark prompt is MMMU's: the question, the options as ``(A) ...`` lines
    and "Answer with the option's letter from the given choices directly." (open questions: "Answer the
    question using a single word or phrase."). ``answer`` is the gold option's text for multiple choice;
    ``breakdown``: ``subject``, ``subfield``, ``difficulty`` (``topic_difficulty``), ``discipline``.

    Args:
        path: ``MMMU/MMMU``, a downloaded snapshot of it (its ``<Subject>/<split>-*.parquet`` shards), Parquet
            files, or a ``save_to_disk`` folder.
        split: ``validation`` (the split papers report), ``dev`` or ``test`` (no public answers).
        subjects: subjects to read, e.g. ``[Math, Physics]`` (default all 30).
        prompt: ``benchmark`` (MMMU's prompt) or ``question`` (raw question and options, for the datamodule's
            ``prompt_template``).
        data_source: ``data_source`` of the rows (default ``mmmu``).
        limit: read only the first ``limit`` rows.
    """

    benchmark = "mmmu"
    default_split = "validation"

    def __init__(
        self,
        path: str | list[str],
        split: str | None = None,
        subjects: list[str] | None = None,
        prompt: PromptMode = "benchmark",
        data_source: str | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(path, split, prompt, None, data_source, limit)
        unknown = sorted(set(subjects or ()) - set(MMMU_SUBJECTS))
        if subjects is not None and (not subjects or unknown):
            raise ValueError(f"subjects={subjects} has unknown subject(s) {unknown}; choose from {list(MMMU_SUBJECTS)}")
        self.subjects = list(subjects or MMMU_SUBJECTS)

    def hub_configs(self) -> list[tuple[str | None, str]]:
        return [(subject, self.split) for subject in self.subjects]

    def item(self, record: dict[str, Any], where: RowLocation, key: str | None) -> Item | None:
        row_id = str(required(record, "id", where))
        subject = row_id.split("_", 1)[-1].rsplit("_", 1)[0]
        if subject not in self.subjects:
            return None
        question = required(record, "question", where)
        options = record.get("options") or []
        if isinstance(options, str):
            try:
                options = ast.literal_eval(options)
            except (ValueError, SyntaxError) as error:
                raise DataError(
                    f"is {options[:60]!r}, not a list of options ({error})",
                    "give the options as MMMU's release does, a Python list written as a string",
                    where=where,
                    field="options",
                    reason="wrong_type",
                ) from error
        options = [str(option) for option in options]
        multi_choice = required(record, "question_type", where) == "multiple-choice"
        if multi_choice:
            lines = "".join(
                f"({letter}) {text}\n" for letter, text in zip(string.ascii_uppercase, options, strict=False)
            )
            prompt = MMMU_MULTI_CHOICE.format(question=question, options=lines)
        else:
            prompt = MMMU_OPEN.format(question=question)
        discipline = next((d for d, members in MMMU_DISCIPLINES.items() if subject in members), None)
        answer = record.get("answer")
        return Item(
            id=row_id,
            question=question,
            prompt=prompt,
            answer=option_text(answer, options, where) if multi_choice else answer,
            images=[record[name] for name in MMMU_IMAGES if record.get(name) is not None],
            choices=options if multi_choice else None,
            answer_type="multi_choice" if multi_choice else "text",
            breakdown={
                "subject": subject,
                "subfield": record.get("subfield"),
                "difficulty": record.get("topic_difficulty"),
                "discipline": discipline,
            },
        )


# ------------------------------------------------------------------------------ DynaMath

DYNAMATH_GUIDE = (  # the benchmark's text as it is, trailing spaces and its typo included
    "\n## Answer Instruction Please provide an answer to the question outlined above. Your response should adhere \n"
    "to the following JSON format, which includes two keys: 'solution' and 'short answer'. The 'solution' key can "
    "contain \ndetailed steps needed to solve the question, and the 'short answer' key should provide a concise "
    "response. If the problem is a multiple choice problem, just provide the corresponing choice option, \n"
    "such as 'A', 'B', 'C', or 'D'. If the answer is a numerical value, format it as a three-digit floating-point "
    "number.\n\nExample of expected JSON response format:\n\n"
)
DYNAMATH_EXAMPLE = json.dumps(
    {"solution": "[Detailed step-by-step explanation]", "short answer": "[Concise Answer]"}, indent=4
)
DYNAMATH_TYPES = {
    "float": "float",
    "int": "integer",
    "multiple choice": "multi_choice",
    "text": "text",
    "single answer": "text",
}
_DYNAMATH_CHOICE = r"(?:^|\s)\(([A-Z])\)\s*"


class DynaMath(Benchmark):
    """DynaMath (one generated variant of its 501 seed questions): ``dataset.json`` + ``image/``, or Hugging Face.

    Schema: https://github.com/DynaMath/DynaMath (``dataset/dataset.json``, ``evaluation/opensource_json_eval.py``)
    and https://huggingface.co/datasets/DynaMath/DynaMath_Sample (splits ``sample_variant1``..``10``;
    ``ground_truth``, ``knowledge_level``, ``decoded_image``). The benchmark prompt is DynaMath's: "## Question",
    the question (a float question adds "Please answer in a floating-point number."), its JSON answer
    instruction and example. ``answer_type`` maps DynaMath's (``float``, ``int`` -> ``integer``, ``multiple
    choice`` -> ``multi_choice``, ``text``/``single answer`` -> ``text``); a float has ``precision`` 3 (DynaMath
    accepts an error of 0.001). Options written into the question (``Choices: (A) yes (B) no``) become
    ``choices`` and the gold letter their text. ``breakdown``: ``subject``, ``level``; extra ``variant`` (the
    split, for worst-case accuracy over variants: one source per variant, as ids repeat across them).

    Args:
        path: ``dataset.json`` (or a folder holding it), Parquet files, a ``save_to_disk`` folder, or
            ``DynaMath/DynaMath_Sample``.
        split: Hugging Face split, one variant (``sample_variant1`` .. ``sample_variant10``).
        prompt: ``benchmark`` (DynaMath's prompt) or ``question`` (raw question and options, for the
            datamodule's ``prompt_template``).
        image_dir: folder the relative image paths (``image/image1.png``) start from (default: the JSON's folder).
        data_source: ``data_source`` of the rows (default ``dynamath``).
        limit: read only the first ``limit`` rows.
    """

    benchmark = "dynamath"
    default_split = "sample_variant1"

    def release_files(self) -> list[str]:
        return ["dataset.json", "dataset/dataset.json"]

    def item(self, record: dict[str, Any], where: RowLocation, key: str | None) -> Item:
        raw_type = str(required(record, "answer_type", where))
        if raw_type not in DYNAMATH_TYPES:
            raise DataError(
                f"is {raw_type!r}",
                f"use one of DynaMath's answer types {list(DYNAMATH_TYPES)}",
                where=where,
                field="answer_type",
                reason="wrong_type",
            )
        answer_type = DYNAMATH_TYPES[raw_type]
        raw_question = required(record, "question", where)
        question, choices = raw_question, None
        if answer_type == "multi_choice":
            question, choices = split_choices(raw_question, _DYNAMATH_CHOICE)
        answer = record.get("answer", record.get("ground_truth"))
        hint = "Please answer in a floating-point number." if raw_type == "float" else ""
        return Item(
            id=str(key or required(record, "id", where)),
            question=question,
            prompt=f"## Question\n{raw_question}{hint}{DYNAMATH_GUIDE}{DYNAMATH_EXAMPLE}",
            answer=option_text(answer, choices, where, strict=False) if choices else answer,
            images=_image(record, "decoded_image", "image"),
            choices=choices,
            answer_type=answer_type,
            precision=3 if answer_type == "float" else None,
            breakdown={"subject": record.get("subject"), "level": record.get("level", record.get("knowledge_level"))},
            extras={"variant": self.split} if key is None else {},
        )


# ------------------------------------------------------------------------------ LogicVista


class LogicVista(Benchmark):
    """LogicVista (448 visual logic questions): ``data/dataset.json`` + ``data/images/``, or a Hugging Face copy.

    Schema: https://github.com/Yijia-Xiao/LogicVista (``data/dataset.json``, ``data/README.md``). The options
    are in the image or written into the question, so the benchmark prompt is the question itself, ``choices``
    is None and ``answer`` the gold letter(s) as given ("C", or "A, C" where two options are right).
    ``breakdown``: ``skill`` and ``capability`` (the broad capabilities), both lists.

    Args:
        path: ``dataset.json`` (or a folder holding it), Parquet files, a ``save_to_disk`` folder or a Hub id
            with the same fields.
        split: Hugging Face split.
        prompt: ``benchmark`` (the question) or ``question`` (the question for the datamodule's
            ``prompt_template``).
        image_dir: folder the image paths start from (default: the JSON's folder, where ``images/`` is).
        data_source: ``data_source`` of the rows (default ``logicvista``).
        limit: read only the first ``limit`` rows.
    """

    benchmark = "logicvista"
    default_split = "test"

    def release_files(self) -> list[str]:
        return ["dataset.json", "data/dataset.json"]

    def item(self, record: dict[str, Any], where: RowLocation, key: str | None) -> Item:
        question = required(record, "question", where)
        name = record.get("imagename")
        images = [f"images/{name}"] if name else _image(record, "image")
        return Item(
            id=str(key or required(record, "id", where)),
            question=question,
            prompt=question,
            answer=record.get("answer"),
            images=images,
            answer_type="multi_choice",
            breakdown={
                "skill": list(record.get("skill") or []),
                "capability": list(record.get("broad_capability") or []),
            },
        )


# ------------------------------------------------------------------------------ VL-RewardBench

VL_REWARDBENCH_PROMPT = """ You are a highly capable multimodal AI assistant tasked with evaluating answers to visual questions. Please analyze the following image and question, then determine which of the two provided answers is better.

Question: {question}

Answer 1: {answer1}

Answer 2: {answer2}

Please evaluate both answers based on the following criteria:
1. Accuracy: How well does the answer align with the visual information in the image?
2. Completeness: Does the answer fully address all aspects of the question?
3. Clarity: Is the answer easy to understand and well-articulated?
4. Relevance: Does the answer directly relate to the question and the image?

After your evaluation, please:
1. Explain your reasoning for each criterion.
2. Provide an overall judgment on which answer is better (Answer 1 or Answer 2). For example: Overall Judgment: Answer X is better.

Your response should be structured and detailed, demonstrating your understanding of both the visual and textual elements of the task."""  # noqa: E501 - the benchmark's prompt as it is
VL_REWARDBENCH_CATEGORIES = {
    "vlfeedback": "general",
    "wildvision-battle": "general",
    "povid": "hallucination",
    "rlaif-v": "hallucination",
    "rlhf-v": "hallucination",
    "reasoning_tasks": "reasoning",
}


def vl_rewardbench_source(row_id: str) -> str:
    """The dataset a VL-RewardBench pair comes from, read from its id as the benchmark's ``cal.py`` does.

    >>> vl_rewardbench_source("RLAIF-V_12"), vl_rewardbench_source("mathverse_3"), vl_rewardbench_source("x")
    ('rlaif-v', 'reasoning_tasks', 'vlfeedback')
    """
    prefix = re.split(r"[_-]", row_id, maxsplit=1)[0]
    named = {"RLAIF": "rlaif-v", "RLHF": "rlhf-v", "mathverse": "reasoning_tasks", "mmmu": "reasoning_tasks"}
    return named.get(prefix) or {"wildvision": "wildvision-battle", "hallucination": "povid"}.get(prefix, "vlfeedback")


class _VLRewardBenchPairs(Source):
    """VL-RewardBench records as ``PreferencePairs`` pair rows (question, image, two responses, label)."""

    def __init__(self, path: str | list[str], split: str, limit: int | None) -> None:
        super().__init__(limit=limit)
        self.path, self.split = path, split

    def default_name(self) -> str:
        return "vl_rewardbench"

    def records(self) -> Iterator[RawRecord]:
        for record, _ in read_release(self.path, self.split, [], [(None, self.split)]):
            value = record.value
            if isinstance(value, dict):
                try:
                    value = self.pair(value, record.where)
                except DataError as error:
                    value = error
            yield RawRecord(record.where, value, record.base_dir)

    def pair(self, record: dict[str, Any], where: RowLocation) -> dict[str, Any]:
        row_id = str(required(record, "id", where))
        ranking = list(required(record, "human_ranking", where))
        if sorted(ranking) != [0, 1]:
            raise DataError(
                f"is {ranking}, not a ranking of two responses ([0, 1] or [1, 0]; 0 is the better one)",
                "drop tied or unranked pairs; VL-RewardBench ranks each pair",
                where=where,
                field="human_ranking",
                reason="wrong_label",
            )
        source = vl_rewardbench_source(row_id)
        return {
            "id": row_id,
            "question": required(record, "query", where),
            "images": _image(record, "image"),
            "responses": list(required(record, "response", where)),
            "label": ranking.index(0) + 1,
            "task": "understanding",
            "answer_type": "text",
            "precision": None,
            "unit": None,
            "breakdown": {"source": source, "category": VL_REWARDBENCH_CATEGORIES[source]},
            "query_source": record.get("query_source"),
        }


class VLRewardBench(PreferencePairs):
    """VL-RewardBench (1,250 ranked response pairs) for a judge: the Hugging Face dataset, as judge chats.

    Schema: https://huggingface.co/datasets/MMInstruction/VL-RewardBench and
    https://github.com/vl-rewardbench/VL_RewardBench (``prompt.py``, ``cal.py``). Each pair becomes the chat
    ``vlrl.data.PreferencePairs`` makes (the same rows ``UnifiedRewardThink`` trains on): ``answer`` "Answer 1 is
    better" or "Answer 2 is better" from ``human_ranking`` (0 marks the better response), the responses in the
    released order (``swapped_messages`` holds the other order). The benchmark prompt is VL-RewardBench's judge
    prompt; ``question`` uses the ``PreferencePairs`` understanding prompt (the method's). ``breakdown``:
    ``source`` (the dataset, read from the id as ``cal.py`` does) and ``category`` (general / hallucination /
    reasoning, the paper's columns).

    Args:
        path: ``MMInstruction/VL-RewardBench``, its Parquet file(s), or a ``save_to_disk`` folder.
        split: Hugging Face split (``test``).
        prompt: ``benchmark`` (VL-RewardBench's judge prompt) or ``question`` (the judge method's
            understanding prompt).
        system_prompt: text of a system turn before each judging prompt (``None``: none).
        data_source: ``data_source`` of the rows (default ``vl_rewardbench``).
        limit: read only the first ``limit`` pairs.
    """

    def __init__(
        self,
        path: str | list[str],
        split: str = "test",
        prompt: PromptMode = "benchmark",
        system_prompt: str | None = None,
        data_source: str | None = None,
        limit: int | None = None,
    ) -> None:
        if prompt not in PROMPT_MODES:
            raise ValueError(
                f"prompt={prompt!r} must be 'benchmark' (VL-RewardBench's judge prompt) or 'question' (the judge "
                "method's understanding prompt)"
            )
        pairs = _VLRewardBenchPairs(path, split, limit)
        if prompt == "benchmark":
            super().__init__(pairs, understanding_prompt=VL_REWARDBENCH_PROMPT, system_prompt=system_prompt)
        else:
            super().__init__(pairs, system_prompt=system_prompt)
        self.data_source = data_source
        self.prompt = prompt

    def __repr__(self) -> str:
        return f"VLRewardBench({self.source.path})"

    def default_name(self) -> str:
        return "vl_rewardbench"

    def judge_record(self, record: Any, where: RowLocation) -> dict[str, Any]:
        return {**super().judge_record(record, where), "data_source": self.name}
