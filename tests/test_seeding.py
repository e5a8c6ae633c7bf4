"""Random streams: one per purpose, step and rank, never shared, and the same again after a resume."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlrl.models import resolve_model_path
from vlrl.rollout import HFEngine
from vlrl.seeding import generator, stream_seed

REPO = Path(__file__).resolve().parents[1]
PURPOSES = ["rollout", "eval", "rethinking", "rethinking/continuation", "replay", "reasoner", "descriptions"]


def test_no_two_purposes_steps_or_ranks_share_a_stream():
    seeds = [stream_seed(7, p, step, rank) for p in PURPOSES for step in range(200) for rank in range(64)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**62 for s in seeds)
    # the former formula `seed * 1_000_003 + step * 1009 + rank` (+1 for the continuation) made rank 0's
    # rethinking continuation rank 1's rollout; the derived streams keep them apart
    assert stream_seed(7, "rethinking/continuation", 3, 0) != stream_seed(7, "rollout", 3, 1)
    assert stream_seed(7, "rollout", 3, 1) == stream_seed(7, "rollout", 3, 1)  # a pure function: resumable
    assert stream_seed(7, "rollout") != stream_seed(8, "rollout") != stream_seed(-7, "rollout")
    first, again = generator(1, "replay", 0, 1), generator(1, "replay", 0, 1)
    assert torch.equal(torch.rand(4, generator=first), torch.rand(4, generator=again))
    with pytest.raises(ValueError, match="rank=-1"):
        stream_seed(0, "rollout", 0, -1)


class RecordingEngine(HFEngine):
    """HF generate that records the seed and the sampled tokens of every call, with the step it belongs to."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.module = None

    def generate(self, prompts, sampling, seed=None):
        out = super().generate(prompts, sampling, seed=seed)
        step = self.module.global_step if self.module is not None else -1
        self.calls.append({"step": step, "seed": seed, "tokens": out.response_ids.tolist()})
        return out


DDP_SCRIPT = """
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.test_grpo import make_data, make_module
from tests.test_seeding import RecordingEngine
from vlrl.callbacks import ForcedRethinking, SelectiveSampleReplay

out = Path(sys.argv[1])


class Dump(pl.Callback):
    def __init__(self, engine, replay, tag):
        self.engine, self.replay, self.tag = engine, replay, tag

    def on_train_end(self, trainer, pl_module):
        replay_seed = self.replay._generator.initial_seed() if self.replay._generator is not None else None
        state = {"calls": self.engine.calls, "replay_seed": replay_seed}
        torch.save(state, out / f"rank{trainer.global_rank}-{self.tag}.pt")


for tag, steps, ckpt in (("first", 2, None), ("resumed", 2, out / "ckpt" / "step=1.ckpt")):
    engine = RecordingEngine()
    module = make_module(rollout_engine=engine, seed=3)
    engine.module = module
    rethink = ForcedRethinking(
        fraction=1.0, min_room=0, max_response_tokens=16, min_continuation_tokens=0, require_eos=False, seed=3
    )
    replay = SelectiveSampleReplay(seed=3)
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out,
        callbacks=[rethink, replay, Dump(engine, replay, tag), checkpoint],
    )
    trainer.fit(module, datamodule=make_data(batch_size=2, size=8), ckpt_path=ckpt)
"""


def test_two_ranks_draw_distinct_streams_and_a_resume_draws_them_again(tmp_path):
    """Two CPU processes (gloo DDP), GRPO with forced rethinking and replay: every rollout and rethinking
    call on every rank and step has its own seed; resumed at step 1, step 1 samples the same tokens."""
    script = tmp_path / "ddp_seeds.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    resolve_model_path("tiny:qwen2_5_vl")  # built once here: two ranks building it at once would race
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first = [torch.load(tmp_path / f"rank{r}-first.pt") for r in range(2)]
    resumed = [torch.load(tmp_path / f"rank{r}-resumed.pt") for r in range(2)]

    calls = [c for f in first for c in f["calls"]]
    assert len(calls) == 2 * 2 * 2  # 2 ranks x 2 steps x (rollout + rethinking continuation)
    seeds = [c["seed"] for c in calls] + [f["replay_seed"] for f in first]
    assert None not in seeds and len(set(seeds)) == len(seeds)
    for r in range(2):  # the resumed run made step 1's calls again, with the same seeds and the same samples
        again = [c for c in first[r]["calls"] if c["step"] == 1]
        assert [c["step"] for c in resumed[r]["calls"]] == [1, 1]
        assert resumed[r]["calls"] == again
        assert resumed[r]["replay_seed"] == first[r]["replay_seed"]
