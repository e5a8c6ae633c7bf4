"""Float32 master weights with bf16 compute: small learning rates are not rounded away.

At lr 1e-6 an AdamW step changes a weight of size ~0.02 by ~1e-6, below bf16's spacing there (~1e-4), so
weights stored in bf16 (``bf16-true``) keep most updates from happening. The shipped configs train with
``trainer.precision: bf16-mixed`` and ``policy.dtype: float32``; these tests run those settings on the tiny
VLM and compare the weight change with a float32 run, and pin the pieces: LoRA adapters in float32 over a
bf16 base, a bf16 reference, and the autocast weight cache cleared between optimizer steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.test_grpo import CharReward, make_data, make_module, quiet_trainer
from vlrl.models import LoRA, Policy
from vlrl.models.precision import check_master_weights, compute_dtype, frozen_dtype_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
INFERENCE_ONLY = {"unified_reward_think/rejection_sampling.yaml"}  # predict: nothing is trained
REAL = sorted(
    str(p.relative_to(CONFIGS))
    for p in CONFIGS.rglob("*.yaml")
    if p.parent.name not in ("demo", "trainer", "rollout", "eval") and "demo/" not in str(p.relative_to(CONFIGS))
)


def trained_models(config: dict) -> dict[str, dict]:
    """The models a config trains: the policy, and a PPO critic."""
    args = config["model"]["init_args"]
    return {key: args[key] for key in ("policy", "critic") if key in args}


@pytest.mark.parametrize("name", REAL)
def test_shipped_configs_keep_float32_master_weights(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    precision = str(config["trainer"]["precision"])
    if name in INFERENCE_ONLY:
        assert precision == "bf16-true"  # frozen judge: bf16 weights are enough
        return
    assert precision == "bf16-mixed", f"{name}: trainer.precision {precision}"
    for key, model in trained_models(config).items():
        if model.get("lora") is not None:  # frozen base in bf16 (or NF4); peft keeps the adapters in float32
            assert model["dtype"] == "bfloat16", f"{name}: {key}.dtype"
        else:
            assert model["dtype"] == "float32", f"{name}: {key}.dtype"


def test_compute_and_frozen_dtypes_follow_the_trainer_precision():
    assert compute_dtype("bf16-mixed") is torch.bfloat16 and compute_dtype("bf16-true") is torch.bfloat16
    assert compute_dtype("16-mixed") is torch.float16 and compute_dtype("32-true") is None
    assert frozen_dtype_name("float32", compute_dtype("bf16-mixed")) == "bfloat16"
    assert frozen_dtype_name("float32", compute_dtype("32-true")) == "float32"


def weight_change(
    precision: str, dtype: str, lr: float = 1e-6, steps: int = 3, accelerator: str = "cpu"
) -> tuple[float, float]:
    """GRPO on the tiny VLM for ``steps`` steps: (norm of the weight change, fraction of weights that changed)."""
    module = make_module(
        policy=Policy("tiny:qwen2_5_vl", dtype=dtype),
        rewards=[CharReward()],
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        max_grad_norm=None,
    )
    trainer = quiet_trainer(max_steps=steps, precision=precision, accelerator=accelerator, devices=1)
    module.configure_model()
    before = {n: p.detach().float().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, datamodule=make_data(batch_size=2, size=2 * steps))
    assert trainer.global_step == steps
    after = {n: p.detach().float() for n, p in module.model.named_parameters()}
    delta = torch.cat([(after[n] - before[n]).flatten() for n in before])
    return float(delta.norm()), float((delta != 0).float().mean())


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_shipped_precision_at_lr_1e6_moves_the_weights_like_float32(accelerator):
    shipped = yaml.safe_load((CONFIGS / "grpo.yaml").read_text())
    precision = shipped["trainer"]["precision"]
    dtype = shipped["model"]["init_args"]["policy"]["dtype"]
    reference_norm, reference_moved = weight_change("32-true", "float32", accelerator=accelerator)
    norm, moved = weight_change(precision, dtype, accelerator=accelerator)
    assert reference_moved > 0.8  # embedding rows of tokens never seen get no gradient
    assert abs(norm / reference_norm - 1) < 0.05, (norm, reference_norm)
    assert moved > 0.95 * reference_moved
    # bf16 weights (the former settings) lose most of the updates: the comparison above can fail
    bf16_norm, bf16_moved = weight_change("bf16-true", "bfloat16", accelerator=accelerator)
    print(
        f"fp32 {reference_norm:.3e} moved {reference_moved:.3f}; {precision}+{dtype} {norm:.3e} moved {moved:.3f}; bf16-true {bf16_norm:.3e} moved {bf16_moved:.3f}"
    )
    assert bf16_norm / reference_norm < 0.5 and bf16_moved < 0.2, (bf16_norm, bf16_moved)


def test_lora_under_bf16_mixed_trains_float32_adapters_on_a_bf16_base(recwarn):
    module = make_module(
        policy=Policy("tiny:qwen2_5_vl", dtype="bfloat16", lora=LoRA(rank=4, alpha=8)),
        rewards=[CharReward()],
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0),
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    quiet_trainer(max_steps=1, precision="bf16-mixed").fit(module, datamodule=make_data(batch_size=2, size=2))
    assert not [w for w in recwarn if "updates round away" in str(w.message)]
    params = dict(module.model.named_parameters())
    adapters = {n for n, p in params.items() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert {params[n].dtype for n in adapters} == {torch.float32}
    assert {p.dtype for n, p in params.items() if n not in adapters and p.is_floating_point()} == {torch.bfloat16}
    # a 1e-6 step is visible in the float32 adapters (lora_B starts at 0, so every entry moves)
    lora_b = [n for n in adapters if "lora_B" in n]
    assert all((params[n] != before[n]).float().mean() > 0.95 for n in lora_b)
    assert all(torch.equal(params[n], before[n]) for n in params if n not in adapters)


def test_bf16_true_on_trained_weights_warns_with_the_fix():
    module = make_module(policy=Policy("tiny:qwen2_5_vl", dtype="bfloat16"), rewards=[CharReward()])
    with pytest.warns(UserWarning, match="100% of the policy's trainable parameters are stored in bfloat16") as seen:
        quiet_trainer(max_steps=1, precision="bf16-true").fit(module, datamodule=make_data(batch_size=2, size=2))
    text = " ".join(str(w.message) for w in seen)
    assert "trainer.precision: bf16-mixed" in text and "policy.dtype: float32" in text
    model, _ = Policy("tiny:qwen2_5_vl", dtype="float32").load()
    assert check_master_weights(model, "policy", "bf16-mixed") == 0.0


def test_each_mini_batch_under_autocast_computes_with_the_updated_weights():
    """With autocast's weight cache on, the bf16 copy of each weight would live until the step ends and the
    second pass over the rollout (epochs=2) would compute with the weights before the first optimizer step.
    Lightning's bf16-mixed autocast runs with the cache off; this pins that the passes see the new weights."""
    module = make_module(
        rewards=[CharReward()],
        epochs=2,
        micro_batch_size=8,  # the whole rollout (2 prompts x 4) in one pass
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
    )
    passes: list[torch.Tensor] = []
    policy_logprobs = module.policy_logprobs

    def recorded(model, rollout, with_entropy=False):
        logprobs, entropy = policy_logprobs(model, rollout, with_entropy)
        if with_entropy:  # the update's passes (reference / old log-probs are computed without)
            passes.append(logprobs.detach().float() * rollout.response_mask.to(logprobs.device))
        return logprobs, entropy

    module.policy_logprobs = recorded
    quiet_trainer(max_steps=1, precision="bf16-mixed").fit(module, datamodule=make_data(batch_size=2, size=2))
    assert len(passes) == 2  # one micro-batch of the whole rollout per epoch
    assert (passes[1] - passes[0]).abs().max() > 1e-2
