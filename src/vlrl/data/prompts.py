"""Rows to chat messages: the prompt template, multiple-choice options, image placeholders.

The user turn holds one ``{"type": "image"}`` part per image (images first), then the text
``prompt_template.format(question=..., choices=...)``. The processor's chat template is applied
later, by the policy. Benchmark questions such as MATH-V's mark where an image sits with
``<image1>``; those markers are removed because the image parts already come first.
"""

from __future__ import annotations

import copy
import re
import string
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlrl.types import PromptBatch

_PLACEHOLDER = re.compile(r"\s*<image\s*\d*>")


@dataclass
class Prompt:
    """One row ready for a batch: chat messages and decoded images."""

    id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    answer: str
    choices: list[str] | None
    data_source: str
    extras: dict[str, Any] = field(default_factory=dict)
    question: str = ""  # the raw question text (see ``question_text``)


def check_template_fields(key: str, template: str, required: set[str], optional: set[str] | None = None) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``template`` uses all ``required`` fields and no others.

    The one check of every format-string template in a config: the datamodule's ``prompt_template``,
    the caption reasoner's and the judge's prompts.

    >>> check_template_fields("prompt", "{caption} {question}", {"caption", "question"})
    >>> check_template_fields("prompt", "{caption}", {"caption", "question"})
    Traceback (most recent call last):
    ...
    ValueError: prompt='{caption}' lacks the field(s) ['question']; add them (write a literal brace as {{ or }})
    """
    braces = "write a literal brace as {{ or }}"
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"{key}={template!r} is not a valid format string ({error}); {braces}") from error
    allowed = required | (optional or set())
    unknown = sorted(names - allowed)
    if unknown:
        raise ValueError(
            f"{key}={template!r} uses unknown field(s) {unknown}; the fields are {sorted(allowed)} ({braces})"
        )
    missing = sorted(required - names)
    if missing:
        raise ValueError(f"{key}={template!r} lacks the field(s) {missing}; add them ({braces})")


def strip_image_placeholders(text: str) -> str:
    """Remove ``<image1>``-style markers (and the space before them).

    >>> strip_image_placeholders("How many digits?\\n<image1>")
    'How many digits?'
    """
    return _PLACEHOLDER.sub("", text).strip()


def render_choices(choices: list[str]) -> str:
    """Options as lettered lines; an option that is just its own letter is shown once.

    >>> render_choices(["3", "4"])
    'A. 3\\nB. 4'
    >>> render_choices(["A", "B"])
    'A.\\nB.'
    """
    lines = []
    for letter, choice in zip(string.ascii_uppercase, choices, strict=False):
        text = choice.strip()
        lines.append(f"{letter}." if text == letter else f"{letter}. {text}")
    return "\n".join(lines)


def prompt_text(question: str, choices: list[str] | None, prompt_template: str) -> str:
    """The user text of a question row.

    With ``{choices}`` in the template the lettered options go there; otherwise they are appended to
    the question on their own lines, before the rest of the template.
    """
    question = strip_image_placeholders(question)
    options = render_choices(choices) if choices else ""
    if options and "{choices}" not in prompt_template:
        question = f"{question}\n{options}"
    return prompt_template.format(question=question, choices=options)


def question_text(question: str | None, messages: list[dict[str, Any]] | None) -> str:
    """The raw question of a row (image placeholders removed, no template, no options); for a row
    given as chat messages, the text of its last user turn."""
    if question is not None:
        return strip_image_placeholders(question)
    for message in reversed(messages or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
    return ""


def build_messages(
    question: str | None,
    messages: list[dict[str, Any]] | None,
    num_images: int,
    choices: list[str] | None,
    prompt_template: str = "{question}",
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages of a row: its own ``messages`` as given, else system + user turn from the template."""
    if messages is not None:
        return copy.deepcopy(messages)
    assert question is not None, "validated rows have a question or messages"
    user = [{"type": "image"} for _ in range(num_images)]
    user.append({"type": "text", "text": prompt_text(question, choices, prompt_template)})
    chat = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    chat.append({"role": "user", "content": user})
    return chat


def collate_prompts(prompts: list[Prompt]) -> PromptBatch:
    """Stack prompts into a ``PromptBatch`` (lists, one entry per prompt; images stay PIL)."""
    return PromptBatch(
        ids=[p.id for p in prompts],
        messages=[p.messages for p in prompts],
        images=[p.images for p in prompts],
        answers=[p.answer for p in prompts],
        choices=[p.choices for p in prompts],
        data_sources=[p.data_source for p in prompts],
        extras=[p.extras for p in prompts],
        questions=[p.question for p in prompts],
    )
