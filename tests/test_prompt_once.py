"""Each distinct prompt once in the padded training forwards (``prompt_once``): the same log-probs, entropies
and gradients as one full row per sample, on the tiny Qwen2.5-VL (3-D RoPE, one- and two-image rows), the
text-only Qwen2 and LLaVA-OneVision (1-D positions, tiled images), with LoRA, under gradient checkpointing
and in a whole GRPO step; fewer positions through the language model; the cases that run one row per sample."""

from __future__ import annotations

import pytest
import torch

from tests.test_grpo import make_module
from tests.test_packing import assert_same_step, hand_rollout, loaded, one_grpo_step  # noqa: F401  (loaded: a fixture)
from vlrl.models import LoRA, Policy
from vlrl.models.loading import vision_modules
from vlrl.models.packing import ResponseBatch, prompt_groups


def _run(module, rollout, prompt_once: bool):
    """Log-probs, entropies and the gradient of a loss reaching every response token."""
    module.prompt_once = prompt_once
    module.model.zero_grad()
    logprobs, entropy = module.policy_logprobs(module.model, rollout, with_entropy=True)
    weights = torch.linspace(-1.0, 1.0, logprobs.numel()).view_as(logprobs)
    (logprobs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    module.model.zero_grad()
    module.prompt_once = True
    return logprobs.detach(), entropy.detach(), grads


class PositionCounter:
    """Positions (rows x columns) the first decoder layer of the language model sees, summed over passes."""

    def __init__(self, model: torch.nn.Module) -> None:
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0") and "vision" not in n)
        self.positions = 0
        self.handle = layer.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.positions += hidden.shape[0] * hidden.shape[1]


def test_prompt_once_equals_a_row_per_sample_and_runs_fewer_positions(loaded):  # noqa: F811
    name, module = loaded
    rollout = hand_rollout(module.processor, name != "tiny:qwen2")  # 7 samples of 3 prompts, responses <= 6
    batch = module.model_inputs(rollout)
    assert module.runs_prompts_once(module.model, batch, rollout.prompts)
    width = batch.inputs["input_ids"].shape[1] - batch.width  # P, the widest prompt
    counter = PositionCounter(module.model)
    full, full_entropy, full_grads = _run(module, rollout, prompt_once=False)
    per_sample = counter.positions
    counter.positions = 0
    once, once_entropy, once_grads = _run(module, rollout, prompt_once=True)
    counter.handle.remove()
    assert per_sample == 7 * (width + 6)
    assert counter.positions == 3 * (width - 1) + 7 * 6  # three prompts but their last token, then 7 x (it + 5)
    mask = rollout.response_mask
    assert (once * (1 - mask)).abs().max() == 0  # 0 after each response's end
    assert (once - full).abs().max().item() < 1e-5
    assert (once_entropy - full_entropy).abs().max().item() < 1e-5
    assert once_grads.keys() == full_grads.keys() and full_grads
    if name != "tiny:qwen2":  # the trained vision tower gets its gradient through the prompt pass
        tower = {
            n
            for n, p in module.model.named_parameters()
            if any(p is q for q in vision_modules(module.model)[0].parameters())
        }
        assert tower & once_grads.keys()
    for key, grad in once_grads.items():
        scale = max(1.0, full_grads[key].abs().max().item())  # sums over many tokens (embeddings): rounding grows
        torch.testing.assert_close(
            grad, full_grads[key], rtol=1e-4, atol=1e-6 * scale, msg=f"{name}: gradient of {key}"
        )


def test_the_check_sees_a_prompt_given_to_the_wrong_samples(loaded):  # noqa: F811
    """Rows of prompt 1 reading prompt 0's cache give other log-probs: the equality above is not vacuous."""
    name, module = loaded
    rollout = hand_rollout(module.processor, name != "tiny:qwen2")
    with torch.no_grad():
        module.prompt_once = False
        full, _ = module.policy_logprobs(module.model, rollout)
        module.prompt_once = True
        swapped = rollout.select(torch.arange(7))
        swapped.prompts = list(rollout.prompts)
        swapped.prompts[3] = rollout.prompts[0]  # sample 3 now reads prompt 0
        wrong, _ = module.policy_logprobs(module.model, swapped)
    assert (wrong[3] - full[3]).abs().max().item() > 1e-3
    assert (wrong[:3] - full[:3]).abs().max().item() < 1e-5


def test_prompt_once_with_lora_and_a_frozen_tower():
    module = make_module(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32", lora=LoRA(rank=4, alpha=8), freeze_vision=True),
        micro_batch_size=8,
    )
    module.configure_model()
    module.model.eval()
    rollout = hand_rollout(module.processor, vlm=True)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:  # LoRA's B starts at 0: give the adapters an effect
                p.add_(0.05 * torch.randn_like(p))
    full, _, full_grads = _run(module, rollout, prompt_once=False)
    once, _, once_grads = _run(module, rollout, prompt_once=True)
    assert (once - full).abs().max().item() < 1e-5
    assert full_grads and all("lora_" in n for n in full_grads)
    for key, grad in once_grads.items():
        torch.testing.assert_close(grad, full_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_when_a_row_per_sample_runs_instead():
    module = make_module(micro_batch_size=8)
    module.configure_model()
    rollout = hand_rollout(module.processor, vlm=True)
    model = module.model
    batch = module.model_inputs(rollout)
    assert module.runs_prompts_once(model, batch, rollout.prompts)
    distinct = rollout.select(torch.tensor([0, 3, 5]))  # one sample of each prompt: nothing to share
    assert not module.runs_prompts_once(model, module.model_inputs(distinct), distinct.prompts)
    module.packing = True
    assert not module.runs_prompts_once(model, module.model_inputs(rollout), rollout.prompts)
    module.packing = False
    module.prompt_once = False
    assert not module.runs_prompts_once(model, batch, rollout.prompts)
    module.prompt_once = True
    module.model.zero_grad()


def test_prompt_once_under_gradient_checkpointing_equals_a_row_per_sample():
    """Checkpointed layers keep the prompt's cache (transformers drops a cache there): the policy's pass under
    autograd, replayed in the backward pass, gives the gradient of a row per sample without checkpointing."""
    module = make_module(micro_batch_size=8)
    module.configure_model()
    module.model.eval()
    rollout = hand_rollout(module.processor, vlm=True)
    full, _, full_grads = _run(module, rollout, prompt_once=False)
    model = module.model
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # the tiny models have no dropout: the same function, now checkpointed
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert module.runs_prompts_once(model, module.model_inputs(rollout), rollout.prompts)
    counter = PositionCounter(model)
    once, _, once_grads = _run(module, rollout, prompt_once=True)
    counter.handle.remove()
    width = module.model_inputs(rollout).inputs["input_ids"].shape[1] - 6
    assert counter.positions == 3 * (width - 1) + 7 * 6  # the hook sits outside the checkpoint: replays not counted
    assert (once - full).abs().max().item() < 1e-5
    assert once_grads.keys() == full_grads.keys()
    for key, grad in once_grads.items():
        scale = max(1.0, full_grads[key].abs().max().item())
        torch.testing.assert_close(grad, full_grads[key], rtol=1e-4, atol=1e-6 * scale, msg=key)
    layers = [m for m in model.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    assert layers and not any(m._can_checkpoint_with_cache for m in layers)  # the layers' own setting is back


def test_prompt_groups_by_hand():
    a, b = object(), object()
    assert prompt_groups([a, a, b, a]) == ([0, 2], [0, 0, 1, 0])
    assert prompt_groups([b]) == ([0], [0])


def test_one_token_responses(loaded):  # noqa: F811
    name, module = loaded
    rollout = hand_rollout(module.processor, name != "tiny:qwen2").select(torch.tensor([5, 5, 5]))  # 1 token each
    assert ResponseBatch.padded(rollout.prompts, 0, rollout.response_ids, rollout.response_mask).width == 1
    with torch.no_grad():
        module.prompt_once = False
        full, _ = module.policy_logprobs(module.model, rollout)
        module.prompt_once = True
        counter = PositionCounter(module.model)
        once, _ = module.policy_logprobs(module.model, rollout)
        counter.handle.remove()
    assert counter.positions == rollout.prompts[0].length - 1 + 3  # the prompt once, its last token on 3 rows
    assert (once - full).abs().max().item() < 1e-5


@pytest.mark.slow
def test_a_grpo_step_with_prompts_once_updates_as_a_row_per_sample():
    """One GRPO step with a KL to a reference and TIS (policy, old and reference passes) moves the weights
    alike with and without ``prompt_once``."""
    rows = one_grpo_step(prompt_once=False, micro_batch_size=4)
    once = one_grpo_step(prompt_once=True, micro_batch_size=4)
    assert any(not torch.equal(v, rows[0][n]) for n, v in once[0].items())  # float rounding differs: it ran
    assert_same_step(once, rows)
