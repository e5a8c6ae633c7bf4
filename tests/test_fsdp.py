"""FSDP2 on two CPU ranks (gloo) through the CLI and the fsdp2 overlay: fit, sharded checkpoint, exact resume.

Lightning re-launches the script for the second rank, so the runs happen in a subprocess. The script runs
three fits through the CLI: 2 steps (writing a sharded checkpoint), a resume from it to step 3, and an
uninterrupted 3-step run; a callback dumps each rank's local shards at the start and end of every fit. Then
one step each of GRPO with a KL reference and of PPO, whose reference and critic are sharded too, and one step
under the shipped precision (bf16-mixed over float32 shards).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import torch
from PIL import Image

from vlrl.models import BlockWrapPolicy, Policy, resolve_model_path

REPO = Path(__file__).resolve().parents[1]


class RecordPrecision(pl.Callback):
    """Records what FSDP2 holds and computes in: the dtypes of the local shards and their gradients (before
    the optimizer step), and the dtype of the weights and activations a decoder layer's projection runs with."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.record: dict[str, set[str]] = {
            "shards": set(),
            "grads": set(),
            "compute_weight": set(),
            "compute_in": set(),
        }

    def on_train_start(self, trainer, pl_module) -> None:
        layer = next(m for n, m in pl_module.model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))

        def seen(module, args):
            self.record["compute_weight"].add(str(module.weight.dtype))
            self.record["compute_in"].add(str(args[0].dtype))

        layer.register_forward_pre_hook(seen)
        self.before = {n: p.to_local().detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.model.parameters():
            self.record["shards"].add(str(p.to_local().dtype))
            if p.grad is not None:
                self.record["grads"].add(str(p.grad.to_local().dtype))

    def on_train_end(self, trainer, pl_module) -> None:
        after = dict(pl_module.model.named_parameters())
        moved = sum(not torch.equal(after[n].to_local(), b) for n, b in self.before.items())
        state = {k: sorted(v) for k, v in self.record.items()} | {"moved": moved, "total": len(self.before)}
        torch.save(state, f"{self.path}-rank{trainer.global_rank}.pt")


class DumpShards(pl.Callback):
    """Saves this rank's local shards of the policy and the global step at the start and end of a fit."""

    def __init__(self, path: str) -> None:
        self.path = path

    def dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        shards = {n: p.to_local().detach().clone() for n, p in pl_module.model.named_parameters()}
        state = {"step": trainer.global_step, "shards": shards}
        torch.save(state, f"{self.path}-rank{trainer.global_rank}-{when}.pt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dump(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dump(trainer, pl_module, "end")


SCRIPT = """
import json
import os
import sys
from pathlib import Path

from vlrl.cli import main

out, repo = Path(sys.argv[1]), Path(sys.argv[2])
common = [
    "fit",
    "--config", str(repo / "configs/demo/grpo.yaml"),
    "--config", str(repo / "configs/trainer/fsdp2.yaml"),
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.precision=32-true",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.sampling.max_new_tokens=6",
    "--model.init_args.micro_batch_size=4",
    '--model.init_args.rewards=[{"class_path": "tests.test_grpo.CharReward"}]',
    "--data.init_args.batch_size=2",
]
every_2 = {  # a mid-epoch checkpoint (one written when max_steps ends the fit would count the epoch as done)
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"dirpath": "ckpt", "every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"},
}
runs = [  # (folder, tag, max_steps, checkpoint to resume from)
    ("split", "first", 2, None),
    ("split", "resumed", 3, "ckpt/step=2.ckpt"),
    ("whole", "whole", 3, None),
]
for folder, tag, steps, ckpt in runs:
    os.makedirs(out / folder, exist_ok=True)
    os.chdir(out / folder)  # the demo config writes under outputs/
    dump = {"class_path": "tests.test_fsdp.DumpShards", "init_args": {"path": str(out / tag)}}
    args = [*common, f"--trainer.max_steps={steps}"]
    args += [f"--trainer.callbacks+={json.dumps(every_2)}", f"--trainer.callbacks+={json.dumps(dump)}"]
    main(args + ([f"--ckpt_path={ckpt}"] if ckpt else []))

# The KL reference (GRPO, kl_coef > 0) and the critic (PPO) are sharded like the policy.
import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from tests.test_fsdp import RecordPrecision
from tests.test_grpo import CharReward, make_data, make_module
from vlrl.methods import PPO
from vlrl.models import FSDP2Strategy, Policy
from vlrl.rollout import Sampling

grpo = make_module(kl_coef=0.1, importance_correction="tis")
ppo = PPO(
    policy=Policy("tiny:qwen2_5_vl", dtype="float32"), rewards=[CharReward()], sampling=Sampling(max_new_tokens=6),
    group_size=2, micro_batch_size=4, critic_steps=2,
)
for name, module, frozen in (("kl", grpo, lambda m: m._ref_model[0]), ("ppo", ppo, lambda m: m.critic_model)):
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=make_data(batch_size=2, size=8))
    state = {
        "sharded": all(isinstance(p, DTensor) for p in frozen(module).parameters()),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    torch.save(state, out / f"{name}-rank{trainer.global_rank}.pt")

# The shipped precision: float32 master shards, bf16 compute (bf16-mixed, policy.dtype float32).
module = make_module(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6))
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy=FSDP2Strategy(), precision="bf16-mixed", max_steps=1, logger=False,
    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
    num_sanity_val_steps=0, callbacks=[RecordPrecision(str(out / "precision"))],
)
trainer.fit(module, datamodule=make_data(batch_size=2, size=4))
"""


def shards(tmp: Path, tag: str, rank: int, when: str) -> dict:
    return torch.load(tmp / f"{tag}-rank{rank}-{when}.pt", weights_only=True)


def test_fsdp2_fit_checkpoint_and_resume_on_two_cpu_ranks(tmp_path):
    script = tmp_path / "fsdp2_fit.py"
    script.write_text(textwrap.dedent(SCRIPT))
    resolve_model_path("tiny:qwen2_5_vl")  # built once here: two ranks building it at once would race
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(REPO)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    # The checkpoint is sharded: a directory with one file per rank and the trainer state.
    ckpt = tmp_path / "split/ckpt/step=2.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(ckpt / "meta.pt", weights_only=False)["global_step"] == 2

    full = dict(Policy("tiny:qwen2_5_vl", dtype="float32").load()[0].named_parameters())
    for rank in range(2):
        first_end = shards(tmp_path, "first", rank, "end")
        resumed_start = shards(tmp_path, "resumed", rank, "start")
        resumed_end = shards(tmp_path, "resumed", rank, "end")
        whole_end = shards(tmp_path, "whole", rank, "end")
        assert (first_end["step"], resumed_start["step"], resumed_end["step"], whole_end["step"]) == (2, 2, 3, 3)
        names = list(first_end["shards"])
        # each rank holds half of every sharded weight
        embed = next(n for n in names if "embed_tokens" in n)
        assert first_end["shards"][embed].shape[0] == full[embed].shape[0] // 2
        # the loaded shards are the saved ones, training went on, and 2 steps + resume for 1 == 3 steps
        for name in names:
            assert torch.equal(resumed_start["shards"][name], first_end["shards"][name]), name
            assert torch.isfinite(resumed_end["shards"][name]).all(), name
            torch.testing.assert_close(resumed_end["shards"][name], whole_end["shards"][name], rtol=0, atol=1e-6)
        moved = [n for n in names if not torch.equal(resumed_end["shards"][n], first_end["shards"][n])]
        assert any("layers" in n for n in moved) and any("visual" in n for n in moved)

    # The resumed run logged step 2 (its first), with a gradient: it continued from the saved step.
    logs = sorted((tmp_path / "split/outputs/demo/grpo/logs").glob("version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(logs[-1].open()) if r.get("update/grad_norm")]
    assert [int(r["step"]) for r in rows] == [2] and float(rows[0]["update/grad_norm"]) > 0

    # The KL reference and the PPO critic were sharded too, and their steps ran: KL to the reference, critic loss.
    for rank in range(2):
        kl = torch.load(tmp_path / f"kl-rank{rank}.pt", weights_only=True)
        ppo = torch.load(tmp_path / f"ppo-rank{rank}.pt", weights_only=True)
        assert kl["sharded"], "reference"
        assert ppo["sharded"], "critic"
    assert kl["metrics"]["update/kl_ref"] >= 0 and kl["metrics"]["rollout/engine_mismatch_mean_abs_log_ratio"] < 1e-4
    assert ppo["metrics"]["critic/loss"] > 0 and ppo["metrics"]["critic/grad_norm"] > 0

    # bf16-mixed under FSDP2: float32 shards and gradients (master weights, optimizer state), bf16 compute,
    # and a 1e-6 step moves the float32 shards.
    for rank in range(2):
        precision = torch.load(tmp_path / f"precision-rank{rank}.pt", weights_only=True)
        assert precision["shards"] == ["torch.float32"] and precision["grads"] == ["torch.float32"], precision
        assert precision["compute_weight"] == ["torch.bfloat16"] and precision["compute_in"] == ["torch.bfloat16"]
        assert precision["moved"] > 0.9 * precision["total"], precision


def test_block_wrap_policy_finds_decoder_layers_and_vision_blocks():
    """The FSDP1 auto-wrap policy resolves the block classes from the model itself (GPU runs use it)."""
    model, _ = Policy("tiny:qwen2_5_vl", dtype="float32").load()
    targets = BlockWrapPolicy()._run_policy(model, set(), {})
    kinds = {type(m).__name__ for m in targets}
    assert kinds == {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"}
    assert len(targets) == model.config.text_config.num_hidden_layers + model.config.vision_config.depth
    only = BlockWrapPolicy(class_names=["Qwen2_5_VLVisionBlock"])._run_policy(model, set(), {})
    assert {type(m).__name__ for m in only} == {"Qwen2_5_VLVisionBlock"}


SFT_SCRIPT = """
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from tests.test_sophia import make_sophia, rl_data
from vlrl.data import Files, SFTDataModule
from vlrl.methods import SFT
from vlrl.models import FSDP2Strategy, Policy
from vlrl.rewards import OpenAIReasoner

out, rows, base_url = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def trainer(steps):
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=out,
    )


sft = SFT(
    policy=Policy("tiny:qwen2_5_vl", dtype="float32"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    max_length=256, micro_batch_size=1,
)
reasoner = OpenAIReasoner(base_url, "served", api_key_env=None, timeout_s=30, max_retries=0, max_concurrency=1)
sophia = make_sophia(reasoner)
for name, module, data in (
    ("sft", sft, SFTDataModule(train=Files(rows), batch_size=2, prompt_template="{question}", shuffle=False)),
    ("sophia", sophia, rl_data(Path(rows))),
):
    module.configure_model()  # unsharded here (no trainer yet): the full weights, to compare with after
    full = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    module.model = None  # the fit loads and shards it again, from the same files
    fit = trainer(1)
    fit.fit(module, datamodule=data)
    params = dict(module.model.named_parameters())
    moved = sum(not torch.equal(params[n].full_tensor(), full[n]) for n in full)
    state = {
        "sharded": all(isinstance(p, DTensor) for p in params.values()),
        "local_rows": {n: p.to_local().shape[0] for n, p in params.items() if "embed_tokens" in n},
        "full_rows": {n: p.shape[0] for n, p in full.items() if "embed_tokens" in n},
        "moved": moved,
        "metrics": {k: float(v) for k, v in fit.callback_metrics.items()},
    }
    torch.save(state, out / f"{name}-rank{fit.global_rank}.pt")
"""


def test_sft_and_sophia_are_sharded_on_two_cpu_ranks(tmp_path):
    """SFT (and so OVR's cold start and the judge's SFT stages) and SOPHIA go through the same policy core as
    the RL methods: under FSDP2 their policy is sharded over both ranks and a step trains it."""
    from tests.openai_server import ServerProcess

    rows = tmp_path / "rows.jsonl"
    lines = []
    for i in range(4):
        Image.new("RGB", (56, 56), (60 * i, 80, 200)).save(tmp_path / f"{i}.png")
        row = {"id": f"q{i}", "images": [f"{i}.png"], "question": f"What colour is shape {i}?", "answer": "red"}
        lines.append(json.dumps({**row, "response": "The shape is \\boxed{red}."}))
    rows.write_text("\n".join(lines) + "\n")
    script = tmp_path / "fsdp2_sft.py"
    script.write_text(textwrap.dedent(SFT_SCRIPT))
    resolve_model_path("tiny:qwen2_5_vl")  # built once here: two ranks building it at once would race
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with ServerProcess(answer="red") as server:  # every trajectory right: SOPHIA keeps one per question
        run = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(rows), server.base_url],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr[-4000:]
    for name in ("sft", "sophia"):
        for rank in range(2):
            state = torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=True)
            assert state["sharded"], name
            for key, rows_held in state["local_rows"].items():  # each rank holds half of the embedding
                assert rows_held == state["full_rows"][key] // 2, (name, key)
            assert state["moved"] > 0, name
    sft_metrics = torch.load(tmp_path / "sft-rank0.pt", weights_only=True)["metrics"]
    sophia_metrics = torch.load(tmp_path / "sophia-rank0.pt", weights_only=True)["metrics"]
    assert sft_metrics["train/loss"] > 0 and sft_metrics["update/grad_norm"] > 0
    assert sophia_metrics["sophia/kept_question_frac"] == 1.0 and sophia_metrics["update/skipped"] == 0.0
