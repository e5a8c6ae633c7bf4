"""Training forwards over prompts + responses: padded or packed, and micro-batches by a token budget.

A training forward (the policy's log-probs under autograd, the old and reference log-probs, a critic's
values) reads, for every response token, the model's output at the position before it. Two layouts
give the same outputs:

- padded (``ResponseBatch.padded``): one row per sample, prompts left-padded, responses right-padded to
  the longest real response of the micro-batch (not the rollout's width), attention mask 0 on pads::

      [pad pad p p p p | r r r EOS pad]

- packed (``ResponseBatch.packed``): every sample's real tokens (prompt, then response up to its last
  real token) one after another in a single row ``[1, L]``, no attention mask, position ids restarting
  at 0 at every sample::

      [p p p p r r r EOS | p p r r | p p p r r r r r]      positions 0 1 2 ... 0 1 ... 0 1 2 ...

  Transformers 5.23 reads such a row as packed sequences when ``attention_mask`` is ``None`` and no
  cache is used: with SDPA or eager attention it builds a block-diagonal causal mask from the
  restarts of the 1-D positions (``masking_utils.find_packed_sequence_indices``), with
  ``flash_attention_2`` it runs the variable-length kernel on the sequences the restarts delimit
  (``modeling_flash_attention_utils._is_packed_sequence``, batch size 1). Attention stays inside each
  sample, so a packed row computes what the samples compute one by one, with no pad positions.
  For Qwen-VL's multimodal RoPE, each sample's 3-D positions are the model's own ``get_rope_index`` of
  that sample alone, and the 1-D text positions go in front (``[4, 1, L]``): Qwen2.5-VL takes the first
  row for the mask and the other three for the rotary embedding.

``ResponseBatch.responses`` picks the outputs that predict the response tokens from either layout and
``unpack`` returns them as ``[n, T]`` (0 after each response's last real token), so callers do not
depend on the layout. ``budget_slices`` cuts a batch into micro-batches by a token budget.

A padded batch can also run each distinct prompt once (``prompt_once_logits``): the ``G`` samples of a
group share a prompt, so its forward (with the images) runs on one row, its key/value cache is copied
to the ``G`` rows, and only the responses run on ``G`` rows::

      prompt pass   [pad p p p]              one row per distinct prompt, but its last token -> cache
      response pass [p r r r] x G            reads the copied cache; predicts the response tokens

Under autograd the copies are indexing, so the gradient reaching the prompt pass is the sum over its
samples, as it is when each sample runs its own prompt. Positions are those the padded batch has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from peft import PeftModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from vlrl.models.inputs import TOKEN_KEYS, collate, extend_prompt, to_device
from vlrl.models.vision import PIXELS, with_shared_vision
from vlrl.types import EncodedPrompt

Rope = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def mrope_index(model: torch.nn.Module) -> Rope | None:
    """The multimodal RoPE position function of a Qwen-VL-style model; None for 1-D positions.

    Transformers has no common attribute that tells 1-D from multimodal RoPE; the model families
    with the latter define ``get_rope_index`` on their inner model, so that is what is looked up
    (under a PEFT wrapper, on the wrapped model; on a bare inner model such as a critic's backbone, on it).
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    inner = getattr(base, "model", None)  # a causal LM's model; a critic's backbone is that model itself
    return getattr(inner, "get_rope_index", None) or getattr(base, "get_rope_index", None)


def pack_sequences(sequences: list[EncodedPrompt], rope: Rope | None) -> dict[str, torch.Tensor]:
    """Sequences (each unpadded, ``[1, L_i]``) concatenated into one row ``[1, L]`` of model inputs.

    No ``attention_mask``; ``position_ids`` restart at 0 at every sequence: ``[1, L]`` for 1-D RoPE, or
    ``[4, 1, L]`` (text positions, then the sequence's own 3-D positions from ``rope``) for multimodal
    RoPE. Media inputs are concatenated in sequence order, as ``collate`` does for a padded batch.
    """
    keys = [k for k in sequences[0].token_inputs if k != "attention_mask"]
    inputs = {k: torch.cat([s.token_inputs[k] for s in sequences], dim=1) for k in keys}  # [1, L]
    positions = []
    for s in sequences:
        text = torch.arange(s.length).view(1, -1)  # [1, L_i], restarting at every sequence
        if rope is None:
            positions.append(text)
        else:
            spatial, _ = rope(**s.token_inputs, **s.media_inputs)  # [3, 1, L_i]
            positions.append(torch.cat([text.view(1, 1, -1), spatial.to(text.dtype)]))  # [4, 1, L_i]
    inputs["position_ids"] = torch.cat(positions, dim=-1)  # [1, L] or [4, 1, L]
    for key in sorted({k for s in sequences for k in s.media_inputs}):
        inputs[key] = torch.cat([s.media_inputs[key] for s in sequences if key in s.media_inputs])
    return inputs


def response_lengths(response_mask: torch.Tensor) -> list[int]:
    """Real tokens of each right-padded response (``[n, T]`` mask -> ``n`` ints); a gap in a mask is refused."""
    real = response_mask.detach().cpu() > 0  # [n, T]
    lengths = real.sum(dim=1)  # [n]
    if not torch.equal(real, torch.arange(real.shape[1]) < lengths[:, None]):
        raise ValueError(
            "a response mask has a 0 before a real token; training forwards take right-padded responses "
            "(mask 1 up to the last real token): train fewer tokens with Rollout.loss_mask instead"
        )
    return lengths.tolist()


@dataclass
class ResponseBatch:
    """Model inputs of prompts + responses, and where the outputs that predict response tokens are.

    Attributes:
        inputs: The model inputs (token inputs, ``position_ids`` when packed, media).
        keep: ``logits_to_keep`` for the forward: the last ``T' + 1`` positions (padded) or the indices
            of the predicting positions (packed).
        rows: ``[M]`` the sample of each real response token (packed; ``None`` when padded).
        cols: ``[M]`` its position in the response (packed; ``None`` when padded).
        real: ``[n, T']`` bool, the real response tokens of the padded rows (``None`` when packed).
        width: ``T'``, the response width the padded rows carry (the longest real response).
        shape: ``(n, T)``: samples and the rollout's response width, the shape ``unpack`` returns.
    """

    inputs: dict[str, torch.Tensor]
    keep: int | torch.Tensor
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    real: torch.Tensor | None
    width: int
    shape: tuple[int, int]

    @classmethod
    def padded(
        cls, prompts: list[EncodedPrompt], pad_id: int, responses: torch.Tensor, response_mask: torch.Tensor
    ) -> ResponseBatch:
        """One row per sample (``collate``), responses cut to the longest real one of the batch."""
        width = max([1, *response_lengths(response_mask)])
        inputs = collate(prompts, pad_id, responses[:, :width], response_mask[:, :width])  # [n, P + T']
        real = response_mask[:, :width] > 0  # [n, T']
        return cls(inputs, width + 1, None, None, real, width, tuple(responses.shape))

    @classmethod
    def packed(
        cls, prompts: list[EncodedPrompt], responses: torch.Tensor, response_mask: torch.Tensor, rope: Rope | None
    ) -> ResponseBatch:
        """All samples in one row ``[1, L]`` (``pack_sequences``), each cut after its last real response token."""
        lengths = response_lengths(response_mask)
        sequences = [extend_prompt(p, responses[i, :r]) for i, (p, r) in enumerate(zip(prompts, lengths, strict=True))]
        inputs = pack_sequences(sequences, rope)
        keep, rows, cols = [], [], []
        start = 0
        for i, (p, r) in enumerate(zip(prompts, lengths, strict=True)):
            keep.append(torch.arange(r) + start + p.length - 1)  # position P_i - 1 + t predicts token t
            rows.append(torch.full((r,), i))
            cols.append(torch.arange(r))
            start += p.length + r
        shape = tuple(responses.shape)
        return cls(inputs, torch.cat(keep), torch.cat(rows), torch.cat(cols), None, max(lengths, default=0), shape)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> ResponseBatch:
        """The batch on ``device``, floating-point media in ``dtype`` (``to_device``)."""
        keep = self.keep.to(device) if isinstance(self.keep, torch.Tensor) else self.keep
        real = self.real.to(device) if self.real is not None else None
        return replace(self, inputs=to_device(self.inputs, device, dtype), keep=keep, real=real)

    @property
    def is_packed(self) -> bool:
        return self.rows is not None

    @property
    def targets(self) -> torch.Tensor:
        """The response tokens in the layout of ``responses``: ``[n, T']`` padded, ``[1, M]`` packed."""
        ids = self.inputs["input_ids"]
        if self.is_packed:
            return ids[:, self.keep + 1]  # [1, M]: the token after each predicting position
        return ids[:, -self.width :]  # [n, T']

    def responses(self, outputs: torch.Tensor) -> torch.Tensor:
        """The outputs ``[b, K, ...]`` at the positions predicting response tokens: ``[n, T', ...]`` padded,
        ``[1, M, ...]`` packed. ``outputs`` are the model's at every position or at ``keep`` only."""
        if not self.is_packed:
            return outputs[:, -self.width - 1 : -1]
        every = outputs.shape[1] == self.inputs["input_ids"].shape[1]  # else already at ``keep`` (M < L)
        return outputs[:, self.keep] if every else outputs

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values in the layout of ``responses`` (``[n, T']`` or ``[1, M]``) as ``[n, T]``, 0 elsewhere."""
        n, t = self.shape
        out = values.new_zeros((n, t))  # [n, T]
        if self.is_packed:
            return out.index_put((self.rows.to(values.device), self.cols.to(values.device)), values[0])
        values = torch.where(self.real, values, torch.zeros_like(values))  # [n, T']: 0 on the pads
        return torch.cat([values, out[:, values.shape[1] :]], dim=1)  # [n, T]


def prompt_groups(prompts: list[EncodedPrompt]) -> tuple[list[int], list[int]]:
    """The first row of each distinct prompt (the same object, as the samples of a group hold) and, for
    every row, the index of its prompt among them.

    Example:
        Rows ``[a, a, b, a]`` give ``[0, 2]`` and ``[0, 0, 1, 0]``.
    """
    first: dict[int, int] = {}
    rows: list[int] = []
    index = []
    for i, p in enumerate(prompts):
        if id(p) not in first:
            first[id(p)] = len(rows)
            rows.append(i)
        index.append(first[id(p)])
    return rows, index


def padded_positions(batch: ResponseBatch, rope: Rope | None) -> torch.Tensor:
    """Position ids of a padded batch as the model computes them without any: ``[3, n, L]`` from ``rope``
    for multimodal RoPE with images, else ``[n, L]`` counting from the first (padded) column."""
    inputs = batch.inputs
    ids = inputs["input_ids"]  # [n, L]
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs}
    if rope is not None and grids:
        tokens = {k: inputs[k] for k in TOKEN_KEYS if k in inputs and k != "input_ids"}
        positions, _ = rope(ids, **tokens, **grids)  # [3, n, L]
        return positions
    return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)  # [n, L]


def prompt_once_logits(
    model: torch.nn.Module,
    batch: ResponseBatch,
    prompts: list[EncodedPrompt],
    pad_id: int,
    rope: Rope | None,
) -> torch.Tensor:
    """The logits ``[n, T', V]`` at the positions predicting the response tokens of the padded ``batch``
    (what ``batch.responses(model(**batch.inputs).logits)`` gives), with each distinct prompt run once.

    The prompt pass runs the distinct prompts but their last token (left-padded to the batch's prompt
    width, their images through the vision tower once) and keeps their key/value cache. Its rows are
    copied to the samples, and the response pass runs each prompt's last token and the response but its
    last token, reading that cache: its outputs are the ``T'`` predicting positions, in one tensor.
    Positions are the padded batch's own (``padded_positions``), so both passes see what one padded
    pass sees. Under gradient checkpointing the decoder layers keep these caches
    (``cache_through_checkpoints``). A prompt's last token must be text (chat templates end with the
    assistant header), as in the engine's shared prefill.
    """
    device = batch.inputs["input_ids"].device
    rows, index = prompt_groups(prompts)
    full_mask = batch.inputs["attention_mask"]  # [n, P + T']
    head_width = full_mask.shape[1] - batch.width - 1  # P - 1
    positions = padded_positions(batch, rope)  # [3, n, P + T'] or [n, P + T']
    first = torch.tensor(rows, device=device)  # [B]
    pixels = batch.inputs.get(PIXELS)
    dtype = pixels.dtype if pixels is not None else None  # the media dtype ``ResponseBatch.to`` gave
    head = to_device(collate([prompts[i] for i in rows], pad_id), device, dtype)  # [B, P]
    if head["input_ids"].shape[1] != head_width + 1 or head_width < 1:
        raise RuntimeError(
            f"the distinct prompts are {head['input_ids'].shape[1]} tokens wide, the batch's {head_width + 1}; "
            "a prompt pass needs at least 2 prompt tokens"
        )
    head = {k: v[:, :head_width] if k in TOKEN_KEYS else v for k, v in head.items()}  # [B, P - 1]
    head = with_shared_vision(model, [prompts[i] for i in rows], head)
    head["position_ids"] = positions.index_select(-2, first)[..., :head_width]  # [3, B, P - 1] or [B, P - 1]
    samples = torch.tensor(index, device=device)  # [n]
    with cache_through_checkpoints(model):
        prompt_cache = Cache(layer_class_to_replicate=PromptLayer)
        model(**head, cache=prompt_cache, use_cache=False, logits_to_keep=1)  # our caches, not a new one
        # the prompt's keys/values on each of its samples' rows (indexing: their gradients add up)
        cache = Cache(layers=[ReadLayer(layer.keys[samples], layer.values[samples]) for layer in prompt_cache.layers])
        out = model(
            input_ids=batch.inputs["input_ids"][:, head_width:-1],  # [n, T']: last prompt token, response but its last
            attention_mask=full_mask[:, :-1],  # [n, P + T' - 1]
            position_ids=positions[..., head_width:-1],  # [3, n, T'] or [n, T']
            cache=cache,
            use_cache=False,
        )
    return out.logits  # [n, T', V]


class PromptLayer(DynamicLayer):
    """A layer's cache in the prompt pass: it holds the keys/values of the pass and is written once, not
    appended to, so a checkpointed layer replayed in the backward pass writes the same states again."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class ReadLayer(DynamicLayer):
    """A layer's cache in the response pass: the prompt's keys/values ``[n, heads, P, d]`` in front of the
    pass's own, nothing stored (a replayed layer reads the same)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextlib.contextmanager
def cache_through_checkpoints(model: torch.nn.Module) -> Iterator[None]:
    """Checkpointed decoder layers keep the cache they are given while inside.

    Transformers drops the cache of a layer it checkpoints under autograd, because a layer that appends to
    it would append again when the backward pass replays it. ``PromptLayer`` and ``ReadLayer`` give the
    same result when replayed, so the layers may keep them (``_can_checkpoint_with_cache``).
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("_can_checkpoint_with_cache", None)


def budget_slices(
    prompt_lengths: list[int], response_lengths: list[int], groups: list[int], budget: int, packed: bool
) -> list[list[int]]:
    """Consecutive samples grouped into micro-batches whose forward holds at most ``budget`` tokens.

    The size of a micro-batch is what its forward computes: the sum of prompt + response tokens when
    packed, rows × (longest prompt + longest response) when padded. The samples of a group (a run of
    equal ``groups`` keys: the samples of one prompt) stay together where they fit: a group that does
    not fit the current micro-batch starts a new one if it fits an empty one, else it is split. A
    sample over the budget on its own goes alone. Order is kept, so results join back in order.

    Example:
        Prompt 4 tokens, responses 2, 2 | 1, 1, 1 (two groups), packed, budget 12: ``[[0, 1], [2, 3], [4]]``
        (the first group is 12 tokens; the second, 15, is split). Padded, budget 12: ``[[0, 1], [2, 3], [4]]``
        (2 rows × 6, then 2 rows × 5).
    """
    slices: list[list[int]] = []
    current: list[int] = []

    def size(index: list[int]) -> int:
        if packed:
            return sum(prompt_lengths[i] + response_lengths[i] for i in index)
        return len(index) * (max(prompt_lengths[i] for i in index) + max(response_lengths[i] for i in index))

    runs: list[list[int]] = []
    for i, g in enumerate(groups):
        if runs and groups[runs[-1][-1]] == g:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        if current and size(current + run) <= budget:
            current += run
            continue
        if size(run) <= budget:
            if current:
                slices.append(current)
            current = list(run)
            continue
        for i in run:  # the group alone is over the budget: sample by sample
            if current and size(current + [i]) <= budget:
                current.append(i)
            else:
                if current:
                    slices.append(current)
                current = [i]
    if current:
        slices.append(current)
    return slices
