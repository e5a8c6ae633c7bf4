"""Offline datasets written by a ``predict`` pass: selected trajectories as SFT rows, written so a rerun resumes.

Two passes write them: SOPHIA's offline pass (``lightning-cli predict --config configs/sophia.yaml``,
``SOPHIA.predict_step``: the kept reasoning trajectories) and UnifiedReward-Think's rejection sampling
(``UnifiedRewardThink.predict_step``: the correctly judged pairs, and the wrong ones for GRPO). Every
question of the predict split ends up in one of two JSONL files per rank under ``output_dir``::

    output_dir/rank0.jsonl          kept rows, one SFT row each (read by vlrl.data.Files)
    output_dir/images/<digest>.png  the images those rows point to (relative paths)
    output_dir/unkept/rank0.jsonl   questions with no kept row, with what the pass recorded about them

A kept row is a chat ``messages`` row that ends with the trajectory as the assistant turn (SOPHIA's
with its loss ``weight`` R(y)·w), so ``vlrl.data.SFTDataModule`` over ``Files(output_dir)`` trains on
it as is (``configs/sophia_offline.yaml``); the rest of the row is metadata (every row: ``source_id``, the question's
id; SOPHIA's: ``question``, ``description``, ``visual_reward``, ``visual_rewards``, ``trajectory_tokens``, ...).
``Files`` reads the folder's ``*.jsonl`` only, not its subfolders, so unkept questions never become
training rows.

Each line is written whole with one ``write`` and flushed to disk before the next question, and the
images of a row are saved before the row itself. A rerun reads the ``source_id`` of every line
already written (any rank's file), skips those questions, and first cuts off a last line that an
interruption left incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

KEPT_GLOB = "rank*.jsonl"
UNKEPT_DIR = "unkept"
IMAGES_DIR = "images"
SOURCE_ID = "source_id"


class TrajectoryWriter:
    """Appends a predict pass's records to the files of one rank under ``output_dir``.

    Args:
        output_dir: The folder of the offline dataset (created if missing).
        rank: The process rank; each rank appends to its own files.
    """

    def __init__(self, output_dir: str | Path, rank: int = 0) -> None:
        self.root = Path(output_dir)
        self.kept_path = self.root / f"rank{rank}.jsonl"
        self.unkept_path = self.root / UNKEPT_DIR / f"rank{rank}.jsonl"
        (self.root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self.unkept_path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.kept_path, self.unkept_path):
            drop_incomplete_line(path)
        self.done: set[str] = written_ids(self.root)

    def save_images(self, question_id: str, images: list[Image.Image]) -> list[str]:
        """Save a question's images as PNG files; their paths relative to ``output_dir``."""
        digest = hashlib.sha1(question_id.encode()).hexdigest()[:20]
        paths = []
        for j, image in enumerate(images):
            relative = f"{IMAGES_DIR}/{digest}-{j}.png"
            image.save(self.root / relative)
            paths.append(relative)
        return paths

    def write(self, question_id: str, kept: list[dict[str, Any]], unkept: dict[str, Any] | None) -> None:
        """Record one question: its kept rows, or (if none) its unkept record; then it counts as done."""
        for row in kept:
            append_line(self.kept_path, {**row, SOURCE_ID: question_id})
        if not kept and unkept is not None:
            append_line(self.unkept_path, {**unkept, SOURCE_ID: question_id})
        self.done.add(question_id)


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line, written in one call and synced to disk."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with path.open("a", encoding="utf-8") as file:
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def drop_incomplete_line(path: Path) -> None:
    """Cut ``path`` back to its last newline (an interrupted write leaves a partial last line)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


def written_ids(output_dir: str | Path) -> set[str]:
    """The ``source_id`` of every question already recorded under ``output_dir`` (kept or not, all ranks)."""
    root = Path(output_dir)
    done: set[str] = set()
    for path in [*root.glob(KEPT_GLOB), *(root / UNKEPT_DIR).glob(KEPT_GLOB)]:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    done.add(json.loads(line)[SOURCE_ID])
                except (ValueError, KeyError):
                    continue  # a partial line of another rank, still being written or cut off
    return done
