"""GRPO end to end on CPU: fit steps on the tiny VLM, learning signal, checkpoint and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlrl.callbacks import RLCallback
from vlrl.data import Files, RLDataModule, Synthetic
from vlrl.methods import GRPO
from vlrl.models import LoRA, Policy
from vlrl.rewards import AccuracyReward, RewardFunction
from vlrl.rollout import Sampling


class CharReward(RewardFunction):
    """Fraction of characters of a response that are in ``chars``: varied rewards for a random model."""

    def __init__(self, chars: str = "aeiou", **kwargs) -> None:
        super().__init__(**kwargs)
        self.chars = set(chars)

    def __call__(self, completions, **kwargs):
        return [sum(c in self.chars for c in t) / max(len(t), 1) for t in completions]


class Recorder(RLCallback):
    """Records, per step, the prompt ids of the rollout and the rewards (both hooks see every step)."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []
        self.rewards: list[list[float]] = []

    def on_rollout_end(self, trainer, pl_module, rollout):
        self.ids.append(list(rollout.batch.ids))
        return rollout

    def on_advantages_computed(self, trainer, pl_module, rollout):
        self.rewards.append(rollout.rewards.tolist())
        assert rollout.advantages.shape == rollout.rewards.shape
        return rollout


def make_module(**overrides) -> GRPO:
    kwargs = dict(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32"),
        rewards=[CharReward(), AccuracyReward(weight=0.5)],
        sampling=Sampling(temperature=1.0, max_new_tokens=8),
        group_size=4,
        micro_batch_size=4,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        seed=5,
    )
    kwargs.update(overrides)
    return GRPO(**kwargs)


def make_data(batch_size: int = 2, size: int = 6) -> RLDataModule:
    return RLDataModule(
        train=Synthetic("train", size=size),
        val=Synthetic("val", size=4),
        batch_size=batch_size,
        eval_batch_size=4,
        prompt_template="{question}\nAnswer in \\boxed{{}}.",
    )


def quiet_trainer(**overrides) -> pl.Trainer:
    """A quiet trainer (CPU by default) without logger or checkpoints; override any argument."""
    kwargs = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**kwargs, **overrides})


def fit(tmp: Path, max_steps: int, ckpt_path: str | None = None, every: int = 2, **module_kwargs):
    recorder = Recorder()
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
            recorder,
            ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=every, save_top_k=-1, filename="{step}"),
        ],
    )
    module = make_module(**module_kwargs)
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    return trainer, module, recorder


def test_fit_updates_the_policy_and_logs_metrics(tmp_path):
    module = make_module()
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step == 2
    changed = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(".visual." in n for n in changed) and any("language_model" in n for n in changed)
    metrics = trainer.callback_metrics
    for key in (
        "reward/mean",
        "reward/std",
        "reward/char",
        "reward/accuracy",
        "response/length_mean",
        "update/clip_frac",
        "update/approx_kl",
        "update/entropy",
        "advantage/zero_group_frac",
        "perf/rollout_tokens_per_s",
        "update/grad_norm",
    ):
        assert key in metrics, key
    assert metrics["reward/std"] > 0
    assert metrics["update/grad_norm"] > 0
    assert 0 < metrics["update/entropy"] <= torch.log(torch.tensor(float(module.model.config.text_config.vocab_size)))


@pytest.mark.parametrize("model_path", ["tiny:llava_onevision"])
def test_fit_is_model_agnostic(model_path):
    """The same step trains another VLM family (SigLIP + Qwen2 LLaVA-OneVision), loaded by the Auto classes."""
    module = make_module(policy=Policy(model_path, dtype="float32"))
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, datamodule=make_data())
    assert type(module.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert trainer.global_step == 1
    assert trainer.callback_metrics["update/grad_norm"] > 0


def test_real_mathv_rows_go_through_the_whole_step():
    """Real MATH-V images and questions (multiple choice included) through processor, rollout and update."""
    fixture = Path(__file__).parent / "fixtures" / "mathv" / "data.jsonl"
    data = RLDataModule(
        train=Files(str(fixture)),
        val=Files(str(fixture)),
        batch_size=4,
        eval_batch_size=8,
        max_pixels=28 * 28 * 16,
        prompt_template="{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    )
    module = make_module()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert "val/accuracy" in trainer.callback_metrics

    assert torch.isfinite(trainer.callback_metrics["reward/mean"])


def test_skipped_bad_rows_are_logged_as_metrics(tmp_path):
    rows = (Path(__file__).parent / "fixtures" / "mathv" / "data.jsonl").read_text().splitlines()
    broken = json.loads(rows[0]) | {"answer": ""}
    (tmp_path / "images").symlink_to(Path(__file__).parent / "fixtures" / "mathv" / "images")
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([*rows[:4], json.dumps(broken), "{not json"]) + "\n")
    data = RLDataModule(train=Files(str(path)), batch_size=2, max_pixels=28 * 28 * 16, on_bad_row="skip")
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(make_module(), datamodule=data)
    metrics = trainer.callback_metrics
    skipped = {k: v.item() for k, v in metrics.items() if k.startswith("data/skipped/")}
    assert skipped == {"data/skipped/train/missing_answer": 1.0, "data/skipped/train/malformed_json": 1.0}


def test_grpo_step_raises_the_probability_of_rewarded_samples():
    """One GRPO update must move log-probs in the direction of the advantages."""
    module = make_module(mini_batch_size=None)
    module.configure_model()
    data = make_data(batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rollout = module.score(module.generate(batch, module.sampling, module.group_size))
    rollout.advantages = module.compute_advantages(rollout)
    assert rollout.advantages.abs().sum() > 0
    with torch.no_grad():
        before, _ = module.policy_logprobs(module.model, rollout)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.5)
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()
    module.update(rollout)
    with torch.no_grad():
        after, _ = module.policy_logprobs(module.model, rollout)
    mask = rollout.response_mask
    seq_change = ((after - before) * mask).sum(1)  # [N]
    # correlation between advantage and change of sequence log-prob is positive
    adv = rollout.advantages
    assert torch.corrcoef(torch.stack([adv, seq_change]))[0, 1] > 0.5


def test_resume_continues_at_the_same_step_data_and_weights(tmp_path):
    full_trainer, full, full_rec = fit(tmp_path / "full", max_steps=4)
    _, _, first_rec = fit(tmp_path / "part", max_steps=2)
    ckpt = tmp_path / "part" / "ckpt" / "step=2.ckpt"
    assert ckpt.exists()
    resumed_trainer, resumed, second_rec = fit(tmp_path / "part", max_steps=4, ckpt_path=str(ckpt))
    assert resumed_trainer.global_step == 4
    # 3 batches of 2 per epoch: the resumed run crosses the epoch boundary exactly like the full one
    assert first_rec.ids + second_rec.ids == full_rec.ids
    assert first_rec.rewards + second_rec.rewards == full_rec.rewards
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_lora_with_kl_to_the_adapter_disabled_policy(tmp_path):
    module = make_module(policy=Policy("tiny:qwen2_5_vl", dtype="float32", lora=LoRA(rank=4, alpha=8)), kl_coef=0.1)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, datamodule=make_data())
    assert "update/kl_ref" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["update/kl_ref"])
    assert not module._ref_model  # no second model under LoRA


def test_reference_model_kl_and_frozen_vision():
    module = make_module(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32", freeze_vision=True), kl_coef=0.05, mini_batch_size=4
    )
    module.configure_model()
    visual = {n: p.detach().clone() for n, p in module.model.named_parameters() if ".visual." in n}
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(module, datamodule=make_data(batch_size=2))  # 8 samples / 4 per mini-batch = 2 steps per rollout
    assert trainer.global_step == 4
    assert len(module._ref_model) == 1
    named = dict(module.model.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in visual.items())
    assert trainer.callback_metrics["update/kl_ref"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(group_size=1), "group_size >= 2"),
        (dict(dual_clip=0.5), "dual_clip must be > 1"),
        (dict(micro_batch_size=0), "micro_batch_size"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


def test_mini_batch_that_does_not_divide_the_rollout_is_named():
    module = make_module(mini_batch_size=3)
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(ValueError, match="mini_batch_size=3 does not divide"):
        trainer.fit(module, datamodule=make_data())
