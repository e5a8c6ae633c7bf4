"""The embedded visual reasoning task: coloured shapes and digits drawn with PIL, with gold answers.

Six kinds of question, from easy to harder for a tiny VLM that sees a 56x56 image as a handful of
visual tokens (so everything is drawn large, and the harder kinds hinge on coarse layout):

- ``color``    one big shape; "What colour is the shape?" -> red / green / blue / yellow
- ``shape``    one big shape; "What shape is it?" -> circle / square / triangle
- ``position`` one shape in one half; "Is the shape on the left or on the right?" (or top/bottom)
- ``compare``  two shapes of different colours and clearly different sizes; "Which shape is bigger,
               the red one or the blue one?" -> red
- ``count``    1-3 large shapes, each in its own quadrant; "How many shapes are there?" -> 2
- ``add``      two seven-segment digits (1-5), one per half; "What is the sum of the two numbers?" -> 7

With ``text_only`` the same scenes become text rows for a language-only cold start: the question
first describes the picture in words (colours, shapes, places, sizes in pixels, digits), no image
is attached, and a ``response`` field holds step-by-step reasoning that ends in ``\\boxed{answer}``.

Everything is a pure function of ``(seed, split, index)``: the same arguments give byte-identical
images and rows. Splits are disjoint by construction: a drawn scene is assigned to train, val or test
by a hash of its parameters (8:1:1), and each split keeps only the scenes assigned to it, so no
scene can occur in two splits whatever the seeds.

Write the three splits as JSONL + PNG files for inspection (and for the ``Files`` source)::

    python -m vlrl.data.synthetic OUT_DIR [--train-size 2000] [--val-size 200] [--test-size 200] [--text-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

Split = Literal["train", "val", "test"]
SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
DIGIT_COLOUR = (20, 20, 20)
SEGMENTS = {  # seven-segment digits: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle
    0: "abcdef",
    1: "bc",
    2: "abged",
    3: "abgcd",
    4: "fgbc",
    5: "afgcd",
    6: "afgedc",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}

# A scene is a tuple of drawable items, each a plain tuple of str/int so that repr() is stable:
#   ("shape", shape, colour, x0, y0, size)   or   ("digit", digit, x0, y0, width, height)
Item = tuple[Any, ...]
Scene = tuple[tuple[Item, ...], str, str]  # items, question, answer


def _box(rng: random.Random, lo: int, hi: int, size: int) -> int:
    """A random start coordinate so that ``[start, start + size)`` lies within ``[lo, hi)``."""
    return rng.randint(lo, max(lo, hi - size))


def _big_shape(rng: random.Random, s: int) -> Item:
    size = rng.randint(round(0.6 * s), round(0.9 * s))
    return ("shape", rng.choice(SHAPES), rng.choice(list(COLOURS)), _box(rng, 0, s, size), _box(rng, 0, s, size), size)


def _color(rng: random.Random, s: int) -> Scene:
    item = _big_shape(rng, s)
    return (item,), "What colour is the shape?", item[2]


def _shape(rng: random.Random, s: int) -> Scene:
    item = _big_shape(rng, s)
    return (item,), "What shape is it?", item[1]


def _position(rng: random.Random, s: int) -> Scene:
    size = rng.randint(round(0.4 * s), round(0.5 * s))
    side = rng.choice(("left", "right", "top", "bottom"))
    half = s // 2
    near = _box(rng, 0, half, size) if side in ("left", "top") else _box(rng, s - half, s, size)
    far = _box(rng, 0, s, size)
    x0, y0 = (near, far) if side in ("left", "right") else (far, near)
    item = ("shape", rng.choice(SHAPES), rng.choice(list(COLOURS)), x0, y0, size)
    if side in ("left", "right"):
        return (item,), "Is the shape on the left or on the right?", side
    return (item,), "Is the shape at the top or at the bottom?", side


def _compare(rng: random.Random, s: int) -> Scene:
    half = s // 2
    big = rng.randint(round(0.38 * s), round(0.48 * s))
    small = rng.randint(round(0.12 * s), round(0.55 * big))
    colours = rng.sample(list(COLOURS), 2)
    sizes = (big, small) if rng.random() < 0.5 else (small, big)
    items = tuple(
        ("shape", rng.choice(SHAPES), colour, _box(rng, lo, lo + half, size), _box(rng, 0, s, size), size)
        for colour, size, lo in zip(colours, sizes, (0, s - half), strict=True)
    )
    bigger = colours[0] if sizes[0] > sizes[1] else colours[1]
    first, second = rng.sample(colours, 2)
    return items, f"Which shape is bigger, the {first} one or the {second} one?", bigger


def _count(rng: random.Random, s: int) -> Scene:
    half = s // 2
    quadrants = sorted(rng.sample(range(4), rng.randint(1, 3)))
    items = []
    for quadrant in quadrants:
        size = rng.randint(round(0.32 * s), round(0.46 * s))
        x_lo, y_lo = (quadrant % 2) * (s - half), (quadrant // 2) * (s - half)
        x0, y0 = _box(rng, x_lo, x_lo + half, size), _box(rng, y_lo, y_lo + half, size)
        items.append(("shape", rng.choice(SHAPES), rng.choice(list(COLOURS)), x0, y0, size))
    return tuple(items), "How many shapes are there?", str(len(items))


def _add(rng: random.Random, s: int) -> Scene:
    half = s // 2
    width, height = round(0.34 * s), round(0.7 * s)
    digits = (rng.randint(1, 5), rng.randint(1, 5))
    items = tuple(
        ("digit", digit, _box(rng, lo, lo + half, width), _box(rng, 0, s, height), width, height)
        for digit, lo in zip(digits, (0, s - half), strict=True)
    )
    return items, "What is the sum of the two numbers?", str(sum(digits))


KINDS: dict[str, Callable[[random.Random, int], Scene]] = {
    "color": _color,
    "shape": _shape,
    "position": _position,
    "compare": _compare,
    "count": _count,
    "add": _add,
}


def render(items: tuple[Item, ...], image_size: int) -> Image.Image:
    """Draw a scene's items on a white ``image_size`` x ``image_size`` RGB canvas."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in items:
        if item[0] == "shape":
            _, shape, colour, x0, y0, size = item
            _draw_shape(draw, shape, COLOURS[colour], (x0, y0, x0 + size - 1, y0 + size - 1))
        else:
            _, digit, x0, y0, width, height = item
            _draw_digit(draw, digit, x0, y0, width, height, max(2, image_size // 14))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], box: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, x0: int, y0: int, width: int, height: int, t: int) -> None:
    x1, y1, ym = x0 + width - 1, y0 + height - 1, y0 + height // 2
    bars = {
        "a": (x0, y0, x1, y0 + t - 1),
        "b": (x1 - t + 1, y0, x1, ym),
        "c": (x1 - t + 1, ym, x1, y1),
        "d": (x0, y1 - t + 1, x1, y1),
        "e": (x0, ym, x0 + t - 1, y1),
        "f": (x0, y0, x0 + t - 1, ym),
        "g": (x0, ym - t // 2, x1, ym - t // 2 + t - 1),
    }
    for segment in SEGMENTS[digit]:
        draw.rectangle(bars[segment], fill=DIGIT_COLOUR)


def _place(item: Item, s: int) -> str:
    """Where an item's centre lies, in words: "at the top left", "in the middle", ..."""
    _, _, _, x0, y0, size = item
    thirds = ("left", "middle", "right"), ("top", "middle", "bottom")
    column = thirds[0][min(2, 3 * (x0 + size // 2) // s)]
    row = thirds[1][min(2, 3 * (y0 + size // 2) // s)]
    if column == row == "middle":
        return "in the middle"
    if column == "middle":
        return f"at the {row}"
    if row == "middle":
        return f"on the {column}"
    return f"at the {row} {column}"


def _named(item: Item) -> str:
    return f"{item[2]} {item[1]}"


def describe(kind: str, items: tuple[Item, ...], question: str, image_size: int) -> tuple[str, list[str]]:
    """A scene in words, and the reasoning steps that answer its question from those words.

    >>> describe("color", (("shape", "square", "red", 4, 4, 40),), "What colour is the shape?", 56)[0]
    'A 56x56 picture shows a red square in the middle.'
    """
    s = image_size
    head = f"A {s}x{s} picture shows"
    if kind in ("color", "shape"):
        item = items[0]
        steps = [f"There is one shape: a {_named(item)}."]
        steps.append(f"Its colour is {item[2]}." if kind == "color" else f"It is a {item[1]}.")
        return f"{head} a {_named(item)} {_place(item, s)}.", steps
    if kind == "position":
        item = items[0]
        _, _, _, x0, y0, size = item
        axis, value = ("x", x0 + size // 2) if "left" in question else ("y", y0 + size // 2)
        low, high = ("left", "right") if axis == "x" else ("top", "bottom")
        words = f"its centre is at x = {x0 + size // 2}, y = {y0 + size // 2} (x grows to the right, y downwards)"
        side = low if value < s / 2 else high
        relation = "less" if side == low else "more"
        steps = [f"The centre has {axis} = {value}.", f"The middle of the picture is at {s / 2:g}."]
        steps.append(f"{value} is {relation} than {s / 2:g}, so the shape is on the {side} side.")
        return f"{head} a {_named(item)}; {words}.", steps
    if kind == "compare":
        parts = [f"a {_named(i)} {i[5]} pixels wide {_place(i, s)}" for i in items]
        a, b = items
        bigger, smaller = (a, b) if a[5] > b[5] else (b, a)
        steps = [f"The {a[2]} one is {a[5]} pixels wide and the {b[2]} one is {b[5]} pixels wide."]
        steps.append(f"{bigger[5]} > {smaller[5]}, so the {bigger[2]} one is bigger.")
        return f"{head} {parts[0]} and {parts[1]}.", steps
    if kind == "count":
        listed = ", ".join(f"a {_named(i)} {_place(i, s)}" for i in items)
        steps = ["Count them one by one: " + ", ".join(f"{n}. the {_named(i)}" for n, i in enumerate(items, 1)) + "."]
        steps.append(f"That makes {len(items)} shape{'s' if len(items) > 1 else ''}.")
        return f"{head} {listed}.", steps
    left, right = (item[1] for item in items)
    steps = [
        f"The number on the left is {left} and the number on the right is {right}.",
        f"{left} + {right} = {left + right}.",
    ]
    return f"{head} two digits: {left} on the left and {right} on the right.", steps


def _bucket(kind: str, items: tuple[Item, ...], question: str, image_size: int) -> int:
    key = repr((kind, items, question, image_size)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 10


def _scene(split: Split, index: int, seed: int, kind: str, image_size: int) -> Scene:
    """The first scene drawn for ``(seed, split, index)`` whose hash assigns it to ``split``."""
    for attempt in range(1000):
        rng = random.Random(f"vlrl-synthetic/{seed}/{split}/{index}/{attempt}")
        items, question, answer = KINDS[kind](rng, image_size)
        if _bucket(kind, items, question, image_size) in SPLIT_BUCKETS[split]:
            return items, question, answer
    raise RuntimeError(
        f"no {kind} scene for split {split} found; the scene space of image_size={image_size} is too small"
    )


def check_args(split: str, size: int, kinds: list[str] | None, image_size: int) -> list[str]:
    """Validate the task arguments; returns the kinds to draw (all by default)."""
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLIT_BUCKETS)}; pick one of them")
    if size < 0:
        raise ValueError(f"size={size} is negative; give the number of rows to draw")
    if image_size < 28:
        raise ValueError(f"image_size={image_size} is too small to draw on; use 28 or more (default 56)")
    kinds = list(KINDS) if kinds is None else list(kinds)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds={kinds} must be a non-empty list drawn from {list(KINDS)}")
    return kinds


def make_rows(
    split: Split,
    size: int,
    seed: int = 0,
    kinds: list[str] | None = None,
    image_size: int = 56,
    text_only: bool = False,
) -> list[dict[str, Any]]:
    """Draw ``size`` rows of one split; kinds take turns (row ``i`` is of kind ``kinds[i % len(kinds)]``).

    Each row: ``id`` ("<split>-<index>"), ``images`` (one PIL image), ``question``, ``answer`` (a short
    word or number) and ``data_source`` (the kind). With ``text_only`` the same scenes are described
    in words instead: ``images`` is empty, the question starts with the description, and ``response``
    holds the step-by-step reasoning ending in ``\\boxed{answer}`` (ids "<split>-text-<index>").
    """
    kinds = check_args(split, size, kinds, image_size)
    rows = []
    for index in range(size):
        kind = kinds[index % len(kinds)]
        items, question, answer = _scene(split, index, seed, kind, image_size)
        row = {
            "id": f"{split}-{index:05d}",
            "images": [render(items, image_size)],
            "question": question,
            "answer": answer,
            "data_source": kind,
        }
        if text_only:
            description, steps = describe(kind, items, question, image_size)
            reasoning = "\n".join(["Let me think step by step.", *steps])
            row |= {
                "id": f"{split}-text-{index:05d}",
                "images": [],
                "question": f"{description} {question}",
                "response": f"{reasoning}\nSo the answer is \\boxed{{{answer}}}.",
            }
        rows.append(row)
    return rows


def save_split(
    directory: str | Path,
    split: Split,
    size: int,
    seed: int = 0,
    kinds: list[str] | None = None,
    image_size: int = 56,
    text_only: bool = False,
) -> Path:
    """Write one split to ``directory/data.jsonl`` with its images as ``directory/images/<id>.png``.

    Returns the path of the JSONL file (readable with ``Files(path=...)``). Text-only rows have no images.
    """
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    data_file = directory / "data.jsonl"
    with data_file.open("w", encoding="utf-8") as out:
        for row in make_rows(split, size, seed, kinds, image_size, text_only):
            paths = [f"images/{row['id']}.png" for _ in row["images"]]
            for image, image_path in zip(row["images"], paths, strict=True):
                image.save(directory / image_path, format="PNG")
            out.write(json.dumps({**row, "images": paths}) + "\n")
    return data_file


def main(argv: list[str] | None = None) -> None:
    """Write the train, val and test splits under OUT_DIR/{train,val,test}/."""
    parser = argparse.ArgumentParser(prog="python -m vlrl.data.synthetic", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None)
    parser.add_argument("--text-only", action="store_true", help="scenes described in words, with reasoning")
    args = parser.parse_args(argv)
    sizes = {"train": args.train_size, "val": args.val_size, "test": args.test_size}
    for split, size in sizes.items():
        path = save_split(args.out_dir / split, split, size, args.seed, args.kinds, args.image_size, args.text_only)
        print(f"{split}: {size} rows -> {path}")


if __name__ == "__main__":
    main()
