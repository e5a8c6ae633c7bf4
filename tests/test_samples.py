"""RolloutSamples: the samples page (JSONL + HTML, or a wandb Table), and the VL-Rethinker demo end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from tests.test_grpo import make_data
from vlrl.callbacks import RolloutSamples
from vlrl.callbacks.samples import response_html
from vlrl.cli import main
from vlrl.types import Rollout

REPO = Path(__file__).resolve().parents[1]
TRIGGER = "\n\nWait, does it seem right?"


@pytest.fixture(scope="module")
def batch():
    data = make_data(batch_size=2)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def sample_rollout(batch) -> Rollout:
    """Four samples per prompt; sample 1 was rethought (with ``TRIGGER``) and sample 6 has a hostile text."""
    texts = [f"response {i} <b>" for i in range(8)]
    texts[1] = "x is 3" + TRIGGER + " yes, \\boxed{3}"
    texts[6] = "</td><script>alert(1)</script>"
    rethought = [i == 1 for i in range(8)]
    return Rollout(
        prompts=[None] * 8,  # not read by the callback
        response_ids=torch.zeros(8, 4, dtype=torch.long),
        response_mask=torch.ones(8, 4),
        logprobs=torch.zeros(8, 4),
        texts=texts,
        finish_reasons=["stop"] * 7 + ["length"],
        group_index=torch.arange(2).repeat_interleave(4),
        batch=batch,
        rewards=torch.arange(8).float() / 10,
        reward_components={"accuracy": torch.zeros(8)},
        advantages=torch.arange(8).float() - 3.5,
        facts={
            "rethought": rethought,
            "rethink_trigger": [TRIGGER if r else "" for r in rethought],
            "rethink_trigger_at": [6 if r else -1 for r in rethought],
            "rethink_original": ["x is 3 \\boxed{4}" if r else None for r in rethought],
        },
    )


class Steps:
    """The two trainer attributes the callback reads, for calling it outside a fit."""

    def __init__(self, step: int) -> None:
        self.global_step, self.is_global_zero, self.loggers = step, True, []


def test_page_shows_prompt_image_response_and_the_highlighted_trigger(tmp_path, batch):
    callback = RolloutSamples(every_n_steps=5, max_samples=3, dirpath=str(tmp_path))
    rollout = sample_rollout(batch)
    assert callback.on_advantages_computed(Steps(10), None, rollout) is rollout
    page = (tmp_path / "step_0000010.html").read_text()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]  # the rethought one first, then in order, shown in order
    assert rows[1]["rethought"] and rows[1]["trigger"] == TRIGGER and rows[1]["reward"] == pytest.approx(0.1)
    assert "<mark>\n\nWait, does it seem right?</mark> yes, \\boxed{3}" in page
    assert "original response</summary>x is 3 \\boxed{4}" in page
    assert page.count('src="data:image/png;base64,') == 3 and batch.questions[0] in page
    assert "response 0 &lt;b&gt;" in page  # response text is escaped
    assert 'href="step_0000010.html"' in (tmp_path / "index.html").read_text()

    callback.on_advantages_computed(Steps(11), None, rollout)  # not a multiple of 5: nothing recorded
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3
    callback.max_samples = 8
    callback.on_advantages_computed(Steps(15), None, rollout)
    page = (tmp_path / "step_0000015.html").read_text()
    assert "<script>" not in page and "&lt;/td&gt;&lt;script&gt;" in page
    assert "step_0000010.html" in (tmp_path / "index.html").read_text()


def test_trigger_is_found_when_its_offset_is_off_by_a_space():
    from vlrl.callbacks.samples import SampleRow

    row = SampleRow(0, 0, "a", "s", "q", "3", "x is 3 Wait, sure", 1.0, 0.0, "stop", rethought=True)
    row.trigger, row.trigger_at = " Wait,", 6
    assert response_html(row) == "x is 3<mark> Wait,</mark> sure"


def test_wandb_logger_gets_a_table(tmp_path, batch, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from vlrl.callbacks.samples import log_wandb_table, wandb_rows

    rows = RolloutSamples(max_samples=2).rows(sample_rollout(batch), step=3)
    data = wandb_rows(rows)
    assert all(isinstance(r[2], wandb.Image) for r in data)  # the thumbnails
    assert "<mark>" in data[1][5].html and "<mark>" not in data[0][5].html  # sample 1 is the rethought one
    monkeypatch.setenv("WANDB_MODE", "offline")  # a real wandb run, written to disk, no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="vlrl-test", save_dir=str(tmp_path), offline=True)
    try:
        log_wandb_table(logger, rows)
        run_dir = Path(logger.experiment.dir)
    finally:
        wandb.finish()
    tables = list(run_dir.rglob("samples*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == [
        "step",
        "id",
        "image",
        "question",
        "answer",
        "response",
        "reward",
        "advantage",
        "finish",
        "flags",
    ]
    assert len(table["data"]) == 2 and table["data"][1][-1] == "rethought"


def test_vl_rethinker_demo_runs_with_both_callbacks(tmp_path, monkeypatch):
    """The demo config, shortened to 3 steps: replay and rethinking metrics, a page with a rethought sample."""
    monkeypatch.chdir(tmp_path)  # the config writes under outputs/
    main(["fit", "--config", str(REPO / "configs" / "demo" / "vl_rethinker.yaml"), "--trainer.max_steps", "3"])
    root = tmp_path / "outputs" / "demo" / "vl_rethinker"
    rows = list(csv.DictReader((root / "logs" / "version_0" / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v != ""}
    for key in (
        "replay/buffer_size",
        "replay/replayed_frac",
        "replay/zero_adv_frac",
        "rethink/kept",
        "rethink/selected",
        "reward/invalid_response_penalty",
    ):
        assert key in logged, key
    kept = [float(r["rethink/kept"]) for r in rows if r.get("rethink/kept")]
    assert len(kept) == 3 and all(k > 0 for k in kept)
    sizes = [float(r["replay/buffer_size"]) for r in rows if r.get("replay/buffer_size")]
    assert sizes[-1] > 0
    page = (root / "logs" / "version_0" / "samples" / "step_0000000.html").read_text()
    assert re.search(r"<mark>\s*Wait[^<]*</mark>", page)
    assert (root / "checkpoints" / "last.ckpt").exists()
