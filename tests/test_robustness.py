"""Reliability of long runs: exact resume, preemption, atomic checkpoint writes, the CLI's safe defaults and
secrets, each checked on the real code paths (tiny models, CPU). Bad input: tests/test_robustness_inputs.py."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import vlrl
from tests.openai_server import ServerProcess
from tests.test_grpo import CharReward, make_data, make_module, quiet_trainer
from tests.test_ppo import make_ppo
from vlrl.callbacks import ForcedRethinking, Preemption, RandomState, SelectiveSampleReplay, SequenceLengthCurriculum
from vlrl.checkpointing import RECORD_NAME, AtomicCheckpointIO, CheckpointError
from vlrl.cli import VLRLCLI, main
from vlrl.data import RLDataModule, Synthetic
from vlrl.rewards import RewardFunction

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]


class NoisyReward(RewardFunction):
    """Draws from the global generators of Python, NumPy and torch, as user code may."""

    def __call__(self, completions, **kwargs):
        return [random.random() + float(np.random.rand()) + float(torch.rand(())) for _ in completions]


class StepLog(pl.Callback):
    """Per step: the prompt ids of the batch and the logged update/reward metrics."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        logged = {k: float(v) for k, v in metrics.items() if k.startswith(("update/", "reward/", "critic/"))}
        self.steps.append({"step": trainer.global_step, "ids": list(batch.ids), **logged})


# --------------------------------------------------------------------------- exact resume
def grpo_run():
    module = make_module(
        rewards=[CharReward(), NoisyReward()],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    callbacks = [
        ForcedRethinking(
            min_room=4,
            min_continuation_tokens=2,
            max_continuation_tokens=6,
            max_response_tokens=16,
            keep_only_correct=False,
            require_eos=False,
            seed=3,
        ),
        SelectiveSampleReplay(min_abs_advantage=0.05, seed=2),
    ]
    return module, callbacks


def ppo_run():
    module = make_ppo(
        rewards=[CharReward(), NoisyReward()],
        critic_steps=2,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4),
    )
    return module, [SequenceLengthCurriculum({0: 6, 1: 8})]


def fit_run(build, root: Path, max_steps: int, ckpt_path: str | None = None, random_state: bool = True):
    module, callbacks = build()
    log = StepLog()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(
        max_steps=max_steps,
        enable_checkpointing=True,
        default_root_dir=root,
        callbacks=[*callbacks, *([RandomState()] if random_state else []), log, checkpoint],
        plugins=[AtomicCheckpointIO()],
    )
    pl.seed_everything(0, verbose=False)  # as the CLI does at every start
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)
    return trainer, module, log.steps


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory) -> dict:
    """Two steps of each run, checkpointed after each step; shared by the resume tests."""
    runs = {}
    for build in (grpo_run, ppo_run):
        root = tmp_path_factory.mktemp(build.__name__)
        _, module, steps = fit_run(build, root, 2)
        runs[build.__name__] = (root, module, steps)
    return runs


@pytest.mark.parametrize("build", [grpo_run, ppo_run], ids=["grpo+rethinking+replay", "ppo+curriculum"])
def test_n_steps_then_resume_for_n_equals_2n_steps(tmp_path, build, full_runs):
    """Losses, rewards, data position and every weight of 2 steps = 1 step + resume for 1 (mid-epoch).

    One step each keeps the test fast; every piece of state is exercised at the first resumed step (the
    replay buffer and the curriculum's new length are used there, the scheduler has moved)."""
    root, full, full_log = full_runs[build.__name__]
    ckpt = root / "ckpt" / "step=1.ckpt"
    state = torch.load(ckpt, weights_only=True)  # plain tensors and primitives only
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 1  # of 3 batches: mid-epoch
    trainer, resumed, resumed_log = fit_run(build, tmp_path, 2, ckpt_path=str(ckpt))
    assert trainer.global_step == 2
    assert [s["step"] for s in resumed_log] == [2]
    assert resumed_log == full_log[1:]  # same prompts, rewards (global RNG included), losses, grad norms
    assert full_log[1]["ids"] != full_log[0]["ids"]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    full_opt, resumed_opt = full.optimizers(), resumed.optimizers()
    for a, b in zip(
        full_opt if isinstance(full_opt, list) else [full_opt],
        resumed_opt if isinstance(resumed_opt, list) else [resumed_opt],
        strict=True,
    ):
        for sa, sb in zip(a.state_dict()["state"].values(), b.state_dict()["state"].values(), strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_without_the_random_state_a_resumed_run_draws_differently(tmp_path, full_runs):
    """The control: global RNG use (here in a reward) is what RandomState restores."""
    root, _, full_log = full_runs["grpo_run"]
    _, _, blind_log = fit_run(grpo_run, tmp_path, 2, ckpt_path=str(root / "ckpt" / "step=1.ckpt"), random_state=False)
    assert blind_log[0]["ids"] == full_log[1]["ids"]  # same data position
    assert blind_log[0]["reward/noisy"] != full_log[1]["reward/noisy"]


# ----------------------------------------------------------------------------- preemption
class SignalInStep(pl.Callback):
    """Sends this process ``signum`` in the middle of the training step that starts at ``at_step``."""

    def __init__(self, signum: signal.Signals, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_after_backward(self, trainer, pl_module):  # between the backward pass and the optimizer step
        if trainer.global_step == self.at_step:
            signal.raise_signal(self.signum)


class StepFile(pl.Callback):
    """Appends ``global_step`` to ``path`` after every training step (for a test watching a subprocess)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as file:
            file.write(f"{trainer.global_step}\n")


def test_sigusr1_on_slurm_saves_hpc_checkpoint_after_the_step_requeues_and_resumes(tmp_path, monkeypatch):
    """Under SLURM the signal is taken at the end of the step (not mid-update, as Lightning's own handler
    would), saved where Lightning's SLURM support resumes from, and the job is requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # a stand-in: there is no SLURM here; it records its arguments
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.setenv(key, "0")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    module = make_module()
    trainer = quiet_trainer(
        max_steps=50, default_root_dir=tmp_path, callbacks=[Preemption(), SignalInStep(signal.SIGUSR1, 1)]
    )
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step == 2  # the signalled step finished, then the run stopped
    assert [p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    for name, value in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name  # the weights after the step's update
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) == before
    resumed = quiet_trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[Preemption()])
    resumed.fit(make_module(), datamodule=make_data())  # no ckpt_path: the requeued job finds hpc_ckpt itself
    assert resumed.global_step == 3


class SignalInValidation(pl.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            signal.raise_signal(signal.SIGTERM)


def test_sigterm_during_validation_saves_the_last_completed_step(tmp_path):
    """Lightning aborts validation with SIGTERMException; the checkpoint is then written from ``on_exception``."""
    data = RLDataModule(train=Synthetic("train", size=6), val=Synthetic("val", size=4), batch_size=2, eval_batch_size=2)
    trainer = quiet_trainer(
        max_steps=50,
        limit_val_batches=2,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        default_root_dir=tmp_path,
        callbacks=[Preemption(), SignalInValidation()],
    )
    with pytest.raises(SystemExit):
        trainer.fit(make_module(), datamodule=data)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1 == trainer.global_step


def test_sigterm_to_the_cli_saves_last_ckpt_and_the_run_resumes_from_it(tmp_path):
    steps = tmp_path / "steps.txt"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 10_000,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 10_000, "save_last": True},
                },
                {"class_path": "tests.test_robustness.StepFile", "init_args": {"path": str(steps)}},
            ],
        },
        "model": {
            "class_path": "vlrl.methods.GRPO",
            "init_args": {
                "policy": {"model_path": "tiny:qwen2_5_vl", "dtype": "float32"},
                "rewards": [{"class_path": "vlrl.rewards.AccuracyReward"}],
                "sampling": {"max_new_tokens": 4},
                "group_size": 2,
                "micro_batch_size": 4,
            },
        },
        "data": {
            "class_path": "vlrl.data.RLDataModule",
            "init_args": {
                "train": {"class_path": "vlrl.data.Synthetic", "init_args": {"split": "train", "size": 64}},
                "batch_size": 2,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "vlrl.cli", "fit", "--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "run1.log", "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if steps.exists() and len(steps.read_text().split()) >= 2:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    log = (tmp_path / "run1.log").read_text()
    assert code == 128 + signal.SIGTERM, log  # not 0: a launcher that restarts failed runs must restart this one
    done = [int(s) for s in steps.read_text().split()]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == done[-1] >= 2  # the step running at the signal finished, then nothing more
    assert re.search(rf"after SIGTERM, saved step {done[-1]} to .*last\.ckpt", log), log
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [RECORD_NAME, "last.ckpt"]  # no temporary left
    resume = [*command, "--ckpt_path", "last", "--trainer.max_steps", str(done[-1] + 1)]
    result = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [int(s) for s in steps.read_text().split()] == [*done, done[-1] + 1]  # global_step continues
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [RECORD_NAME, "last.ckpt"]  # it went on with it


# ------------------------------------------------------------------------ atomic checkpoints
class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4.0)}, target)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(100_000), "bad": ExplodesWhenPickled()}, target)
    written: list[int] = []

    def failing_fsync(fd: int) -> None:  # the disk fails after the whole file went to the page cache
        written.append(os.fstat(fd).st_size)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CheckpointError, match="disk full"):  # one line naming the file and the cause
        io.save_checkpoint({"global_step": 3, "w": torch.zeros(100_000)}, target)
    assert written[0] > 400_000  # the new checkpoint had been written out in full
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD_NAME, "last.ckpt"]  # no partial file, under any name
    previous = io.load_checkpoint(target)
    assert previous["global_step"] == 1 and torch.equal(previous["w"], torch.arange(4.0))


def cli_trainer(tmp_path: Path, *extra: str) -> pl.Trainer:
    args = ["--config", str(REPO / "configs/demo/grpo.yaml"), "--trainer.default_root_dir", str(tmp_path), *extra]
    cli = VLRLCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=args,
    )
    return cli.trainer


def test_the_cli_installs_atomic_writes_preemption_and_random_state_once(tmp_path):
    trainer = cli_trainer(tmp_path)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    names = [type(c).__name__ for c in trainer.callbacks]
    assert names.count("Preemption") == 1 and names.count("RandomState") == 1
    assert names.index("Preemption") < names.index("ModelCheckpoint")  # saved before ModelCheckpoint's save
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {"trainer": {"callbacks": [{"class_path": "vlrl.callbacks.Preemption", "init_args": {"signals": []}}]}}
        )
    )
    trainer = cli_trainer(tmp_path, "--config", str(overlay))
    preemption = [c for c in trainer.callbacks if isinstance(c, Preemption)]
    assert len(preemption) == 1 and preemption[0].signals == []  # the configured one replaces the default


# -------------------------------------------------------------------------------- security
def constructors_with(parameter: str) -> dict[str, inspect.Parameter]:
    """Every class in the vlrl package whose constructor takes ``parameter`` (modules that need absent
    optional packages, such as vLLM, are still read when importable)."""
    found = {}
    for info in pkgutil.walk_packages(vlrl.__path__, "vlrl."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            try:
                parameters = inspect.signature(cls).parameters
            except (TypeError, ValueError):  # classes without a Python signature (exceptions)
                continue
            if parameter in parameters:
                found[f"{cls.__module__}.{name}"] = parameters[parameter]
    return found


def test_trust_remote_code_is_off_unless_set():
    found = constructors_with("trust_remote_code")
    assert {"vlrl.models.loading.Policy", "vlrl.rewards.reasoners.HFReasoner"} <= set(found)
    assert {name: p.default for name, p in found.items() if p.default is not False} == {}


def test_checkpoints_are_loaded_weights_only():
    calls = []
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "callbacks").rglob("*.py")]:
        for match in re.finditer(r"torch\.load\((.*)\)", path.read_text()):
            calls.append((path.name, match.group(1)))
    assert calls and all("weights_only=True" in args for _, args in calls), calls


def test_resuming_through_the_cli_plugin_refuses_pickled_code(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        io.load_checkpoint(tmp_path / "evil.ckpt")
    assert Payload.ran == []


class Payload:
    """Pickled as a call to ``Payload.run``: what a malicious checkpoint would do."""

    ran: list[str] = []

    @classmethod
    def run(cls) -> Payload:
        cls.ran.append("ran")
        return cls()

    def __reduce__(self):
        return (Payload.run, ())


KEY_ENV, KEY = "VLRL_ROBUSTNESS_KEY", "sk-robustness-0123456789abcdef"


def test_the_api_key_never_reaches_logs_configs_checkpoints_or_samples(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr(sys, "argv", ["lightning-cli"])
    caplog.set_level("DEBUG")
    with ServerProcess(answer="red") as server:
        reasoner = {
            "class_path": "vlrl.rewards.OpenAIReasoner",
            "init_args": {"base_url": server.base_url, "model": "served", "api_key_env": KEY_ENV, "timeout_s": 30},
        }
        overlay = {
            "trainer": {
                "max_steps": 1,
                "limit_val_batches": 0,
                "default_root_dir": str(tmp_path),
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(tmp_path), "name": "logs"},
                },
                "callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
                    },
                    {"class_path": "vlrl.callbacks.RolloutSamples", "init_args": {"every_n_steps": 1}},
                ],
            },
            "model": {"init_args": {"group_size": 2, "caption_reward": {"init_args": {"reasoner": reasoner}}}},
            "data": {"init_args": {"batch_size": 2}},
        }
        path = tmp_path / "overlay.yaml"
        path.write_text(yaml.safe_dump(overlay))
        main(["fit", "--config", str(REPO / "configs/demo/racro.yaml"), "--config", str(path)])
        requests = server.log()["requests"]
    assert requests and all(r["authorization"] == f"Bearer {KEY}" for r in requests)  # the key was used
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".ckpt", ".yaml", ".csv", ".jsonl", ".html"} <= kinds, kinds
    for file in written:
        assert KEY.encode() not in file.read_bytes(), file
        if zipfile.is_zipfile(file):  # a checkpoint: every member, in case one is compressed
            with zipfile.ZipFile(file) as archive:
                assert not [m for m in archive.namelist() if KEY.encode() in archive.read(m)], file
    out, err = capfd.readouterr()
    assert KEY not in out + err + caplog.text
