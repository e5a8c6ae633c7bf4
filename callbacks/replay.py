"""Selective Sample Replay (VL-Rethinker, arXiv 2504.08837): train on samples that still teach something.

In a GRPO group where every sample gets the same reward, every advantage is 0 and the group adds
nothing to the gradient ("vanishing advantages"). After advantages are computed
(``on_advantages_computed``), this callback

1. drops the samples with zero advantage (``vlrl.algorithms.zero_advantage``: exactly 0, which
   ``group_advantages`` gives every sample of an equal-reward group), and with ``min_abs_advantage``
   above 0 also those with ``|A| <= min_abs_advantage``, from the update batch;
2. fills the batch back up to ``batch_size`` samples with samples of earlier steps, drawn from a
   replay buffer with replacement, with probability proportional to ``|A| ** alpha``;
3. pushes the step's own kept samples into the buffer (FIFO, ``capacity`` samples), with their
   prompt encoding (token ids and image tensors), response tokens, masks, behaviour log-probs,
   advantage, reward, the per-token fields set by then (``returns``, ``engine_logprobs``,
   ``is_weights``) and their plain-valued ``facts``.

Replayed samples are off-policy: their stored behaviour log-probs are ``pi_old``, so the clipped
ratio of the loss handles them. Each keeps its own prompt encoding (``Rollout.concat``), so the
reference log-probs, the loss and the metrics of the update batch are computed on the right inputs.

Decisions where the paper leaves room:

- Draws come from the buffer as it was before this step's push: a replayed sample is never one of
  the step's own.
- Until the buffer holds a sample (the first steps), the batch is filled with the step's own
  zero-advantage samples. They add no policy gradient (as in plain GRPO), and the update batch
  always has ``batch_size`` samples: mini-batch sizes keep dividing it, and under multi-process
  training every rank runs the same number of optimizer steps.
- The buffer is per rank. Its state (samples and the draw generator) is in the checkpoint through
  ``state_dict``, all ranks' buffers gathered into it, so a resumed run replays the same samples;
  a run resumed on fewer ranks merges the buffers of the missing ones.
- Rows of replayed samples in ``Rollout.batch`` carry their id, messages, answer, choices, data
  source and question, not their PIL images (the pixels the update needs are in the encoding).

Memory: the buffer keeps one encoding per prompt (shared by its samples) on CPU; an image at
VL-Rethinker's ``max_pixels`` (1280 * 28 * 28) is up to ~24 MB of float32 pixel values, and the
checkpoint holds the buffer too: size ``capacity`` with that in mind.

Metrics (``Rollout.stats``, logged each step): ``replay/buffer_size``, ``replay/replayed_frac``
(fraction of the update batch drawn from the buffer), ``replay/zero_adv_frac`` (fraction of the
step's samples dropped), ``replay/zero_adv_group_frac`` (fraction of its groups with no sample
kept), ``replay/zero_adv_filled`` (zero-advantage samples used to fill an empty buffer's batch)
and ``replay/mean_age`` (mean steps since replayed samples were generated).

Run: ``lightning-cli fit --config configs/demo/vl_rethinker.yaml``.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from vlrl.algorithms import zero_advantage
from vlrl.hooks import RLCallback
from vlrl.seeding import generator
from vlrl.types import EncodedPrompt, PromptBatch, Rollout

if TYPE_CHECKING:
    from vlrl.methods.base import RLMethod

_SCALAR = (str, int, float, bool, type(None))
STORED_FIELDS = ("returns", "engine_logprobs", "is_weights")  # per-token Rollout fields kept with a sample


class SelectiveSampleReplay(RLCallback):
    """Drops zero-advantage samples and refills the update batch from a replay buffer (VL-Rethinker SSR).

    Args:
        capacity: Most samples the buffer holds; the oldest leave first. Default: 4 x the
            rollout size of the first step.
        alpha: Exponent of the replay priority ``|A| ** alpha`` (0 = uniform).
        min_abs_advantage: Samples with ``|A|`` above this stay in the update batch and enter the
            buffer; the others are dropped. The default 0 drops exactly the zero-advantage samples
            (``vlrl.algorithms.zero_advantage``), as the ``advantage/zero_group_frac`` metric counts them.
        batch_size: Samples in the update batch, at most the rollout size (prompts per step x
            group_size) and a multiple of the method's ``mini_batch_size``. Default: the rollout size.
        seed: Seed of the replay draws (combined with the rank).
    """

    def __init__(
        self,
        capacity: int | None = None,
        alpha: float = 1.0,
        min_abs_advantage: float = 0.0,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1 sample, or null (4 x the rollout size)")
        if alpha < 0:
            raise ValueError(f"alpha={alpha} must be >= 0 (the priority is |A| ** alpha; 0 draws uniformly)")
        if min_abs_advantage < 0:
            raise ValueError(f"min_abs_advantage={min_abs_advantage} must be >= 0 (0 keeps every non-zero advantage)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1, or null (the rollout size)")
        self.capacity = capacity
        self.alpha = alpha
        self.min_abs_advantage = min_abs_advantage
        self.batch_size = batch_size
        self.seed = seed
        self.entries: deque[dict[str, Any]] = deque()  # oldest first
        self.prompts: dict[int, dict[str, Any]] = {}  # prompt key -> encoding and row, shared by its samples
        self._refs: Counter[int] = Counter()  # prompt key -> entries that use it
        self._next_key = 0
        self._generator: torch.Generator | None = None

    # --------------------------------------------------------------------------------- the hook
    @property
    def update_batch_size(self) -> int | None:
        """The update batch this callback refills to (``batch_size``), checked by the method's update plan."""
        return self.batch_size

    def on_advantages_computed(self, trainer: pl.Trainer, pl_module: RLMethod, rollout: Rollout) -> Rollout:
        out, stats = self.reshape(rollout, pl_module.pad_id, step=trainer.global_step, rank=trainer.global_rank)
        out.stats.update(stats)  # logged by the step
        return out

    def reshape(self, rollout: Rollout, pad_id: int, step: int = 0, rank: int = 0) -> tuple[Rollout, dict[str, float]]:
        """The update batch for ``rollout`` (kept + replayed samples) and its metrics; updates the buffer."""
        advantages = rollout.advantages
        if advantages is None or advantages.dim() != 1:
            shape = None if advantages is None else tuple(advantages.shape)
            raise ValueError(
                f"SelectiveSampleReplay needs one advantage per sample ([N]), got {shape}; "
                "use it with group-advantage methods such as GRPO"
            )
        n = len(rollout)
        target = self.batch_size or n
        if target > n:
            raise ValueError(
                f"SelectiveSampleReplay batch_size={target} is larger than the rollout of {n} samples "
                "(prompts per step x group_size); lower batch_size or leave it null"
            )
        if self.capacity is None:
            self.capacity = 4 * n
        generator = self._ensure_generator(rank)
        keep = ~zero_advantage(advantages)  # [N]
        if self.min_abs_advantage > 0:
            keep &= advantages.abs() > self.min_abs_advantage  # [N]
        kept_idx = keep.nonzero().flatten()
        if len(kept_idx) > target:  # only when batch_size < rollout size
            kept_idx = kept_idx[torch.randperm(len(kept_idx), generator=generator)[:target].sort().values]
        parts = [_flag(rollout.select(kept_idx), replayed=False)]
        missing = target - len(kept_idx)
        replayed: list[dict[str, Any]] = []
        filled = 0
        if missing and self.entries:
            replayed = self.draw(missing, generator)
            parts.append(_flag(self.as_rollout(replayed, pad_id), replayed=True))
        elif missing:
            zero_idx = (~keep).nonzero().flatten()[:missing]
            filled = len(zero_idx)
            parts.append(_flag(rollout.select(zero_idx), replayed=False))
        self.push(rollout, keep.nonzero().flatten().tolist(), step)
        out = Rollout.concat(parts, pad_id) if len(parts) > 1 else parts[0]
        groups = rollout.group_index
        kept_groups = set(groups[keep].tolist())
        stats = {
            "replay/buffer_size": float(len(self.entries)),
            "replay/replayed_frac": len(replayed) / max(len(out), 1),
            "replay/zero_adv_frac": float((~keep).float().mean()) if n else 0.0,
            "replay/zero_adv_group_frac": 1.0 - len(kept_groups) / max(len(set(groups.tolist())), 1),
            "replay/zero_adv_filled": float(filled),
            "replay/mean_age": sum(step - e["step"] for e in replayed) / len(replayed) if replayed else 0.0,
        }
        return out, stats

    # ------------------------------------------------------------------------------ the buffer
    def push(self, rollout: Rollout, index: list[int], step: int) -> None:
        """Store the samples at ``index`` of ``rollout`` (oldest samples leave beyond ``capacity``)."""
        keys: dict[int, int] = {}  # id(EncodedPrompt) -> prompt key, so a group shares one encoding
        lengths = rollout.response_mask.sum(dim=1).long()  # [N]
        for i in index:
            prompt = rollout.prompts[i]
            if id(prompt) not in keys:
                keys[id(prompt)] = self._add_prompt(prompt, rollout.batch, int(rollout.group_index[i]))
            length = int(lengths[i])
            self.entries.append(
                {
                    "prompt": keys[id(prompt)],
                    "response_ids": rollout.response_ids[i, :length].clone(),  # [L]
                    "response_mask": rollout.response_mask[i, :length].clone(),  # [L]
                    "logprobs": rollout.logprobs[i, :length].clone(),  # [L]
                    "loss_mask": None if rollout.loss_mask is None else rollout.loss_mask[i, :length].clone(),
                    "advantage": float(rollout.advantages[i]),
                    "reward": float(rollout.rewards[i]) if rollout.rewards is not None else 0.0,
                    "components": {k: float(v[i]) for k, v in rollout.reward_components.items()},
                    "text": rollout.texts[i],
                    "finish_reason": rollout.finish_reasons[i],
                    **{name: _row(getattr(rollout, name), i, length) for name in STORED_FIELDS},
                    "facts": {
                        k: v[i] for k, v in rollout.facts.items() if isinstance(v[i], _SCALAR) and k != "replayed"
                    },
                    "step": step,
                }
            )
            self._refs[keys[id(prompt)]] += 1
        while len(self.entries) > self.capacity:
            self._release(self.entries.popleft()["prompt"])

    def draw(self, count: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """``count`` buffer entries drawn with replacement, with probability proportional to ``|A| ** alpha``."""
        weights = torch.tensor([abs(e["advantage"]) for e in self.entries], dtype=torch.float64) ** self.alpha
        picks = torch.multinomial(weights, count, replacement=True, generator=generator)  # [count]
        return [self.entries[i] for i in picks.tolist()]

    def as_rollout(self, entries: list[dict[str, Any]], pad_id: int) -> Rollout:
        """Buffer entries as a Rollout: one batch row per distinct prompt, responses padded to the widest."""
        keys = list(dict.fromkeys(e["prompt"] for e in entries))
        where = {k: j for j, k in enumerate(keys)}
        encoded = {k: EncodedPrompt(self.prompts[k]["token_inputs"], self.prompts[k]["media_inputs"]) for k in keys}
        rows = [self.prompts[k]["row"] for k in keys]
        width = max(len(e["response_ids"]) for e in entries)

        def stack(field: str, fill: float, default: str | None = None) -> torch.Tensor:
            values = [e[field] if e[field] is not None else e[default] for e in entries]
            return torch.stack([torch.nn.functional.pad(v, (0, width - len(v)), value=fill) for v in values])

        names = set.intersection(*(set(e["components"]) for e in entries))
        fact_names = list(dict.fromkeys(k for e in entries for k in e["facts"]))
        stored = {  # a per-token field every drawn entry has (entries of before a change of method may lack it)
            name: stack(name, 0) for name in STORED_FIELDS if all(e.get(name) is not None for e in entries)
        }
        return Rollout(
            prompts=[encoded[e["prompt"]] for e in entries],
            response_ids=stack("response_ids", pad_id),  # [n, W]
            response_mask=stack("response_mask", 0),  # [n, W]
            logprobs=stack("logprobs", 0),  # [n, W]
            texts=[e["text"] for e in entries],
            finish_reasons=[e["finish_reason"] for e in entries],
            group_index=torch.tensor([where[e["prompt"]] for e in entries], dtype=torch.long),  # [n]
            batch=PromptBatch(
                ids=[r["id"] for r in rows],
                messages=[json.loads(r["messages"]) for r in rows],
                images=[[] for _ in rows],
                answers=[r["answer"] for r in rows],
                choices=[r["choices"] for r in rows],
                data_sources=[r["data_source"] for r in rows],
                questions=[r["question"] for r in rows],
            ),
            rewards=torch.tensor([e["reward"] for e in entries]),  # [n]
            reward_components={k: torch.tensor([e["components"][k] for e in entries]) for k in sorted(names)},
            advantages=torch.tensor([e["advantage"] for e in entries]),  # [n]
            loss_mask=stack("loss_mask", 0, "response_mask")
            if any(e["loss_mask"] is not None for e in entries)
            else None,
            facts={k: [e["facts"].get(k) for e in entries] for k in fact_names},
            **stored,  # [n, W] each
        )

    def _add_prompt(self, prompt: EncodedPrompt, batch: PromptBatch, g: int) -> int:
        key, self._next_key = self._next_key, self._next_key + 1
        self.prompts[key] = {
            "token_inputs": {k: v.detach().cpu() for k, v in prompt.token_inputs.items()},
            "media_inputs": {k: v.detach().cpu() for k, v in prompt.media_inputs.items()},
            "row": {  # plain values only: the checkpoint is loaded with weights_only
                "id": batch.ids[g],
                "messages": json.dumps(batch.messages[g], default=str),
                "answer": batch.answers[g],
                "choices": None if batch.choices[g] is None else list(batch.choices[g]),
                "data_source": batch.data_sources[g],
                "question": batch.questions[g] if batch.questions else "",
            },
        }
        return key

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] <= 0:
            del self._refs[key], self.prompts[key]

    def _ensure_generator(self, rank: int) -> torch.Generator:
        if self._generator is None:
            self._generator = generator(self.seed, "replay", 0, rank)
        return self._generator

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The buffer of every rank (gathered: all ranks call this when a checkpoint is saved)."""
        local = {
            "entries": list(self.entries),
            "prompts": self.prompts,
            "next_key": self._next_key,
            "capacity": self.capacity,
            "generator": None if self._generator is None else self._generator.get_state(),
        }
        if not _distributed():
            return {"ranks": [local]}
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's buffer; with fewer ranks than saved, rank r also takes ranks r + world, ..."""
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _distributed() else (0, 1)
        mine = state_dict["ranks"][rank::world]
        self.entries, self.prompts, self._refs, self._next_key = deque(), {}, Counter(), 0
        self._generator = None
        for saved in mine:
            remap = {}
            for old, prompt in saved["prompts"].items():
                remap[old], self._next_key = self._next_key, self._next_key + 1
                self.prompts[remap[old]] = prompt
            for entry in saved["entries"]:
                facts = entry.get("facts", entry.get("extras", {}))  # "extras" in checkpoints of earlier versions
                self.entries.append({**entry, "prompt": remap[entry["prompt"]], "facts": facts})
                self._refs[remap[entry["prompt"]]] += 1
        if mine:
            self.capacity = mine[0]["capacity"] if self.capacity is None else self.capacity
            if mine[0]["generator"] is not None:
                self._generator = torch.Generator()
                self._generator.set_state(mine[0]["generator"])
        if self.capacity is not None:
            while len(self.entries) > self.capacity:
                self._release(self.entries.popleft()["prompt"])


def _flag(rollout: Rollout, replayed: bool) -> Rollout:
    rollout.facts["replayed"] = [replayed] * len(rollout)
    return rollout


def _row(value: torch.Tensor | None, i: int, length: int) -> torch.Tensor | None:
    """Sample ``i``'s first ``length`` entries of an ``[N, T]`` field (a copy), or None if the field is unset."""
    return None if value is None else value[i, :length].clone()  # [L]


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )
