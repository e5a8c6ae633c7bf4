"""PPO with a critic: GAE on padded rollouts (hand-worked), the separate critic, fit, checkpoint and resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.test_grpo import CharReward, make_data
from vlrl.callbacks import RLCallback
from vlrl.methods import PPO
from vlrl.models import LoRA, Policy, load_value_model
from vlrl.models.inputs import collate, encode_prompt
from vlrl.rewards import AccuracyReward
from vlrl.rollout import Sampling
from vlrl.types import EncodedPrompt, PromptBatch, Rollout


def make_ppo(**overrides) -> PPO:
    kwargs = dict(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32"),
        rewards=[CharReward()],
        sampling=Sampling(temperature=1.0, max_new_tokens=8),
        group_size=4,
        micro_batch_size=4,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        critic_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        seed=5,
    )
    kwargs.update(overrides)
    return PPO(**kwargs)


def make_trainer(tmp: Path, max_steps: int, callbacks: list[pl.Callback], **overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp,
        callbacks=callbacks,
    )
    return pl.Trainer(**{**kwargs, **overrides})


def hand_rollout(rewards: list[float], values: torch.Tensor, mask: torch.Tensor) -> Rollout:
    """A rollout with given rewards, values and response mask (no model needed for the advantage math)."""
    n, t = mask.shape
    prompt = EncodedPrompt(token_inputs={"input_ids": torch.zeros(1, 1, dtype=torch.long)}, media_inputs={})
    batch = PromptBatch(ids=["p"], messages=[[]], images=[[]], answers=["1"], choices=[None], data_sources=["s"])
    return Rollout(
        prompts=[prompt] * n,
        response_ids=torch.zeros(n, t, dtype=torch.long),
        response_mask=mask,
        logprobs=torch.zeros(n, t),
        texts=[""] * n,
        finish_reasons=["stop"] * n,
        group_index=torch.zeros(n, dtype=torch.long),
        batch=batch,
        rewards=torch.tensor(rewards),
        values=values,
    )


# Three right-padded responses of lengths 3, 2 and 1; the padding holds a value of 9 that must be ignored.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
VALUES = torch.tensor([[0.5, 0.6, 0.8], [0.3, 0.4, 9.0], [0.25, 9.0, 9.0]])
REWARDS = [1.0, 0.0, 1.0]  # each on the last real token of its row

# Worked by hand: δ_t = r_t + γ·V_{t+1} − V_t (V after the last real token = 0), A_t = δ_t + γλ·A_{t+1}.
# Row 0, γ=λ=0.95: δ = (0.95·0.6 − 0.5, 0.95·0.8 − 0.6, 1 − 0.8) = (0.07, 0.16, 0.2);
#   A_2 = 0.2, A_1 = 0.16 + 0.9025·0.2 = 0.3405, A_0 = 0.07 + 0.9025·0.3405 = 0.37730125.
# Row 1, γ=λ=0.95: δ = (0.95·0.4 − 0.3, 0 − 0.4) = (0.08, −0.4); A_0 = 0.08 − 0.9025·0.4 = −0.281.
# Row 2 (one token) in every case: A_0 = 1 − 0.25 = 0.75.
HAND_ADVANTAGES = {
    (1.0, 1.0): [[0.5, 0.4, 0.2], [-0.3, -0.4, 0.0], [0.75, 0.0, 0.0]],
    (1.0, 0.95): [[0.4705, 0.39, 0.2], [-0.28, -0.4, 0.0], [0.75, 0.0, 0.0]],
    (0.95, 1.0): [[0.4025, 0.35, 0.2], [-0.3, -0.4, 0.0], [0.75, 0.0, 0.0]],
    (0.95, 0.95): [[0.37730125, 0.3405, 0.2], [-0.281, -0.4, 0.0], [0.75, 0.0, 0.0]],
}


@pytest.mark.parametrize(("gamma", "lam"), list(HAND_ADVANTAGES))
def test_gae_on_a_padded_rollout_matches_hand_worked_values(gamma, lam):
    module = make_ppo(gamma=gamma, lam=lam, normalize_advantages=False)
    rollout = hand_rollout(REWARDS, VALUES, MASK)
    advantages = module.compute_advantages(rollout)
    expected = torch.tensor(HAND_ADVANTAGES[(gamma, lam)])
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-6)
    # returns = A + V on the response tokens, 0 on padding (the padded 9s never enter)
    torch.testing.assert_close(rollout.returns, (expected + VALUES) * MASK, rtol=0, atol=1e-6)


def test_gamma_and_lambda_one_give_return_minus_value():
    torch.manual_seed(3)
    lengths = torch.tensor([7, 1, 4, 6, 2])
    mask = (torch.arange(7) < lengths[:, None]).float()  # [5, 7]
    values = torch.randn(5, 7)
    rewards = torch.randn(5)
    module = make_ppo(normalize_advantages=False)
    advantages = module.compute_advantages(hand_rollout(rewards.tolist(), values, mask))
    torch.testing.assert_close(advantages, (rewards[:, None] - values) * mask, rtol=0, atol=1e-6)


def test_advantages_are_normalised_over_the_rollouts_response_tokens():
    torch.manual_seed(4)
    mask = (torch.arange(6) < torch.tensor([6, 3, 5, 1])[:, None]).float()  # [4, 6]
    rollout = hand_rollout(torch.rand(4).tolist(), torch.rand(4, 6), mask)
    raw = make_ppo(normalize_advantages=False).compute_advantages(rollout)
    normed = make_ppo().compute_advantages(rollout)
    valid = normed[mask.bool()]
    assert abs(valid.mean().item()) < 1e-6
    assert abs(valid.std().item() - 1.0) < 1e-5  # unbiased std over the 15 valid tokens of the batch
    assert torch.equal(normed[~mask.bool()], torch.zeros(int((1 - mask).sum())))
    raw_valid = raw[mask.bool()]
    torch.testing.assert_close(valid, (raw_valid - raw_valid.mean()) / raw_valid.std(), rtol=0, atol=1e-5)


def test_the_ovr_reward_needs_a_correct_answer_and_an_eos():
    """r = 1 only if the answer is right AND the response stopped with EOS: AccuracyReward(truncated_score=0)."""
    reward = AccuracyReward(truncated_score=0.0)
    scores = reward(
        [r"so \boxed{4}", r"so \boxed{4}", r"so \boxed{5}", r"so \boxed{5}"],
        answers=["4"] * 4,
        choices=[None] * 4,
        finish_reasons=["stop", "length", "stop", "length"],
    )
    assert scores == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(critic_steps=0), "critic_steps must be >= 1"),
        (dict(gamma=1.5), "gamma must be in"),
        (dict(lam=-0.1), "lam must be in"),
        (dict(value_clip=0.0), "value_clip must be > 0"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_ppo(**kwargs)


@pytest.mark.parametrize("model_path", ["tiny:qwen2_5_vl", "tiny:qwen2"])
@pytest.mark.parametrize("lora", [None, LoRA(rank=4, alpha=8)])
def test_value_model_on_a_vlm_and_a_text_model(model_path, lora):
    model, processor = load_value_model(Policy(model_path, dtype="float32", lora=lora))
    assert not any("lm_head" in name for name, _ in model.named_parameters())  # the LM head is dropped
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert "value_head.weight" in trainable and "value_head.bias" in trainable
    if lora is not None:
        assert all("lora_" in name or name.startswith("value_head.") for name in trainable)
    prompt = encode_prompt(processor, [{"role": "user", "content": "How many sides has a square?"}], [])
    inputs = collate([prompt, prompt], 0, torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    values = model(**inputs)  # [2, P + 3]
    assert values.shape == (2, prompt.length + 3) and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros_like(values))  # zero-initialised head: the first values are 0
    values.sum().backward()
    assert model.value_head.weight.grad.abs().sum() > 0


class FixedRollout(RLCallback):
    """Replaces every step's samples with those of the first step: the critic then fits a fixed batch."""

    def __init__(self) -> None:
        self.first: Rollout | None = None

    def on_rollout_end(self, trainer, pl_module, rollout):
        if self.first is None:
            self.first = rollout
        return replace(self.first, facts={}, stats={})


class MetricsPerStep(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_critic_learns_a_fixed_batch_apart_from_the_policy(tmp_path):
    """Inside a real fit on one fixed batch: the value loss falls; critic steps change only the critic and
    do not advance global_step; the two models share no tensor and each optimizer holds only its own."""
    module = make_ppo(critic_steps=2, critic_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
    original_critic_step = module.critic_step
    checks: list[tuple[bool, bool, bool]] = []

    def critic_step_spy(mini, optimizer, scheduler):  # wraps the real step to look at it from outside
        policy_before = [p.detach().clone() for p in module.model.parameters()]
        critic_before = [p.detach().clone() for p in module.critic_model.parameters()]
        step_before = module.trainer.global_step
        stats = original_critic_step(mini, optimizer, scheduler)
        policy_same = all(torch.equal(a, b) for a, b in zip(policy_before, module.model.parameters(), strict=True))
        critic_moved = any(
            not torch.equal(a, b) for a, b in zip(critic_before, module.critic_model.parameters(), strict=True)
        )
        checks.append((policy_same, critic_moved, module.trainer.global_step == step_before))
        return stats

    module.critic_step = critic_step_spy
    metrics = MetricsPerStep()
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[FixedRollout(), metrics])
    trainer.fit(module, datamodule=make_data())

    assert trainer.global_step == 6  # one per policy step, although 12 critic steps were taken
    assert len(checks) == 12 and all(all(c) for c in checks), checks
    losses = [row["critic/loss"] for row in metrics.rows]
    # the first tokens of a group share one state, so part of the loss cannot be fitted; about half can
    assert losses[0] > 0 and losses[-1] < 0.6 * losses[0], losses
    for key in ("critic/clip_frac", "critic/grad_norm", "critic/lr", "critic/values", "critic/returns"):
        assert key in metrics.rows[-1], key

    policy_params, critic_params = list(module.model.parameters()), list(module.critic_model.parameters())
    assert {p.data_ptr() for p in policy_params}.isdisjoint(p.data_ptr() for p in critic_params)
    policy_opt, critic_opt = (o.param_groups for o in trainer.optimizers)
    in_policy_opt = {id(p) for g in policy_opt for p in g["params"]}
    in_critic_opt = {id(p) for g in critic_opt for p in g["params"]}
    assert in_policy_opt == {id(p) for p in policy_params if p.requires_grad}
    assert in_critic_opt == {id(p) for p in critic_params if p.requires_grad}
    assert "critic_model.value_head.weight" in module.state_dict()
    assert not any(k.startswith("critic_model") and "lm_head" in k for k in module.state_dict())


def test_values_are_zero_off_the_response_tokens():
    module = make_ppo()
    module.configure_model()
    torch.nn.init.normal_(module.critic_model.value_head.weight)  # a zero head would make every value 0
    data = make_data(batch_size=2)
    data.setup("fit")
    rollout = module.generate(next(iter(data.train_dataloader())), Sampling(max_new_tokens=6), 2)
    rollout.response_mask[0, 2:] = 0.0  # as if the first response had stopped after 2 tokens
    values = module.compute_values(rollout)  # [N, T]
    assert values.shape == rollout.response_ids.shape
    assert torch.equal(values[0, 2:], torch.zeros(values.shape[1] - 2))
    assert bool((values[rollout.response_mask.bool()] != 0).all())
    # the values are those of the states before each token: the same micro-batch recomputed agrees
    with torch.no_grad():
        torch.testing.assert_close(values[1], module.critic_values(rollout.select([1]))[0] * rollout.response_mask[1])


def fit_ppo(tmp: Path, max_steps: int, ckpt_path: str | None = None) -> tuple[pl.Trainer, PPO, list]:
    rewards: list[list[float]] = []

    class Rewards(RLCallback):
        def on_advantages_computed(self, trainer, pl_module, rollout):
            assert rollout.advantages.shape == rollout.response_ids.shape  # token-level [N, T]
            rewards.append(rollout.rewards.tolist())
            return rollout

    module = make_ppo(
        critic_lr_scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=6)
    )
    checkpoint = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp, max_steps, [Rewards(), checkpoint], enable_checkpointing=True)
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    return trainer, module, rewards


def test_fit_saves_both_models_and_optimizers_and_resumes_exactly(tmp_path):
    full_trainer, full, full_rewards = fit_ppo(tmp_path, max_steps=3)
    assert full_trainer.global_step == 3  # one per rollout: the 12 critic steps do not count
    ckpt = tmp_path / "ckpt" / "step=2.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert "critic_model.value_head.weight" in state["state_dict"]
    assert any(k.startswith("critic_model.backbone.") for k in state["state_dict"])
    assert len(state["optimizer_states"]) == 2 and len(state["lr_schedulers"]) == 1
    critic_trainable = sum(1 for p in full.critic_model.parameters() if p.requires_grad)
    assert len(state["optimizer_states"][1]["state"]) == critic_trainable  # Adam moments of every critic tensor
    assert state["lr_schedulers"][0]["_step_count"] == 1 + 2 * 4  # 4 critic steps per rollout, 2 rollouts

    resumed_trainer, resumed, resumed_rewards = fit_ppo(tmp_path / "resumed", max_steps=3, ckpt_path=str(ckpt))
    assert resumed_trainer.global_step == 3
    assert resumed_rewards == full_rewards[2:]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_rollout_texts_are_the_responses_without_padding():
    """Rewards read ``rollout.texts``: a shorter response must not carry its padding into the text."""
    module = make_ppo()
    module.configure_model()
    module.rollout_engine.stop_ids = list(
        range(0, len(module.tokenizer), 3)
    )  # a third of the vocabulary ends a response
    data = make_data(batch_size=2)
    data.setup("fit")
    rollout = module.generate(next(iter(data.train_dataloader())), Sampling(max_new_tokens=12), 4)
    lengths = rollout.response_mask.sum(1).long()  # [N]
    assert lengths.min() < lengths.max()  # some responses are padded
    for ids, n, text in zip(rollout.response_ids, lengths.tolist(), rollout.texts, strict=True):
        assert text == module.tokenizer.decode(ids[:n], skip_special_tokens=True)
