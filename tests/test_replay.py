"""SelectiveSampleReplay: dropping, buffering, priority draws, fill to size, checkpoint/resume, multi-process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.test_grpo import make_data, make_module
from vlrl.algorithms import group_advantages
from vlrl.callbacks import RLCallback, SelectiveSampleReplay
from vlrl.models import resolve_model_path
from vlrl.types import EncodedPrompt, PromptBatch, Rollout

PAD = 99
REPO = Path(__file__).resolve().parents[1]


def toy_rollout(tag: str, advantages: list[float], group_size: int = 4, width: int = 5) -> Rollout:
    """Samples with made-up tokens; response i has ``min(2 + i % 3, width)`` tokens; one small image per prompt."""
    n = len(advantages)
    prompts_n = n // group_size
    encoded = [
        EncodedPrompt(
            token_inputs={"input_ids": torch.tensor([[10 + g, 11, 12]]), "attention_mask": torch.ones(1, 3)},
            media_inputs={"pixel_values": torch.full((4, 6), float(g)), "image_grid_thw": torch.tensor([[1, 2, 2]])},
        )
        for g in range(prompts_n)
    ]
    lengths = [min(2 + i % 3, width) for i in range(n)]
    mask = torch.tensor([[1.0] * k + [0.0] * (width - k) for k in lengths])  # [N, T]
    ids = torch.where(mask.bool(), torch.arange(n * width).view(n, width) % 50, torch.tensor(PAD))
    return Rollout(
        prompts=[p for p in encoded for _ in range(group_size)],
        response_ids=ids,
        response_mask=mask,
        logprobs=-0.5 * mask,
        texts=[f"{tag}-{i}" for i in range(n)],
        finish_reasons=["stop"] * n,
        group_index=torch.arange(prompts_n).repeat_interleave(group_size),
        batch=PromptBatch(
            ids=[f"{tag}-p{g}" for g in range(prompts_n)],
            messages=[
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{g}"}]}]
                for g in range(prompts_n)
            ],
            images=[[] for _ in range(prompts_n)],
            answers=[str(g) for g in range(prompts_n)],
            choices=[None] * prompts_n,
            data_sources=["toy"] * prompts_n,
        ),
        rewards=torch.tensor(advantages),
        reward_components={"acc": torch.tensor(advantages)},
        advantages=torch.tensor(advantages),
    )


# ------------------------------------------------------------------------- Rollout.concat
def test_concat_keeps_each_samples_prompt_and_pads_to_the_widest():
    a = toy_rollout("a", [1.0, 0.0, 0.0, -1.0], width=5)
    b = toy_rollout("b", [0.5, -0.5, 0.5, -0.5, 2.0, 0.0, 0.0, -2.0], width=3)
    b.response_mask[:, :] = 1.0
    b.response_ids[:, :] = 7
    b.loss_mask = b.response_mask.clone()
    b.loss_mask[0, 1] = 0.0
    b.facts["flag"] = [True] * 8
    b.reward_components["extra"] = torch.ones(8)
    out = Rollout.concat([a, b], pad_id=PAD)
    assert len(out) == 12 and out.response_ids.shape == (12, 5)
    assert out.prompts[4] is b.prompts[0] and out.prompts[11] is b.prompts[7]
    assert (out.response_ids[4:, 3:] == PAD).all() and (out.response_mask[4:, 3:] == 0).all()
    assert out.group_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert out.batch.ids == ["a-p0", "b-p0", "b-p1"]
    assert torch.equal(out.loss_mask[:4], a.response_mask) and out.loss_mask[4, 1] == 0
    assert out.facts["flag"] == [None] * 4 + [True] * 8
    assert set(out.reward_components) == {"acc"}  # only the names both have
    assert out.advantages.tolist() == a.advantages.tolist() + b.advantages.tolist()
    assert out.stats is a.stats


def test_concat_refuses_half_computed_fields():
    a, b = toy_rollout("a", [1.0] * 4), toy_rollout("b", [1.0] * 4)
    b.rewards = None
    with pytest.raises(ValueError, match="`rewards` is set in some rollouts"):
        Rollout.concat([a, b], pad_id=PAD)


# ------------------------------------------------------------------------------ the buffer
def test_zero_advantage_samples_are_dropped_and_the_rest_buffered():
    ssr = SelectiveSampleReplay(seed=0)
    first, stats = ssr.reshape(toy_rollout("s0", [0, 0, 0, 0, 1, -1, 0.5, -0.5]), PAD, step=0)
    # empty buffer: the batch is the kept samples, filled with the step's own zero-advantage ones
    assert first.texts == ["s0-4", "s0-5", "s0-6", "s0-7", "s0-0", "s0-1", "s0-2", "s0-3"]
    assert stats["replay/zero_adv_filled"] == 4 and stats["replay/replayed_frac"] == 0
    assert stats["replay/zero_adv_frac"] == 0.5 and stats["replay/zero_adv_group_frac"] == 0.5
    assert [e["text"] for e in ssr.entries] == ["s0-4", "s0-5", "s0-6", "s0-7"]
    assert len(ssr.prompts) == 1  # one encoding shared by the group's samples
    assert ssr.capacity == 32  # 4 x the rollout size

    second, stats = ssr.reshape(toy_rollout("s1", [2, -2, 1, -1, 0, 0, 0, 0]), PAD, step=1)
    assert len(second) == 8 and (second.advantages.abs() > 0).all()  # no zero-advantage sample
    assert second.texts[:4] == ["s1-0", "s1-1", "s1-2", "s1-3"]
    assert all(t.startswith("s0-") for t in second.texts[4:])  # drawn from earlier steps only
    assert second.facts["replayed"] == [False] * 4 + [True] * 4
    assert stats["replay/replayed_frac"] == 0.5 and stats["replay/buffer_size"] == 8
    assert stats["replay/mean_age"] == 1.0


def test_buffer_is_fifo_within_capacity():
    ssr = SelectiveSampleReplay(capacity=6)
    ssr.reshape(toy_rollout("s0", [1, 1, 1, 2, 0, 0, 0, 0]), PAD, step=0)
    ssr.reshape(toy_rollout("s1", [0, 0, 0, 0, 1, 2, 1, 1]), PAD, step=1)
    assert [e["text"] for e in ssr.entries] == ["s0-2", "s0-3", "s1-4", "s1-5", "s1-6", "s1-7"]
    assert len(ssr.prompts) == 2  # s0's prompt still referenced by two samples, s1's by four
    ssr.reshape(toy_rollout("s2", [3, 3, 3, 3, 3, 3, 0, 0]), PAD, step=2)
    assert [e["text"] for e in ssr.entries] == [f"s2-{i}" for i in range(6)]
    assert len(ssr.prompts) == 2  # the two prompts of step 2; older encodings were released


def test_min_abs_advantage_is_the_threshold():
    ssr = SelectiveSampleReplay(min_abs_advantage=0.5)
    out, stats = ssr.reshape(toy_rollout("s0", [0.5, 0.6, -0.7, 0.1, 0, 0, 0, 0]), PAD)
    assert out.texts[:2] == ["s0-1", "s0-2"] and [e["text"] for e in ssr.entries] == ["s0-1", "s0-2"]
    assert stats["replay/zero_adv_frac"] == 0.75


@pytest.mark.parametrize(("value", "size", "mode"), [(-0.1, 8, "std"), (0.7, 16, "std"), (1.1, 16, "mean")])
def test_a_group_of_equal_rewards_is_dropped(value, size, mode):
    # Group 0: every reward equal (−0.1 is VL-Rethinker's invalid-response penalty); group 1: mixed.
    # float32 rounding once gave group 0 advantages of +0.0074 (−0.1 x8) or ±0.106 (0.7 x16), so the
    # replay kept the whole uninformative group and reported zero_adv_frac 0.
    rollout = toy_rollout("s0", [0.0] * 2 * size, group_size=size)
    rollout.rewards = torch.tensor([value] * size + [1.0, 0.0] * (size // 2))  # [2 * size]
    rollout.advantages = group_advantages(rollout.rewards, rollout.group_index, mode=mode)  # [2 * size]
    ssr = SelectiveSampleReplay(seed=0)
    out, stats = ssr.reshape(rollout, PAD, step=0)
    assert stats["replay/zero_adv_frac"] == 0.5 and stats["replay/zero_adv_group_frac"] == 0.5
    group_1 = [f"s0-{i}" for i in range(size, 2 * size)]
    assert out.texts[:size] == group_1 and [e["text"] for e in ssr.entries] == group_1  # kept and buffered
    assert stats["replay/zero_adv_filled"] == size  # the empty buffer's batch is filled with group 0


def test_the_replay_and_the_metric_share_one_zero_rule():
    # Groups: all 0 | one tiny but real advantage (1e-9) | mixed. Zero groups: only the first, 1 of 3
    # (the metric once counted |A| < 1e-8 as zero, 2 of 3, where the replay kept the 1e-9 sample).
    rollout = toy_rollout("s0", [0, 0, 0, 0, 1e-9, 0, 0, 0, 1, -1, 0, 0])
    _, stats = SelectiveSampleReplay(seed=0).reshape(rollout, PAD, step=0)
    assert stats["replay/zero_adv_group_frac"] == pytest.approx(1 / 3)
    assert stats["replay/zero_adv_frac"] == pytest.approx(9 / 12)
    assert make_module().rollout_metrics(rollout)["advantage/zero_group_frac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [(1.0, [0.1, 0.2, 0.3, 0.4]), (2.0, [1 / 30, 4 / 30, 9 / 30, 16 / 30]), (0.0, [0.25] * 4)],
)
def test_draw_frequencies_follow_abs_advantage_to_the_alpha(alpha, expected):
    ssr = SelectiveSampleReplay(alpha=alpha, seed=1)
    ssr.reshape(toy_rollout("s0", [0.1, -0.2, 0.3, -0.4]), PAD)
    count = 40_000
    draws = ssr.draw(count, torch.Generator().manual_seed(5))
    freq = [sum(d["text"] == f"s0-{i}" for d in draws) / count for i in range(4)]
    # 4 standard deviations of a frequency from 40k draws is at most 0.01
    assert freq == pytest.approx(expected, abs=0.01)
    again = ssr.draw(50, torch.Generator().manual_seed(5))
    assert [d["text"] for d in again] == [d["text"] for d in draws[:50]]  # seeded: reproducible


def test_fill_to_size_with_a_smaller_update_batch():
    ssr = SelectiveSampleReplay(batch_size=6, seed=0)
    out, _ = ssr.reshape(toy_rollout("s0", [1, 1, 1, 1, 1, 1, 1, 0]), PAD, step=0)
    assert len(out) == 6 and len(set(out.texts)) == 6 and "s0-7" not in out.texts  # a subset of the kept
    assert len(ssr.entries) == 7  # every kept sample is buffered, not only the subset
    out, stats = ssr.reshape(toy_rollout("s1", [0, 0, 0, 0, 1, 0, 0, 0]), PAD, step=1)
    assert len(out) == 6 and out.texts[0] == "s1-4" and stats["replay/replayed_frac"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="batch_size=16 is larger than the rollout of 8"):
        SelectiveSampleReplay(batch_size=16).reshape(toy_rollout("s", [1] * 8), PAD)


def test_replayed_rows_rebuild_prompt_batch_and_tensors():
    ssr = SelectiveSampleReplay(seed=0)
    old = toy_rollout("s0", [1, 1, 1, 1, 2, 2, 2, 2], width=6)  # responses of 2-4 tokens, padded to 6
    ssr.reshape(old, PAD, step=0)
    out, _ = ssr.reshape(toy_rollout("s1", [0] * 8, width=2), PAD, step=1)
    assert out.response_ids.shape[1] == 4  # stored unpadded, replayed wider than this step's responses
    for i in range(len(out)):
        j = int(out.texts[i].split("-")[1])
        n = 2 + j % 3
        assert torch.equal(out.response_ids[i, :n], old.response_ids[j, :n])
        assert torch.equal(out.prompts[i].media_inputs["pixel_values"], old.prompts[j].media_inputs["pixel_values"])
        row = int(out.group_index[i])
        assert out.batch.ids[row] == f"s0-p{j // 4}" and out.batch.answers[row] == str(j // 4)
        assert out.batch.messages[row] == old.batch.messages[j // 4]


def test_state_dict_round_trip_restores_buffer_and_draws(tmp_path):
    ssr = SelectiveSampleReplay(seed=3)
    ssr.reshape(toy_rollout("s0", [1, -2, 3, 0, 0, 0, 0, 0.5]), PAD, step=0)
    torch.save(ssr.state_dict(), tmp_path / "state.pt")
    restored = SelectiveSampleReplay(seed=3)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # plain values only
    assert [e["text"] for e in restored.entries] == [e["text"] for e in ssr.entries]
    a, _ = ssr.reshape(toy_rollout("s1", [0] * 8), PAD, step=1)
    b, _ = restored.reshape(toy_rollout("s1", [0] * 8), PAD, step=1)
    assert a.texts == b.texts and torch.equal(a.response_ids, b.response_ids)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="capacity=0"):
        SelectiveSampleReplay(capacity=0)
    with pytest.raises(ValueError, match="alpha=-1"):
        SelectiveSampleReplay(alpha=-1)
    with pytest.raises(ValueError, match=r"needs one advantage per sample \(\[N\]\), got \(8, 5\)"):
        rollout = toy_rollout("s", [1] * 8)
        rollout.advantages = torch.ones(8, 5)
        SelectiveSampleReplay().reshape(rollout, PAD)


# ------------------------------------------------------------------------- on the tiny VLM
def test_replayed_samples_recompute_their_behaviour_logprobs():
    """A merged batch of this step's and replayed samples feeds the model the right prompts and images."""
    module = make_module()
    module.configure_model()
    data = make_data(batch_size=2)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    ssr = SelectiveSampleReplay(min_abs_advantage=0.5, seed=0)
    for step in range(2):
        rollout = module.score(module.generate(next(loader), module.sampling, module.group_size))
        rollout.advantages = module.compute_advantages(rollout)
        out, stats = ssr.reshape(rollout, module.pad_id, step=step)
    assert stats["replay/replayed_frac"] > 0 and len(out) == len(rollout)
    replayed = torch.tensor(out.facts["replayed"])
    assert len(set(out.batch.ids)) == len(out.batch.ids) == 2 + len(set(out.group_index[replayed].tolist()))
    with torch.no_grad():
        recomputed, _ = module.policy_logprobs(module.model, out)  # [N, W]
    mask = out.response_mask.bool()
    torch.testing.assert_close(recomputed[mask], out.logprobs[mask], atol=1e-4, rtol=0)


class Recorder(RLCallback):
    """After the replay: the update batch's texts and whether each was replayed, per step."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, bool]]] = []

    def on_advantages_computed(self, trainer, pl_module, rollout):
        self.steps.append(list(zip(rollout.texts, rollout.facts["replayed"], strict=True)))
        return rollout


def fit_with_replay(root: Path, max_steps: int, ckpt_path: str | None = None):
    ssr, recorder = SelectiveSampleReplay(min_abs_advantage=0.5, seed=2), Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[ssr, recorder, ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)],
    )
    module = make_module()
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    return trainer, module, ssr, recorder


def test_fit_checkpoint_resume_replays_the_same_buffer(tmp_path):
    full_trainer, full, full_ssr, full_rec = fit_with_replay(tmp_path / "full", 3)
    assert any(replayed for step in full_rec.steps[1:] for _, replayed in step)  # replay did happen
    for key in ("replay/buffer_size", "replay/replayed_frac", "replay/zero_adv_frac"):
        assert key in full_trainer.callback_metrics, key
    _, _, part_ssr, part_rec = fit_with_replay(tmp_path / "part", 2)
    ckpt = next((tmp_path / "part" / "ckpt").glob("*step=2.ckpt"))
    state = torch.load(ckpt, weights_only=True)  # the buffer holds plain values only
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("SelectiveSampleReplay"))
    assert [e["text"] for e in saved["ranks"][0]["entries"]] == [e["text"] for e in part_ssr.entries]
    _, resumed, resumed_ssr, resumed_rec = fit_with_replay(tmp_path / "part", 3, ckpt_path=str(ckpt))
    assert any(replayed for _, replayed in resumed_rec.steps[0])  # the resumed step replays from the restored buffer
    assert part_rec.steps + resumed_rec.steps == full_rec.steps  # same samples replayed, step by step
    assert [e["text"] for e in resumed_ssr.entries] == [e["text"] for e in full_ssr.entries]
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


DDP_SCRIPT = """
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.test_grpo import make_data, make_module
from vlrl.callbacks import SelectiveSampleReplay

out = Path(sys.argv[1])


class Dump(pl.Callback):
    def __init__(self, ssr, tag):
        self.ssr, self.tag = ssr, tag

    def on_train_start(self, trainer, pl_module):
        self.start = [e["text"] for e in self.ssr.entries]

    def on_train_end(self, trainer, pl_module):
        end = [e["text"] for e in self.ssr.entries]
        torch.save({"start": self.start, "end": end}, out / f"rank{trainer.global_rank}-{self.tag}.pt")


for steps, ckpt in ((2, None), (3, out / "ckpt" / "epoch=0-step=2.ckpt")):  # fit, then resume
    ssr = SelectiveSampleReplay(min_abs_advantage=0.5, seed=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out,
        callbacks=[ssr, Dump(ssr, steps), ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2, save_top_k=-1)],
    )
    trainer.fit(make_module(), datamodule=make_data(batch_size=2, size=8), ckpt_path=ckpt)
"""


def test_buffers_are_per_rank_and_resume_on_their_rank(tmp_path):
    """Two CPU processes (gloo DDP): each rank keeps its own buffer, the checkpoint holds both."""
    script = tmp_path / "ddp_replay.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    resolve_model_path("tiny:qwen2_5_vl")  # built once here: two ranks building it at once would race
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first = [torch.load(tmp_path / f"rank{r}-2.pt") for r in range(2)]
    assert first[0]["end"] and first[1]["end"] and first[0]["end"] != first[1]["end"]
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("SelectiveSampleReplay"))
    assert [[e["text"] for e in r["entries"]] for r in saved["ranks"]] == [f["end"] for f in first]
    resumed = [torch.load(tmp_path / f"rank{r}-3.pt") for r in range(2)]
    assert [r["start"] for r in resumed] == [f["end"] for f in first]  # each rank got its own buffer back
