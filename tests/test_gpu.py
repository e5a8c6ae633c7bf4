"""CUDA checks (marked ``gpu``; skipped where no CUDA device exists), and the machine check on CPU.

On a GPU machine: GRPO in bf16, log-prob agreement, FSDP1 (``configs/trainer/fsdp.yaml``) on one GPU and
on two where present, QLoRA (``configs/debug/qlora_1gpu.yaml`` on the tiny VLM) and the official vLLM
engine with weight syncs (skipped without vllm). ``vlrl-check-gpu`` runs one step on CPU in the main lane.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.test_grpo import Recorder, make_data, make_module, quiet_trainer
from vlrl.check_machine import main as check_machine
from vlrl.models import Policy, resolve_model_path
from vlrl.rollout import Sampling

REPO = Path(__file__).resolve().parents[1]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not importable")


@pytest.mark.gpu
def test_grpo_fit_on_cuda_in_bf16_mixed():
    """The shipped precision on CUDA: float32 master weights, bf16 compute, a bf16 KL reference."""
    module = make_module(policy=Policy("tiny:qwen2_5_vl", dtype="float32"), kl_coef=0.05)
    devices = []

    class DeviceRecorder(Recorder):
        def on_rollout_end(self, trainer, pl_module, rollout):
            devices.append((pl_module.device.type, next(pl_module.model.parameters()).dtype))
            return rollout

    trainer = quiet_trainer(
        callbacks=[DeviceRecorder()],
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
    )
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step == 2
    assert devices == [("cuda", torch.float32)] * 2
    assert next(module._ref_model[0].parameters()).dtype == torch.bfloat16
    assert torch.isfinite(trainer.callback_metrics["update/kl_ref"])
    assert trainer.callback_metrics["update/grad_norm"] > 0


@pytest.mark.gpu
def test_engine_and_trainer_logprobs_agree_on_cuda():
    module = make_module(policy=Policy("tiny:qwen2_5_vl", dtype="float32"))
    module.configure_model()
    module.cuda()
    data = make_data(batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    rollout = module.generate(batch, Sampling(max_new_tokens=16), 4)
    with torch.no_grad():
        recomputed, _ = module.policy_logprobs(module.model, rollout)
    diff = ((recomputed.cpu() - rollout.logprobs) * rollout.response_mask).abs().max().item()
    assert diff < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("devices", [1, 2])
def test_fsdp1_overlay_fits_checkpoints_and_resumes_on_cuda(tmp_path, devices):
    """GRPO through the CLI with configs/trainer/fsdp.yaml: 2 steps, a sharded checkpoint, a resume to step 3."""
    if torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} CUDA devices")
    resolve_model_path("tiny:qwen2_5_vl")  # built once here: ranks building it at once would race
    common = [
        sys.executable,
        "-m",
        "vlrl.cli",
        "fit",
        "--config",
        str(REPO / "configs/demo/grpo.yaml"),
        "--config",
        str(REPO / "configs/trainer/fsdp.yaml"),
        f"--trainer.devices={devices}",
        "--trainer.precision=bf16-mixed",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.policy.dtype=float32",
        "--model.init_args.sampling.max_new_tokens=8",
        '--model.init_args.rewards=[{"class_path": "tests.test_grpo.CharReward"}]',
        "--data.init_args.batch_size=2",
    ]
    every_2 = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": "ckpt", "every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"},
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for steps, resume in ((2, []), (3, ["--ckpt_path=ckpt/step=2.ckpt"])):
        args = [*common, f"--trainer.max_steps={steps}", f"--trainer.callbacks+={json.dumps(every_2)}", *resume]
        run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "ckpt/step=2.ckpt").is_dir()  # state_dict_type: sharded writes a directory
    logs = sorted((tmp_path / "outputs/demo/grpo/logs").glob("version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(logs[-1].open()) if r.get("update/grad_norm")]
    assert [int(r["step"]) for r in rows] == [2]  # the resumed run continued at the saved step
    assert all(float(r["update/grad_norm"]) > 0 for r in rows)


@pytest.mark.gpu
def test_qlora_debug_config_on_cuda(tmp_path, monkeypatch):
    """configs/debug/qlora_1gpu.yaml on the tiny VLM on a GPU: NF4 base on CUDA, adapters trained, KL logged."""
    bnb = pytest.importorskip("bitsandbytes")
    from tests.test_qlora import CONFIG, Probe
    from vlrl.cli import main

    monkeypatch.chdir(tmp_path)
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
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=tests.test_qlora.Probe",
            "--model.init_args.policy.model_path=tiny:qwen2_5_vl",
            "--model.init_args.policy.min_pixels=3136",
            "--model.init_args.policy.max_pixels=12544",
            "--model.init_args.sampling.max_new_tokens=8",
            "--model.init_args.group_size=2",
            '--model.init_args.rewards=[{"class_path": "tests.test_grpo.CharReward"}]',
            f"--data={json.dumps(data)}",
        ]
    )
    module = Probe.last.module
    assert module.trainer.global_step == 2
    base = [m.base_layer for n, m in module.model.named_modules() if hasattr(m, "base_layer") and ".visual." not in n]
    assert base and all(isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cuda" for m in base)
    params = dict(module.model.named_parameters())
    changed = [n for n, before in Probe.last.before.items() if not torch.equal(params[n], before)]
    assert changed and all("lora_" in n for n in changed)
    assert torch.isfinite(module.trainer.callback_metrics["update/kl_ref"])


@pytest.mark.gpu
@needs_vllm
@pytest.mark.parametrize("model_impl", ["auto", "transformers"])
def test_vllm_engine_follows_the_trained_weights_on_cuda(model_impl):
    """The official vLLM build: GRPO samples with it, syncs weights after every step, log-probs agree."""
    from vlrl.rollout import VLLMEngine

    engine = VLLMEngine(gpu_memory_utilization=0.2, max_model_len=1024, model_impl=model_impl, dtype="float32")
    module = make_module(
        policy=Policy("tiny:qwen2_5_vl", dtype="float32"), rollout_engine=engine, importance_correction="measure"
    )
    trainer = quiet_trainer(accelerator="gpu", devices=1, max_steps=2)
    try:
        trainer.fit(module, datamodule=make_data())
        assert trainer.global_step == 2
        assert engine.weight_syncs == 3  # before the first rollout, then after each optimizer step
        # measured at step 2, on weights the engine received after step 1: far below the step's own change
        assert trainer.callback_metrics["rollout/engine_mismatch_mean_abs_log_ratio"] < 1e-2
        assert trainer.callback_metrics["update/grad_norm"] > 0
    finally:
        engine.close()


def test_machine_check_runs_one_step_on_cpu(capsys):
    """``vlrl-check-gpu --device cpu``: builds the model, runs a GRPO step with HF rollouts, prints the figures."""
    check_machine(
        ["--device", "cpu", "--engine", "hf", "--hidden", "64", "--layers", "2", "--steps", "1"]
        + ["--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4"]
    )
    out = capsys.readouterr().out
    assert "rollout engine: HF generate (--engine hf)" in out
    summary = next(line for line in out.splitlines() if line.startswith("single step:"))
    rollout, training = (float(summary.split(f"{k} ")[1].split(" tok/s")[0]) for k in ("rollout", "training"))
    assert rollout > 0 and training > 0
    assert "peak CPU memory:" in out
