"""HF engine: one prefill per distinct prompt, its cache copied to the samples; the same samples and log-probs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlrl.models import Policy
from vlrl.models.inputs import encode_prompt
from vlrl.models.tiny import build_llava_onevision
from vlrl.rollout import HFEngine, Sampling


def _prompt(processor, text: str, images: list[Image.Image]):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return encode_prompt(processor, [{"role": "user", "content": content if images else text}], images)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision", "qwen2"])
def family(request, tmp_path_factory):
    if request.param == "llava_onevision":
        path = str(build_llava_onevision(tmp_path_factory.mktemp("llava")))
    else:
        path = f"tiny:{request.param}"
    model, processor = Policy(path, dtype="float32").load()
    if request.param == "qwen2":
        a = _prompt(processor, "What is two plus two?", [])
        b = _prompt(processor, "Which number is larger, seven or nine? Answer in one word.", [])
    else:
        size = (56, 56)
        a = _prompt(processor, "What colour is the square?", [Image.new("RGB", size, (200, 30, 30))])
        b = _prompt(  # two images, a longer text: rows of different lengths (left padding)
            processor,
            "Which of the two images holds the blue circle, the first or the second?",
            [Image.new("RGB", size, (30, 30, 200)), Image.new("RGB", size, (30, 160, 30))],
        )
    return request.param, model, processor, a, b


class TokenCounter:
    """Positions fed to the language model (rows x columns), summed over its forward passes."""

    def __init__(self, model):
        lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
        self.tokens = 0
        self.handle = lm.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        shape = (embeds if embeds is not None else ids).shape
        self.tokens += int(shape[0] * shape[1])


def _generate(model, processor, prompts, share: bool, steps: int = 12):
    engine = HFEngine(share_prefill=share)
    engine.bind(model, processor)
    counter = TokenCounter(model)
    try:  # greedy over the whole length: every row runs every step, so the counts are exact
        sampled = engine.generate(
            prompts, Sampling(temperature=1.0, max_new_tokens=steps, min_new_tokens=steps), seed=7
        )
    finally:
        counter.handle.remove()
    return sampled, counter.tokens


def test_shared_prefill_samples_the_same_tokens_with_the_same_logprobs(family):
    name, model, processor, a, b = family
    prompts = [a, a, a, b, b, a]  # groups need not be contiguous
    plain, plain_tokens = _generate(model, processor, prompts, share=False)
    shared, shared_tokens = _generate(model, processor, prompts, share=True)
    assert torch.equal(plain.response_ids, shared.response_ids), name
    assert torch.equal(plain.response_mask, shared.response_mask)
    assert (plain.logprobs - shared.logprobs).abs().max().item() < 1e-5
    # plain: 6 rows x P prompt columns, then 11 decoding steps of 6 rows; shared: 2 distinct rows x (P - 1),
    # then the last prompt column and 11 steps for 6 rows
    width = max(a.length, b.length)
    assert plain_tokens == 6 * width + 6 * 11
    assert shared_tokens == 2 * (width - 1) + 6 * 1 + 6 * 11


def test_distinct_prompts_only_use_the_plain_prefill(family):
    _, model, processor, a, b = family
    plain, plain_tokens = _generate(model, processor, [a, b], share=False, steps=4)
    shared, shared_tokens = _generate(model, processor, [a, b], share=True, steps=4)
    assert torch.equal(plain.response_ids, shared.response_ids)
    assert plain_tokens == shared_tokens == 2 * max(a.length, b.length) + 2 * 3
