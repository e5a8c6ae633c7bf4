"""DAPO's dynamic sampling: the update batch holds only non-zero-advantage groups, extra prompts are drawn up to a
cap and counted, and a resumed run draws the same extra prompts and ends with the same weights. The DAPO and
GSPO demo configs fit a few steps."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.test_grpo import CharReward, make_module
from vlrl.algorithms import group_advantages
from vlrl.callbacks import DynamicSampling, RLCallback
from vlrl.callbacks.dynamic_sampling import split_groups, take_groups
from vlrl.cli import main
from vlrl.data import RLDataModule, Synthetic
from vlrl.types import EncodedPrompt, PromptBatch, Rollout


class ColourOnly(CharReward):
    """The vowel fraction on colour questions, 0 on every other kind: the groups of the others all score 0."""

    name = "char"

    def __call__(self, completions, data_sources, **kwargs):
        scores = super().__call__(completions)
        return [s if source == "color" else 0.0 for s, source in zip(scores, data_sources, strict=True)]


class UpdateBatches(RLCallback):
    """Records the prompt ids and advantages of every update batch (placed after ``DynamicSampling``)."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []
        self.advantages: list[torch.Tensor] = []
        self.sources: list[list[str]] = []
        self.filled: list[float] = []

    def on_advantages_computed(self, trainer, pl_module, rollout):
        self.ids.append([rollout.batch.ids[g] for g in rollout.group_index.tolist()])
        self.sources.append([rollout.batch.data_sources[g] for g in rollout.group_index.tolist()])
        self.advantages.append(rollout.advantages.clone())
        self.filled.append(rollout.stats["dynamic_sampling/filled_groups"])
        return rollout


def data(size: int = 12) -> RLDataModule:
    return RLDataModule(
        train=Synthetic("train", size=size, kinds=["color", "count"]),
        batch_size=2,
        prompt_template="{question}\nAnswer in \\boxed{{}}.",
    )


def fit(tmp: Path, max_steps: int, ckpt_path: str | None = None, max_draws: int = 4):
    updates = UpdateBatches()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp,
        callbacks=[
            DynamicSampling(max_draws=max_draws),
            updates,
            ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"),
        ],
    )
    module = make_module(rewards=[ColourOnly()])
    trainer.fit(module, datamodule=data(), ckpt_path=ckpt_path)
    return trainer, module, updates


def hand_rollout(rewards: list[float], group_size: int, ids: list[str], width: int = 2) -> Rollout:
    """``len(ids)`` groups of ``group_size`` samples with the given rewards; group-std advantages."""
    n = len(rewards)
    prompt = EncodedPrompt(token_inputs={"input_ids": torch.zeros(1, 1, dtype=torch.long)}, media_inputs={})
    batch = PromptBatch(
        ids=ids,
        messages=[[] for _ in ids],
        images=[[] for _ in ids],
        answers=["1" for _ in ids],
        choices=[None for _ in ids],
        data_sources=["s" for _ in ids],
    )
    rollout = Rollout(
        prompts=[prompt] * n,
        response_ids=torch.zeros(n, width, dtype=torch.long),
        response_mask=torch.ones(n, width),
        logprobs=torch.zeros(n, width),
        texts=[""] * n,
        finish_reasons=["stop"] * n,
        group_index=torch.arange(len(ids)).repeat_interleave(group_size),
        batch=batch,
        rewards=torch.tensor(rewards),
        stats={"perf/rollout_s": 1.0, "perf/rollout_tokens": float(n * width)},
    )
    rollout.advantages = group_advantages(rollout.rewards, rollout.group_index)
    return rollout


@pytest.fixture(scope="module")
def module():
    module = make_module()
    module.configure_model()  # the tokenizer gives the pad id the batches are joined with
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    return module


def test_groups_are_split_by_the_zero_advantage_rule_and_taken_with_their_prompts():
    rollout = hand_rollout([1, 0, 0.5, 0.5, 0, 1], 2, ["a", "b", "c"])
    assert split_groups(rollout) == ([0, 2], [1])
    taken = take_groups(rollout, [0, 2])
    assert taken.batch.ids == ["a", "c"] and taken.group_index.tolist() == [0, 0, 1, 1]
    assert taken.rewards.tolist() == [1, 0, 0, 1] and taken.group_size == 2


def test_fill_draws_until_every_group_teaches_and_trims_the_surplus(module):
    # the step: groups a (zero), b (kept); draw 1: c (zero), d (zero); draw 2: e, f (both kept, f is surplus)
    first = hand_rollout([0.5, 0.5, 1, 0], 2, ["a", "b"])
    draws = iter([hand_rollout([0, 0, 1, 1], 2, ["c", "d"]), hand_rollout([1, 0, 0, 1], 2, ["e", "f"])])
    callback = DynamicSampling(max_draws=5)
    out, stats = callback.fill(first, lambda: next(draws), module)
    assert out.batch.ids == ["b", "e"] and out.group_index.tolist() == [0, 0, 1, 1]
    assert not out.advantages.eq(0).any()
    assert stats == {
        "dynamic_sampling/draws": 3.0,
        "dynamic_sampling/zero_group_frac": 3 / 6,
        "dynamic_sampling/filled_groups": 0.0,
        "dynamic_sampling/prompts_drawn": 4.0,
    }
    assert out.stats["perf/rollout_s"] == 3.0 and out.stats["perf/rollout_tokens"] == 24.0  # every draw counted


def test_at_the_cap_the_batch_is_filled_with_the_steps_own_zero_groups(module):
    first = hand_rollout([0.5, 0.5, 1, 0, 0, 0], 2, ["a", "b", "c"])
    draws = iter([hand_rollout([0, 0, 1, 1, 2, 2], 2, ["d", "e", "f"])])
    out, stats = DynamicSampling(max_draws=2).fill(first, lambda: next(draws), module)
    assert sorted(out.batch.ids) == ["a", "b", "c"]  # nothing non-zero in the draw; a and c fill the batch
    assert stats["dynamic_sampling/draws"] == 2.0 and stats["dynamic_sampling/filled_groups"] == 2.0
    nothing = iter([])
    out, stats = DynamicSampling(max_draws=1).fill(first, lambda: next(nothing), module)  # never draws
    assert out.batch.ids == ["b", "a", "c"] and stats["dynamic_sampling/draws"] == 1.0


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="max_draws=0 must be >= 1"):
        DynamicSampling(max_draws=0)


def test_fit_updates_only_on_non_zero_groups_and_resumes_exactly(tmp_path):
    full_trainer, full, full_updates = fit(tmp_path / "full", max_steps=4)
    metrics = full_trainer.callback_metrics
    assert metrics["dynamic_sampling/prompts_drawn"] > 0 and "dynamic_sampling/draws" in metrics
    updates = zip(full_updates.advantages, full_updates.sources, full_updates.filled, strict=True)
    for advantages, sources, filled in updates:
        assert len(advantages) == 2 * 4  # two prompts of four samples, as without dynamic sampling
        # the other kind always scores 0: its groups reach the update only to fill a batch at the cap
        assert sources.count("count") == 4 * filled
    _, _, first = fit(tmp_path / "part", max_steps=2)
    ckpt = tmp_path / "part" / "ckpt" / "step=2.ckpt"
    resumed_trainer, resumed, second = fit(tmp_path / "part", max_steps=4, ckpt_path=str(ckpt))
    assert resumed_trainer.global_step == 4
    assert first.ids + second.ids == full_updates.ids  # the same extra prompts after the resume
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["dapo", "gspo"])
def test_demo_config_fits_a_few_steps(name, tmp_path, monkeypatch):
    """``lightning-cli fit --config configs/demo/<name>.yaml`` runs (two steps here), and logs its method's figures."""
    config = Path(__file__).resolve().parents[1] / "configs" / "demo" / f"{name}.yaml"
    monkeypatch.chdir(tmp_path)  # the demo writes its outputs/ under the working directory
    steps = {"dapo": 2, "gspo": 8}[name]  # optimizer steps of two rollouts (GSPO's demo takes four a rollout)
    main(["fit", "--config", str(config), f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false"])
    logs = sorted((tmp_path / "outputs" / "demo" / name / "logs").glob("version_*/metrics.csv"))
    rows = list(csv.DictReader(logs[-1].open()))
    steps = [row for row in rows if row.get("update/policy_loss")]
    assert len(steps) == 2  # one logged row per rollout
    if name == "dapo":
        assert all(float(row["dynamic_sampling/draws"]) >= 1 for row in steps)
        assert all(row["reward/overlong"] != "" for row in steps)
    else:  # four optimizer steps a rollout: from the second on, the 3e-4 / 4e-4 sequence clip acts
        assert max(float(row["update/clip_frac"]) for row in steps) > 0
