"""SequenceLengthCurriculum: the schedule, its validation, and the rollout length inside a fit and after a resume."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.test_grpo import make_data, make_module
from vlrl.callbacks import RLCallback, SequenceLengthCurriculum
from vlrl.rollout import Sampling


def test_default_schedule_is_the_papers():
    curriculum = SequenceLengthCurriculum()
    assert [curriculum.length_at(s) for s in (0, 299, 300, 699, 700, 900)] == [24576] * 2 + [32768] * 2 + [49152] * 2


def test_initial_applies_before_the_first_entry():
    curriculum = SequenceLengthCurriculum({10: 64, 20: 128}, initial=32)
    assert [curriculum.length_at(s) for s in (0, 9, 10, 19, 20, 10_000)] == [32, 32, 64, 64, 128, 128]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(schedule={}), "schedule is empty"),
        (dict(schedule={5: 64}), r"no entry for step 0.*add `0: LENGTH`.*or set `initial"),
        (dict(schedule={0: 64, 10: 0}), "bad entries {10: 0}"),
        (dict(schedule={0: 64, -1: 32}), "bad entries {-1: 32}"),
        (dict(schedule={0: 64}, initial=32), "remove initial"),
        (dict(schedule={5: 64}, initial=0), "initial must be >= 1"),
    ],
)
def test_bad_schedules_fail_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceLengthCurriculum(**kwargs)


def test_state_dict_round_trip():
    curriculum = SequenceLengthCurriculum({0: 8, 3: 16})
    curriculum.current = 16
    restored = SequenceLengthCurriculum({0: 8, 3: 16})
    restored.load_state_dict(curriculum.state_dict())
    assert restored.current == 16


def test_only_rl_methods_take_it():
    with pytest.raises(TypeError, match="sets the rollout length of an RL method"):
        SequenceLengthCurriculum({0: 8}).setup(pl.Trainer(logger=False), pl.LightningModule(), "fit")


class Lengths(RLCallback):
    """Per step: the module's limit and the width of the sampled responses; the limit at train start."""

    def __init__(self) -> None:
        self.limits: list[int] = []
        self.widths: list[int] = []
        self.at_start: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.at_start = pl_module.max_new_tokens

    def on_rollout_end(self, trainer, pl_module, rollout):
        self.limits.append(pl_module.max_new_tokens)
        self.widths.append(int(rollout.response_ids.shape[1]))
        return rollout


def fit(tmp: Path, max_steps: int, ckpt_path: str | None = None) -> tuple[pl.Trainer, Lengths]:
    lengths = Lengths()
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
            SequenceLengthCurriculum({0: 3, 2: 5, 3: 7}),  # runs before Lengths: its hooks come first
            lengths,
            ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"),
        ],
    )
    module = make_module(sampling=Sampling(temperature=1.0, max_new_tokens=100))  # the curriculum overrides it
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    return trainer, lengths


def test_length_changes_at_the_configured_steps_and_after_resume(tmp_path):
    trainer, full = fit(tmp_path, max_steps=4)
    assert full.limits == [3, 3, 5, 7]
    assert all(w <= limit for w, limit in zip(full.widths, full.limits, strict=True))
    assert full.widths[3] > 3  # the rollout really samples longer responses (a random model rarely stops)
    assert trainer.callback_metrics["curriculum/max_new_tokens"] == 7

    resumed_trainer, resumed = fit(tmp_path / "resumed", max_steps=4, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert resumed.at_start == 3  # the checkpoint's length (set at step 1), not the module's 100
    assert resumed.limits == full.limits[2:]
    assert resumed_trainer.global_step == 4


def test_steps_beyond_max_steps_warn_and_apply_after_a_staged_resume(tmp_path, caplog):
    # Stage 1 stops at step 2, before the schedule's steps 2 and 3: a warning names them, the run goes on.
    with caplog.at_level(logging.WARNING, logger="vlrl.callbacks.curriculum"):
        first_trainer, first = fit(tmp_path, max_steps=2)
    assert first.limits == [3, 3] and first_trainer.global_step == 2
    warned = [r.getMessage() for r in caplog.records if "SequenceLengthCurriculum" in r.getMessage()]
    assert len(warned) == 1 and "[2, 3]" in warned[0] and "max_steps=2" in warned[0]

    # Stage 2 resumes to step 4 with the same schedule: the kept entries for steps 2 and 3 take effect.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlrl.callbacks.curriculum"):
        second_trainer, second = fit(tmp_path / "stage2", max_steps=4, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert second.limits == [5, 7] and second_trainer.global_step == 4
    assert not [r for r in caplog.records if "will not be reached" in r.getMessage()]
