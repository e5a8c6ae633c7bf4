"""VLLMEngine on the tiny Qwen2.5-VL (vLLM's transformers backend, CPU) against the HF model it mirrors.

One engine serves the whole module; tests that change the model's weights put them back (and sync
them) before they end.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from tests.vllm.conftest import CPU_ENGINE, hf_logprobs
from vlrl.algorithms import truncated_importance_weights
from vlrl.models import Policy
from vlrl.models.inputs import encode_prompt
from vlrl.rollout import RolloutEngine, Sampling, VLLMEngine

pytestmark = pytest.mark.timeout(600)

RED = Image.new("RGB", (56, 56), (200, 30, 30))  # 4 visual tokens
WIDE = Image.new("RGB", (112, 56), (30, 30, 200))  # 8 visual tokens


def ask(processor, text: str, images: list[Image.Image]):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return encode_prompt(processor, [{"role": "user", "content": content}], images)


@pytest.fixture(scope="module")
def vlm(tiny_vlm):
    model, processor = Policy(tiny_vlm, dtype="float32").load()
    engine = VLLMEngine(model_impl="transformers", **CPU_ENGINE)
    engine.bind(model, processor)
    prompts = [
        ask(processor, "What colour is the square?", [RED]),
        ask(processor, "Which side holds the big circle, left or right?", [WIDE]),
        ask(processor, "Compare the two images.", [RED, WIDE]),
        ask(processor, "What is 1 + 2?", []),
    ]
    yield model, processor, engine, prompts
    engine.close()


def scored(model, engine, prompts, gen, temperature, suppressed: bool = True) -> torch.Tensor:
    """The HF model's log-probs of ``gen``; by default over the vocabulary the engine samples from."""
    excluded = sorted(engine.suppress) if suppressed else None
    return hf_logprobs(model, prompts, gen, engine.pad_id, temperature, excluded)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_are_the_trainers_on_image_and_text_prompts(vlm, temperature):
    model, processor, engine, prompts = vlm
    group = [p for p in prompts for _ in range(3)]  # G = 3; one and two images, two sizes, no image
    gen = engine.generate(group, Sampling(temperature=temperature, max_new_tokens=10), seed=3)
    assert gen.response_ids.shape[0] == 12 and gen.response_mask.sum() > 30
    valid = gen.response_mask.bool()
    assert (gen.logprobs[valid] < 0).all() and (gen.logprobs[~valid] == 0).all()
    # the same numbers as the trainer over the vocabulary vLLM samples from (vision tokens suppressed) ...
    assert (gen.logprobs - scored(model, engine, group, gen, temperature)).abs().max().item() < 1e-4
    # ... and over the full vocabulary, shifted up by -log(1 - p) for the small mass p of the vision tokens
    full = scored(model, engine, group, gen, temperature, suppressed=False)
    shift = (gen.logprobs - full)[valid]
    assert shift.min().item() > 0 and shift.max().item() < 2e-2
    # the mismatch a truncated importance correction would see: weights just below 1, none truncated
    tis = truncated_importance_weights(full, gen.logprobs, gen.response_mask)
    assert 0 < tis.mean_abs_log_ratio.item() < 2e-2 and tis.truncated_fraction.item() == 0
    assert (tis.weights[valid] < 1).all() and (tis.weights[valid] > 0.98).all()
    # vLLM saw the images: with another image in the first prompt, the trainer's numbers move
    recoloured = ask(processor, "What colour is the square?", [Image.new("RGB", (56, 56), (20, 200, 20))])
    other = scored(model, engine, [recoloured] * 3 + group[3:], gen, temperature)
    assert (other[:3] - gen.logprobs[:3]).abs().max().item() > 1e-3


def test_sampling_is_seeded_distinct_per_sample_and_never_emits_vision_tokens(vlm):
    _, processor, engine, prompts = vlm
    group = [prompts[0]] * 6
    sampling = Sampling(max_new_tokens=12)
    a = engine.generate(group, sampling, seed=7)
    b = engine.generate(group, sampling, seed=7)
    c = engine.generate(group, sampling, seed=8)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert len({tuple(r) for r in a.response_ids.tolist()}) == 6  # the G samples of a prompt differ
    assert not torch.isin(a.response_ids, torch.tensor(sorted(engine.suppress))).any()
    assert len(set(a.response_ids.flatten().tolist())) > 30  # true sampling over the whole vocabulary


def make_eos_certain(model: torch.nn.Module, eos: int) -> None:
    """Weights under which the next token is always EOS.

    Coordinate 0 of the residual stream is 1 at every text position (the embeddings set it and no
    layer writes to it), the final norm keeps only that coordinate, and only EOS's output row reads it.
    """
    text = model.model.language_model
    with torch.no_grad():
        text.embed_tokens.weight[:, 0] = 1.0
        for layer in text.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        text.norm.weight.zero_()
        text.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = 1000.0


def test_finish_reasons_and_masks_before_and_after_a_weight_sync(vlm):
    model, processor, engine, prompts = vlm
    length = engine.generate(prompts, Sampling(max_new_tokens=5, min_new_tokens=5), seed=0)
    assert length.finish_reasons == ["length"] * 4
    assert length.response_mask.sum(dim=1).tolist() == [5.0] * 4
    eos = processor.tokenizer.eos_token_id
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        make_eos_certain(model, eos)
        engine.update_weights(model)
        stop = engine.generate(prompts, Sampling(max_new_tokens=8), seed=0)
    finally:
        model.load_state_dict(original)
        engine.update_weights(model)
    assert stop.finish_reasons == ["stop"] * 4
    assert stop.response_ids.tolist() == [[eos]] * 4 and stop.response_mask.tolist() == [[1.0]] * 4
    assert stop.logprobs.abs().max().item() < 1e-4  # log 1


def test_a_weight_sync_brings_the_engine_to_the_changed_weights(vlm):
    model, _, engine, prompts = vlm
    sampling = Sampling(max_new_tokens=10)
    before = engine.generate(prompts, sampling, seed=11)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for param in model.parameters():  # the vision tower and the language model alike
                param.add_(torch.randn_like(param) * 0.05)
        stale = engine.generate(prompts, sampling, seed=11)
        assert torch.equal(stale.response_ids, before.response_ids)  # nothing reached the engine yet
        assert (scored(model, engine, prompts, stale, 1.0) - stale.logprobs).abs().max().item() > 1e-2
        syncs = engine.weight_syncs
        engine.update_weights(model)
        after = engine.generate(prompts, sampling, seed=11)
        assert engine.weight_syncs == syncs + 1
        assert (scored(model, engine, prompts, after, 1.0) - after.logprobs).abs().max().item() < 1e-4
        assert not torch.equal(after.response_ids, before.response_ids)
    finally:
        model.load_state_dict(original)
        engine.update_weights(model)


def test_prompts_that_vllm_would_encode_differently_are_refused(vlm, tiny_vlm):
    _, processor, engine, prompts = vlm
    one = Sampling(max_new_tokens=1)
    with pytest.raises(ValueError, match="no images"):
        engine.generate([replace(prompts[0], images=[])], one)
    with pytest.raises(ValueError, match=r"2 image\(s\) but 1 run"):
        engine.generate([replace(prompts[0], images=[RED, RED])], one)
    # a policy whose processor shrinks images further than vLLM's does: 4 visual tokens instead of 8
    small = Policy(tiny_vlm, dtype="float32", max_pixels=56 * 56).load_processor()
    with pytest.raises(ValueError, match="size its images differently"):
        engine.generate([ask(small, "Which side?", [WIDE])], one)


def test_configuration_errors_name_the_key():
    assert isinstance(VLLMEngine(), RolloutEngine)
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5"):
        VLLMEngine(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="sleep_level=3"):
        VLLMEngine(sleep_level=3)
    with pytest.raises(RuntimeError, match="bind"):
        VLLMEngine().generate([], Sampling())


def test_top_k_and_top_p_are_refused(vlm):
    _, _, engine, prompts = vlm
    for sampling in (Sampling(top_k=20), Sampling(top_p=0.9)):
        with pytest.raises(ValueError, match="top_k=0 and top_p=1"):
            engine.generate(prompts, sampling)
