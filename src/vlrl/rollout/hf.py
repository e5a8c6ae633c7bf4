"""Rollout with Hugging Face ``generate``, sharing the policy's weights (CPU, debugging, small runs).

Sampling is true sampling unless configured otherwise (``top_k=0``: HF's default of 50 is not
applied), vision special tokens are never sampled, and log-probs are taken from the raw logits at
the sampling temperature (not from the processed scores), so they are the log-probs the trainer
recomputes. ``update_weights`` has nothing to do: the engine generates with the module itself (under
FSDP2 its shards are gathered for the duration of each call; under FSDP1 the ranks decode in step).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from transformers import Cache, LogitsProcessor, LogitsProcessorList

from vlrl.algorithms import token_logprobs
from vlrl.models.inputs import TOKEN_KEYS, collate, cut_at_stop, to_device
from vlrl.models.loading import pad_token_id, stop_token_ids
from vlrl.models.sharding import gathered, needs_synced_generation
from vlrl.models.vision import PIXELS, base_model, with_shared_vision
from vlrl.rollout.base import Generation, Sampling, generation_config
from vlrl.types import EncodedPrompt

# Config attributes naming vision special tokens, across model families.
VISION_TOKEN_ATTRS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "image_token_index",
    "video_token_index",
)


class HFEngine:
    """Samples with ``model.generate`` in batches.

    Args:
        max_batch_size: Most sequences per ``generate`` call (``None``: all at once).
        suppress_vision_tokens: Never sample image/video/vision-boundary tokens (a random or
            lightly trained VLM otherwise emits them, and they break re-encoding).
        share_prefill: Prefill each distinct prompt of a call once (its images through the vision tower
            once) and give every sample of it a copy of that key/value cache, instead of prefilling the
            ``G`` copies; the samples and log-probs are the same up to float rounding. ``False``: HF's
            own prefill of every row (the vision tower still runs once per distinct prompt).
    """

    def __init__(
        self, max_batch_size: int | None = None, suppress_vision_tokens: bool = True, share_prefill: bool = True
    ) -> None:
        self.max_batch_size = max_batch_size
        self.suppress_vision_tokens = suppress_vision_tokens
        self.share_prefill = share_prefill
        self.model: torch.nn.Module | None = None

    def bind(self, model: torch.nn.Module, processor: object) -> None:
        self.model = model
        self.pad_id = pad_token_id(processor)
        self.stop_ids = stop_token_ids(model, processor)
        config = model.config
        ids = {getattr(config, a, None) for a in VISION_TOKEN_ATTRS}
        self.suppress_ids = sorted(i for i in ids if isinstance(i, int)) if self.suppress_vision_tokens else []

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation runs on the training module's own weights."""

    @torch.no_grad()
    def generate(self, prompts: list[EncodedPrompt], sampling: Sampling, seed: int | None = None) -> Generation:
        if self.model is None:
            raise RuntimeError("HFEngine.generate called before bind(model, processor)")
        size = self.max_batch_size or len(prompts)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            # under FSDP the parameters are gathered once for the call, not once per token
            with (
                gathered(self.model, self.pad_id),
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            ):
                if seed is not None:
                    torch.manual_seed(seed)
                chunks = [self._generate(prompts[i : i + size], sampling, device) for i in range(0, len(prompts), size)]
        finally:
            self.model.train(was_training)
        return _concat(chunks, self.pad_id)

    def _generate(self, prompts: list[EncodedPrompt], sampling: Sampling, device: torch.device) -> Generation:
        batch = to_device(collate(prompts, self.pad_id), device, self.model.dtype)
        cache = self._shared_prefill(prompts, batch, device) if self.share_prefill else None
        if cache is None:
            batch = with_shared_vision(self.model, prompts, batch)  # the tower once per distinct prompt
        else:  # the images are in the cache: generate only feeds the last prompt token
            batch = {k: v for k, v in batch.items() if k != PIXELS} | {"cache": cache}
        greedy = sampling.temperature == 0
        # plain temperature sampling (the RL default) is done by the recorder; top-k/top-p by HF's warpers
        own_sampling = not greedy and not sampling.top_k and sampling.top_p >= 1.0
        hf_sampling = replace(sampling, temperature=0.0) if own_sampling else sampling  # HF then takes the argmax
        config = generation_config(hf_sampling, self.stop_ids, self.pad_id, suppress_tokens=self.suppress_ids or None)
        recorder = StepLogprobs(1.0 if greedy else sampling.temperature, sample=own_sampling)
        hooked = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # under PEFT
        handle = hooked.register_forward_hook(recorder.on_forward)
        try:
            synced = needs_synced_generation(self.model)  # FSDP1: every rank runs as many passes as the longest
            sequences = self.model.generate(
                **batch, generation_config=config, logits_processor=LogitsProcessorList([recorder]), synced_gpus=synced
            )
        finally:
            handle.remove()
        width = batch["input_ids"].shape[1]
        response = sequences[:, width:]  # [n, T]
        logprobs = recorder.finish(response).cpu()  # [n, T] raw, before any logits processor
        response, mask, stopped = cut_at_stop(response.cpu(), self.stop_ids, self.pad_id)  # [n, T], [n, T], [n]
        return Generation(
            response_ids=response,
            response_mask=mask,
            logprobs=logprobs * mask,
            finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
        )

    def _shared_prefill(self, prompts: list[EncodedPrompt], batch: dict, device: torch.device) -> Cache | None:
        """The key/value cache of ``batch`` but its last column, from one prefill per distinct prompt.

        The distinct prompts (the same ``EncodedPrompt`` object, as the ``G`` samples of a group hold) are
        prefilled left-padded to the batch's width less one, so each row's cache is the one its own
        prefill would make; the cache rows (and, for multimodal RoPE, the position offsets the model
        keeps for decoding) are then copied out to the samples. ``generate`` then feeds the last prompt
        token, which is a text token of every row. ``None`` when no prompt repeats (nothing to share).
        """
        first: dict[int, int] = {}
        index = [first.setdefault(id(p), len(first)) for p in prompts]  # row -> distinct prompt
        width = batch["input_ids"].shape[1]
        if len(first) == len(prompts) or width < 2:
            return None
        unique = list({id(p): p for p in prompts}.values())
        head = to_device(collate(unique, self.pad_id), device, self.model.dtype)  # [B, P]: same width
        head = {k: v[:, :-1] if k in TOKEN_KEYS else v for k, v in head.items()}  # [B, P - 1]
        inner = getattr(base_model(self.model), "model", None)
        if getattr(inner, "get_rope_index", None) is None:  # 1-D RoPE: positions follow the mask, as in generate
            mask = head["attention_mask"].long()  # [B, P - 1]
            head["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, P - 1]
        head = with_shared_vision(self.model, unique, head)
        cache = self.model(**head, use_cache=True, logits_to_keep=1).cache
        rows = torch.tensor(index, device=device)  # [N]
        cache.batch_select_indices(rows)
        if getattr(inner, "rope_deltas", None) is not None:  # Qwen-VL: decoding positions = text positions + delta
            inner.rope_deltas = inner.rope_deltas[rows]  # [N, 1]
        return cache


class StepLogprobs(LogitsProcessor):
    """Log-probs of the tokens ``generate`` picks, one step at a time; optionally picks them itself.

    A forward hook (``on_forward``) keeps a reference to the raw logits of the latest pass, before
    any logits processor. ``generate`` calls this processor once per generated token, right after
    that pass (and not for the idle passes of a rank that has finished under synchronised
    generation), so the step's raw logits are reduced to ``[n]`` log-probs of the chosen token as
    soon as it is known: right away when this processor samples, else at the next step from the
    token ``generate`` appended. Only one step of logits is alive at a time; HF's ``output_logits``
    would keep all of them, ``[n, T, V]`` in float32, until the end (GiBs for long responses over a
    150k vocabulary).

    With ``sample=True`` it also draws the token (temperature sampling, no top-k/top-p) by inverse
    transform: one uniform number per row against the float64 cumulative distribution, instead of
    ``torch.multinomial``, which on CPU draws an exponential variate for every vocabulary entry (half
    of the decoding time with a 150k vocabulary). The scores it returns are 0 at the drawn token and
    ``−inf`` elsewhere, for HF's greedy step to pick. Processors that run before it (suppressed
    tokens, ``min_new_tokens``) shape the distribution it samples; the log-probs stay the raw ones.
    """

    def __init__(self, temperature: float, sample: bool = False) -> None:
        self.temperature = temperature
        self.sample = sample
        self.latest: torch.Tensor | None = None  # [n, 1, V] raw logits of the latest forward pass
        self.pending: torch.Tensor | None = None  # [n, 1, V] raw logits of a step whose token is not yet known
        self.columns: list[torch.Tensor] = []  # T' x [n]

    def on_forward(self, module: torch.nn.Module, args: tuple, output) -> None:
        self.latest = output.logits[:, -1:].detach()  # [n, 1, V]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:  # the previous step's token is the last one appended
            self._take(input_ids[:, -1])
        if self.latest is None:
            raise RuntimeError(
                "no forward pass of the model was seen before sampling (is the hook on the right module?)"
            )
        self.pending = self.latest
        if not self.sample:
            return scores
        probs = torch.softmax(scores.double() / self.temperature, dim=-1)  # [n, V]
        cdf = probs.cumsum_(dim=-1)  # [n, V]
        u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]  # [n, 1] in [0, total)
        tokens = torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[1] - 1)  # [n, 1] first cdf > u
        self._take(tokens[:, 0])
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)  # [n, V]

    def _take(self, tokens: torch.Tensor) -> None:
        self.columns.append(token_logprobs(self.pending, tokens[:, None], self.temperature)[:, 0])  # [n]
        self.pending = None

    def finish(self, response: torch.Tensor) -> torch.Tensor:
        """``[n, T]`` log-probs of ``response`` (the generated tokens); checks one step per token."""
        if self.pending is not None:
            self._take(response[:, -1].to(self.pending.device))
        if len(self.columns) != response.shape[1]:
            raise RuntimeError(f"recorded {len(self.columns)} steps for {response.shape[1]} generated tokens")
        return torch.stack(self.columns, dim=1)  # [n, T]


def _concat(chunks: list[Generation], pad_id: int) -> Generation:
    """Join per-chunk generations, padding to the longest response and trimming unused columns."""
    width = max(int(c.response_mask.sum(dim=1).max().item()) if c.response_mask.numel() else 0 for c in chunks)
    width = max(width, 1)

    def fit(t: torch.Tensor, value: float) -> torch.Tensor:
        t = t[:, :width]
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Generation(
        response_ids=torch.cat([fit(c.response_ids, pad_id) for c in chunks]),
        response_mask=torch.cat([fit(c.response_mask, 0.0) for c in chunks]),
        logprobs=torch.cat([fit(c.logprobs, 0.0) for c in chunks]),
        finish_reasons=[r for c in chunks for r in c.finish_reasons],
    )
