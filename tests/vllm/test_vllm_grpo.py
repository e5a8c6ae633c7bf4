"""GRPO trained on vLLM rollouts: the engine samples every step and follows every optimizer step."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.test_grpo import make_data, make_module, quiet_trainer
from tests.vllm.conftest import CPU_ENGINE, hf_logprobs
from vlrl.models import Policy
from vlrl.models.inputs import encode_prompt
from vlrl.rollout import Sampling, VLLMEngine

pytestmark = pytest.mark.timeout(600)


def test_grpo_fit_on_vllm_rollouts_keeps_the_engine_on_the_trained_weights(tiny_vlm):
    engine = VLLMEngine(model_impl="transformers", **CPU_ENGINE)
    module = make_module(policy=Policy(tiny_vlm, dtype="float32"), rollout_engine=engine)
    trainer = quiet_trainer(max_steps=2)
    try:
        trainer.fit(module, datamodule=make_data())
        assert trainer.global_step == 2
        assert engine.weight_syncs == 3  # before the first rollout, then after each optimizer step
        metrics = trainer.callback_metrics
        assert metrics["response/length_mean"] > 0 and metrics["perf/rollout_s"] > 0
        image = Image.new("RGB", (56, 56), (30, 160, 30))
        prompt = encode_prompt(module.processor, [{"role": "user", "content": [{"type": "image"}]}], [image])
        group = [prompt] * 4
        gen = engine.generate(group, Sampling(max_new_tokens=8), seed=2)
        excluded = sorted(engine.suppress)
        trained = hf_logprobs(module.model, group, gen, engine.pad_id, 1.0, excluded)
        assert (trained - gen.logprobs).abs().max().item() < 1e-4
        initial, _ = Policy(tiny_vlm, dtype="float32").load()  # the weights before training
        before = hf_logprobs(initial, group, gen, engine.pad_id, 1.0, excluded)
        assert (before - gen.logprobs).abs().max().item() > 1e-3
        assert torch.isfinite(gen.logprobs).all()
    finally:
        engine.close()
