"""``RLDataModule``: sources in, ``PromptBatch`` out, with a data position that survives resuming.

Rows are read and validated when the stage is set up (before the first step), so a bad row fails
the run at once with its file, row and field, or is skipped and counted (``on_bad_row: skip``;
counts in ``skipped_rows``). Image files are checked then too (all of their data); their pixels are
decoded for use when a batch is built (in worker processes if ``num_workers > 0``). When the
loaders are made (the model is loaded by then) each prompt's length in tokens is checked against
``max_prompt_tokens``. A row that still fails when its batch is built is, with ``skip``, replaced by
another row and counted (see ``vlrl.data.loader``), so one bad file cannot stop a long run.

The train loader is a ``ResumableLoader`` (see ``vlrl.data.loader``): Lightning saves its position
in every checkpoint, and ``fit(ckpt_path=...)`` continues with the next unseen batch of the same
shuffled order, across epoch boundaries.

Batch size: either per device (``batch_size``) or over all devices (``global_batch_size``, the
figure papers give); the latter is split over ``trainer.devices`` x ``trainer.num_nodes`` when the
trainer is known, so a config means the same batch on one node or on eight.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from vlrl.data.errors import DataError
from vlrl.data.images import fitted_size, load_image
from vlrl.data.loader import ResumableLoader, ResumableSampler, SkippedRows
from vlrl.data.prompts import Prompt, build_messages, check_template_fields, collate_prompts, question_text
from vlrl.data.schema import Row
from vlrl.data.sources import Source

Split = Literal["train", "val", "test", "predict"]
_STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


def per_device(total: int, key: str, world_size: int, num_nodes: int = 1) -> int:
    """``total`` (a batch over all devices, named ``key`` in errors) split evenly over ``world_size`` devices.

    >>> per_device(640, "data.global_batch_size", 64, num_nodes=8)
    10

    Raises:
        ValueError: ``world_size`` does not divide ``total``; the message names the key, the world
            size as ``trainer.devices`` x ``trainer.num_nodes``, the nearest totals that would split
            and the device counts that divide ``total``.
    """
    if total % world_size == 0:
        return total // world_size
    lower, upper = total // world_size * world_size, (total // world_size + 1) * world_size
    nearest = f"{lower} or {upper}" if lower else f"{upper}"
    counts = ", ".join(str(d) for d in range(1, total + 1) if total % d == 0)
    raise ValueError(
        f"{key}={total} does not split evenly over {world_size} devices (trainer.devices={world_size // num_nodes} x "
        f"trainer.num_nodes={num_nodes}): set {key} to a multiple of {world_size} (nearest: {nearest}), or run on a "
        f"number of devices that divides {total} ({counts})"
    )


class PromptDataset(Dataset):
    """Validated rows as ``Prompt`` items: chat messages built, images decoded and resized."""

    def __init__(
        self,
        rows: list[Row],
        prompt_template: str = "{question}",
        system_prompt: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.rows = rows
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def messages(self, row: Row) -> list[dict]:
        """The chat messages of ``row``."""
        return build_messages(
            row.question, row.messages, len(row.images), row.choices, self.prompt_template, self.system_prompt
        )

    def __getitem__(self, index: int) -> Prompt:
        row = self.rows[index]
        return Prompt(
            id=row.id,
            messages=self.messages(row),
            images=[load_image(ref, self.min_pixels, self.max_pixels, row.where) for ref in row.images],
            answer=row.answer,
            choices=row.choices,
            data_source=row.data_source,
            extras=row.extras,
            question=question_text(row.question, row.messages),
        )


def prompt_tokens(processor: Any, dataset: PromptDataset, chunk: int = 1024) -> list[tuple[int, int]]:
    """``(text, visual)`` token counts of each prompt of ``dataset`` under ``processor``, without decoding images.

    Text: the chat-templated prompt, tokenized (in chunks of ``chunk`` rows), less one placeholder token
    per image; visual: what the processor expands each image to at its size after ``fit_pixels``
    (``_get_num_multimodal_tokens``, which vLLM uses too; 0 where a processor cannot say).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    counts: list[tuple[int, int]] = []
    for start in range(0, len(dataset), chunk):
        rows = dataset.rows[start : start + chunk]
        texts = [
            processor.apply_chat_template(dataset.messages(row), add_generation_prompt=True, tokenize=False)
            for row in rows
        ]
        for row, ids in zip(rows, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
            sizes = [fitted_size(size, dataset.min_pixels, dataset.max_pixels) for size in row.image_sizes]
            if sizes and hasattr(processor, "_get_num_multimodal_tokens"):
                info = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])
                counts.append((len(ids) - len(sizes), sum(info.num_image_tokens)))
            else:
                counts.append((len(ids), 0))
    return counts


class RLDataModule(LightningDataModule):
    """Prompts for RL (and SFT/eval) from files, Hugging Face datasets or the synthetic task.

    Batches are ``vlrl.types.PromptBatch``: per prompt its id, chat ``messages`` (an optional system
    turn, then a user turn with one ``{"type": "image"}`` part per image followed by the text),
    the decoded RGB images, the gold answer, the options of a multiple-choice question, the
    ``data_source`` and the row's other fields (``extras``).

    Args:
        train: source of training prompts (e.g. ``vlrl.data.Files``, ``vlrl.data.HFDataset``,
            ``vlrl.data.Synthetic``).
        val: source of validation prompts.
        test: source of test prompts.
        predict: source of prompts for ``predict``.
        batch_size: rows per training step on each device: prompts of one rollout for the RL methods
            (each is then sampled several times), samples of one optimizer step for ``SFT``.
            Default 8 when ``global_batch_size`` is not set either.
        global_batch_size: rows per training step over all devices, the batch papers state (e.g.
            VL-Rethinker's 512 prompts); each device takes ``global_batch_size`` / (``trainer.devices``
            x ``trainer.num_nodes``), which must divide evenly. Set this or ``batch_size``, not both.
        eval_batch_size: prompts per batch and device for val/test/predict (default: the training
            batch per device).
        prompt_template: user text of a question row, with fields ``{question}`` and ``{choices}``
            (the lettered options "A. ..." one per line). Without ``{choices}``, options are
            appended to the question. ``<image1>``-style markers are removed from questions.
        system_prompt: text of a system turn put before each question row (rows that bring their
            own ``messages`` are used as given).
        min_pixels: upscale images with fewer pixels (width*height) to about this many,
            keeping the aspect ratio.
        max_pixels: downscale images with more pixels to at most this many, keeping the aspect ratio.
        max_prompt_tokens: longest prompt a row may make, in tokens: the chat-templated text plus the
            visual tokens of its images (as the processor counts them, after ``min_pixels``/``max_pixels``).
            A longer row is a bad row (``prompt_too_long``). Default: what an RL method's model can
            take, its context (the vLLM engine's ``max_model_len``, else the model config's
            ``max_position_embeddings``) minus ``sampling.max_new_tokens``; no check for other methods.
        on_bad_row: ``error`` stops at the first bad row with its file, row and field; ``skip``
            skips bad rows, warns once per source with the counts and keeps them in ``skipped_rows``;
            a training row that fails only when its batch is built is replaced by another row and
            counted the same way.
        shuffle: shuffle training rows each epoch (the order depends only on ``seed`` and the epoch).
        seed: seed of the training order.
        num_workers: worker processes that decode images and build batches.
        drop_last: drop the last incomplete training batch of each epoch.
    """

    def __init__(
        self,
        train: Source | None = None,
        val: Source | None = None,
        test: Source | None = None,
        predict: Source | None = None,
        batch_size: int | None = None,
        global_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        prompt_template: str = "{question}",
        system_prompt: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_prompt_tokens: int | None = None,
        on_bad_row: Literal["error", "skip"] = "error",
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        sizes = (
            ("batch_size", batch_size),
            ("global_batch_size", global_batch_size),
            ("eval_batch_size", eval_batch_size),
        )
        for name, value in sizes:
            if value is not None and value < 1:
                raise ValueError(f"data.{name}={value} must be at least 1")
        if batch_size is not None and global_batch_size is not None:
            raise ValueError(
                f"data.batch_size={batch_size} (per device) and data.global_batch_size={global_batch_size} (over all "
                "devices) are both set: keep one and set the other to null"
            )
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive pixel count (or null for no bound)")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}; swap or widen them")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(
                f"data.max_prompt_tokens={max_prompt_tokens} must be a positive number of tokens, or null for the "
                "model's own limit"
            )
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row={on_bad_row!r} must be 'error' or 'skip'")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be 0 (main process) or more")
        check_template_fields("prompt_template", prompt_template, {"question"}, {"choices"})
        self.sources: dict[Split, Source | None] = {"train": train, "val": val, "test": test, "predict": predict}
        self.global_batch_size = global_batch_size
        self._batch_size = 8 if batch_size is None and global_batch_size is None else batch_size
        self._eval_batch_size = eval_batch_size
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_prompt_tokens = max_prompt_tokens
        self.on_bad_row = on_bad_row
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.datasets: dict[Split, PromptDataset] = {}
        self.skipped_rows: dict[str, int] = {}  # "<split>/<reason>" -> rows skipped, e.g. for self.log_dict
        self._replaced_train_rows: dict[int, str] = {}  # rows replaced at batch time, shared by every train loader
        self._length_checked: set[Split] = set()

    @property
    def batch_size(self) -> int:
        """Rows per training step on this device: ``batch_size``, or ``global_batch_size`` split over the
        trainer's devices (one device without a trainer)."""
        if self.global_batch_size is None:
            return self._batch_size
        world_size, num_nodes = (self.trainer.world_size, self.trainer.num_nodes) if self.trainer else (1, 1)
        return per_device(self.global_batch_size, "data.global_batch_size", world_size, num_nodes)

    @property
    def eval_batch_size(self) -> int:
        """Prompts per val/test/predict batch on this device."""
        return self._eval_batch_size or self.batch_size

    def describe_batch(self) -> str:
        """Where the per-device batch comes from, for error messages."""
        if self.global_batch_size is None:
            return f"data.batch_size={self.batch_size}"
        world_size = self.trainer.world_size if self.trainer else 1
        return f"data.global_batch_size={self.global_batch_size} / {world_size} device(s) = {self.batch_size}"

    def setup(self, stage: str) -> None:
        """Derive the per-device batch (an error if it does not divide), then read and validate the rows of
        the splits ``stage`` uses (each split once)."""
        if self.global_batch_size is not None:  # a global batch that does not split fails here, before reading data
            rank_zero_info(f"Training batch: {self.describe_batch()} per device")
        for split in _STAGE_SPLITS.get(stage, ()):
            if self.sources[split] is not None and split not in self.datasets:
                self.datasets[split] = self._load(split)

    def _load(self, split: Split) -> PromptDataset:
        source = self.sources[split]
        assert source is not None
        try:
            loaded = source.load(self.on_bad_row)
        except DataError as error:
            if error.where is not None:  # a row's error already names its file and line
                raise
            raise DataError(
                f"data.{split}: {error.problem}", error.fix, reason=error.reason, skippable=False
            ) from error
        total = sum(loaded.skipped.values())
        if total:
            for reason, count in loaded.skipped.items():
                self.skipped_rows[f"{split}/{reason}"] = count
            details = "; ".join(
                f"{reason}: {count} (first: {loaded.first_error[reason]})" for reason, count in loaded.skipped.items()
            )
            rank_zero_warn(f"Skipped {total} bad row(s) of {split} source {source!r} ({details})")
        if not loaded.rows:
            raise DataError(
                f"{split} source {source!r} has no usable rows ({total} skipped as bad)",
                "check the source's path and column_mapping, and the warning about skipped rows",
                reason="config",
                skippable=False,
            )
        return PromptDataset(loaded.rows, self.prompt_template, self.system_prompt, self.min_pixels, self.max_pixels)

    def dataset(self, split: Split) -> PromptDataset:
        """The prompts of ``split``, read now if ``setup`` has not read them."""
        if split not in self.datasets:
            if self.sources[split] is None:
                raise ValueError(f"no {split} source is configured; set `data.{split}` (e.g. to a vlrl.data.Files)")
            self.datasets[split] = self._load(split)
        return self.datasets[split]

    def prompt_budget(self) -> tuple[Any, int, str] | None:
        """The trainer's processor, the longest prompt allowed in tokens and where that limit comes from;
        None where there is nothing to check with (no trainer, or a module without the limits)."""
        from vlrl.methods.base import RLMethod  # here: vlrl.methods imports vlrl.data
        from vlrl.methods.core import PolicyModule
        from vlrl.rollout.vllm import VLLMEngine

        module = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(module, PolicyModule) or module.processor is None:
            return None
        if self.max_prompt_tokens is not None:
            return module.processor, self.max_prompt_tokens, f"data.max_prompt_tokens={self.max_prompt_tokens}"
        if not isinstance(module, RLMethod):
            return None
        engine = module.rollout_engine
        if isinstance(engine, VLLMEngine) and engine.max_model_len is not None:
            context, source = engine.max_model_len, f"rollout_engine.max_model_len={engine.max_model_len}"
        else:
            context = getattr(module.model.config.get_text_config(), "max_position_embeddings", None)
            source = f"the model config's max_position_embeddings={context}"
        if context is None:
            return None
        limit = context - module.max_new_tokens
        return module.processor, limit, f"{source} - sampling.max_new_tokens={module.max_new_tokens}"

    def check_prompt_lengths(self, split: Split) -> None:
        """Check (once) that every prompt of ``split`` fits ``prompt_budget``; a longer row is a bad row."""
        budget = self.prompt_budget()
        if budget is None or split in self._length_checked:
            return
        processor, limit, source = budget
        dataset = self.dataset(split)
        kept, skipped, first = [], 0, ""
        for row, (text, visual) in zip(dataset.rows, prompt_tokens(processor, dataset), strict=True):
            if text + visual <= limit:
                kept.append(row)
                continue
            error = DataError(
                f"makes a prompt of {text + visual} tokens ({text} text, {visual} visual), more than the "
                f"{limit} allowed ({source})",
                "shorten the question or give smaller images (data.max_pixels), or set data.max_prompt_tokens "
                "if the model takes longer prompts",
                where=row.where,
                field="messages" if row.messages is not None else "question",
                reason="prompt_too_long",
            )
            if self.on_bad_row == "error":
                raise error
            skipped, first = skipped + 1, first or error.detail
        self._length_checked.add(split)
        if not skipped:
            return
        key = f"{split}/prompt_too_long"
        self.skipped_rows[key] = self.skipped_rows.get(key, 0) + skipped
        rank_zero_warn(f"Skipped {skipped} {split} row(s) whose prompt is too long (first: {first})")
        if not kept:
            raise DataError(
                f"no {split} prompt fits in {limit} tokens ({source})",
                "shorten the prompts, or give the model a longer context",
                reason="config",
                skippable=False,
            )
        dataset.rows = kept

    def train_dataloader(self) -> ResumableLoader:
        self.check_prompt_lengths("train")
        dataset = self.dataset("train")
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = ResumableSampler(
            len(dataset), self.batch_size, self.shuffle, self.seed, self.drop_last, rank, world_size
        )
        if len(sampler) == 0:
            raise ValueError(
                f"the train source has {len(dataset)} rows, fewer than one batch ({self.describe_batch()}) on each "
                f"of {world_size} device(s); lower the batch size or set drop_last: false"
            )
        skipped = SkippedRows(self.skipped_rows, "train/", self._replaced_train_rows)
        return ResumableLoader(dataset, sampler, collate_prompts, self.num_workers, self.on_bad_row == "skip", skipped)

    def _eval_dataloader(self, split: Split) -> DataLoader | list:
        if self.sources[split] is None:
            return []
        self.check_prompt_lengths(split)
        return DataLoader(
            self.dataset(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_dataloader("predict")
