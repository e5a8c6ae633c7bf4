"""SFT: assistant-only loss mask, packing without cross-contamination, frozen vision, row weights, LoRA, data."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from vlrl.data import DataError, Files, SFTDataModule, Synthetic, make_rows
from vlrl.methods import SFT
from vlrl.methods.sft import MicroBatch, encode_conversation, pack, packed_row, padded_batch
from vlrl.models import LoRA, Policy
from vlrl.models.packing import mrope_index
from vlrl.models.tiny import build_tokenizer
from vlrl.rewards import is_correct

TEMPLATE = "{question}\nPut your final answer within \\boxed{{}}."

# The chat template published with Qwen2.5-VL-7B-Instruct (its chat_template.json; Apache-2.0), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def make_module(**overrides) -> SFT:
    kwargs = dict(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        max_length=512,
    )
    return SFT(**{**kwargs, **overrides})


def make_data(train, batch_size: int = 4, **kwargs) -> SFTDataModule:
    return SFTDataModule(train=train, batch_size=batch_size, prompt_template=TEMPLATE, shuffle=False, **kwargs)


def quiet_trainer(**overrides) -> pl.Trainer:
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


def first_batch(data: SFTDataModule):
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def sequence_nll(module: SFT, micro: MicroBatch) -> torch.Tensor:
    """``[n]`` summed NLL of the trained tokens of each row of ``micro``."""
    with torch.no_grad():
        return (module.token_nll(micro) * micro.trained[:, 1:]).sum(dim=1)


# --- the assistant-only loss mask ------------------------------------------------------------------------------


def test_assistant_only_mask_on_the_real_qwen2_5_vl_chat_template(shared_data):
    """Real vocabulary, real chat template (default system turn, image tokens): only assistant turns are trained."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = build_tokenizer(real_vocab_dir=shared_data / "tokenizers" / "qwen2.5")
    size = {"shortest_edge": 56 * 56, "longest_edge": 16 * 28 * 28}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tok,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
        {"role": "assistant", "content": "The square is red.\n\n\\boxed{red}"},
        {"role": "user", "content": [{"type": "text", "text": "And its shape?"}]},
        {"role": "assistant", "content": "\\boxed{square}"},
    ]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    sample = encode_conversation(processor, messages, [Image.new("RGB", (56, 56), "red")], stop_ids=[im_end])

    prompt_ids = sample.prompt.token_inputs["input_ids"][0].tolist()
    assert prompt_ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 4  # the image expanded in the prompt
    assert tok.decode(prompt_ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    trained = sample.target_ids[sample.loss_mask.bool()].tolist()
    assert tok.decode(trained) == "The square is red.\n\n\\boxed{red}<|im_end|>\\boxed{square}<|im_end|>"
    # the untrained rest: the newline after each turn's end and the second user turn with its assistant header
    untrained = sample.target_ids[~sample.loss_mask.bool()].tolist()
    assert tok.decode(untrained) == "\n<|im_start|>user\nAnd its shape?<|im_end|>\n<|im_start|>assistant\n\n"
    # prompt + targets re-create the whole rendered conversation token for token (image pads collapsed)
    whole = processor.apply_chat_template(messages, tokenize=False)
    text = tok.decode(prompt_ids + sample.target_ids.tolist()).replace("<|image_pad|>" * 4, "<|image_pad|>")
    assert text == whole


def test_messages_must_end_with_an_assistant_turn():
    _, processor = Policy("tiny:qwen2", dtype="float32").load()
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        encode_conversation(processor, [{"role": "user", "content": "hi"}], [], stop_ids=[])


# --- packing ---------------------------------------------------------------------------------------------------


def test_pack_first_fit_decreasing():
    assert pack([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert pack([7, 7], 7) == [[0], [1]]
    with pytest.raises(ValueError, match="does not fit"):
        pack([8], 7)


@pytest.mark.parametrize("model_path", ["tiny:qwen2_5_vl", "tiny:qwen2"])
def test_packed_row_equals_the_samples_run_unpacked(model_path):
    """Per-token log-likelihoods of a packed row equal those of the samples run alone and padded together."""
    module = make_module(policy=Policy(model_path, dtype="float32"))
    module.configure_model()
    module.model.eval()
    vlm = model_path == "tiny:qwen2_5_vl"
    rows = make_rows("train", 3) + make_rows("train", 2, text_only=True)
    samples = []
    for row in rows:
        images = row["images"] if vlm else []
        user = [{"type": "image"} for _ in images] + [{"type": "text", "text": row["question"]}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row.get("response", "ok")}]
        samples.append(encode_conversation(module.processor, messages, images, module.rollout_engine.stop_ids))

    packed = packed_row(samples, mrope_index(module.model))
    assert packed.inputs["input_ids"].shape == (1, sum(s.length for s in samples))
    assert "attention_mask" not in packed.inputs
    alone = torch.cat([sequence_nll(module, padded_batch([s], module.pad_id)) for s in samples])  # [5]
    padded = sequence_nll(module, padded_batch(samples, module.pad_id))  # [5]
    with torch.no_grad():
        per_token = module.token_nll(packed) * packed.trained[:, 1:]  # [1, L - 1]
    owner = torch.arange(len(samples)).repeat_interleave(torch.tensor([s.length for s in samples]))  # [L]
    packed_sums = torch.zeros(len(samples)).index_add_(0, owner[1:], per_token[0])  # by the predicted token's sample
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed_sums, alone, atol=1e-4, rtol=1e-5)

    # the check would catch contamination: the same row with an ordinary all-ones mask attends across samples
    leaky = MicroBatch(
        {**packed.inputs, "attention_mask": torch.ones_like(packed.inputs["input_ids"])}, packed.weights, packed.trained
    )
    with torch.no_grad():
        leaked = (module.token_nll(leaky) * leaky.trained[:, 1:]).sum()
    assert not torch.allclose(leaked, alone.sum(), atol=1e-2)


def test_packed_and_unpacked_training_give_the_same_loss_and_update():
    logged, weights, passes = {}, {}, {}
    for pack_rows in (False, True):
        module = make_module(
            pack=pack_rows, micro_batch_size=2, optimizer=lambda params: torch.optim.SGD(params, lr=0.5)
        )
        trainer = quiet_trainer(max_steps=1)
        trainer.fit(module, datamodule=make_data(Synthetic("train", size=6, text_only=True), batch_size=6))
        logged[pack_rows] = trainer.callback_metrics["train/loss"]
        passes[pack_rows] = trainer.callback_metrics["train/micro_batches"]
        weights[pack_rows] = module.model.lm_head.weight.detach().clone()
    assert passes[False] == 3 and passes[True] < 3  # 6 samples of ~150 tokens: 3 per 512-token row
    torch.testing.assert_close(logged[True], logged[False], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights[True], weights[False], atol=1e-6, rtol=1e-5)


# --- training ----------------------------------------------------------------------------------------------------


def test_frozen_vision_is_unchanged_and_the_language_model_learns():
    """Image rows (target = answer) through a frozen vision tower: its weights stay, the LM's move."""
    module = make_module(policy=Policy("tiny:qwen2_5_vl", dtype="float32", freeze_vision=True), pack=True)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, datamodule=make_data(Synthetic("train", size=8)))
    assert trainer.global_step == 2
    named = dict(module.model.named_parameters())
    visual = [n for n in named if ".visual." in n]
    assert visual and all(torch.equal(named[n], before[n]) for n in visual)
    assert all(not named[n].requires_grad for n in visual)
    assert not torch.equal(named["lm_head.weight"], before["lm_head.weight"])


def test_text_only_rows_train_a_vlm():
    """Text-only rows (no image, no pixel values) through the VLM: the loss on a fixed batch falls."""
    batch = first_batch(make_data(Synthetic("train", size=2, text_only=True), batch_size=2))
    assert all(images == [] for images in batch.images)
    module = make_module(pack=True, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    module.configure_model()
    samples, _ = module.encode(batch)
    micro = module.micro_batches(samples)
    assert not any("pixel_values" in m.inputs for m in micro)
    start = sum(float(sequence_nll(module, m).sum()) for m in micro)
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(module, datamodule=make_data(Synthetic("train", size=2, text_only=True), batch_size=2))
    end = sum(float(sequence_nll(module, m).sum()) for m in micro)
    assert end < 0.8 * start


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("pack_rows", [False, True])
def test_row_weights_scale_each_samples_loss(tmp_path, pack_rows):
    """loss = Σ_i w_i · NLL_i / N (N: trained tokens of the batch), pinned against per-sample NLLs."""
    rows = [
        {"question": "What colour is the shape?", "response": "It is red. \\boxed{red}", "weight": 2.0},
        {"question": "How many shapes are there?", "response": "\\boxed{3}", "weight": 0.0},
        {"question": "What is 2 + 3?", "answer": "5", "weight": 0.5},
    ]
    data = make_data(Files(str(write_rows(tmp_path / "rows.jsonl", rows)), require_answer=False), batch_size=3)
    module = make_module(pack=pack_rows, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    module.configure_model()
    samples, _ = module.encode(first_batch(data))
    assert [s.weight for s in samples] == [2.0, 0.0, 0.5]
    nll = torch.cat([sequence_nll(module, padded_batch([s], module.pad_id)) for s in samples])  # [3]
    tokens = sum(float(s.loss_mask.sum()) for s in samples)
    expected = (2.0 * nll[0] + 0.0 * nll[1] + 0.5 * nll[2]) / tokens
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, datamodule=data)
    torch.testing.assert_close(trainer.callback_metrics["train/loss"], expected, atol=1e-5, rtol=1e-5)
    assert trainer.callback_metrics["train/tokens"] == tokens


def test_lora_sft_trains_only_the_adapters():
    module = make_module(policy=Policy("tiny:qwen2_5_vl", dtype="float32", lora=LoRA(rank=4, alpha=8)), pack=True)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, datamodule=make_data(Synthetic("train", size=8, text_only=True)))
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_validation_reports_loss_and_generation_accuracy():
    from vlrl.rollout import Sampling

    data = SFTDataModule(
        train=Synthetic("train", size=4, text_only=True),
        val=Synthetic("val", size=4, text_only=True),
        batch_size=4,
        prompt_template=TEMPLATE,
    )
    module = make_module(eval_sampling=Sampling(temperature=0.0, max_new_tokens=4))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert metrics["val/loss"] > 0 and 0 <= metrics["val/accuracy"] <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(pack=True, max_length=None), "pack=true needs max_length"), (dict(micro_batch_size=0), "micro_batch_size")],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


def test_long_samples_are_cut_and_counted():
    batch = first_batch(make_data(Synthetic("train", size=4, text_only=True), batch_size=4))
    module = make_module(max_length=None)
    module.configure_model()
    full, _ = module.encode(batch)
    shortest_prompt = min(s.prompt.length for s in full)
    module.max_length = shortest_prompt + 3
    samples, stats = module.encode(batch)
    assert samples and all(s.length == shortest_prompt + 3 for s in samples)
    assert stats["data/truncated_frac"] + stats["data/dropped_frac"] == 1.0
    assert stats["data/truncated_frac"] == len(samples) / 4


# --- data --------------------------------------------------------------------------------------------------------


def test_sft_rows_become_conversations(tmp_path):
    rows = [
        {"question": "Q1", "response": "R1", "answer": "A1"},  # the response is learnt, the answer kept for grading
        {"question": "Q2", "answer": "A2"},  # no response: the answer is the target
        {"messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "R3"}]},
    ]
    source = Files(str(write_rows(tmp_path / "rows.jsonl", rows)), require_answer=False)
    batch = first_batch(SFTDataModule(train=source, batch_size=3, shuffle=False))
    assert [m[-1]["role"] for m in batch.messages] == ["assistant"] * 3
    assert batch.messages[0][-1]["content"] == [{"type": "text", "text": "R1"}]
    assert batch.messages[1][-1]["content"] == [{"type": "text", "text": "A2"}]
    assert batch.messages[2] == rows[2]["messages"]
    assert batch.answers == ["A1", "A2", ""]


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"messages": [{"role": "user", "content": "Q"}]}, "response", "missing_target"),
        ({"question": "Q", "response": 3}, "response", "wrong_type"),
        ({"question": "Q", "answer": "A", "weight": -1}, "weight", "bad_weight"),
        ({"question": "Q", "answer": "A", "weight": "high"}, "weight", "bad_weight"),
    ],
)
def test_bad_sft_rows_are_named_or_skipped(tmp_path, row, field, reason):
    good = {"question": "Q", "answer": "A"}
    path = write_rows(tmp_path / "rows.jsonl", [good, row])
    source = Files(str(path), require_answer=False)
    with pytest.raises(DataError, match=rf"rows.jsonl line 2: field '{field}'"):
        SFTDataModule(train=source, batch_size=1).setup("fit")
    data = SFTDataModule(train=source, batch_size=1, on_bad_row="skip")
    data.setup("fit")
    assert len(data.dataset("train")) == 1
    assert data.skipped_rows == {f"train/{reason}": 1}


def test_text_only_synthetic_rows_reason_to_their_answer():
    rows = make_rows("train", 60, text_only=True)
    assert {r["data_source"] for r in rows} == {"color", "shape", "position", "compare", "count", "add"}
    picture_rows = make_rows("train", 60)
    for text, picture in zip(rows, picture_rows, strict=True):
        assert text["images"] == [] and text["answer"] == picture["answer"]
        assert text["question"].endswith(picture["question"])  # same scene, described in words first
        assert is_correct(text["response"], text["answer"], None)
        conclusion = text["response"].splitlines()[-2]  # the last reasoning step, before the boxed answer
        assert text["answer"] in conclusion, (text["question"], text["response"])
