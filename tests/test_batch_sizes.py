"""Global batch sizes: configs state the papers' batch over all devices; each device derives its share.

``data.global_batch_size`` (rows per training step over all devices) and ``model.global_mini_batch_size``
(samples per optimizer step over all devices) are split over ``trainer.devices`` x ``trainer.num_nodes``;
a split that does not divide fails in ``setup`` naming the key. Checked on the split itself, on real
trainers of 1, 8 and 64 devices, in a real fit on one device and on two ranks, and on every shipped
real-model config against the batch sizes of METHODS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from tests.test_grpo import Recorder, make_module, quiet_trainer
from vlrl.callbacks import SequenceLengthCurriculum
from vlrl.cli import VLRLCLI
from vlrl.data import RLDataModule, Synthetic
from vlrl.data.datamodule import per_device
from vlrl.methods import SFT, RLMethod
from vlrl.models import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "{question}\nAnswer in \\boxed{{}}."


def trainer_of(devices: int, num_nodes: int = 1) -> pl.Trainer:
    """A real CPU trainer of ``devices`` x ``num_nodes`` ranks (built, not launched)."""
    strategy = "ddp" if devices * num_nodes > 1 else "auto"
    return pl.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False)


# --- the split ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "num_nodes", "share"), [(1, 1, 640), (8, 1, 80), (64, 8, 10)])
def test_a_global_batch_splits_evenly_over_the_devices(world_size, num_nodes, share):
    assert per_device(640, "data.global_batch_size", world_size, num_nodes) == share


def test_a_global_batch_that_does_not_split_names_the_key_the_devices_and_what_would_work():
    # 640 over 6 nodes x 8 = 48 devices: 640 / 48 = 13.3; the nearest multiples of 48 are 13 x 48 = 624 and
    # 14 x 48 = 672; 640 = 2^7 x 5 has the divisors listed below
    with pytest.raises(ValueError) as error:
        per_device(640, "data.global_batch_size", 48, num_nodes=6)
    message = str(error.value)
    assert "data.global_batch_size=640 does not split evenly over 48 devices" in message
    assert "trainer.devices=8 x trainer.num_nodes=6" in message
    assert "nearest: 624 or 672" in message
    assert "(1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 64, 80, 128, 160, 320, 640)" in message
    with pytest.raises(ValueError, match=r"model.global_mini_batch_size=4 .* over 8 devices .*nearest: 8\)"):
        per_device(4, "model.global_mini_batch_size", 8)  # fewer than one sample per device


# --- the datamodule on real trainers -----------------------------------------------------------------------------


@pytest.mark.parametrize(("devices", "num_nodes", "share"), [(1, 1, 640), (8, 1, 80), (8, 8, 10)])
def test_the_datamodule_takes_its_share_of_the_global_batch(devices, num_nodes, share):
    data = RLDataModule(global_batch_size=640)
    data.trainer = trainer_of(devices, num_nodes)
    assert (data.batch_size, data.eval_batch_size) == (share, share)
    pinned = RLDataModule(global_batch_size=640, eval_batch_size=4)
    pinned.trainer = data.trainer
    assert (pinned.batch_size, pinned.eval_batch_size) == (share, 4)
    per_device_batch = RLDataModule(batch_size=3)  # a per-device batch stays what it says on any number of devices
    per_device_batch.trainer = data.trainer
    assert per_device_batch.batch_size == 3
    assert RLDataModule().batch_size == 8  # neither set: the default, per device


def test_a_global_batch_without_a_trainer_is_one_devices_batch():
    assert RLDataModule(global_batch_size=12).batch_size == 12


def test_setup_fails_before_reading_data_when_the_global_batch_does_not_split():
    data = RLDataModule(train=Synthetic("train", size=8), global_batch_size=640)
    data.trainer = trainer_of(8, 6)
    with pytest.raises(ValueError, match=r"data.global_batch_size=640 does not split evenly over 48 devices"):
        data.setup("fit")
    assert data.datasets == {}


def test_batch_size_and_global_batch_size_are_exclusive():
    with pytest.raises(ValueError, match=r"data.batch_size=8 \(per device\) and data.global_batch_size=512"):
        RLDataModule(batch_size=8, global_batch_size=512)
    with pytest.raises(ValueError, match=r"mini_batch_size=8 \(per device\) and global_mini_batch_size=64"):
        make_module(mini_batch_size=8, global_mini_batch_size=64)
    with pytest.raises(ValueError, match=r"global_mini_batch_size must be >= 1"):
        make_module(global_mini_batch_size=0)
    with pytest.raises(ValueError, match=r"data.global_batch_size=0 must be at least 1"):
        RLDataModule(global_batch_size=0)


# --- a real fit ----------------------------------------------------------------------------------------------------


def global_data(global_batch_size: int, size: int = 6) -> RLDataModule:
    return RLDataModule(
        train=Synthetic("train", size=size), global_batch_size=global_batch_size, prompt_template=TEMPLATE
    )


def test_grpo_fit_derives_the_per_device_mini_batch_from_the_global_one():
    # one device: 2 prompts x group_size 4 = 8 samples per rollout; global mini-batch 4 -> 8 / 4 = 2 optimizer steps
    recorder = Recorder()
    module = make_module(global_mini_batch_size=4)
    trainer = quiet_trainer(max_steps=2, callbacks=[recorder])
    trainer.fit(module, datamodule=global_data(2))
    assert module.mini_batch_size == 4
    assert [len(ids) for ids in recorder.ids] == [2]  # one rollout of the whole global batch
    assert trainer.global_step == 2


def test_a_global_mini_batch_that_does_not_divide_the_rollout_fails_in_setup_naming_both_keys():
    module = make_module(global_mini_batch_size=3)
    with pytest.raises(ValueError) as error:
        quiet_trainer(max_steps=1).fit(module, datamodule=global_data(2))
    assert str(error.value).startswith(
        "mini_batch_size=3 (model.global_mini_batch_size=3 / 1 devices) does not divide the update batch of 8 "
        "samples (data.global_batch_size=2 / 1 device(s) = 2 prompts x group_size=4)"
    )
    assert module.model is None  # before any weights were loaded


TWO_RANKS = """
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from tests.test_batch_sizes import global_data
from tests.test_grpo import Recorder, make_module
from tests.test_sft import TEMPLATE, make_module as make_sft
from vlrl.data import RLDataModule, SFTDataModule, Synthetic

out = Path(sys.argv[1])


def trainer(**kwargs):
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, **kwargs
    )


# GRPO: 4 prompts per step and a mini-batch of 4 samples over both ranks, group_size 2
recorder = Recorder()
grpo = make_module(group_size=2, global_mini_batch_size=4, micro_batch_size=2)
fit = trainer(max_steps=2, callbacks=[recorder])
data = global_data(4, size=8)
fit.fit(grpo, datamodule=data)
# SFT: 4 samples per optimizer step over both ranks, one sample per forward pass
sft_data = SFTDataModule(train=Synthetic("train", size=8), global_batch_size=4, prompt_template=TEMPLATE)
sft = make_sft(micro_batch_size=1)
sft_fit = trainer(max_steps=1)
sft_fit.fit(sft, datamodule=sft_data)
# test on 5 rows over 2 ranks: the distributed sampler serves one row twice; the report counts it once
test_data = RLDataModule(train=Synthetic("train", size=8), test=Synthetic("test", size=5), global_batch_size=4,
                         eval_batch_size=2, prompt_template="{question}")
fit.test(grpo, datamodule=test_data, verbose=False)
rank = fit.global_rank
record = {
    "test_accuracy": float(fit.callback_metrics["test/accuracy"]),
    "world_size": fit.world_size,
    "prompts_per_device": data.batch_size,
    "mini_batch_size": grpo.mini_batch_size,
    "rollout_prompts": [len(ids) for ids in recorder.ids],
    "grpo_steps": fit.global_step,
    "sft_samples_per_device": sft_data.batch_size,
    "sft_micro_batches": float(sft_fit.callback_metrics["train/micro_batches"]),
    "sft_steps": sft_fit.global_step,
}
(out / f"rank{rank}.json").write_text(json.dumps(record))
"""


def test_two_ranks_each_take_half_of_the_global_batch_and_mini_batch(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS))
    resolve_model_path("tiny:qwen2_5_vl")  # built once here: two ranks building it at once would race
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # GRPO: 4 prompts / 2 ranks = 2 each, x group_size 2 = 4 samples per rank; mini-batch 4 / 2 = 2 samples,
        # so 4 / 2 = 2 optimizer steps per rollout: max_steps=2 is one rollout
        assert record["world_size"] == 2
        assert (record["prompts_per_device"], record["mini_batch_size"]) == (2, 2)
        assert (record["rollout_prompts"], record["grpo_steps"]) == ([2], 2)
        # SFT: 4 samples / 2 ranks = 2 each, accumulated over 2 / micro_batch_size 1 = 2 passes in one step
        assert (record["sft_samples_per_device"], record["sft_micro_batches"], record["sft_steps"]) == (2, 2.0, 1)
    # evaluation: rank 0 wrote every rank's predictions once; both ranks log the accuracy of those 5 rows
    written = [json.loads(line) for line in (tmp_path / "eval" / "test-step2" / "predictions.jsonl").open()]
    assert sorted(row["id"] for row in written) == sorted({row["id"] for row in written}) and len(written) == 5
    accuracy = sum(row["correct"] for row in written) / 5
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["test_accuracy"] for r in range(2)] == pytest.approx(
        [accuracy, accuracy]
    )


# --- the shipped configs -------------------------------------------------------------------------------------------

REAL_CONFIGS = sorted(
    [str(p) for p in (REPO / "configs").glob("*.yaml")]
    + [str(p) for p in (REPO / "configs/unified_reward_think").glob("*.yaml") if p.name != "rejection_sampling.yaml"]
)  # rejection_sampling.yaml only predicts: no training batch

# METHODS.md: prompts (or rows) per training step over all devices, as the papers give them
PAPER_GLOBAL_BATCH = {
    "vl_rethinker.yaml": 512,  # 512 prompts x G=8
    "racro.yaml": 256,  # 256 prompts x G=4
    "ovr_rl.yaml": 512,  # 512 prompts x 16 samples
    "sophia.yaml": 512,
    "sophia_offline.yaml": 512,
    "ovr_cold_start.yaml": 640,
    "dapo.yaml": 512,  # 512 prompts x G=16
}
PAPER_GROUP_SIZE = {"vl_rethinker.yaml": 8, "racro.yaml": 4, "ovr_rl.yaml": 16, "dapo.yaml": 16}
# policy optimizer steps per rollout: RACRO 256 / 128 prompts = 2; OVR 1; VL-Rethinker "several" (the config's 4);
# the two configs without a paper batch: grpo.yaml 4, UnifiedReward-Think 1
STEPS_PER_ROLLOUT = {
    "racro.yaml": 2,
    "ovr_rl.yaml": 1,
    "vl_rethinker.yaml": 4,
    "grpo.yaml": 4,
    "unified_reward_think/grpo.yaml": 1,
    "dapo.yaml": 16,  # 8192 samples / mini-batch 512
    "gspo.yaml": 4,  # 8192 samples / mini-batch 2048 (the paper splits each rollout into four mini-batches)
}
# Per forward pass, the bf16 logits of Qwen2.5-VL-7B (vocabulary 152,064) and their gradient take
# tokens x 152,064 x 2 bytes x 2; with weights, optimizer state and activations they must leave room on an 80 GB
# GPU: at most half of it.
VOCAB, LOGITS_BUDGET = 152_064, 40 * 2**30


def config_name(config: str) -> str:
    return config.split("configs/")[-1]


def instantiate(config: str, devices: int, num_nodes: int | None) -> VLRLCLI:
    """The config as the CLI builds it, on a CPU trainer of ``devices`` x ``num_nodes`` (the config's if None)."""
    args = ["--config", config, "--trainer.accelerator=cpu", f"--trainer.devices={devices}", "--trainer.strategy=ddp"]
    args += ["--trainer.logger=false"] + ([f"--trainer.num_nodes={num_nodes}"] if num_nodes else [])
    return VLRLCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=args,
    )


def test_every_paper_config_is_checked():
    names = {config_name(c) for c in REAL_CONFIGS}
    assert set(PAPER_GLOBAL_BATCH) <= names and set(STEPS_PER_ROLLOUT) <= names


@pytest.mark.parametrize("config", REAL_CONFIGS, ids=config_name)
def test_a_shipped_config_states_its_batch_over_all_devices(config):
    data = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    model = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
    assert "global_batch_size" in data and "batch_size" not in data, "state the batch over all devices"
    assert "mini_batch_size" not in model, "state the mini-batch over all devices (global_mini_batch_size)"
    if config_name(config) in PAPER_GLOBAL_BATCH:
        assert "paper" in Path(config).read_text().split("global_batch_size:")[1].splitlines()[0], "cite the paper"


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own sys.argv
@pytest.mark.parametrize(("devices", "num_nodes"), [(8, None), (8, 8)], ids=["one-node", "eight-nodes"])
@pytest.mark.parametrize("config", REAL_CONFIGS, ids=config_name)
def test_a_shipped_config_trains_with_the_papers_batch_on_one_node_and_on_eight(config, devices, num_nodes):
    cli = instantiate(config, devices, num_nodes)
    data, module, trainer = cli.datamodule, cli.model, cli.trainer
    name = config_name(config)
    assert trainer.world_size == devices * (num_nodes or 1)
    data.trainer = trainer
    assert (
        data.batch_size * trainer.world_size
        == data.global_batch_size
        == PAPER_GLOBAL_BATCH.get(name, data.global_batch_size)
    )
    if isinstance(module, RLMethod):
        module.trainer = trainer
        module.setup("fit")  # the per-device mini-batch
        rollout = data.batch_size * module.group_size  # samples per device
        module.plan_update(data.batch_size, data.describe_batch())
        assert module.group_size == PAPER_GROUP_SIZE.get(name, module.group_size)
        assert rollout // (module.mini_batch_size or rollout) == STEPS_PER_ROLLOUT[name]
        curricula = [c for c in trainer.callbacks if isinstance(c, SequenceLengthCurriculum)]
        longest = max([module.max_new_tokens] + [n for c in curricula for n in c.lengths])  # response tokens
        tokens = module.micro_batch_size * longest
    else:
        assert isinstance(module, SFT)  # one optimizer step per batch, accumulated over micro-batches or packed rows
        tokens = module.max_length if module.pack else module.micro_batch_size * module.max_length
    assert tokens * VOCAB * 2 * 2 <= LOGITS_BUDGET, f"micro_batch_size too large for 7B on 80 GB: {tokens} tokens"
