"""The shipped vLLM overlay, ``configs/rollout/vllm.yaml``, on a method config through the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.vllm.conftest import CPU_ENGINE
from vlrl.cli import main

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]


def test_the_vllm_overlay_runs_grpo_with_truncated_importance_sampling(tiny_vlm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo config writes under outputs/
    engine = "--model.init_args.rollout_engine.init_args."
    main(
        [
            "fit",
            "--config", str(REPO / "configs/demo/grpo.yaml"),
            "--config", str(REPO / "configs/rollout/vllm.yaml"),
            f"--model.init_args.policy.model_path={tiny_vlm}",
            "--trainer.max_steps=2",
            # the overlay's GPU settings, replaced by CPU ones (a fixed KV cache, no graph capture), and the
            # Transformers model implementation, as in the other tests of this lane
            f"{engine}model_impl=transformers",
            f"{engine}gpu_memory_utilization={CPU_ENGINE['gpu_memory_utilization']}",
            f"{engine}enforce_eager=true",
            f"{engine}max_model_len={CPU_ENGINE['max_model_len']}",
            f"{engine}dtype=float32",
            f"{engine}engine_kwargs={json.dumps(CPU_ENGINE['engine_kwargs'])}",
        ]
    )  # fmt: skip
    (metrics,) = tmp_path.glob("outputs/demo/grpo/logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("rollout/engine_mismatch_kl")]
    assert [int(r["step"]) for r in rows] == [0, 1]  # TIS measured the engine against the trainer at every step
    for row in rows:
        # Same weights in float32; what is left is vLLM's log-probs being normalised without the vision tokens it
        # never samples (3 of the tiny vocabulary's 1032, about 0.3% of a random model's mass): ~0.003.
        assert 0 <= float(row["rollout/engine_mismatch_mean_abs_log_ratio"]) < 0.01
        assert float(row["rollout/engine_mismatch_truncated_frac"]) == 0.0
