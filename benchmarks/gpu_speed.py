"""GPU speed of one RL step on a random-weight Qwen2.5-VL-3B/7B architecture, built offline: one table.

Nothing is downloaded: the model is the real architecture (``--size 3b`` or ``7b``; text and vision
sizes of the released configs) with random weights in bfloat16 and the tokenizer of ``vlrl.models.tiny``
(the real 151k vocabulary when ``shared/data/tokenizers/qwen2.5`` is present, else the tiny one, with
the model's embedding at the real 151,936 rows either way). The prompts are the synthetic shapes
questions of ``vlrl.data`` (one image each), ``B`` prompts x ``G`` samples. It measures:

- rollout tokens/s of vlrl's ``HFEngine`` and, where vLLM is installed, of ``VLLMEngine`` against a
  standalone ``vllm.LLM`` on the same model, prompts and sampling (temperature 1, no top-k/top-p);
- training sample tokens/s of the policy forward + backward (vlrl's path: the vision tower once per
  distinct image per micro-batch, each distinct prompt once; and a row per sample) and its MFU, counting
  ``6 x parameters`` FLOPs per position the language model ran and per patch for the vision tower,
  against ``--peak-tflops`` (H200 / H100 bf16 dense: 989);
- the step time: rollout (the faster engine) + training.

Run on a lent GPU (about 5-8 minutes at 7B)::

    python benchmarks/gpu_speed.py --size 7b --prompts 8 --group-size 8 --max-new-tokens 256
    python benchmarks/gpu_speed.py --size tiny --device cpu --prompts 2 --group-size 2 --max-new-tokens 8  # smoke

``--size tiny`` (the tiny test model) runs end to end on a CPU so the script is exercised without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REAL_VOCAB_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers" / "qwen2.5"
PROMPT_TEMPLATE = "{question}\nPut your final answer within \\boxed{{}}."
# text and vision sizes of the released Qwen2.5-VL configs
SIZES: dict[str, dict[str, Any]] = {
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vision_out=2048),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vision_out=3584),
}
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31])


def build_model(size: str, out_dir: Path, device: str) -> Path:
    """Write the model of ``size`` to ``out_dir`` (random weights, offline) and return its path."""
    from vlrl.models import tiny

    vocab = REAL_VOCAB_DIR if REAL_VOCAB_DIR.is_dir() else None
    if size == "tiny":
        return tiny.build_qwen2_5_vl(out_dir, real_vocab_dir=vocab)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    s = SIZES[size]
    tok = tiny.build_tokenizer(real_vocab_dir=vocab)
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    text = dict(
        vocab_size=151936,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(VISION, out_hidden_size=s["vision_out"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=size == "3b",
        **{k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    processor = Qwen2_5_VLProcessor(
        **tiny._vision_processors(256 * 28 * 28, 1280 * 28 * 28), tokenizer=tok, chat_template=tiny.CHAT_TEMPLATE
    )
    path = tiny._save(model, processor, out_dir)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return path


def prompt_rows(count: int, image_size: int) -> list[Any]:
    from vlrl.data import RLDataModule, Synthetic

    data = RLDataModule(
        train=Synthetic("train", size=count, seed=0, image_size=image_size),
        batch_size=count,
        prompt_template=PROMPT_TEMPLATE,
        shuffle=False,
    )
    dataset = data.dataset("train")
    return [dataset[i] for i in range(count)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rollout(engine: Any, prompts: list, sampling: Any, device: str) -> tuple[float, float]:
    """(seconds, generated tokens) of one ``generate`` call, after one warm-up call."""
    engine.generate(prompts, sampling, seed=0)
    sync(device)
    start = time.perf_counter()
    out = engine.generate(prompts, sampling, seed=1)
    sync(device)
    return time.perf_counter() - start, float(out.response_mask.sum())


def standalone_vllm(model_dir: str, rows: list, group: int, processor: Any, max_new_tokens: int) -> tuple[float, float]:
    """(seconds, generated tokens) of a plain ``vllm.LLM`` on the same prompts, G samples each."""
    from vllm import LLM, SamplingParams

    llm = LLM(model_dir, dtype="bfloat16", gpu_memory_utilization=0.3, limit_mm_per_prompt={"image": 1})
    params = SamplingParams(n=group, temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_new_tokens, seed=1)
    requests = [
        {
            "prompt": processor.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False),
            "multi_modal_data": {"image": r.images[0]},
        }
        for r in rows
    ]
    llm.generate(requests, params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    del llm
    gc.collect()
    return seconds, float(tokens)


def training(
    model: Any, rollout: Any, pad_id: int, micro: int, device: str, prompt_once: bool
) -> tuple[float, float, float, float]:
    """(seconds, sample tokens, computed positions, vision patches) of forward + backward over the rollout in
    micro-batches: vlrl's path (the vision tower once per distinct image per micro-batch), each distinct prompt
    once (``prompt_once_logits``) or a row per sample. Sample tokens are the real prompt + response tokens of
    the samples; computed positions those the language model ran (fewer when the prompts run once)."""
    from vlrl.algorithms import token_logprobs
    from vlrl.models.packing import ResponseBatch, mrope_index, prompt_groups, prompt_once_logits
    from vlrl.models.vision import distinct_prompts, with_shared_vision

    prompts, ids, mask = rollout
    tokens = positions = patches = 0.0
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), micro):
        part, part_ids, part_mask = prompts[i : i + micro], ids[i : i + micro], mask[i : i + micro]
        batch = ResponseBatch.padded(part, pad_id, part_ids, part_mask).to(torch.device(device), model.dtype)
        tokens += float(batch.inputs["attention_mask"].sum())
        patches += sum(float(p.media_inputs["pixel_values"].shape[0]) for p in distinct_prompts(part)[0])
        rows, width = batch.inputs["input_ids"].shape
        if prompt_once:
            distinct = len(prompt_groups(part)[0])
            positions += distinct * (width - batch.width - 1) + rows * batch.width  # prompts but their last token
        else:
            positions += rows * width
        with autocast:
            if prompt_once:
                logits = prompt_once_logits(model, batch, part, pad_id, mrope_index(model))
            else:
                inputs = with_shared_vision(model, part, batch.inputs)
                logits = batch.responses(model(**inputs, use_cache=False, logits_to_keep=batch.keep).logits)
            logprobs = batch.unpack(token_logprobs(logits, batch.targets))  # [n, T]
        logprobs.sum().backward()
    sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, tokens, positions, patches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "3b", "7b"], default="7b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=448, help="side of the synthetic images in pixels")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM rows even where vLLM is installed")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device; use --size tiny --device cpu to exercise the script")

    from vlrl.models import Policy
    from vlrl.models.inputs import encode_prompt
    from vlrl.models.loading import vision_modules
    from vlrl.rollout import HFEngine, Sampling

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vlrl-gpu-speed-") as tmp:
        start = time.perf_counter()
        model_dir = str(build_model(args.size, Path(tmp) / "model", args.device))
        rows["build_s"] = time.perf_counter() - start
        dtype = "bfloat16" if args.device == "cuda" else "float32"
        model, processor = Policy(model_dir, dtype=dtype).load()
        model.to(args.device).train()
        data = prompt_rows(args.prompts, args.image_size)
        encoded = [encode_prompt(processor, r.messages, r.images) for r in data]
        prompts = [p for p in encoded for _ in range(args.group_size)]
        sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens)
        engine = HFEngine()
        engine.bind(model, processor)
        seconds, tokens = timed_rollout(engine, prompts, sampling, args.device)
        rows["rollout HFEngine tokens/s"] = tokens / seconds
        rollout_s = seconds
        out = engine.generate(prompts, sampling, seed=2)
        vision_params = sum(p.numel() for m in vision_modules(model) for p in m.parameters())
        lm_params = sum(p.numel() for p in model.parameters()) - vision_params
        batches = (prompts, out.response_ids, out.response_mask)
        training(model, batches, engine.pad_id, args.micro_batch_size, args.device, True)  # warm-up, not timed
        for prompt_once, label in ((True, "train"), (False, "train, a row per sample")):
            seconds, tokens, positions, patches = training(
                model, batches, engine.pad_id, args.micro_batch_size, args.device, prompt_once
            )
            flops = 6.0 * (lm_params * positions + vision_params * patches)
            rows[f"{label} s"] = seconds
            rows[f"{label} sample tokens/s"] = tokens / seconds
            rows[f"{label} MFU"] = flops / seconds / (args.peak_tflops * 1e12)
            if prompt_once:
                train_s = seconds
        vllm_ready = args.device == "cuda" and not args.no_vllm
        if vllm_ready:
            try:
                import vllm  # noqa: F401
            except ImportError:
                vllm_ready = False
        if vllm_ready:
            from vlrl.rollout.vllm import VLLMEngine

            vengine = VLLMEngine(dtype="bfloat16")
            vengine.bind(model, processor)
            seconds, tokens = timed_rollout(vengine, prompts, sampling, args.device)
            rows["rollout VLLMEngine tokens/s"] = tokens / seconds
            rollout_s = min(rollout_s, seconds)
            del vengine
            gc.collect()
            seconds, tokens = standalone_vllm(model_dir, data, args.group_size, processor, args.max_new_tokens)
            rows["rollout standalone vLLM tokens/s"] = tokens / seconds
        rows["step s (rollout + train)"] = rollout_s + train_s
    print(
        f"Qwen2.5-VL {args.size}, random weights; B={args.prompts} x G={args.group_size}, {args.max_new_tokens} new tokens"
    )
    for key, value in rows.items():
        print(f"  {key:<36} {value:>12.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
