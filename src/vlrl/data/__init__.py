"""Data: sources of rows, their validation, prompts, and the datamodule that yields ``PromptBatch``.

For example ``RLDataModule(train=Synthetic("train", size=2000), val=Files("data/val.jsonl"), batch_size=8)``;
in YAML each source is named by ``class_path`` (``vlrl.data.Files``, ``vlrl.data.HFDataset``,
``vlrl.data.Synthetic``) with its constructor arguments as ``init_args``. Evaluation benchmarks read as
released (``vlrl.data.MathVista``, ``MathVision``, ``MathVerse``, ``WeMath``, ``MMMU``, ``DynaMath``,
``LogicVista``, ``VLRewardBench``) are sources too; see ``vlrl.data.benchmarks``.
"""

from vlrl.data.benchmarks import (
    MMMU,
    Benchmark,
    DynaMath,
    LogicVista,
    MathVerse,
    MathVision,
    MathVista,
    VLRewardBench,
    WeMath,
)
from vlrl.data.datamodule import PromptDataset, RLDataModule
from vlrl.data.errors import DataError, RowLocation
from vlrl.data.images import fit_pixels, load_image
from vlrl.data.loader import ResumableLoader, ResumableSampler
from vlrl.data.preference import PreferencePairs, SyntheticPairs, make_pairs, swap_candidates
from vlrl.data.prompts import Prompt, build_messages, render_choices, strip_image_placeholders
from vlrl.data.schema import Row, validate_row
from vlrl.data.sft import SFTDataModule
from vlrl.data.sources import Files, HFDataset, Source, Synthetic
from vlrl.data.synthetic import make_rows, save_split

__all__ = [
    "MMMU",
    "Benchmark",
    "DataError",
    "DynaMath",
    "Files",
    "HFDataset",
    "LogicVista",
    "MathVerse",
    "MathVision",
    "MathVista",
    "PreferencePairs",
    "Prompt",
    "PromptDataset",
    "RLDataModule",
    "ResumableLoader",
    "ResumableSampler",
    "Row",
    "RowLocation",
    "SFTDataModule",
    "Source",
    "Synthetic",
    "SyntheticPairs",
    "VLRewardBench",
    "WeMath",
    "build_messages",
    "fit_pixels",
    "load_image",
    "make_pairs",
    "make_rows",
    "render_choices",
    "save_split",
    "strip_image_placeholders",
    "swap_candidates",
    "validate_row",
]
