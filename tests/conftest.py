"""Shared fixtures: tiny models built offline once per session, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models named ``tiny:...`` are built into a per-session cache, never the user's."""
    cache = tmp_path_factory.mktemp("vlrl_cache")
    os.environ["VLRL_CACHE"] = str(cache)
    return cache


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder is absent ({SHARED_DATA})")
    return SHARED_DATA


# The fast lane (``make test-fast``, ``pytest -m fast``): the files of pure-function and unit tests, which
# build at most a tiny model and run no multi-step fit. A test in one of them marked ``slow`` stays out; a
# test elsewhere joins with ``@pytest.mark.fast``. Add a new file of unit tests here.
FAST_FILES = frozenset(
    {
        "test_algorithms.py",
        "test_algorithms_2026.py",
        "test_data.py",
        "test_grading_modes.py",
        "test_layout.py",
        "test_evaluation.py",
        "test_benchmark_sources.py",
        "test_answer_extraction.py",
        "test_loss_path.py",
        "test_plan.py",
        "test_reasoners.py",
        "test_rethinking_rewards.py",
        "test_rewards.py",
        "test_rollout_fields.py",
        "test_throughput.py",
        "test_tis.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in FAST_FILES and "slow" not in item.keywords:
            item.add_marker(pytest.mark.fast)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
