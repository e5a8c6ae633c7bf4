"""SFT: supervised fine-tuning on chat conversations, with the loss on assistant tokens only.

One training step is one optimizer step over the batch::

    conversations -> tokens with an assistant-only loss mask -> packed rows or padded micro-batches
    -> weighted token-mean NLL over the whole batch (all micro-batches, all devices) -> optimizer step

The batch of a step is ``data.global_batch_size`` samples over all devices (or ``data.batch_size`` on
each): each device accumulates the gradients of its share over its micro-batches (``micro_batch_size``
samples each, or one packed row each) inside the step, so a step is one optimizer step on the whole
batch on any number of devices, and Lightning's ``accumulate_grad_batches`` stays 1 (manual
optimization refuses it).

Used for Open Vision Reasoner's language-only cold start (text-only long chain-of-thought data, vision
tower and projector frozen, sample packing), for rejection-sampling fine-tuning, for SOPHIA's offline
stage (each row's ``weight`` scales its loss) and for UnifiedReward-Think's cold start. Data comes
from ``vlrl.data.SFTDataModule``: every conversation ends with the assistant turn(s) to learn.

Encoding: the context before the first assistant turn is encoded by the processor exactly as an RL
prompt is (chat template with the generation prompt, image tokens), and what follows is tokenized
as the chat template renders it turn by turn; only the assistant turns are trained on, up to and
including their end-of-turn token (the trailing newline some templates add after it is not).
Images must come before the first assistant turn.

Packing (``pack: true``): the samples of a batch are packed first-fit into rows of at most
``max_length`` tokens, one row per forward pass, with no attention mask and position ids that
restart at every sample. Transformers then keeps attention inside each sample (block-diagonal mask
with SDPA/eager, variable-length kernels with FlashAttention), so a packed row computes exactly what
the samples would compute one by one; for Qwen-VL's multimodal RoPE, each sample's 3-D positions are
its own, with the 1-D text positions put in front as transformers expects for packed input.

Run: ``lightning-cli fit --config configs/demo/ovr_cold_start.yaml`` (tiny model, CPU) or
``lightning-cli fit --config configs/ovr_cold_start.yaml`` (Qwen2.5-VL-7B).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image

from vlrl.algorithms import aggregate_loss, token_logprobs
from vlrl.data.sft import WEIGHT_FIELD, ends_with_assistant
from vlrl.evaluation import Evaluation
from vlrl.methods.core import PolicyModule
from vlrl.models.inputs import collate, encode_prompt, extend_prompt, to_device
from vlrl.models.loading import Policy, tokenizer_of
from vlrl.models.packing import Rope, mrope_index, pack_sequences
from vlrl.rollout import RolloutEngine, Sampling
from vlrl.types import EncodedPrompt, PromptBatch


@dataclass
class SFTSample:
    """One encoded conversation: the context before the first assistant turn, then the rest."""

    prompt: EncodedPrompt  # token inputs [1, P] and the images' media inputs
    target_ids: torch.Tensor  # [T] int64, every token after the prompt
    loss_mask: torch.Tensor  # [T] float, 1 on assistant tokens
    weight: float = 1.0

    @property
    def length(self) -> int:
        return self.prompt.length + int(self.target_ids.shape[0])


@dataclass
class MicroBatch:
    """One forward pass: model inputs and, aligned with ``input_ids``, the loss weight of each token."""

    inputs: dict[str, torch.Tensor]  # input_ids [n, L] and the other model inputs
    weights: torch.Tensor  # [n, L] float: row weight on trained tokens, 0 elsewhere
    trained: torch.Tensor  # [n, L] float: 1 on trained tokens (the token-mean counts these)


def encode_conversation(
    processor: Any, messages: list[dict[str, Any]], images: list[Image.Image], stop_ids: list[int]
) -> SFTSample:
    """Tokens of a conversation that ends with an assistant turn, with the assistant-only loss mask.

    Args:
        processor: The model's processor (or tokenizer) with its chat template.
        messages: The chat; images may appear only before the first assistant turn.
        images: The images of those turns, in order.
        stop_ids: End-of-turn token ids; an assistant turn is trained up to the last of them.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not ends_with_assistant(messages):
        raise ValueError("an SFT conversation must end with an assistant turn; read rows with vlrl.data.SFTDataModule")
    first = turns[0]
    later_images = sum(
        part.get("type") == "image" for m in messages[first:] if isinstance(m["content"], list) for part in m["content"]
    )
    if later_images:
        raise ValueError("images after the first assistant turn are not supported; move them into the first user turn")
    tokenizer = tokenizer_of(processor)

    def render(upto: int, generation_prompt: bool) -> str:
        return processor.apply_chat_template(messages[:upto], add_generation_prompt=generation_prompt, tokenize=False)

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = encode_prompt(processor, messages[:first], images)
    if prompt.length == 0:
        raise ValueError("the chat template renders an empty context before the first assistant turn")
    done = render(first, True)
    ids: list[int] = []
    mask: list[float] = []
    for k, turn in enumerate(turns):
        end = render(turn + 1, False)
        reply = tokens(_after(done, end))
        stops = [j for j, t in enumerate(reply) if t in stop_ids]
        trained = stops[-1] + 1 if stops else len(reply)
        ids += reply
        mask += [1.0] * trained + [0.0] * (len(reply) - trained)
        if k + 1 < len(turns):
            done = render(turns[k + 1], True)
            between = tokens(_after(end, done))
            ids += between
            mask += [0.0] * len(between)
    return SFTSample(prompt, torch.tensor(ids, dtype=torch.long), torch.tensor(mask))


def _after(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(
            "the chat template does not render the conversation incrementally (a shorter conversation is not a "
            f"prefix of the longer one: {prefix[-60:]!r} vs {text[len(prefix) - 60 : len(prefix)]!r}); such templates "
            "rewrite earlier turns, so train on one assistant turn per row"
        )
    return text[len(prefix) :]


def truncate(sample: SFTSample, max_length: int) -> SFTSample | None:
    """``sample`` cut to ``max_length`` tokens (the end of its target goes); None if the prompt fills it."""
    room = max_length - sample.prompt.length
    if room <= 0:
        return None
    return replace(sample, target_ids=sample.target_ids[:room], loss_mask=sample.loss_mask[:room])


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into bins whose lengths sum to at most ``capacity``.

    >>> pack([5, 3, 4, 2], 7)
    [[0, 3], [2, 1]]
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit a packed row of {capacity}")
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return bins


def packed_row(samples: list[SFTSample], rope: Rope | None) -> MicroBatch:
    """Samples concatenated into one row ``[1, L]`` whose attention stays inside each sample."""
    inputs = pack_sequences([extend_prompt(s.prompt, s.target_ids) for s in samples], rope)  # [1, L]
    zeros = [torch.zeros(s.prompt.length) for s in samples]
    trained = torch.cat([t for z, s in zip(zeros, samples, strict=True) for t in (z, s.loss_mask)])  # [L]
    weights = torch.cat([t for z, s in zip(zeros, samples, strict=True) for t in (z, s.loss_mask * s.weight)])  # [L]
    return MicroBatch(inputs, weights.view(1, -1), trained.view(1, -1))


def padded_batch(samples: list[SFTSample], pad_id: int) -> MicroBatch:
    """Samples as one padded batch ``[n, P + T]``: prompts left-padded, targets right-padded (as in RL)."""
    width = max(int(s.target_ids.shape[0]) for s in samples)

    def right_pad(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[0]), value=value)

    targets = torch.stack([right_pad(s.target_ids, pad_id) for s in samples])  # [n, T]
    valid = torch.stack([right_pad(torch.ones_like(s.loss_mask), 0.0) for s in samples])  # [n, T]
    inputs = collate([s.prompt for s in samples], pad_id, targets, valid)
    prompt_width = inputs["input_ids"].shape[1] - width
    zeros = torch.zeros(len(samples), prompt_width)  # [n, P]
    trained = torch.cat([zeros, torch.stack([right_pad(s.loss_mask, 0.0) for s in samples])], dim=1)  # [n, P + T]
    weights = trained * torch.tensor([s.weight for s in samples]).view(-1, 1)  # [n, P + T]
    return MicroBatch(inputs, weights, trained)


class SFT(PolicyModule):
    """Supervised fine-tuning with an assistant-only loss, optional sample packing and row weights.

    Args:
        policy: The model being trained (path, dtype, LoRA, quantization, ``freeze_vision`` for a
            language-only stage).
        optimizer: Optimizer factory for the trainable parameters.
        lr_scheduler: Learning-rate scheduler factory, stepped after every optimizer step.
        max_length: Most tokens of one sample (prompt + target); longer targets are cut at the end,
            samples whose prompt alone is longer are dropped (both counted in the metrics).
            ``None``: no limit (then ``pack`` is unavailable).
        pack: Pack the samples of each batch into rows of at most ``max_length`` tokens, one row per
            forward pass, attention and positions kept per sample. Without packing, samples are
            padded into micro-batches of ``micro_batch_size``.
        micro_batch_size: Samples per forward/backward pass on each device when not packing (gradient
            accumulation inside the step over batch per device / ``micro_batch_size`` passes; only memory
            depends on it, not the result).
        max_grad_norm: Clip the gradient norm to this value (``None`` = no clipping).
        eval_sampling: If set, validation and test also generate a response for each prompt (the
            conversation before its first assistant turn) and report accuracy against the rows'
            gold answers (``val/accuracy``); the loss (``val/loss``) is always reported.
        max_nonfinite_steps: A step whose gradients hold NaN/inf is skipped (weights and optimizer
            state unchanged, counted as ``update/nonfinite_skipped``); this many in a row stop the run.
        rollout_engine: Generates for ``eval_sampling`` (and SOPHIA's descriptions); default: HF
            ``generate`` on the policy itself.
        seed: The run's seed; the evaluation (and SOPHIA's) sampling streams derive from it.
        evaluation: How generated answers are graded and reported (``vlrl.evaluation.Evaluation``).
    """

    def __init__(
        self,
        policy: Policy,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_length: int | None = None,
        pack: bool = False,
        micro_batch_size: int = 8,
        max_grad_norm: float | None = 1.0,
        eval_sampling: Sampling | None = None,
        max_nonfinite_steps: int = 3,
        rollout_engine: RolloutEngine | None = None,
        seed: int = 0,
        evaluation: Evaluation | None = None,
    ) -> None:
        super().__init__(
            policy=policy,
            rollout_engine=rollout_engine,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            max_grad_norm=max_grad_norm,
            seed=seed,
            max_nonfinite_steps=max_nonfinite_steps,
            evaluation=evaluation,
        )
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 tokens (or null for no limit)")
        if pack and max_length is None:
            raise ValueError("pack=true needs max_length (the tokens of one packed row), e.g. max_length: 4096")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be at least 1")
        self.max_length = max_length
        self.pack = pack
        self.micro_batch_size = micro_batch_size
        self.eval_sampling = eval_sampling

    # ----------------------------------------------------------------------------- the SFT step
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        samples, stats = self.encode(batch)  # 1. conversations -> tokens, assistant-only loss mask
        if not samples:
            raise ValueError(
                f"every sample of batch {batch_idx} has a prompt longer than max_length={self.max_length}; raise it"
            )
        micro_batches = self.micro_batches(samples)  # 2. packed rows or padded micro-batches
        stats.update(self.sft_step(micro_batches))  # 3. one optimizer step on the whole batch
        tokens = sum(s.length for s in samples)
        stats["perf/step_s"] = time.perf_counter() - start
        stats["perf/tokens_per_s"] = tokens / stats["perf/step_s"]
        self.log_dict(stats, batch_size=len(samples))
        self.log("loss", stats["train/loss"], prog_bar=True, logger=False, batch_size=len(samples))

    def encode(self, batch: PromptBatch) -> tuple[list[SFTSample], dict[str, float]]:
        """The batch's conversations as samples (cut to ``max_length``), and counts of what was cut."""
        stop_ids = self.rollout_engine.stop_ids
        samples, truncated, dropped = [], 0, 0
        for i, (messages, images) in enumerate(zip(batch.messages, batch.images, strict=True)):
            sample = encode_conversation(self.processor, messages, images, stop_ids)
            sample.weight = float(batch.extras[i].get(WEIGHT_FIELD, 1.0)) if batch.extras else 1.0
            if self.max_length is not None and sample.length > self.max_length:
                sample = truncate(sample, self.max_length)
                truncated += sample is not None
                dropped += sample is None
            if sample is not None:
                samples.append(sample)
        stats = {"data/truncated_frac": truncated / len(batch), "data/dropped_frac": dropped / len(batch)}
        return samples, stats

    def micro_batches(self, samples: list[SFTSample]) -> list[MicroBatch]:
        if self.pack:
            rope = mrope_index(self.model)
            bins = pack([s.length for s in samples], self.max_length)
            return [packed_row([samples[i] for i in b], rope) for b in bins]
        size = self.micro_batch_size
        return [padded_batch(samples[i : i + size], self.pad_id) for i in range(0, len(samples), size)]

    def token_nll(self, micro: MicroBatch) -> torch.Tensor:
        """``[n, L - 1]`` negative log-likelihood of each next token of the micro-batch."""
        inputs = to_device(micro.inputs, self.device, self.model.dtype)
        logits = self.model(**inputs, use_cache=False).logits[:, :-1]  # [n, L - 1, V] predicting tokens 1..L-1
        return -token_logprobs(logits, inputs["input_ids"][:, 1:])  # [n, L - 1]

    def sft_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """Weighted token-mean NLL over all micro-batches on all devices, then one optimizer step."""
        optimizer, scheduler = self.optimizer_and_scheduler(0)
        world = self.trainer.world_size
        num_tokens = self.all_reduce(sum(mb.trained[:, 1:].sum() for mb in micro_batches), "sum")
        # every device must run as many backward passes as the others (each one syncs gradients):
        # devices with fewer packed rows repeat one with zero weight
        count = int(self.all_reduce(torch.tensor(float(len(micro_batches))), "max"))
        zero = replace(micro_batches[-1], weights=torch.zeros_like(micro_batches[-1].weights))
        total = 0.0
        for micro in micro_batches + [zero] * (count - len(micro_batches)):
            per_token = self.token_nll(micro) * micro.weights[:, 1:].to(self.device)  # [n, L - 1]
            trained = micro.trained[:, 1:].to(self.device)  # [n, L - 1]
            loss = aggregate_loss(per_token, trained, "token-mean", num_tokens=num_tokens)
            self.manual_backward(loss * world)
            total += float(loss.detach())
        stats = {"train/loss": total, "train/tokens": float(num_tokens)}
        stats.update(self.step_optimizer(optimizer, scheduler))  # NaN/inf: no update
        stats["train/micro_batches"] = float(len(micro_batches))
        return stats

    # ----------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def evaluate(self, batch: PromptBatch, stage: str) -> None:
        """Token-mean NLL of the assistant tokens (row weights not applied) and, optionally, accuracy."""
        samples, _ = self.encode(batch)
        nll, tokens = 0.0, 0.0
        for micro in self.micro_batches(samples):
            trained = micro.trained[:, 1:].to(self.device)  # [n, L - 1]
            nll += float((self.token_nll(micro) * trained).sum())
            tokens += float(trained.sum())
        if tokens:
            self.log(f"{stage}/loss", nll / tokens, batch_size=int(tokens), sync_dist=True, prog_bar=True)
        if self.eval_sampling is not None:
            self.generation_accuracy(batch, stage)

    def generation_accuracy(self, batch: PromptBatch, stage: str) -> None:
        """Greedy (or ``eval_sampling``) answers to the prompts with a gold answer, graded and recorded."""
        graded = [i for i, answer in enumerate(batch.answers) if answer]
        if not graded:
            return
        prompts = []
        for i in graded:
            messages = batch.messages[i]
            first = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(encode_prompt(self.processor, messages[:first], batch.images[i]))
        out = self.rollout_engine.generate(prompts, self.eval_sampling, seed=self.seed_for("eval"))
        texts = self.decode(out.response_ids, out.response_mask)
        rows = batch.select(graded)
        self.record(stage, rows, texts, self.evaluation.grade(texts, rows))
