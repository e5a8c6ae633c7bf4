"""The vision tower once per distinct prompt: equal log-probs and gradients to the per-copy path, less tower work."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlrl.algorithms import token_logprobs
from vlrl.models import Policy
from vlrl.models.inputs import collate, encode_prompt, extend_prompt
from vlrl.models.loading import freeze, vision_modules
from vlrl.models.tiny import build_llava_onevision
from vlrl.models.vision import distinct_prompts, supports_shared_vision, tower_is_trained, with_shared_vision
from vlrl.rollout import HFEngine, Sampling

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 160, 30)


def _prompt(processor, text: str, images: list[Image.Image]):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return encode_prompt(processor, [{"role": "user", "content": content}], images)


def _load(name: str, tmp_path_factory) -> tuple[torch.nn.Module, object]:
    if name == "llava_onevision":
        path = build_llava_onevision(tmp_path_factory.mktemp("llava"))
        return Policy(str(path), dtype="float32").load()
    return Policy("tiny:qwen2_5_vl", dtype="float32").load()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def family(request, tmp_path_factory):
    model, processor = _load(request.param, tmp_path_factory)
    size = (56, 56)
    single = _prompt(processor, "What colour is the square?", [Image.new("RGB", size, RED)])
    double = _prompt(
        processor, "Which image holds the circle?", [Image.new("RGB", size, BLUE), Image.new("RGB", size, GREEN)]
    )
    return request.param, model, processor, single, double


def _samples(processor, single, double):
    """Five samples of two prompts (one with two images), responses of different lengths."""
    prompts = [single, single, single, double, double]
    ids = processor.tokenizer("the red square is left of it", add_special_tokens=False)["input_ids"][:6]
    responses = torch.tensor([ids, ids[::-1], ids[1:] + ids[:1], ids, ids[2:] + ids[:2]])  # [5, 6]
    mask = torch.ones_like(responses, dtype=torch.float)  # [5, 6]
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return prompts, responses, mask


def _logprobs(model, batch, responses, mask):
    width = responses.shape[1]
    logits = model(**batch, use_cache=False, logits_to_keep=width + 1).logits[:, :-1]  # [n, T, V]
    return token_logprobs(logits, responses) * mask  # [n, T]


class PatchCounter:
    """Rows of pixels (patches) that enter the vision tower, summed over its calls."""

    def __init__(self, model):
        self.rows = 0
        self.calls = 0
        self.handle = vision_modules(model)[0].register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        pixels = args[0] if args else next(iter(kwargs.values()))
        self.rows += int(pixels.shape[0])
        self.calls += 1


def test_distinct_prompts_by_media_extended_prompts_included(family):
    _, _, _, single, double = family
    cont = extend_prompt(single, torch.tensor([5, 6]))
    unique, index = distinct_prompts([single, single, double, cont, double])
    assert unique == [single, double]
    assert index == [0, 0, 1, 0, 1]


def test_trained_tower_equal_logprobs_and_gradients_one_pass_per_prompt(family):
    name, model, processor, single, double = family
    assert supports_shared_vision(model) and tower_is_trained(model)
    prompts, responses, mask = _samples(processor, single, double)
    plain = collate(prompts, 0, responses, mask)
    counter = PatchCounter(model)
    try:
        model.zero_grad()
        reference = _logprobs(model, plain, responses, mask)
        reference.sum().backward()
        reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        plain_rows = counter.rows
        counter.rows = 0
        model.zero_grad()
        shared = _logprobs(model, with_shared_vision(model, prompts, plain), responses, mask)
        shared.sum().backward()
    finally:
        counter.handle.remove()
    # the tower saw each prompt's pixels once: 1 + 2 = 3 images, not the 5 samples' 3·1 + 2·2 = 7
    assert plain_rows > 0 and counter.rows * 7 == plain_rows * 3
    assert (shared - reference).abs().max().item() < 1e-5
    tower = {n for n, _ in vision_modules(model)[0].named_parameters()}
    assert tower
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys()
    assert any(
        n.split(".")[-2] in {"patch_embed", "proj", "embeddings"} or "visual" in n or "vision" in n for n in grads
    )
    for n, g in grads.items():
        ref = reference_grads[n]
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-6), f"{name}: gradient of {n} differs"
    model.zero_grad()


def test_frozen_tower_features_kept_from_the_first_pass(family, tmp_path_factory):
    name, _, _, _, _ = family
    model, processor = _load(name, tmp_path_factory)
    freeze(vision_modules(model))
    if name == "llava_onevision":  # its row separator shapes the features too: trained until frozen
        assert tower_is_trained(model)
        model.model.image_newline.requires_grad_(False)
    assert not tower_is_trained(model)
    single = _prompt(processor, "What colour is the square?", [Image.new("RGB", (56, 56), RED)])
    double = _prompt(
        processor,
        "Which image holds the circle?",
        [Image.new("RGB", (56, 56), BLUE), Image.new("RGB", (56, 56), GREEN)],
    )
    prompts, responses, mask = _samples(processor, single, double)
    plain = collate(prompts, 0, responses, mask)
    with torch.no_grad():
        reference = _logprobs(model, plain, responses, mask)
    counter = PatchCounter(model)
    try:
        first = _logprobs(model, with_shared_vision(model, prompts, plain), responses, mask)
        first_calls = counter.calls
        flipped = collate(prompts[::-1], 0, responses.flip(0), mask.flip(0))  # another pass, rows reordered
        again = _logprobs(model, with_shared_vision(model, prompts[::-1], flipped), responses.flip(0), mask.flip(0))
    finally:
        counter.handle.remove()
    assert first_calls == 1
    assert counter.calls == 1  # the second pass read the kept features
    assert (first.detach() - reference).abs().max().item() < 1e-5
    assert (again.detach().flip(0) - reference).abs().max().item() < 1e-5


def test_engine_encodes_each_prompt_once_and_trainer_reproduces_logprobs(family):
    name, model, processor, single, double = family
    engine = HFEngine()
    engine.bind(model, processor)
    group = [p for p in (single, double) for _ in range(4)]
    counter = PatchCounter(model)
    try:
        gen = engine.generate(group, Sampling(temperature=1.0, max_new_tokens=8), seed=1)
    finally:
        counter.handle.remove()
    assert counter.calls == 1
    with torch.no_grad():  # one pass over the two distinct prompts: the rows generate encoded
        once = PatchCounter(model)
        model(**collate([single, double], engine.pad_id), use_cache=False)
        once.handle.remove()
    assert counter.rows == once.rows  # 3 images, not 4 x 3
    with torch.no_grad():
        plain = collate(group, engine.pad_id, gen.response_ids, gen.response_mask)
        recomputed = _logprobs(model, plain, gen.response_ids, gen.response_mask)
    assert (recomputed - gen.logprobs).abs().max().item() < 1e-4, name


def test_text_only_rows_mixed_into_an_image_batch(family):
    """A VLM batch may hold rows without images: they pass through, and every row's log-probs are unchanged."""
    _, model, processor, single, double = family
    text_only = _prompt(processor, "What is two plus two?", [])
    prompts = [single, text_only, double, text_only]
    ids = processor.tokenizer("the red square", add_special_tokens=False)["input_ids"][:3]
    responses = torch.tensor([ids] * 4)  # [4, 3]
    mask = torch.ones_like(responses, dtype=torch.float)  # [4, 3]
    batch = collate(prompts, processor.tokenizer.pad_token_id, responses, mask)
    with torch.no_grad():
        plain = _logprobs(model, batch, responses, mask)
        shared = _logprobs(model, with_shared_vision(model, prompts, batch), responses, mask)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
