"""Tiny offline models: built, saved and reloaded through from_pretrained, for several families."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from vlrl.models import LoRA, Policy, vision_modules
from vlrl.models.inputs import collate, encode_prompt
from vlrl.models.tiny import QWEN_SPECIAL_TOKENS, build_llava_onevision, build_qwen2_5_vl, resolve_model_path


def _image_message(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_tiny_qwen2_5_vl_is_a_real_checkpoint_directory(tiny_cache):
    path = resolve_model_path("tiny:qwen2_5_vl")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen2_5_vl"
    text = config.text_config
    assert text.hidden_size // text.num_attention_heads >= 32  # vLLM's CPU kernels need head_dim >= 32
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    model, processor = Policy("tiny:qwen2_5_vl", dtype="float32").load()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    enc = encode_prompt(processor, _image_message("what colour is the square?"), [Image.new("RGB", (56, 56), "red")])
    ids = enc.token_inputs["input_ids"][0].tolist()
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(image_pad) == 4  # 56x56 pixels -> 4x4 patches -> 2x2 merged visual tokens
    assert enc.media_inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith("<|im_start|>assistant\n")


def test_build_is_deterministic(tmp_path):
    a = build_qwen2_5_vl(tmp_path / "a", layers=1)
    b = build_qwen2_5_vl(tmp_path / "b", layers=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())


def test_text_model_loads_with_tokenizer_and_chat_template():
    model, tok = Policy("tiny:qwen2", dtype="float32").load()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    enc = encode_prompt(tok, [{"role": "user", "content": "What is 2 + 3?"}], [])
    assert enc.media_inputs == {}
    assert (
        tok.decode(enc.token_inputs["input_ids"][0])
        == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="text tokenizer only"):
        encode_prompt(tok, _image_message("x"), [Image.new("RGB", (8, 8))])


def test_second_vlm_family_llava_onevision(tmp_path):
    path = build_llava_onevision(tmp_path / "llava")
    model, processor = Policy(str(path), dtype="float32", freeze_vision=True).load()
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    frozen = vision_modules(model)
    assert {type(m).__name__ for m in frozen} == {"SiglipVisionModel", "LlavaOnevisionMultiModalProjector"}
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert any(p.requires_grad for p in model.parameters())
    enc = encode_prompt(processor, _image_message("which shape?"), [Image.new("RGB", (90, 60), "blue")])
    batch = collate([enc, enc], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_real_qwen_vocabulary_variant(tmp_path, shared_data):
    path = build_qwen2_5_vl(
        tmp_path / "real", real_vocab_dir=shared_data / "tokenizers" / "qwen2.5", hidden=64, layers=1
    )
    model, processor = Policy(str(path), dtype="float32").load()
    tok = processor.tokenizer
    assert len(tok) == 151643 + len(QWEN_SPECIAL_TOKENS)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    real_ids = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in real_ids} == real_ids
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # the ids real Qwen2.5 checkpoints use
    assert model.config.image_token_id == 151655
    enc = encode_prompt(processor, _image_message("What is x?"), [Image.new("RGB", (56, 56), "red")])
    assert enc.token_inputs["input_ids"][0].tolist().count(151655) == 4


def test_freeze_vision_and_lora():
    model, _ = Policy("tiny:qwen2_5_vl", dtype="float32", freeze_vision=True).load()
    visual = vision_modules(model)
    assert [type(m).__name__ for m in visual] == ["Qwen2_5_VisionTransformerPretrainedModel"]
    assert all(not p.requires_grad for p in visual[0].parameters())
    lora_model, _ = Policy("tiny:qwen2_5_vl", dtype="float32", lora=LoRA(rank=4, alpha=8)).load()
    trainable = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".visual." in n for n in trainable)  # adapters on the language model only by default


def test_quantization_without_lora_is_rejected():
    with pytest.raises(ValueError, match="policy.lora"):
        Policy("tiny:qwen2_5_vl", quantization="nf4")
