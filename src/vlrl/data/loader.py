"""A training loader that knows its place in the data, so that a resumed run continues at the same row.

``ResumableSampler`` decides which rows form each batch of an epoch on this rank: the epoch's order
is a permutation that depends only on ``(seed, epoch)``, sharded over ranks. ``ResumableLoader``
walks those batches and counts each one *as it hands it out*; ``state_dict`` returns
``{epoch, position, ...}``. Lightning's fit loop stores the ``state_dict`` of every train loader
that has ``state_dict``/``load_state_dict`` in the checkpoint (``loops.fit_loop.state_dict.combined_loader``)
and restores it on ``--ckpt_path`` before the first batch is drawn, and calls ``sampler.set_epoch``
at every epoch start.

Why counting here is exact: for a loader with a length, Lightning (2.6) does not prefetch a batch
ahead (``_PrefetchDataFetcher`` prefetches only when the length is unknown), so when a checkpoint
is written after step ``k`` exactly ``k`` batches of the epoch have left this loader. Worker
processes run ahead, but they draw from the *remaining* batch list, and the count is taken in the
main process as batches come out, not when workers read the indices. The tests check this against
an uninterrupted run, mid-epoch and across an epoch boundary.

A row that fails when its batch is built (an image changed on disk since the rows were checked)
is, with ``skip_bad_rows``, replaced by the next row in dataset order that builds and is not in the
batch, so the batch keeps its size; the replaced rows are counted (``SkippedRows``) and kept in the
loader's state. The replacement depends only on the data, so a resumed run builds the same batch.

This is a plain iterable rather than a ``torch.utils.data.DataLoader`` on purpose: Lightning
replaces the sampler of a ``DataLoader`` under distributed strategies, which would discard the
sharding and the position kept here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from vlrl.data.errors import DataError

MAX_REPLACED_PER_BATCH = 64  # more rows of one batch failing means the data changed under the run: stop


class ResumableSampler:
    """The batches of row indices of each epoch for one rank, and the position reached.

    Args:
        num_rows: rows in the dataset.
        batch_size: rows per batch on each rank.
        shuffle: permute the rows each epoch (the order depends only on ``seed`` and the epoch).
        seed: seed of the per-epoch permutation.
        drop_last: drop the rows that do not fill a whole batch on every rank; otherwise the order
            is padded (wrapping around) to a multiple of ``world_size`` and the last batch is smaller.
        rank: this process's rank.
        world_size: number of ranks; global batch ``j`` is rows ``order[j*B*W : (j+1)*B*W]``.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size} are not valid")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # batches of ``epoch`` already handed out

    def __len__(self) -> int:
        per_rank = self.num_rows // self.world_size if self.drop_last else math.ceil(self.num_rows / self.world_size)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The global row order of ``epoch``: a permutation that depends only on ``(seed, epoch)``."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, in order."""
        order = self.order(epoch)
        step = self.batch_size * self.world_size
        if self.drop_last:
            order = order[: len(self) * step]
        elif (pad := -len(order) % self.world_size) and len(order):
            order = np.concatenate([order, np.resize(order, pad)])
        shard = order[self.rank :: self.world_size].tolist()
        return [shard[i : i + self.batch_size] for i in range(0, len(shard), self.batch_size)]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (Lightning calls this at each epoch start); a new epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; batch size or rank count may change (rows consumed are kept)."""
        self.epoch = int(state["epoch"])
        if state["num_rows"] != self.num_rows:
            rank_zero_warn(
                f"The checkpoint's data position was saved for {state['num_rows']} training rows, but the data now "
                f"has {self.num_rows}: resuming at the start of epoch {self.epoch}. Resume with the same data to "
                "continue at the same row."
            )
            self.position = 0
            return
        if state["seed"] != self.seed:
            rank_zero_warn(
                f"Resuming with seed={self.seed} but the checkpoint used seed={state['seed']}: the rest of the epoch "
                "follows the new seed's order, so some rows may repeat or be missed in this epoch."
            )
        consumed = int(state["position"]) * int(state["batch_size"]) * int(state["world_size"])
        self.position = math.ceil(consumed / (self.batch_size * self.world_size))


@dataclass
class SkippedRows:
    """Rows that failed when their batch was built and were replaced by other rows.

    Attributes:
        counts: ``prefix + reason`` -> rows replaced; the datamodule passes its ``skipped_rows`` so that
            these rows are logged with the rows skipped at setup (``data/skipped/train/<reason>``).
        prefix: the start of each key of ``counts`` (e.g. ``"train/"``).
        rows: row index -> reason, of every row replaced so far (stored in the loader's state).
    """

    counts: dict[str, int] = field(default_factory=dict)
    prefix: str = ""
    rows: dict[int, str] = field(default_factory=dict)

    def add(self, index: int, reason: str) -> bool:
        """Record row ``index`` as replaced; False (and nothing counted) if it already was."""
        if index in self.rows:
            return False
        self.rows[index] = reason
        key = self.prefix + reason
        self.counts[key] = self.counts.get(key, 0) + 1
        return True


class Built(NamedTuple):
    """A built batch (None when ``error`` is set), the rows replaced in it, and the error that stopped it."""

    batch: Any
    replaced: list[tuple[int, DataError]]
    error: DataError | None = None


def build_batch(dataset: Dataset, collate_fn: Callable[[list[Any]], Any], indices: list[int], replace: bool) -> Built:
    """Collate the items of ``indices``; with ``replace``, an item that raises ``DataError`` is replaced.

    The replacement of row ``i`` is the first of rows ``i+1, i+2, ...`` (wrapping around) that is not in
    the batch and builds, so the batch depends only on ``indices`` and the data. Errors are returned,
    not raised, so that they leave a data worker process whole.
    """
    items, replaced = [], []
    taken = set(indices)
    for index in indices:
        candidate: int | None = index
        while True:
            try:
                items.append(dataset[candidate])
                break
            except DataError as error:
                if not replace:
                    return Built(None, replaced, error)
                replaced.append((candidate, error))
                candidate = next(
                    (j for k in range(1, len(dataset)) if (j := (candidate + k) % len(dataset)) not in taken), None
                )
                if candidate is None or len(replaced) > MAX_REPLACED_PER_BATCH:
                    return Built(None, replaced, _too_many(replaced))
                taken.add(candidate)
    return Built(collate_fn(items), replaced)


def _too_many(replaced: list[tuple[int, DataError]]) -> DataError:
    return DataError(
        f"{len(replaced)} rows failed while one batch was built (first: {replaced[0][1].detail}); the data "
        "probably changed after the run checked it",
        "check that the data files and images are still in place, then resume",
        reason="config",
        skippable=False,
    )


def _as_is(built: Built) -> Built:
    return built  # a worker's ``Built`` as it is (the default would convert its contents)


class _Batches(Dataset):
    """The pending batches of an epoch as a dataset of ``Built`` items, for worker processes."""

    def __init__(self, dataset: Dataset, collate_fn: Callable, pending: list[list[int]], replace: bool) -> None:
        self.dataset, self.collate_fn, self.pending, self.replace = dataset, collate_fn, pending, replace

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, index: int) -> Built:
        return build_batch(self.dataset, self.collate_fn, self.pending[index], self.replace)


class ResumableLoader:
    """Iterates the batches of ``sampler`` from its position, collating rows of ``dataset``.

    Args:
        dataset: map-style dataset of rows; an item that cannot be built raises ``DataError``.
        sampler: the epoch's batches and the position reached (its state is this loader's state).
        collate_fn: turns a list of dataset items into a batch.
        num_workers: worker processes that build batches (0: in the main process).
        skip_bad_rows: replace a row that fails when its batch is built (see ``build_batch``) instead
            of raising its ``DataError``.
        skipped: where replaced rows are recorded (default: a new ``SkippedRows``).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: ResumableSampler,
        collate_fn: Callable[[list[Any]], Any],
        num_workers: int = 0,
        skip_bad_rows: bool = False,
        skipped: SkippedRows | None = None,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler  # Lightning calls ``sampler.set_epoch`` through this attribute
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.skip_bad_rows = skip_bad_rows
        self.skipped = skipped if skipped is not None else SkippedRows()

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if sampler.position >= len(sampler):  # the last epoch was run through without ``set_epoch``
            sampler.set_epoch(sampler.epoch + 1)
        pending = sampler.batches(sampler.epoch)[sampler.position :]
        for built in self._build(pending):
            for index, error in built.replaced:
                if self.skipped.add(index, error.reason):
                    rank_zero_warn(
                        f"Skipped a row that failed when its batch was built (another row took its place): {error.detail}"
                    )
            if built.error is not None:
                raise built.error
            sampler.position += 1  # counted before the batch is handed out: a checkpoint taken after it includes it
            yield built.batch

    def _build(self, pending: list[list[int]]) -> Iterator[Built]:
        if self.num_workers == 0:
            for indices in pending:
                yield build_batch(self.dataset, self.collate_fn, indices, self.skip_bad_rows)
            return
        batches = _Batches(self.dataset, self.collate_fn, pending, self.skip_bad_rows)
        yield from DataLoader(batches, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.sampler.state_dict(),
            "replaced_rows": [[i, reason] for i, reason in sorted(self.skipped.rows.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        if state["num_rows"] == self.sampler.num_rows:  # row indices of other data mean nothing here
            for index, reason in state.get("replaced_rows", []):
                self.skipped.add(int(index), str(reason))
