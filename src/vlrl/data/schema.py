"""The row schema every source is read into, and its validation.

A row read from any source is a mapping with these fields (after the source's column mapping):

- ``id`` (str; ints accepted) — default ``"<data_source>:<index>"``;
- ``images`` — a list (or ``image`` — a single value) of file paths relative to the data file's
  folder, encoded bytes, ``{"bytes": ..., "path": ...}`` dicts as Hugging Face / Parquet store them,
  or PIL images; zero or more;
- ``question`` (str) or ``messages`` (a chat list whose ``{"type": "image"}`` parts match the images);
- ``answer`` (str; numbers are converted) — required unless the source says ``require_answer: false``;
- ``choices`` (or ``options``) — option texts of a multiple-choice question;
- ``data_source`` (str) — default the source's name;
- anything else is kept in ``extras`` (method-specific, e.g. the two responses of a preference pair).

``validate_row`` turns such a mapping into a ``Row`` or raises a ``DataError`` naming the file, the
line/row, the field and the fix.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlrl.data.errors import DataError, RowLocation
from vlrl.data.images import ImageRef, probe_image

MAX_CHOICES = len(string.ascii_uppercase)
_ALIASES = {"image": "images", "options": "choices"}


@dataclass
class Row:
    """One validated row. Image data is checked to be complete, but decoded for use only when a batch is built."""

    id: str
    images: list[ImageRef]
    question: str | None  # None when the row gives ``messages``
    messages: list[dict[str, Any]] | None
    answer: str  # "" when the source does not require answers
    choices: list[str] | None
    data_source: str
    extras: dict[str, Any] = field(default_factory=dict)
    where: RowLocation | None = None  # for errors found later (an image changed on disk, a prompt too long)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each image as stored


def validate_row(
    record: Any,
    where: RowLocation,
    *,
    default_id: str,
    default_source: str,
    base_dir: Path | None = None,
    require_answer: bool = True,
) -> Row:
    """Check one record against the schema and return it as a ``Row``.

    Args:
        record: the row as read (a dict, after column mapping).
        where: the file and line/row it came from, for error messages.
        default_id: the id used when the row has none.
        default_source: the ``data_source`` used when the row has none.
        base_dir: the folder relative image paths are resolved against (the data file's folder).
        require_answer: whether a missing or empty ``answer`` is an error.
    """
    if not isinstance(record, dict):
        raise DataError(
            f"the row is a {type(record).__name__}, not an object with named fields",
            'write each row as a JSON object such as {"question": ..., "answer": ...}',
            where=where,
            reason="wrong_type",
        )
    values = _resolve_aliases(record, where)
    images, sizes = _images(values.pop("images", None), where, base_dir)
    given_question = values.pop("question", None)
    question = _question(given_question, where)
    messages = _messages(values.pop("messages", None), len(images), where)
    if question is None and messages is None:
        raise DataError(
            "is empty" if given_question is not None else "is missing (the row has neither 'question' nor 'messages')",
            "add a non-empty 'question' (or a chat 'messages' list), or map your prompt column to "
            "'question' with `column_mapping`",
            where=where,
            field="question",
            reason="missing_question",
        )
    return Row(
        id=_text(values.pop("id", None), "id", where) or default_id,
        images=images,
        question=question,
        messages=messages,
        answer=_answer(values.pop("answer", None), require_answer, where),
        choices=_choices(values.pop("choices", None), where),
        data_source=_text(values.pop("data_source", None), "data_source", where) or default_source,
        extras=values,
        where=where,
        image_sizes=sizes,
    )


def _resolve_aliases(record: dict[str, Any], where: RowLocation) -> dict[str, Any]:
    values = dict(record)
    for alias, name in _ALIASES.items():
        if alias not in values:
            continue
        value = values.pop(alias)
        if values.get(name) is not None and value is not None:
            raise DataError(
                f"the row has both '{alias}' and '{name}'",
                f"keep one of them, e.g. map the other away with `column_mapping: {{{alias}: {alias}_extra}}`",
                where=where,
                field=name,
                reason="wrong_type",
            )
        if values.get(name) is None:
            values[name] = value
    return values


def _wrong_type(name: str, value: Any, expected: str, where: RowLocation) -> DataError:
    return DataError(
        f"is a {type(value).__name__} ({_short(value)}), expected {expected}",
        f"write '{name}' as {expected}",
        where=where,
        field=name,
        reason="wrong_type",
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(value: Any, name: str, where: RowLocation) -> str | None:
    """An optional short string field; ints are accepted (ids are often numbers)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _wrong_type(name, value, "a string", where)
    return value.strip() or None


def _number_text(value: int | float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _answer(value: Any, required: bool, where: RowLocation) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number_text(value)
    if value is not None and not isinstance(value, str):
        raise _wrong_type("answer", value, "a string (or a number)", where)
    answer = (value or "").strip()
    if not answer and required:
        problem = "is missing" if value is None else "is empty"
        raise DataError(
            problem,
            "give every row its gold 'answer' (map the answer column with `column_mapping` if it has "
            "another name), or set `require_answer: false` on the source if this method needs none",
            where=where,
            field="answer",
            reason="missing_answer",
        )
    return answer


def _question(value: Any, where: RowLocation) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _wrong_type("question", value, "a string", where)
    return value if value.strip() else None


def _messages(value: Any, num_images: int, where: RowLocation) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    expected = 'a list of {"role": ..., "content": ...} objects'
    if not isinstance(value, list) or not value:
        raise _wrong_type("messages", value, f"a non-empty {expected}", where)
    image_parts = 0
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _wrong_type("messages", message, expected, where)
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and "type" in part for part in content):
                raise _wrong_type("messages", content, 'content parts like {"type": "text", "text": ...}', where)
            image_parts += sum(part["type"] == "image" for part in content)
        elif not isinstance(content, str):
            raise _wrong_type("messages", content, "content as a string or a list of parts", where)
    if image_parts != num_images:
        raise DataError(
            f"has {image_parts} image part(s) but the row has {num_images} image(s)",
            'put one {"type": "image"} content part in the messages for each image of the row, in order',
            where=where,
            field="messages",
            reason="image_mismatch",
        )
    return value


def _choices(value: Any, where: RowLocation) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise _wrong_type("choices", value, "a list of option texts", where)
    choices = []
    for choice in value:
        if isinstance(choice, (int, float)) and not isinstance(choice, bool):
            choices.append(_number_text(choice))
        elif isinstance(choice, str):
            choices.append(choice)
        else:
            raise _wrong_type("choices", choice, "option texts (strings)", where)
    if len(choices) > MAX_CHOICES:
        raise DataError(
            f"has {len(choices)} options; at most {MAX_CHOICES} can be lettered A-Z",
            "shorten the option list or put the options into the question text",
            where=where,
            field="choices",
            reason="wrong_type",
        )
    return choices or None


def _images(value: Any, where: RowLocation, base_dir: Path | None) -> tuple[list[ImageRef], list[tuple[int, int]]]:
    """The row's image references and the size of each (every image's data checked to be complete)."""
    if value is None:
        return [], []
    items = value if isinstance(value, (list, tuple)) else [value]
    refs = [_image_ref(item, where, base_dir) for item in items]
    return refs, [probe_image(ref, where, "images") for ref in refs]


def _image_ref(item: Any, where: RowLocation, base_dir: Path | None) -> ImageRef:
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            item = item["bytes"]
        elif item.get("path") is not None:
            item = item["path"]
        else:
            raise DataError(
                "has an image entry with neither 'bytes' nor 'path'",
                'give each image as a file path, encoded bytes, or {"bytes": ..., "path": ...}',
                where=where,
                field="images",
                reason="missing_image",
            )
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str) and item.strip():
        if item.startswith(("http://", "https://")):
            raise DataError(
                f"is a URL ({item}); images are not downloaded",
                "download the images and refer to them by file path",
                where=where,
                field="images",
                reason="wrong_type",
            )
        path = Path(item).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return str(path)
    raise _wrong_type("images", item, 'image file paths, bytes or {"bytes", "path"} objects', where)
