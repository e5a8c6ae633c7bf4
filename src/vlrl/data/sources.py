"""Where rows come from: files (JSONL / Parquet / a folder of them), a Hugging Face dataset, the synthetic task.

Each source is a small class whose constructor arguments are its config, so YAML names it with
``class_path``/``init_args``::

    data:
      train:
        class_path: vlrl.data.Files
        init_args: {path: data/train.jsonl, column_mapping: {problem: question, solution: answer}}

All sources read into the same validated ``Row`` (see ``vlrl.data.schema``) through ``Source.load``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal, NamedTuple

from vlrl.data.errors import DataError, RowLocation
from vlrl.data.schema import Row, validate_row
from vlrl.data.synthetic import check_args, make_rows

FILE_SUFFIXES = (".jsonl", ".parquet")


class RawRecord(NamedTuple):
    """A record as read, before mapping and validation (``value`` is a ``DataError`` if unparsable)."""

    where: RowLocation
    value: Any
    base_dir: Path | None  # relative image paths are resolved against this folder


@dataclass
class LoadedRows:
    """The valid rows of a source, and the rows skipped per reason (with the first message of each)."""

    rows: list[Row]
    skipped: Counter[str] = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)


class Source(ABC):
    """Base of all row sources.

    Args:
        column_mapping: renames source columns to schema fields, e.g. ``{problem: question,
            solution: answer}``. A mapped column that the source lacks is an error.
        data_source: ``data_source`` of rows that have none (default: the source's name).
        require_answer: whether a row without a gold ``answer`` is bad (false for methods that
            need no answers, e.g. when rewards come from a judge).
        limit: read only the first ``limit`` rows.
    """

    def __init__(
        self,
        column_mapping: dict[str, str] | None = None,
        data_source: str | None = None,
        require_answer: bool = True,
        limit: int | None = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit} must be a positive number of rows (or null for all)")
        self.column_mapping = dict(column_mapping or {})
        self.data_source = data_source
        self.require_answer = require_answer
        self.limit = limit

    @property
    def name(self) -> str:
        """The default ``data_source`` and the prefix of default ids."""
        return self.data_source or self.default_name()

    @abstractmethod
    def default_name(self) -> str:
        """A name derived from what the source reads (a file stem, a dataset name)."""

    @abstractmethod
    def records(self) -> Iterator[RawRecord]:
        """The raw records, in order."""

    def load(self, on_bad_row: Literal["error", "skip"] = "error") -> LoadedRows:
        """Read and validate every row; a bad row raises ``DataError`` or, with ``"skip"``, is counted."""
        raw = list(islice(self.records(), self.limit))
        self._check_mapping(raw)
        loaded = LoadedRows(rows=[])
        for index, record in enumerate(raw):
            try:
                if isinstance(record.value, DataError):
                    raise record.value
                row = validate_row(
                    self._mapped(record.value),
                    record.where,
                    default_id=f"{self.name}:{index}",
                    default_source=self.name,
                    base_dir=record.base_dir,
                    require_answer=self.require_answer,
                )
            except DataError as error:
                if on_bad_row == "error":
                    raise
                loaded.skipped[error.reason] += 1
                loaded.first_error.setdefault(error.reason, error.detail)
                continue
            loaded.rows.append(row)
        return loaded

    def _mapped(self, record: Any) -> Any:
        if not self.column_mapping or not isinstance(record, dict):
            return record
        out = {key: value for key, value in record.items() if key not in self.column_mapping}
        for column, name in self.column_mapping.items():
            if column in record:
                out[name] = record[column]
        return out

    def _check_mapping(self, raw: list[RawRecord]) -> None:
        columns: dict[str, None] = {}
        for record in raw:
            if isinstance(record.value, dict):
                columns.update(dict.fromkeys(record.value))
        missing = [column for column in self.column_mapping if column not in columns]
        if missing and columns:
            raise DataError(
                f"names column(s) {missing} that {self} does not have; available columns: {list(columns)}",
                "map only columns that exist (source column -> schema field)",
                field="column_mapping",
                reason="config",
                skippable=False,
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class Files(Source):
    """Rows from JSONL or Parquet files, or a folder of them.

    A folder contributes all its ``*.jsonl`` and ``*.parquet`` files (not recursive), sorted by
    name. Relative image paths in a row are resolved against the folder of the file holding it, so
    an image folder with a ``metadata.jsonl`` (Hugging Face "imagefolder" layout) reads directly,
    with ``column_mapping: {file_name: image}``. Row numbers in errors are JSONL line numbers
    (1-based) or Parquet row numbers (1-based).

    Args:
        path: a ``.jsonl``/``.parquet`` file, a folder of them, or a list of files/folders.
        column_mapping: renames source columns to schema fields, e.g. ``{problem: question}``.
        data_source: ``data_source`` of rows that have none (default: the first file's stem, or
            the folder's name).
        require_answer: whether a row without a gold ``answer`` is bad.
        limit: read only the first ``limit`` rows.
    """

    def __init__(
        self,
        path: str | list[str],
        column_mapping: dict[str, str] | None = None,
        data_source: str | None = None,
        require_answer: bool = True,
        limit: int | None = None,
    ) -> None:
        super().__init__(column_mapping, data_source, require_answer, limit)
        self.paths = [Path(p).expanduser() for p in ([path] if isinstance(path, str) else path)]
        if not self.paths:
            raise ValueError("path is an empty list; give at least one .jsonl/.parquet file or folder")

    def __repr__(self) -> str:
        return f"Files({', '.join(str(p) for p in self.paths)})"

    def default_name(self) -> str:
        first = self.paths[0]
        return first.name if first.is_dir() else first.stem

    def files(self) -> list[Path]:
        """The data files read, in order."""
        files = []
        for path in self.paths:
            if path.is_dir():
                found = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file())
                if not found:
                    raise DataError(
                        f"path {path} is a folder without {'/'.join(FILE_SUFFIXES)} files",
                        "point `path` at a folder with data files, or at the files themselves",
                        reason="config",
                        skippable=False,
                    )
                files.extend(found)
            elif path.is_file() and path.suffix in FILE_SUFFIXES:
                files.append(path)
            else:
                problem = "does not exist" if not path.exists() else f"is not a {'/'.join(FILE_SUFFIXES)} file"
                raise DataError(
                    f"path {path} {problem}",
                    "give a .jsonl or .parquet file, or a folder of them (relative paths start at the "
                    "working directory)",
                    reason="config",
                    skippable=False,
                )
        return files

    def records(self) -> Iterator[RawRecord]:
        for file in self.files():
            yield from (_jsonl_records(file) if file.suffix == ".jsonl" else _parquet_records(file))


def _jsonl_records(file: Path) -> Iterator[RawRecord]:
    """The lines of a JSONL file as records; a line that is not UTF-8 or not JSON is a ``DataError`` record.

    Lines are split on ``\\n`` and decoded one by one, so that one bad byte spoils only its line. A
    UTF-8 byte-order mark opening the file is ignored.
    """
    with file.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = RowLocation(str(file), number, "line")
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield RawRecord(where, _bad_encoding(raw, error, where), file.parent)
                continue
            line = line.rstrip("\r\n")  # else an error at the end of the line is reported at column 1 of the next
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                value = DataError(
                    f"is not valid JSON: {error.msg} at column {error.pos + 1}, {_near(line, error.pos)}",
                    "fix the line so that it holds exactly one JSON object",
                    where=where,
                    reason="malformed_json",
                )
            yield RawRecord(where, value, file.parent)


def _near(line: str, pos: int, width: int = 20) -> str:
    """Where character ``pos`` of ``line`` is, shown as the text around it with ``>>>`` before it."""
    before, after = line[max(0, pos - width) : pos], line[pos : pos + width]
    return f"here: {before!r} >>> {after!r}" if after else f"at the end of the line, after {before!r}"


def _bad_encoding(raw: bytes, error: UnicodeDecodeError, where: RowLocation) -> DataError:
    column = len(raw[: error.start].decode("utf-8", errors="replace")) + 1
    return DataError(
        f"is not UTF-8 text: byte 0x{raw[error.start]:02x} at column {column} (byte {error.start + 1} of the "
        f"line) {error.reason}",
        "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl` if it is Latin-1)",
        where=where,
        reason="bad_encoding",
    )


def _parquet_records(file: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            number += 1
            yield RawRecord(RowLocation(str(file), number, "row"), value, file.parent)


class HFDataset(Source):
    """Rows from a Hugging Face dataset: a Hub name (``datasets.load_dataset``) or a local folder.

    A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with
    ``datasets.load_from_disk``; any other name or folder goes to ``load_dataset``. Image columns
    are read undecoded (bytes) and decoded only when a batch is built. Row numbers in errors are
    1-based positions in the split.

    Args:
        name: Hub dataset id (``owner/name``) or a local dataset folder.
        split: the split to read.
        subset: the dataset's configuration name, if it has several.
        column_mapping: renames dataset columns to schema fields, e.g. ``{problem: question}``.
        data_source: ``data_source`` of rows that have none (default: the dataset's name).
        require_answer: whether a row without a gold ``answer`` is bad.
        limit: read only the first ``limit`` rows.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        subset: str | None = None,
        column_mapping: dict[str, str] | None = None,
        data_source: str | None = None,
        require_answer: bool = True,
        limit: int | None = None,
    ) -> None:
        super().__init__(column_mapping, data_source, require_answer, limit)
        self.dataset_name = name
        self.split = split
        self.subset = subset

    def __repr__(self) -> str:
        return f"HFDataset({self.dataset_name}[{self.split}])"

    def default_name(self) -> str:
        return Path(self.dataset_name.rstrip("/")).name

    def _local_saved(self) -> Path | None:
        path = Path(self.dataset_name).expanduser()
        saved = path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())
        return path if saved else None

    def dataset(self) -> Any:
        """The ``datasets.Dataset`` of the split, with image columns undecoded."""
        import datasets

        local = self._local_saved()
        if local is None:
            data = datasets.load_dataset(self.dataset_name, self.subset, split=self.split)
        else:
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if self.split not in data:
                    raise DataError(
                        f"dataset {local} has no split '{self.split}'; its splits are {list(data)}",
                        "set `split` to one of them",
                        field="split",
                        reason="config",
                        skippable=False,
                    )
                data = data[self.split]
        for column, feature in data.features.items():
            undecoded = _undecoded(feature)
            if undecoded is not None:
                data = data.cast_column(column, undecoded)
        return data

    def records(self) -> Iterator[RawRecord]:
        base_dir = self._local_saved()
        where = f"{self.dataset_name}[{self.split}]"
        for number, value in enumerate(self.dataset(), start=1):
            yield RawRecord(RowLocation(where, number, "row"), value, base_dir)


def _undecoded(feature: Any) -> Any | None:
    """``feature`` with every ``Image`` set to ``decode=False``; None if it holds no image."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False) if feature.decode else None
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        inner = _undecoded(feature.feature)
        if inner is None:
            return None
        if isinstance(feature, datasets.LargeList):
            return datasets.LargeList(inner)
        return datasets.List(inner, length=feature.length)
    if isinstance(feature, dict):
        changed = {key: _undecoded(value) for key, value in feature.items()}
        if all(value is None for value in changed.values()):
            return None
        return {key: feature[key] if value is None else value for key, value in changed.items()}
    return None


class Synthetic(Source):
    """The embedded synthetic visual reasoning task (see ``vlrl.data.synthetic``), drawn in memory.

    Args:
        split: which split to draw; splits never share a scene.
        size: number of rows.
        seed: seed of the drawing (same seed, same rows and bytes).
        kinds: question kinds to include (default all: color, shape, position, compare, count, add).
        image_size: side of the square images in pixels.
        text_only: describe each scene in words instead of drawing it: no image, the description
            starts the question, and a ``response`` field holds step-by-step reasoning ending in
            ``\\boxed{answer}`` (SFT data for a language-only cold start, e.g. ``vlrl.methods.SFT``).
    """

    def __init__(
        self,
        split: Literal["train", "val", "test"],
        size: int,
        seed: int = 0,
        kinds: list[str] | None = None,
        image_size: int = 56,
        text_only: bool = False,
    ) -> None:
        super().__init__(data_source="synthetic")
        self.kinds = check_args(split, size, kinds, image_size)
        self.split = split
        self.size = size
        self.seed = seed
        self.image_size = image_size
        self.text_only = text_only

    def __repr__(self) -> str:
        text = ", text_only" if self.text_only else ""
        return f"Synthetic({self.split}, size={self.size}, seed={self.seed}{text})"

    def default_name(self) -> str:
        return "synthetic"

    def records(self) -> Iterator[RawRecord]:
        where = f"synthetic[{self.split}]"
        rows = make_rows(self.split, self.size, self.seed, self.kinds, self.image_size, self.text_only)
        for number, row in enumerate(rows, start=1):
            yield RawRecord(RowLocation(where, number, "row"), row, None)
