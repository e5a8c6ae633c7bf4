"""The HF generate engine: G samples per prompt, finish reasons, and log-probs the trainer reproduces."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlrl.algorithms import token_logprobs
from vlrl.models import Policy
from vlrl.models.inputs import collate, encode_prompt, extend_prompt
from vlrl.rollout import HFEngine, RolloutEngine, Sampling


@pytest.fixture(scope="module")
def vlm():
    model, processor = Policy("tiny:qwen2_5_vl", dtype="float32").load()
    engine = HFEngine()
    engine.bind(model, processor)
    images = [Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (112, 56), (30, 30, 200))]
    texts = ["What colour is the square?", "Which side holds the big circle, left or right?"]
    prompts = [
        encode_prompt(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}], [im])
        for t, im in zip(texts, images, strict=True)
    ]
    return model, processor, engine, prompts


def _recompute(model, engine, prompts, gen, temperature):
    batch = collate(prompts, engine.pad_id, gen.response_ids, gen.response_mask)
    width = gen.response_ids.shape[1]
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[:, -width - 1 : -1]
    return token_logprobs(logits, gen.response_ids, temperature) * gen.response_mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_match_engine_within_1e4(vlm, temperature):
    model, _, engine, prompts = vlm
    group = [p for p in prompts for _ in range(4)]  # G = 4, prompts of different lengths (left padding)
    gen = engine.generate(group, Sampling(temperature=temperature, max_new_tokens=20), seed=3)
    assert gen.response_ids.shape[0] == 8
    assert gen.response_mask.sum() > 0
    recomputed = _recompute(model, engine, group, gen, temperature)
    assert (recomputed - gen.logprobs).abs().max().item() < 1e-4
    assert (gen.logprobs[gen.response_mask.bool()] < 0).all()


def test_sampling_is_seeded_true_sampling_and_skips_vision_tokens(vlm):
    _, processor, engine, prompts = vlm
    group = [prompts[0]] * 6
    a = engine.generate(group, Sampling(max_new_tokens=16), seed=7)
    b = engine.generate(group, Sampling(max_new_tokens=16), seed=7)
    c = engine.generate(group, Sampling(max_new_tokens=16), seed=8)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert len({tuple(r) for r in a.response_ids.tolist()}) > 1  # G samples differ from each other
    vision = [
        processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
    ]
    assert not torch.isin(a.response_ids, torch.tensor(vision)).any()
    # a random tiny model spreads its mass over the vocabulary: true sampling (top_k off) reaches
    # tokens far outside the 50 most likely ones
    assert len(set(a.response_ids.flatten().tolist())) > 20


def test_finish_reasons_and_masks(vlm):
    model, processor, engine, prompts = vlm
    eos = processor.tokenizer.eos_token_id
    # make EOS overwhelmingly likely: every sample must stop after exactly one token
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[eos] = 100.0
    head = model.lm_head
    original = head.bias
    head.bias = torch.nn.Parameter(bias)
    try:
        stop = engine.generate(prompts, Sampling(max_new_tokens=8), seed=0)
    finally:
        head.bias = original
    assert stop.finish_reasons == ["stop", "stop"]
    assert stop.response_mask.tolist() == [[1.0], [1.0]]
    assert stop.response_ids[:, 0].tolist() == [eos, eos]
    length = engine.generate(prompts, Sampling(max_new_tokens=5, min_new_tokens=5), seed=0)
    assert length.finish_reasons == ["length", "length"]
    assert length.response_mask.sum().item() == 10


def test_greedy_and_continuation_from_a_prefix(vlm):
    model, _, engine, prompts = vlm
    greedy = engine.generate(prompts, Sampling(temperature=0.0, max_new_tokens=6), seed=0)
    again = engine.generate(prompts, Sampling(temperature=0.0, max_new_tokens=6), seed=1)
    assert torch.equal(greedy.response_ids, again.response_ids)
    # continuing from (prompt + first 3 greedy tokens) gives the remaining greedy tokens
    n = int(greedy.response_mask[0].sum())
    if n >= 4:
        extended = extend_prompt(prompts[0], greedy.response_ids[0, :3])
        rest = engine.generate([extended], Sampling(temperature=0.0, max_new_tokens=n - 3), seed=0)
        assert rest.response_ids[0, : n - 3].tolist() == greedy.response_ids[0, 3:n].tolist()


def test_engine_satisfies_protocol():
    assert isinstance(HFEngine(), RolloutEngine)
    with pytest.raises(RuntimeError, match="bind"):
        HFEngine().generate([], Sampling())
