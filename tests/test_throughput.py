"""Speed work: the throughput callback (hand-counted FLOPs and parameters, patch counts, the peak
table, a short fit) and the optimised parts of the step (the engine's sampler and log-prob
recorder, the chunked entropy)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_grpo import make_data, make_module, quiet_trainer
from vlrl.algorithms import entropy_from_logits, token_logprobs
from vlrl.callbacks import Throughput
from vlrl.callbacks.throughput import ParamCounts, StepWork, count_parameters, peak_flops_of, step_flops, visual_patches
from vlrl.models.inputs import collate, encode_prompt
from vlrl.models.loading import Policy
from vlrl.rollout import HFEngine, Sampling
from vlrl.rollout.hf import StepLogprobs


class Toy(torch.nn.Module):
    """Embedding 10x4 (40, excluded), vision 3->4 (16), a 4->4 layer (20), head 4->10 (40)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.visual = torch.nn.Linear(3, 4)
        self.layer = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed


def test_count_parameters_by_hand() -> None:
    toy = Toy()
    assert count_parameters(toy) == ParamCounts(language=60, vision=16, vision_trainable=True)
    toy.visual.requires_grad_(False)
    assert count_parameters(toy).vision_trainable is False


def test_step_flops_by_hand() -> None:
    params = ParamCounts(language=60, vision=16, vision_trainable=True)
    work = StepWork(
        prompt_tokens=10,
        sampled_tokens=6,
        rollout_patches=8,
        train_tokens=16,
        train_patches=8,
        epochs=2,
        reference_passes=1,
    )
    # generation 2·60·(10 + 6) + 2·16·8 = 1920 + 256 = 2176
    # training   2 epochs × (6·60·16 + 6·16·8) = 2 × (5760 + 768) = 13056
    # reference  2·60·16 + 2·16·8 = 2176
    assert step_flops(params, work) == 2176 + 13056 + 2176
    # frozen vision tower: 2·16·8 = 256 per epoch in training instead of 768
    frozen = ParamCounts(language=60, vision=16, vision_trainable=False)
    assert step_flops(frozen, work) == 2176 + 2 * (5760 + 256) + 2176


def test_parameters_and_patches_of_the_tiny_vlm() -> None:
    model, processor = Policy("tiny:qwen2_5_vl", dtype="float32").load()
    counts = count_parameters(model)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    embed = model.get_input_embeddings().weight.numel()
    assert counts.vision == vision > 0
    assert counts.language + counts.vision + embed == sum(p.numel() for p in model.parameters())
    # a 112 x 112 image in 14-pixel patches: an 8 x 8 grid, one temporal step -> 64 patches
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt = encode_prompt(processor, messages, [Image.new("RGB", (112, 112))])
    assert visual_patches(prompt, 14) == 64
    # no grid (LLaVA-style pixel values [images, 3, H, W]): pixels / patch area, 2 x (28/14)² = 8
    prompt.media_inputs = {"pixel_values": torch.zeros(2, 3, 28, 28)}
    assert visual_patches(prompt, 14) == 8
    prompt.media_inputs = {}
    assert visual_patches(prompt, 14) == 0


def test_peak_flops_table(monkeypatch) -> None:
    assert peak_flops_of(torch.device("cpu")) is None
    # No GPU here: the device name is the only thing read, so it is stubbed.
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops_of(torch.device("cuda", 0)) == peak
    with pytest.raises(ValueError, match="peak_flops"):
        Throughput(peak_flops=0)


@pytest.mark.slow
def test_fit_logs_finite_throughput_and_mfu() -> None:
    module = make_module()
    callback = Throughput(peak_flops=1e12)
    trainer = quiet_trainer(max_steps=2, callbacks=[callback])
    trainer.fit(module, datamodule=make_data())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    for key in ("perf/train_tokens_per_s", "perf/flops_per_s", "perf/mfu", "perf/rollout_tokens_per_s"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, (key, metrics)
    assert metrics["perf/mfu"] == pytest.approx(metrics["perf/flops_per_s"] / 1e12)
    # the last step's work: 2 prompts x 4 samples, each prompt encoded with its image's patches
    work = callback.work
    assert work.sampled_tokens > 0 and work.rollout_patches > 0 and work.epochs == 1
    assert work.train_tokens == work.prompt_tokens + work.sampled_tokens  # nothing reshaped the batch
    # on CPU without peak_flops there is no peak to compare with: no MFU
    plain = Throughput()
    plain.on_fit_start(trainer, module)
    assert plain.peak_flops is None and plain.params == callback.params


# ---------------------------------------------------------------------------------------------- #
# The step's optimised parts: the engine's own sampler and log-prob recorder, the chunked entropy


@pytest.mark.parametrize(
    ("temperature", "expected"), [(1.0, [0.1, 0.2, 0.3, 0.4]), (0.5, [1 / 30, 4 / 30, 9 / 30, 16 / 30])]
)
def test_inverse_transform_sampler_draws_the_tempered_distribution(temperature, expected) -> None:
    n = 40_000
    raw = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.1])).expand(n, 5)  # [n, V] the model's logits
    scores = raw.clone()
    scores[:, 4] = -math.inf  # a suppressed token: processors before the sampler set it to -inf
    recorder = StepLogprobs(temperature, sample=True)
    recorder.latest = raw[:, None]  # what the forward hook would hold
    torch.manual_seed(0)
    out = recorder(torch.zeros(n, 3, dtype=torch.long), scores)
    tokens = out.argmax(dim=-1)  # [n] HF's greedy step
    assert (out.isfinite().sum(dim=-1) == 1).all()
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert freq[4] == 0  # never the suppressed token
    torch.testing.assert_close(freq[:4], torch.tensor(expected, dtype=torch.float64), atol=0.01, rtol=0)
    # the recorded log-prob is the raw one (token 4 not removed): log softmax(raw / T)[token]
    raw_logp = torch.log_softmax(raw[0] / temperature, dim=-1)
    logprobs = recorder.finish(tokens[:, None])  # [n, 1]
    torch.testing.assert_close(logprobs[:, 0], raw_logp[tokens])


def test_recorder_with_hf_sampling_takes_the_appended_token_and_checks_the_count() -> None:
    raw = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))[:, None]  # [2, 1, 3]
    recorder = StepLogprobs(1.0)
    recorder.latest = raw
    scores = raw[:, 0].clone()
    assert recorder(torch.zeros(2, 4, dtype=torch.long), scores) is scores  # not sampling: scores untouched
    recorder.latest = raw.flip(-1)  # the next pass
    recorder(torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 2]]), scores)  # step 1 appended tokens 1 and 2
    logprobs = recorder.finish(torch.tensor([[1, 0], [2, 0]]))  # step 2 picked token 0 in both rows
    expected = [[math.log(0.25), math.log(0.25)], [math.log(0.6), math.log(0.6)]]
    torch.testing.assert_close(logprobs, torch.tensor(expected))
    with pytest.raises(RuntimeError, match="recorded 2 steps for 3"):
        recorder.finish(torch.zeros(2, 3, dtype=torch.long))


def test_hf_warper_path_log_probs_match_the_trainer() -> None:
    model, processor = Policy("tiny:qwen2_5_vl", dtype="float32").load()
    engine = HFEngine()
    engine.bind(model, processor)
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    prompt = encode_prompt(processor, messages, [Image.new("RGB", (56, 56), (200, 30, 30))])
    gen = engine.generate([prompt] * 3, Sampling(top_k=5, max_new_tokens=6), seed=1)  # HF's top-k warper samples
    batch = collate([prompt] * 3, engine.pad_id, gen.response_ids, gen.response_mask)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[:, -7:-1]
    recomputed = token_logprobs(logits, gen.response_ids) * gen.response_mask
    assert (recomputed - gen.logprobs).abs().max().item() < 1e-4
    top5 = logits.topk(5, dim=-1).indices  # [3, 6, 5]
    valid = gen.response_mask.bool()
    assert (top5 == gen.response_ids[..., None]).any(-1)[valid].all()


def test_chunked_entropy_equals_the_differentiable_form() -> None:
    logits = torch.randn(3, 7, 11) * 4
    logits[0, 0, :3] = -math.inf
    reference = entropy_from_logits(logits.clone().requires_grad_(True)).detach()  # full-size autograd form
    for chunk_size in (1, 4, 1024):
        torch.testing.assert_close(entropy_from_logits(logits, chunk_size=chunk_size), reference)
    torch.testing.assert_close(
        entropy_from_logits(logits.bfloat16()), entropy_from_logits(logits.bfloat16().float()), rtol=0, atol=1e-6
    )
    assert entropy_from_logits(torch.zeros(2, 5, 7)).sub(math.log(7)).abs().max() < 1e-6  # uniform: ln 7
    # the temperature divides the logits: p = softmax([0, 2 ln 3] / 2) = [0.25, 0.75], H = 0.5623351
    two = torch.tensor([0.0, 2 * math.log(3.0)])
    assert abs(float(entropy_from_logits(two, temperature=2.0)) - 0.5623351) < 1e-6
    torch.testing.assert_close(entropy_from_logits(logits, 0.7), entropy_from_logits(logits / 0.7))
