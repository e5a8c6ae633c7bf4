"""Rollout samples: what the model is writing, as a table of prompt, image, response and reward.

Every ``every_n_steps`` training steps, on the ``on_advantages_computed`` hook (rewards and
advantages known), up to ``max_samples`` samples of the step are recorded on rank 0:

- with a ``WandbLogger``: a ``wandb.Table`` (key ``rollout/samples``) with image thumbnails and the
  response as HTML;
- otherwise: one JSON line per sample appended to ``samples.jsonl`` and a self-contained HTML page
  per step (``step_0000012.html``, thumbnails embedded as base64 PNG) with an ``index.html``
  listing the pages, in ``dirpath`` (default: ``<trainer.log_dir>/samples``).

A rethought sample (``vlrl.callbacks.ForcedRethinking``) shows its trigger highlighted, and its
original response folded under it; a replayed one (``vlrl.callbacks.SelectiveSampleReplay``) is
marked. Rethought samples are picked first, then the others in rollout order. List this callback
before ``SelectiveSampleReplay`` to see the step's samples, after it to see the update batch
(replayed rows carry no image).

Run: ``lightning-cli fit --config configs/demo/vl_rethinker.yaml``, then open
``outputs/demo/vl_rethinker/logs/version_0/samples/index.html``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from vlrl.hooks import RLCallback
from vlrl.types import PromptBatch, Rollout

COLUMNS = ("step", "id", "image", "question", "answer", "response", "reward", "advantage", "finish", "flags")

_STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}
td.text{white-space:pre-wrap;font-family:monospace;max-width:48em}
mark{background:#ffd54f;font-weight:bold}details{color:#666}"""


@dataclass
class SampleRow:
    """One recorded sample."""

    step: int
    index: int  # position in the rollout
    id: str
    data_source: str
    question: str
    answer: str
    response: str
    reward: float
    advantage: float | None
    finish_reason: str
    components: dict[str, float] = field(default_factory=dict)
    rethought: bool = False
    trigger: str = ""
    trigger_at: int = -1
    original: str | None = None  # the response a rethought one replaced
    replayed: bool = False
    thumbnail: str | None = None  # base64 PNG

    @property
    def flags(self) -> str:
        return " ".join(name for name, on in (("rethought", self.rethought), ("replayed", self.replayed)) if on)


class RolloutSamples(RLCallback):
    """Records samples of the rollout (prompt, image, response, reward) every few steps.

    Args:
        every_n_steps: Record every N-th training step, counting from step 0.
        max_samples: Most samples recorded per step (rethought samples first).
        thumbnail_size: Longest side of the image thumbnails, in pixels.
        dirpath: Folder of ``samples.jsonl`` and the HTML pages; default ``<trainer.log_dir>/samples``.
            Not used with a ``WandbLogger``.
    """

    def __init__(
        self, every_n_steps: int = 10, max_samples: int = 16, thumbnail_size: int = 96, dirpath: str | None = None
    ) -> None:
        for key, value in (
            ("every_n_steps", every_n_steps),
            ("max_samples", max_samples),
            ("thumbnail_size", thumbnail_size),
        ):
            if value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.thumbnail_size = thumbnail_size
        self.dirpath = dirpath

    def on_advantages_computed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollout: Rollout) -> Rollout:
        step = trainer.global_step
        if step % self.every_n_steps:
            return rollout
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        folder = None if wandb_loggers else self.folder(trainer)  # on every rank: log_dir is a collective
        if not trainer.is_global_zero or len(rollout) == 0:
            return rollout
        rows = self.rows(rollout, step)
        for lg in wandb_loggers:
            log_wandb_table(lg, rows)
        if folder is not None:
            write_samples(folder, rows)
        return rollout

    def folder(self, trainer: pl.Trainer) -> Path:
        """Where the JSONL and HTML files go."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    def rows(self, rollout: Rollout, step: int) -> list[SampleRow]:
        """The samples to record: rethought ones first, then the rest in rollout order, at most ``max_samples``."""
        rethought = [bool(_fact(rollout, "rethought", i, False)) for i in range(len(rollout))]
        order = sorted(range(len(rollout)), key=lambda i: (not rethought[i], i))[: self.max_samples]
        batch, thumbs = rollout.batch, {}
        rows = []
        for i in sorted(order):
            g = int(rollout.group_index[i])
            if g not in thumbs:
                thumbs[g] = thumbnail(batch.images[g][0], self.thumbnail_size) if batch.images[g] else None
            advantage = None
            if rollout.advantages is not None and rollout.advantages.dim() == 1:
                advantage = float(rollout.advantages[i])
            rows.append(
                SampleRow(
                    step=step,
                    index=i,
                    id=batch.ids[g],
                    data_source=batch.data_sources[g],
                    question=question_of(batch, g),
                    answer=batch.answers[g],
                    response=rollout.texts[i],
                    reward=float(rollout.rewards[i]) if rollout.rewards is not None else float("nan"),
                    advantage=advantage,
                    finish_reason=rollout.finish_reasons[i],
                    components={k: float(v[i]) for k, v in rollout.reward_components.items()},
                    rethought=rethought[i],
                    trigger=_fact(rollout, "rethink_trigger", i, ""),
                    trigger_at=int(_fact(rollout, "rethink_trigger_at", i, -1)),
                    original=_fact(rollout, "rethink_original", i, None),
                    replayed=bool(_fact(rollout, "replayed", i, False)),
                    thumbnail=thumbs[g],
                )
            )
        return rows


def _fact(rollout: Rollout, name: str, i: int, default: Any) -> Any:
    """Sample ``i``'s value of the fact ``name`` (``Rollout.facts``), ``default`` where it is absent or None."""
    values = rollout.facts.get(name)
    return default if values is None or values[i] is None else values[i]


def question_of(batch: PromptBatch, g: int) -> str:
    """The question text of prompt ``g``: the raw question, else the text of the last user turn."""
    if batch.questions and batch.questions[g]:
        return batch.questions[g]
    for message in reversed(batch.messages[g]):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def thumbnail(image: Image.Image, size: int) -> str:
    """``image`` shrunk to fit ``size`` x ``size`` pixels, as a base64 PNG."""
    small = image.convert("RGB")
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def response_html(row: SampleRow) -> str:
    """The response as HTML, with a rethinking trigger highlighted and the original response folded."""
    text, at, trigger = row.response, row.trigger_at, row.trigger
    if row.rethought and 0 <= at <= len(text):
        end = at + len(trigger) if text[at : at + len(trigger)] == trigger else at + len(trigger.strip())
        body = f"{html.escape(text[:at])}<mark>{html.escape(text[at:end])}</mark>{html.escape(text[end:])}"
    else:
        body = html.escape(text)
    if row.original is not None:
        body += f"<details><summary>original response</summary>{html.escape(row.original)}</details>"
    return body


def write_samples(folder: Path, rows: list[SampleRow]) -> Path:
    """Append ``rows`` to ``samples.jsonl``, write their step's HTML page and the index; returns the page."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "samples.jsonl").open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in asdict(row).items() if k != "thumbnail"}) + "\n")
    step = rows[0].step
    page = folder / f"step_{step:07d}.html"
    cells = []
    for row in rows:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in row.components.items())
        values = (  # (html, css class)
            (str(row.step), ""),
            (f"{html.escape(row.id)}<br><small>{html.escape(row.data_source)} #{row.index}</small>", ""),
            (f'<img src="data:image/png;base64,{row.thumbnail}">' if row.thumbnail else "", ""),
            (html.escape(row.question), "text"),
            (html.escape(row.answer), ""),
            (response_html(row), "text"),
            (f"{row.reward:.3f}<br><small>{html.escape(parts)}</small>", ""),
            ("" if row.advantage is None else f"{row.advantage:.3f}", ""),
            (row.finish_reason, ""),
            (row.flags, ""),
        )
        cells.append("<tr>" + "".join(f'<td class="{c}">{v}' if c else f"<td>{v}" for v, c in values) + "</tr>")
    header = "".join(f"<th>{c}" for c in COLUMNS)
    page.write_text(
        f"<!doctype html><meta charset=utf-8><title>samples, step {step}</title><style>{_STYLE}</style>"
        f"<h1>Rollout samples, step {step}</h1><table><tr>{header}</tr>{''.join(cells)}</table>\n",
        encoding="utf-8",
    )
    links = "".join(f'<li><a href="{p.name}">{p.stem}</a>' for p in sorted(folder.glob("step_*.html")))
    (folder / "index.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>rollout samples</title><h1>Rollout samples</h1><ul>{links}</ul>\n",
        encoding="utf-8",
    )
    return page


def wandb_rows(rows: list[SampleRow]) -> list[list]:
    """``rows`` as ``wandb.Table`` data in the order of ``COLUMNS``: thumbnails as images, responses as HTML."""
    import wandb

    data = []
    for row in rows:
        image = wandb.Image(Image.open(io.BytesIO(base64.b64decode(row.thumbnail)))) if row.thumbnail else None
        response = wandb.Html(f"<div style='white-space:pre-wrap'>{response_html(row)}</div>")
        data.append(
            [
                row.step,
                row.id,
                image,
                row.question,
                row.answer,
                response,
                row.reward,
                row.advantage,
                row.finish_reason,
                row.flags,
            ]
        )
    return data


def log_wandb_table(logger: WandbLogger, rows: list[SampleRow]) -> None:
    """Log ``rows`` as a ``wandb.Table`` under ``rollout/samples``."""
    logger.log_table("rollout/samples", columns=list(COLUMNS), data=wandb_rows(rows), step=rows[0].step)
