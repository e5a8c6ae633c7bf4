"""Tiny random models built offline, for tests and the CPU demo.

Each factory writes a complete Hugging Face model directory (config, weights, tokenizer, chat
template and, for VLMs, the processor) with ``save_pretrained``; everything in vlrl then loads it
through the same ``from_pretrained`` path a real checkpoint takes. Nothing is downloaded.

- ``qwen2_5_vl``: a Qwen2.5-VL (2-layer ViT, 4-layer language model, head_dim 32 so vLLM's CPU build
  can load it) with a byte-level BPE tokenizer trained here on a small corpus.
- ``qwen2``: a text-only Qwen2 with the same tokenizer (a reasoner, or a text policy).
- ``llava_onevision``: a LLaVA-OneVision (SigLIP tower + Qwen2 language model), a second VLM family.
- ``qwen2_5_vl_realvocab``: the Qwen2.5-VL above with the real 151,643-token Qwen2.5 vocabulary
  (special tokens at their real ids), given the folder holding ``vocab.json`` and ``merges.txt``.

``resolve_model_path("tiny:qwen2_5_vl")`` builds the model once into a cache folder
(``$VLRL_CACHE`` or ``~/.cache/vlrl``) and returns its path, so configs can name tiny models.

Run ``python -m vlrl.models.tiny OUT_DIR [NAME ...]`` to write them to a folder.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase

TINY_PREFIX = "tiny:"
SEED = 1234

# The special tokens of Qwen2.5, in the order of their real ids (151643 onwards).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
REAL_VOCAB_SIZE = 151643  # regular tokens in the real Qwen2.5 vocabulary

# A Qwen-style chat template: content is a string or a list of {"type": "text"|"image"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAVA_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\\n")


def _corpus() -> Iterator[str]:
    """Text the tiny BPE is trained on: words of the synthetic task, math and chat formatting."""
    words = [
        "what",
        "colour",
        "color",
        "is",
        "the",
        "shape",
        "square",
        "circle",
        "triangle",
        "red",
        "green",
        "blue",
        "yellow",
        "how",
        "many",
        "shapes",
        "are",
        "there",
        "which",
        "side",
        "left",
        "right",
        "top",
        "bottom",
        "larger",
        "smaller",
        "bigger",
        "number",
        "sum",
        "of",
        "two",
        "digits",
        "drawn",
        "in",
        "image",
        "answer",
        "question",
        "please",
        "reason",
        "step",
        "by",
        "step",
        "and",
        "put",
        "your",
        "final",
        "within",
        "boxed",
        "think",
        "wait",
        "let's",
        "double",
        "check",
        "does",
        "it",
        "seem",
        "right",
        "there",
        "might",
        "be",
        "a",
        "mistake",
        "caption",
        "describe",
        "detail",
        "the",
        "a",
        "an",
        "of",
        "to",
        "yes",
        "no",
        "image",
        "1",
        "2",
        "better",
        "first",
        "second",
    ]
    math = ["\\boxed{", "}", "\\frac{", "<think>", "</think>", "<answer>", "</answer>", "Answer:", "\n\n"]
    for i in range(200):
        yield " ".join(words[(i * 7 + k) % len(words)] for k in range(12))
        yield f"{i} + {i % 13} = {i + i % 13} " + " ".join(math)
    yield "".join(chr(c) for c in range(32, 127))


def build_tokenizer(vocab_size: int = 1024, real_vocab_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """A Qwen2 tokenizer: trained offline on a small corpus, or from the real Qwen2.5 vocabulary.

    Special tokens take the ids right after the regular vocabulary, so with the real vocabulary
    they land at their real ids (``<|endoftext|>`` = 151643, ``<|im_end|>`` = 151645, ...).
    """
    from transformers import Qwen2Tokenizer

    if real_vocab_dir is not None:
        vocab = json.loads((Path(real_vocab_dir) / "vocab.json").read_text())
        merges_text = (Path(real_vocab_dir) / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in merges_text if line and not line.startswith("#version")]
        if len(vocab) != REAL_VOCAB_SIZE:
            raise ValueError(f"{real_vocab_dir}/vocab.json has {len(vocab)} tokens, expected {REAL_VOCAB_SIZE}")
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        bpe.train_from_iterator(_corpus(), trainer=trainer)
        state = json.loads(bpe.to_str())["model"]
        vocab = state["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    expected = {t: len(vocab) + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    got = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    if got != expected:
        raise RuntimeError(f"special token ids moved: {got} != {expected}")
    return tok


def _text_kwargs(tok: PreTrainedTokenizerBase, hidden: int, layers: int) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,  # head_dim 32: the smallest vLLM's CPU kernels take
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _vision_processors(min_pixels: int, max_pixels: int) -> dict:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return {"image_processor": Qwen2VLImageProcessor(size=size), "video_processor": Qwen2VLVideoProcessor(size=size)}


def build_qwen2_5_vl(
    out_dir: str | Path,
    *,
    real_vocab_dir: str | Path | None = None,
    hidden: int = 128,
    layers: int = 4,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 16 * 28 * 28,
) -> Path:
    """Write a tiny random Qwen2.5-VL with tokenizer, chat template and processor to ``out_dir``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = build_tokenizer(real_vocab_dir=real_vocab_dir)
    text = _text_kwargs(tok, hidden, layers)
    half = 32 // 2  # mrope_section must sum to head_dim / 2
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, half - 10]}
    vision = dict(
        depth=vision_layers,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=vision_hidden // 32,
        out_hidden_size=hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[vision_layers - 1],
    )
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **{k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = Qwen2_5_VLProcessor(
        **_vision_processors(min_pixels, max_pixels), tokenizer=tok, chat_template=CHAT_TEMPLATE
    )
    return _save(model, processor, out_dir)


def build_qwen2(out_dir: str | Path, *, hidden: int = 128, layers: int = 4) -> Path:
    """Write a tiny random text-only Qwen2 with tokenizer and chat template to ``out_dir``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(
        Qwen2Config(**_text_kwargs(tok, hidden, layers), rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    )
    return _save(model, tok, out_dir)


def build_llava_onevision(
    out_dir: str | Path, *, hidden: int = 128, layers: int = 2, vision_hidden: int = 64, image_size: int = 56
) -> Path:
    """Write a tiny random LLaVA-OneVision (SigLIP + Qwen2) with its own processor to ``out_dir``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    patch = 14
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=vision_hidden // 32,
        image_size=image_size,
        patch_size=patch,
    )
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_text_kwargs(tok, hidden, layers)},
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[image_size, image_size]],
        vision_aspect_ratio="anyres_max_1",
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[[image_size, image_size]],
        do_pad=True,
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=LLAVA_CHAT_TEMPLATE,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size}),
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1",
    )
    return _save(model, processor, out_dir)


def _save(model: torch.nn.Module, processor, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = True
    model.generation_config.top_k = None
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen2": build_qwen2,
    "llava_onevision": build_llava_onevision,
}


def cache_dir() -> Path:
    return Path(os.environ.get("VLRL_CACHE", Path.home() / ".cache" / "vlrl")) / "tiny"


def resolve_model_path(path: str) -> str:
    """Return ``path`` unchanged, or build ``tiny:NAME`` once into the cache and return its folder."""
    if not path.startswith(TINY_PREFIX):
        return path
    name = path[len(TINY_PREFIX) :]
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {path!r}; choose one of {', '.join(TINY_PREFIX + n for n in BUILDERS)}")
    target = cache_dir() / name
    if not (target / "config.json").exists():
        tmp = target.with_name(f"{name}.tmp{os.getpid()}")
        BUILDERS[name](tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    return str(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write tiny random models to a folder.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("names", nargs="*", default=list(BUILDERS), choices=list(BUILDERS))
    args = parser.parse_args(argv)
    for name in args.names:
        print(BUILDERS[name](args.out_dir / name))


if __name__ == "__main__":
    main()
