"""The single-GPU QLoRA debugging config, run on CPU with the tiny VLM: 4-bit base, LoRA trained, no reference copy."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from vlrl.cli import main

bnb = pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "debug" / "qlora_1gpu.yaml"


class Probe(pl.Callback):
    """Keeps the module the CLI built and a copy of its trainable parameters at the start of the fit."""

    last: Probe | None = None

    def __init__(self) -> None:
        self.module: pl.LightningModule | None = None
        self.before: dict[str, torch.Tensor] = {}
        Probe.last = self

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module = pl_module
        self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}


def test_qlora_debug_config_trains_adapters_on_a_4bit_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config writes under outputs/
    data = {
        "class_path": "vlrl.data.RLDataModule",
        "init_args": {
            "train": {"class_path": "vlrl.data.Synthetic", "init_args": {"split": "train", "size": 8}},
            "batch_size": 2,
            "prompt_template": "{question}\nAnswer in \\boxed{{}}.",
        },
    }
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=tests.test_qlora.Probe",
            "--model.init_args.policy.model_path=tiny:qwen2_5_vl",
            "--model.init_args.policy.dtype=float32",
            "--model.init_args.policy.min_pixels=3136",
            "--model.init_args.policy.max_pixels=12544",
            "--model.init_args.sampling.max_new_tokens=8",
            "--model.init_args.group_size=2",
            # Varied rewards from a random model, so the advantages (and the adapter updates) are not zero.
            '--model.init_args.rewards=[{"class_path": "tests.test_grpo.CharReward"}]',
            f"--data={json.dumps(data)}",
        ]
    )
    probe = Probe.last
    assert probe is not None and probe.module is not None
    module, model = probe.module, probe.module.model
    assert module.trainer.global_step == 2

    # The base linear layers of the language model are 4-bit NF4 and frozen.
    base = [m.base_layer for n, m in model.named_modules() if hasattr(m, "base_layer") and ".visual." not in n]
    assert base and all(isinstance(m, bnb.nn.Linear4bit) for m in base)
    # Policy.load keeps bitsandbytes' training layout: no CPU inference repack after the rollouts (on CPUs with
    # AVX512-BF16 that repack would break the next backward; see keep_4bit_layout_trainable).
    assert not any(m.support_avx512bf16_for_cpu for m in base)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in base)
    assert all(m.weight.quant_state.quant_type == "nf4" and not m.weight.requires_grad for m in base)

    # Only LoRA parameters train, and the fit changed them.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(probe.before) == set(trainable)
    params = dict(model.named_parameters())
    changed = [n for n in trainable if not torch.equal(params[n], probe.before[n])]
    assert any("lora_B" in n for n in changed)  # lora_B starts at zero; only an update moves it

    # The reference is the adapter-disabled policy: no second model was loaded.
    assert module._ref_model == []

    # The KL to that reference was logged every step: 0 at the first (lora_B = 0, so the adapters add nothing),
    # > 0 at the second, after the adapters moved away from the base.
    rows = list(csv.DictReader((tmp_path / "outputs/debug/qlora_1gpu/logs/version_0/metrics.csv").open()))
    kl = [float(r["update/kl_ref"]) for r in rows if r.get("update/kl_ref")]
    assert len(kl) == 2 and all(math.isfinite(v) for v in kl)
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 1e-8
