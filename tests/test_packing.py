"""Padding-free training forwards and micro-batches by a token budget: the same log-probs, values and gradients
as the padded forward, on the tiny Qwen2.5-VL (rows of one and two images, 3-D RoPE), LLaVA-OneVision (1-D
positions, tiled images) and the text-only Qwen2, with the vision tower shared across a prompt's samples."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from tests.test_grpo import make_data, make_module, quiet_trainer
from tests.test_ppo import make_ppo
from tests.test_vision_once import PatchCounter
from vlrl.algorithms import token_logprobs
from vlrl.models import Policy, resolve_model_path
from vlrl.models.inputs import encode_prompt
from vlrl.models.loading import vision_modules
from vlrl.models.packing import ResponseBatch, budget_slices, mrope_index, response_lengths
from vlrl.models.tiny import build_llava_onevision
from vlrl.models.vision import supports_shared_vision
from vlrl.types import PromptBatch, Rollout

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 160, 30)


def _prompt(processor, text: str, images: list[Image.Image]):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return encode_prompt(processor, [{"role": "user", "content": content}], images)


def hand_rollout(processor, vlm: bool) -> Rollout:
    """Seven samples of three prompts (one image, two images, one image at another size; all text for a text
    model), responses of 6, 2, 5 | 6, 3 | 1, 4 tokens, right-padded to 6."""
    size = (56, 56)
    one = [Image.new("RGB", size, RED)] if vlm else []
    two = [Image.new("RGB", size, BLUE), Image.new("RGB", size, GREEN)] if vlm else []
    wide = [Image.new("RGB", (112, 56), GREEN)] if vlm else []
    prompts = [
        _prompt(processor, "What colour is the square?", one),
        _prompt(processor, "Which image holds the circle?", two),
        _prompt(processor, "How many sides has a triangle?", wide),
    ]
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = tokenizer("the red square is left of it", add_special_tokens=False)["input_ids"][:6]
    assert len(ids) == 6
    responses = torch.tensor([ids, ids[::-1], ids[1:] + ids[:1], ids[2:] + ids[:2], ids, ids[::-1], ids])  # [7, 6]
    lengths = torch.tensor([6, 2, 5, 6, 3, 1, 4])
    mask = (torch.arange(6) < lengths[:, None]).float()  # [7, 6]
    responses = torch.where(mask.bool(), responses, torch.zeros_like(responses))
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    batch = PromptBatch(
        ids=["a", "b", "c"],
        messages=[[]] * 3,
        images=[one, two, wide],
        answers=["1"] * 3,
        choices=[None] * 3,
        data_sources=["s"] * 3,
    )
    return Rollout(
        prompts=[prompts[g] for g in group.tolist()],
        response_ids=responses,
        response_mask=mask,
        logprobs=torch.zeros(7, 6),
        texts=[""] * 7,
        finish_reasons=["stop"] * 7,
        group_index=group,
        batch=batch,
    )


@pytest.fixture(scope="module", params=["tiny:qwen2_5_vl", "tiny:qwen2", "llava_onevision"])
def loaded(request, tmp_path_factory):
    path = request.param
    if path == "llava_onevision":  # 1-D positions, images split into tiles (anyres)
        path = str(build_llava_onevision(tmp_path_factory.mktemp("llava")))
    module = make_module(policy=Policy(path, dtype="float32"), micro_batch_size=8)
    module.configure_model()
    module.model.eval()  # no dropout: the two forwards must see the same function
    return request.param, module


def _logprobs_and_grads(module, rollout, packing: bool):
    module.packing = packing
    module.model.zero_grad()
    logprobs, entropy = module.policy_logprobs(module.model, rollout, with_entropy=True)
    weights = torch.linspace(-1.0, 1.0, logprobs.numel()).view_as(logprobs)  # a loss that reaches every token
    (logprobs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    module.packing = False
    return logprobs.detach(), entropy, grads


def test_packed_equals_padded_per_token_and_in_every_gradient(loaded):
    name, module = loaded
    vlm = name != "tiny:qwen2"
    rollout = hand_rollout(module.processor, vlm)
    mask = rollout.response_mask
    if vlm:
        assert supports_shared_vision(module.model)  # shared vision is on in both forwards
        counter = PatchCounter(module.model)
    padded, padded_entropy, padded_grads = _logprobs_and_grads(module, rollout, packing=False)
    packed, packed_entropy, packed_grads = _logprobs_and_grads(module, rollout, packing=True)
    if vlm:
        counter.handle.remove()
        assert counter.calls == 2  # one vision pass per forward for the two image prompts
    assert (padded * (1 - mask)).abs().max() == 0 and (packed * (1 - mask)).abs().max() == 0  # 0 after the ends
    assert (packed - padded).abs().max().item() < 1e-5
    assert (packed_entropy - padded_entropy).abs().max().item() < 1e-5
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    if vlm:  # the trained vision tower gets its gradient too
        assert any(p.grad is not None for p in vision_modules(module.model)[0].parameters())
    for n, g in packed_grads.items():
        scale = max(1.0, padded_grads[n].abs().max().item())  # sums over many tokens (embeddings): rounding grows
        torch.testing.assert_close(g, padded_grads[n], rtol=1e-4, atol=1e-6 * scale, msg=f"{name}: gradient of {n}")
    module.model.zero_grad()


def test_the_check_catches_shared_attention_and_wrong_positions(loaded):
    """The packed row with an all-ones mask attends across samples; on the VLM, 1-D positions in place of
    each sample's 3-D ones move the image samples: both differ from the padded forward."""
    name, module = loaded
    rollout = hand_rollout(module.processor, name != "tiny:qwen2")
    with torch.no_grad():
        padded, _ = module.policy_logprobs(module.model, rollout)

        def run(batch: ResponseBatch) -> torch.Tensor:
            logits = module.model(**batch.inputs, use_cache=False, logits_to_keep=batch.keep).logits
            return batch.unpack(token_logprobs(logits, batch.targets))

        rope = mrope_index(module.model)
        packed = ResponseBatch.packed(rollout.prompts, rollout.response_ids, rollout.response_mask, rope)
        assert (run(packed) - padded).abs().max().item() < 1e-5
        leaky = ResponseBatch.packed(rollout.prompts, rollout.response_ids, rollout.response_mask, rope)
        leaky.inputs["attention_mask"] = torch.ones_like(leaky.inputs["input_ids"])
        later = rollout.group_index > 0  # the samples after the first prompt's see the earlier ones
        assert (run(leaky) - padded)[later].abs().max().item() > 1e-3
        if rope is not None:
            flat = ResponseBatch.packed(rollout.prompts, rollout.response_ids, rollout.response_mask, None)
            assert (run(flat) - padded).abs().amax(dim=1).min().item() > 1e-3  # every sample shows an image


def test_packed_layout_by_hand(loaded):
    name, module = loaded
    rollout = hand_rollout(module.processor, name != "tiny:qwen2")
    lengths = [p.length for p in rollout.prompts]
    batch = ResponseBatch.packed(
        rollout.prompts, rollout.response_ids, rollout.response_mask, mrope_index(module.model)
    )
    total = sum(lengths) + 6 + 2 + 5 + 6 + 3 + 1 + 4
    assert batch.inputs["input_ids"].shape == (1, total) and "attention_mask" not in batch.inputs
    text = batch.inputs["position_ids"][0].view(-1)  # the 1-D positions (first row when 3-D)
    starts = (text == 0).nonzero().view(-1).tolist()
    assert len(starts) == 7 and starts[1] == lengths[0] + 6  # sample 1 starts after prompt 0 + its 6 tokens
    assert batch.keep.numel() == 27 and batch.keep[0].item() == lengths[0] - 1
    assert torch.equal(batch.targets[0, :6], rollout.response_ids[0])
    padded = ResponseBatch.padded(rollout.prompts, module.pad_id, rollout.response_ids, rollout.response_mask)
    assert padded.width == 6 and padded.inputs["input_ids"].shape == (7, max(lengths) + 6)
    short = rollout.select([1, 5])  # responses of 2 and 1 tokens: padded to 2, not to the rollout's 6
    assert ResponseBatch.padded(short.prompts, 0, short.response_ids, short.response_mask).width == 2


def test_critic_values_packed_equal_padded():
    module = make_ppo(micro_batch_size=8)
    module.configure_model()
    critic = module.critic_model
    critic.eval()
    with torch.no_grad():
        critic.value_head.weight.normal_(0.0, 0.5)  # zero-initialised: give the head something to show
    rollout = hand_rollout(module.processor, vlm=True)
    with torch.no_grad():
        padded = module.critic_values(rollout)
        module.packing = True
        packed = module.critic_values(rollout)
    assert padded.shape == packed.shape == (7, 6)
    assert packed.abs().sum() > 0
    assert (packed - padded).abs().max().item() < 1e-5


def test_budget_slices_by_hand():
    # prompt 4 tokens; responses 2, 2 | 1, 1, 1: packed sizes 6, 6 | 5, 5, 5
    prompts, responses, groups = [4] * 5, [2, 2, 1, 1, 1], [0, 0, 1, 1, 1]
    assert budget_slices(prompts, responses, groups, 12, packed=True) == [[0, 1], [2, 3], [4]]
    assert budget_slices(prompts, responses, groups, 30, packed=True) == [[0, 1, 2, 3, 4]]
    # padded: rows x (longest prompt + longest response); the second group (3 x 5 = 15) fits 15 alone
    assert budget_slices(prompts, responses, groups, 15, packed=False) == [[0, 1], [2, 3, 4]]
    assert budget_slices(prompts, responses, groups, 29, packed=False) == [[0, 1], [2, 3, 4]]  # 5 x 6 = 30
    assert budget_slices(prompts, responses, groups, 30, packed=False) == [[0, 1, 2, 3, 4]]
    # a sample over the budget goes alone, the others around it stay together
    assert budget_slices([4, 4, 4], [1, 20, 1], [0, 0, 0], 12, packed=True) == [[0], [1], [2]]
    assert budget_slices([4, 4, 4, 4], [1, 1, 20, 1], [0, 0, 1, 2], 12, packed=True) == [[0, 1], [2], [3]]


def test_response_mask_with_a_gap_is_refused():
    assert response_lengths(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])) == [2, 0]
    with pytest.raises(ValueError, match="a response mask has a 0 before a real token"):
        response_lengths(torch.tensor([[1.0, 0.0, 1.0]]))


def _mini_batch_gradient(module, rollout) -> dict[str, torch.Tensor]:
    module.model.zero_grad()
    module.accumulate_gradients(rollout, module.policy_micro_loss)
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def test_mini_batch_gradient_is_the_same_for_any_micro_batches(caplog):
    """Token-mean over the mini-batch: micro-batches of 1 and 8 samples and token budgets (padded, packed)
    give one gradient; the budget keeps each prompt's samples together and runs an oversized sample alone."""
    module = make_module(micro_batch_size=8)
    module.configure_model()
    module.model.eval()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    rollout = hand_rollout(module.processor, vlm=True)
    order = torch.tensor([5, 0, 3, 1, 6, 2, 4])  # a shuffled mini-batch, as mini_batch_steps draws it
    rollout = rollout.select(order)
    with torch.no_grad():
        current, _ = module.policy_logprobs(module.model, rollout)
    rollout.logprobs = current + 0.05 * torch.randn_like(current) * rollout.response_mask  # some ratios clipped
    rollout.advantages = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.5, -2.0])
    reference = _mini_batch_gradient(module, rollout)  # micro_batch_size 8: one pass
    module.micro_batch_size = 1
    for key, got in _mini_batch_gradient(module, rollout).items():
        torch.testing.assert_close(got, reference[key], rtol=1e-4, atol=1e-6, msg=f"micro_batch_size 1: {key}")
    lengths = [p.length for p in rollout.prompts]
    prompt_tokens = {int(g): n for g, n in zip(rollout.group_index, lengths, strict=True)}
    budget = prompt_tokens[0] + 6 + prompt_tokens[0] + 5  # two samples of prompt 0 fit, not three
    module.max_tokens_per_micro_batch = budget
    for packing in (False, True):
        module.packing = packing
        grouped = rollout.select(torch.sort(rollout.group_index, stable=True).indices)  # as accumulate_gradients does
        slices = [m.group_index.tolist() for m in module.micro_batches(grouped)]
        # prompt 0's responses of 6, 2, 5 tokens do not fit together: packed 6 + 2 then 5; padded 6 then 2 + 5
        assert slices[:2] == ([[0, 0], [0]] if packing else [[0], [0, 0]])
        with caplog.at_level(logging.WARNING, logger="vlrl.methods.base"):
            grads = _mini_batch_gradient(module, rollout)
        for key, got in grads.items():
            torch.testing.assert_close(got, reference[key], rtol=1e-4, atol=1e-6, msg=f"packing={packing}: {key}")
    assert not any("over it and runs alone" in r.message for r in caplog.records)
    module.max_tokens_per_micro_batch = 8  # every sample is over it
    with caplog.at_level(logging.WARNING, logger="vlrl.methods.base"):
        assert len(list(module.micro_batches(rollout))) == 7
        assert len(list(module.micro_batches(rollout))) == 7
    warned = [r for r in caplog.records if "over it and runs alone" in r.message]
    assert len(warned) == 1  # once
    module.model.zero_grad()


def test_a_budget_below_one_token_is_named():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch must be >= 1 .* got 0"):
        make_module(max_tokens_per_micro_batch=0)


def one_grpo_step(**overrides) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weights and the ``update/`` metrics after one GRPO step with a KL to a reference and TIS (policy,
    old and reference passes), mini-batches of 4 samples, SGD at lr 0.5."""
    module = make_module(
        mini_batch_size=4,
        kl_coef=0.1,
        importance_correction="tis",
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        **overrides,
    )
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, datamodule=make_data(batch_size=2))
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("update/")}
    return weights, logged


def assert_same_step(step: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    """Two ``one_grpo_step`` results logged the same loss, KL and clip fraction and moved the weights alike."""
    (weights, logged), (ref_weights, ref_logged) = step, reference
    for key in ("update/policy_loss", "update/kl_ref", "update/clip_frac"):
        assert logged[key] == pytest.approx(ref_logged[key], abs=1e-5), key
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_step_packed_under_a_token_budget_updates_as_the_padded_step():
    """One GRPO step with a KL to a reference and TIS (policy, old and reference passes all packed, cut by a
    token budget) moves the weights as the padded step with fixed micro-batches does."""
    padded = one_grpo_step(micro_batch_size=2)
    packed = one_grpo_step(packing=True, max_tokens_per_micro_batch=170, micro_batch_size=2)  # 47 + 8: three a forward
    assert_same_step(packed, padded)


UNEVEN_RANKS = """
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from tests.test_batch_sizes import global_data
from tests.test_grpo import make_module

out = Path(sys.argv[1])


class UnevenBudgets(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        # rank 0 runs each of its 4 samples alone, rank 1 all 4 in one forward
        pl_module.max_tokens_per_micro_batch = 1 if trainer.global_rank == 0 else 100_000


module = make_module(
    group_size=2, packing=True, max_tokens_per_micro_batch=100_000,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
)
losses = []
backward = module.manual_backward
module.manual_backward = lambda loss, *args, **kwargs: (losses.append(float(loss.detach())), backward(loss, *args, **kwargs))
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_progress_bar=False,
    enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    callbacks=[UnevenBudgets()],
)
trainer.fit(module, datamodule=global_data(4, size=8))
checksum = sum(float(p.double().sum()) for p in module.model.parameters())
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"losses": losses, "checksum": checksum}))
"""


@pytest.mark.slow
def test_ranks_with_different_micro_batch_counts_run_as_many_backward_passes(tmp_path):
    """Under DDP every backward pass syncs gradients: a rank whose token budget gives it fewer micro-batches
    runs zero-weight passes until it has as many as the others, and both end with the same weights."""
    script = tmp_path / "uneven_ranks.py"
    script.write_text(textwrap.dedent(UNEVEN_RANKS))
    resolve_model_path("tiny:qwen2_5_vl")  # built once here: two ranks building it at once would race
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == 4  # 2 prompts x 2 samples per rank
    assert all(loss != 0.0 for loss in ranks[0]["losses"])
    assert ranks[1]["losses"][0] != 0.0 and ranks[1]["losses"][1:] == [0.0, 0.0, 0.0]  # the matching passes
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], abs=1e-9)
