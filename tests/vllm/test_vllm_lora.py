"""VLLMEngine with a LoRA policy (tiny text Qwen2, vLLM's native model code): only the adapter is synced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.vllm.conftest import CPU_ENGINE, hf_logprobs
from vlrl.models import LoRA, Policy
from vlrl.models.inputs import encode_prompt
from vlrl.rollout import Sampling, VLLMEngine

pytestmark = pytest.mark.timeout(600)

QUESTIONS = ["What is 1 + 2?", "Which shape is larger, the square or the circle?", "Please reason step by step."]


@pytest.fixture(scope="module")
def lora_policy(tiny_text_model):
    model, tokenizer = Policy(tiny_text_model, dtype="float32", lora=LoRA(rank=8, alpha=16)).load()
    engine = VLLMEngine(**CPU_ENGINE)
    engine.bind(model, tokenizer)
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}], []) for q in QUESTIONS]
    yield model, engine, [p for p in prompts for _ in range(2)]
    engine.close()


def lora_b(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_B" in n]


def test_adapter_updates_reach_the_engine_and_only_the_adapter_moves(lora_policy):
    model, engine, prompts = lora_policy
    sampling = Sampling(max_new_tokens=10)
    first = engine.generate(prompts, sampling, seed=5)
    assert engine.lora_request.lora_int_id == 1  # the first rollout loaded the (still zero) adapter
    assert (hf_logprobs(model, prompts, first, engine.pad_id, 1.0) - first.logprobs).abs().max().item() < 1e-4
    with torch.no_grad():
        for param in lora_b(model):  # a trained adapter: B is no longer zero
            param.copy_(torch.randn_like(param) * 0.3)
    stale = engine.generate(prompts, sampling, seed=5)
    assert torch.equal(stale.logprobs, first.logprobs)
    assert (hf_logprobs(model, prompts, stale, engine.pad_id, 1.0) - stale.logprobs).abs().max().item() > 1e-2
    engine.update_weights(model)
    folder = Path(engine.lora_request.lora_path)
    assert engine.lora_request.lora_int_id == 2 and folder.is_dir()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    with safe_open(folder / "adapter_model.safetensors", "pt") as saved:
        names = list(saved.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)  # no base weight is sent
    after = engine.generate(prompts, sampling, seed=5)
    assert (hf_logprobs(model, prompts, after, engine.pad_id, 1.0) - after.logprobs).abs().max().item() < 1e-4
    assert not torch.equal(after.response_ids, first.response_ids)
    engine.update_weights(model)
    assert engine.lora_request.lora_int_id == 3 and not folder.exists()  # the previous adapter is removed
    assert engine.llm.llm_engine.list_loras() == {3}


def test_sleep_level_2_is_refused_with_lora(lora_policy):
    model, _, _ = lora_policy
    with pytest.raises(ValueError, match="sleep_level=2"):
        VLLMEngine(sleep_level=2).bind(model, None)
