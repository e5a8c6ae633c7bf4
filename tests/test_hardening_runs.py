"""Runs, folders and errors of long runs: the last completed step saved on an exception and on Ctrl-C, one run per
output folder, cleanup after interrupted writes, ``--ckpt_path last`` from the run's record, and every config error
as one line before any weights load. Real fits on tiny models (CPU), real subprocesses and signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.test_grpo import make_data, make_module, quiet_trainer
from tests.test_robustness import StepLog
from vlrl.callbacks import Preemption, RandomState, RLCallback, SelectiveSampleReplay
from vlrl.checkpointing import RECORD_NAME, AtomicCheckpointIO, describe_state_dict_mismatch
from vlrl.cli import main
from vlrl.errors import AllRanksError, ConfigError
from vlrl.models import Policy, resolve_model_path
from vlrl.rundir import LOCK_NAME, RunDirectory

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class FailInStep(RLCallback):
    """Raises ``error`` inside the training step that starts at ``at_step`` (after the rollout, before any update)."""

    def __init__(self, at_step: int, error: BaseException, rank: int | None = None) -> None:
        self.at_step, self.error, self.rank = at_step, error, rank

    def on_rollout_end(self, trainer, pl_module, rollout):
        if trainer.global_step == self.at_step and self.rank in (None, trainer.global_rank):
            raise self.error
        return rollout


class FailInSecondUpdate(pl.Callback):
    """Raises after the first of the step's two optimizer steps (the weights are then part-updated)."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.backwards = at_step, 0

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step >= self.at_step:
            self.backwards += 1
            if self.backwards == 2:
                raise RuntimeError("boom in the second mini-batch")


class SignalOnce(pl.Callback):
    """Sends this process ``signum`` once per ``at_steps`` entry, after the first backward pass of that step."""

    def __init__(self, signum: signal.Signals, *at_steps: int) -> None:
        self.signum, self.at_steps = signum, list(at_steps)

    def on_after_backward(self, trainer, pl_module):
        if self.at_steps and trainer.global_step == self.at_steps[0]:
            self.at_steps.pop(0)
            signal.raise_signal(self.signum)


def fit(root: Path, max_steps: int, *callbacks, ckpt_path: str | None = None, every: int = 1, **module_kwargs):
    """A GRPO fit with the replay (state that changes inside a step) and a checkpoint after every step."""
    log = StepLog()
    checkpoint = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1, save_last=True, filename="{step}"
    )
    trainer = quiet_trainer(
        max_steps=max_steps,
        enable_checkpointing=True,
        default_root_dir=root,
        callbacks=[
            Preemption(),
            SelectiveSampleReplay(min_abs_advantage=0.0, seed=2),
            RandomState(),
            log,
            *callbacks,
            checkpoint,
        ],
        plugins=[AtomicCheckpointIO()],
    )
    module = make_module(**module_kwargs)
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, datamodule=make_data(size=12), ckpt_path=ckpt_path)
    return trainer, module, log.steps


def same(a, b) -> bool:
    """``a`` and ``b`` are equal, tensors included, at any depth."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two steps in a row, with a checkpoint after each (the reference of the exception tests)."""
    root = tmp_path_factory.mktemp("whole")
    _, module, steps = fit(root, 2)
    return root, module, steps


# ----------------------------------------------------------------------- exceptions inside fit
def test_an_exception_before_the_updates_saves_the_last_completed_step_and_the_resume_redoes_the_step(
    tmp_path, uninterrupted, caplog
):
    """Step 2 fails after its rollout: last.ckpt holds step 1 exactly as an uninterrupted run had it (weights,
    data position, replay buffer), so the resumed run does step 2 with the same batch and the same result."""
    whole_root, whole, whole_steps = uninterrupted
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(RuntimeError, match="server down"):
        fit(tmp_path, 2, FailInStep(1, RuntimeError("server down")), every=1000)  # no periodic checkpoint
    assert "after an exception, saved step 1 to" in caplog.text
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    reference = torch.load(whole_root / "ckpt" / "step=1.ckpt", weights_only=True)
    assert saved["global_step"] == 1
    for name, value in reference["state_dict"].items():
        assert torch.equal(saved["state_dict"][name], value), name
    position = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"]
    assert position == reference["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 1
    replay = next(v for k, v in saved["callbacks"].items() if k.startswith("SelectiveSampleReplay"))
    replay_ref = next(v for k, v in reference["callbacks"].items() if k.startswith("SelectiveSampleReplay"))
    assert same(replay, replay_ref)  # the buffer without step 2's samples
    _, resumed, steps = fit(tmp_path, 2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), every=1000)
    assert steps == whole_steps[1:]  # same prompts, rewards and losses as the uninterrupted step 2
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_an_exception_during_the_updates_saves_nothing_and_says_why(tmp_path, caplog):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(RuntimeError, match="second mini-batch"):
        fit(tmp_path, 4, FailInSecondUpdate(at_step=0), every=1000, mini_batch_size=4)  # 2 updates per step
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()
    assert "raised after the step's first update (global_step 1): the weights are part-updated" in caplog.text


def test_ctrl_c_finishes_the_step_saves_last_ckpt_and_exits_130(tmp_path):
    """In process: SIGINT in the middle of step 2's update; the step finishes, last.ckpt holds it."""
    trainer, module, _ = fit(tmp_path, 50, SignalOnce(signal.SIGINT, 1), every=1000)
    assert trainer.global_step == 2
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    for name, value in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
    assert preemption.exit_code == 130
    with pytest.raises(KeyboardInterrupt):  # after the fit, Ctrl-C acts as it did before
        signal.raise_signal(signal.SIGINT)


class AgreedError(AllRanksError):
    """An error every rank raises at the same point (as after an all-reduced decision)."""


TWO_RANKS = """
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.test_grpo import make_data, make_module
from tests.test_hardening_runs import AgreedError, FailInStep
from vlrl.callbacks import Preemption
from vlrl.models import FSDP2Strategy

out = Path(sys.argv[1])


def trainer(name, *callbacks):
    checkpoint = ModelCheckpoint(dirpath=out / name, every_n_train_steps=1000, save_last=True)
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out,
        callbacks=[Preemption(), *callbacks, checkpoint],
    )


try:  # every rank raises it in step 2: all take part in the sharded save of step 1
    trainer("agreed", FailInStep(1, AgreedError("all ranks agree: stop"))).fit(make_module(), datamodule=make_data(size=8))
except AgreedError:
    print(f"rank {pl.utilities.rank_zero.rank_zero_only.rank}: agreed error raised", flush=True)
# only rank 1 raises: no save is possible, and the process must end rather than hang
trainer("local", FailInStep(1, RuntimeError("rank 1 alone"), rank=1)).fit(make_module(), datamodule=make_data(size=8))
"""


def test_two_ranks_save_on_an_error_all_raise_and_end_promptly_on_one_ranks_error(tmp_path):
    """FSDP2 on 2 CPU ranks: an AllRanksError writes the sharded checkpoint of the last completed step; an error
    on rank 1 alone writes nothing (a collective save cannot be done from one rank), says so, and the run ends."""
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS))
    resolve_model_path("tiny:qwen2_5_vl")  # built once here: two ranks building it at once would race
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=280
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert time.monotonic() - started < 240, output
    assert output.count("agreed error raised") == 2, output[-4000:]
    saved = tmp_path / "agreed" / "last.ckpt"
    assert saved.is_dir() and sorted(p.name for p in saved.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(saved / "meta.pt", weights_only=False)["global_step"] == 1
    assert "rank 1 alone" in output
    assert "it was raised on rank 1 of 2, and a checkpoint needs every rank" in output, output[-4000:]
    assert not (tmp_path / "local").exists() or not any((tmp_path / "local").iterdir())


# ----------------------------------------------------------------------------- the run folder
def test_a_folder_held_by_a_live_run_is_refused_before_any_weights_load_and_a_dead_holder_is_taken_over(
    tmp_path, caplog
):
    holder = subprocess.Popen(["sleep", "120"])
    try:
        from vlrl.rundir import _process_start

        lock = tmp_path / LOCK_NAME
        since = "2026-01-01 00:00:00 UTC"
        record = {"pid": holder.pid, "host": socket.gethostname(), "process_start": _process_start(holder.pid)}
        lock.write_text(json.dumps({**record, "since": since, "command": "lightning-cli fit"}))
        module = make_module()
        trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[RunDirectory()])
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on {socket.gethostname()}"):
            trainer.fit(module, datamodule=make_data())
        assert module.model is None  # refused before the weights loaded
    finally:
        holder.kill()
        holder.wait()
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[RunDirectory()])
    trainer.fit(make_module(), datamodule=make_data())  # the holder is dead: its lock is stale
    assert trainer.global_step == 1
    assert f"taking over the stale lock {lock}" in caplog.text
    assert not lock.exists()  # released at the end of the fit


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    from vlrl.rundir import acquire

    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": "node-17", "since": "yesterday", "command": "lightning-cli fit"}))
    with pytest.raises(ConfigError, match=rf"pid 1 on node-17.*if it is over, delete {lock}"):
        acquire(tmp_path)


class CrashOnLast(AtomicCheckpointIO):
    """Dies (``os._exit``) in the middle of writing ``last.ckpt`` at step ``at_step``, as a kill would."""

    def __init__(self, at_step: int = 2) -> None:
        self.at_step = at_step

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if Path(path).name == "last.ckpt" and checkpoint["global_step"] == self.at_step:
            with open(Path(path).with_name(".last.ckpt.0123456789ab.tmp"), "wb") as file:
                file.write(b"PK\x03\x04 half of a checkpoint")
            os._exit(9)
        super().save_checkpoint(checkpoint, path, storage_options)


class StepFile(pl.Callback):
    """Appends ``global_step`` (and, at the start of training, ``start <step of last.ckpt>``) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, line: str) -> None:
        with open(self.path, "a") as file:
            file.write(line + "\n")

    def on_train_start(self, trainer, pl_module):
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        self.write(f"start {torch.load(last, weights_only=True)['global_step'] if last.exists() else '-'}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.write(str(trainer.global_step))


def cli_config(root: Path, **trainer) -> Path:
    """A GRPO config for the CLI on the tiny model, checkpointing every step into ``root/ckpt``."""
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
            "default_root_dir": str(root),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "ckpt"),
                        "every_n_train_steps": 1,
                        "save_top_k": -1,
                        "save_last": True,
                        "filename": "{step}",
                    },
                },
                {"class_path": "tests.test_hardening_runs.StepFile", "init_args": {"path": str(root / "steps.txt")}},
            ],
            **trainer,
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
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_kill_during_a_write_leaves_nothing_behind_at_the_next_start_and_last_resumes_the_newest(tmp_path):
    """Killed while writing last.ckpt after step 2: step=2.ckpt is whole, last.ckpt still holds step 1, a partial
    temporary is left. ``--ckpt_path last`` resumes from step 2 (the record; Lightning's rule takes the newest
    ``*last*`` file, step 1, and redoes step 2 into step=2-v1.ckpt); the temporary goes; last.ckpt catches up."""
    crash = cli_config(tmp_path, max_steps=3, plugins=[{"class_path": "tests.test_hardening_runs.CrashOnLast"}])
    command = [sys.executable, "-m", "vlrl.cli", "fit", "--config", str(crash)]
    run = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert run.returncode == 9, run.stdout + run.stderr
    ckpt = tmp_path / "ckpt"
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 1
    assert (ckpt / ".last.ckpt.0123456789ab.tmp").exists()
    assert (tmp_path / LOCK_NAME).exists()  # the killed run's lock, now stale
    config = cli_config(tmp_path, max_steps=3)
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert (tmp_path / "steps.txt").read_text().split("\n")[:-1] == ["start -", "1", "2", "start 2", "3"]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        RECORD_NAME,
        "last.ckpt",
        "step=1.ckpt",
        "step=2.ckpt",
        "step=3.ckpt",
    ]
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_cli_run_in_the_folder_is_refused_and_ctrl_c_saves_and_exits_130(tmp_path, capsys):
    config = cli_config(tmp_path)
    steps = tmp_path / "steps.txt"
    command = [sys.executable, "-m", "vlrl.cli", "fit", "--config", str(config)]
    with open(tmp_path / "run.log", "w") as out:
        first = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 200
            while time.monotonic() < deadline and first.poll() is None:
                if steps.exists() and len(steps.read_text().split("\n")) >= 3:  # "start -", then 1 step done
                    break
                time.sleep(0.2)
            with pytest.raises(SystemExit) as stopped:
                main(["fit", "--config", str(config)])
            assert stopped.value.code == 1
            error = capsys.readouterr().err.strip().splitlines()
            assert error[0].startswith(f"error: {tmp_path} is in use by another run (pid {first.pid} on "), error
            assert "Traceback" not in "\n".join(error)
            first.send_signal(signal.SIGINT)
            code = first.wait(timeout=120)
        finally:
            first.kill()
    log = (tmp_path / "run.log").read_text()
    assert code == 130, log
    done = [int(s) for s in steps.read_text().split()[2:]]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == done[-1]
    assert re.search(rf"after SIGINT, saved step {done[-1]} to .*last\.ckpt", log), log
    assert "enforce fail" not in log and "Traceback" not in log
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------ config errors, one line, early
def cli_error(capsys, *args: str) -> str:
    """The CLI's stderr for ``args`` over the GRPO demo config, which must exit with status 1."""
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(REPO / "configs/demo/grpo.yaml"), "--trainer.max_steps=1", *args])
    assert stopped.value.code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--model.init_args.group_size=0"], "error: group_size must be >= 1, got 0"),
        (["--model.init_args.optimizer.init_args.lr=-0.001"], "error: optimizer: Invalid learning rate: -0.001;"),
        (["--ckpt_path=missing.ckpt"], "error: --ckpt_path='missing.ckpt': no such file"),
        (["--ckpt_path=empty.ckpt"], "error: --ckpt_path='empty.ckpt' is empty (0 bytes)"),
        (["--ckpt_path=config.ckpt"], "error: --ckpt_path='config.ckpt' is not a checkpoint"),
        (
            ["--model.init_args.policy.model_path=runs/sft/final"],
            "error: policy.model_path='runs/sft/final': no such folder",
        ),
        (
            ["--trainer.default_root_dir=afile/run"],
            "error: the run's folder afile/run cannot be written (Not a directory)",
        ),
    ],
    ids=["group_size", "negative_lr", "missing_ckpt", "empty_ckpt", "not_a_ckpt", "missing_model", "unwritable_dir"],
)
def test_a_config_error_is_one_line_with_the_fix_before_any_weights_load(tmp_path, monkeypatch, capsys, args, line):
    monkeypatch.chdir(tmp_path)  # the demo config writes under outputs/
    (tmp_path / "empty.ckpt").touch()
    (tmp_path / "config.ckpt").write_text("seed_everything: 0\n")
    (tmp_path / "afile").write_text("a file, not a folder")
    started = time.monotonic()
    err = cli_error(capsys, *args)
    assert time.monotonic() - started < 30  # no Hub retries, no model load
    lines = err.strip().splitlines()
    assert lines[-2].startswith(line), err
    assert lines[-1] == "(the traceback: run again with --debug or VLRL_DEBUG=1)"
    assert "Traceback" not in err and "Namespace(" not in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Does not validate") as raised:
        main(["fit", "--config", str(REPO / "configs/demo/grpo.yaml"), "--model.init_args.group_size=0", "--debug"])
    assert "group_size must be >= 1, got 0" in str(raised.value.__cause__)


def test_model_folders_are_checked_before_their_weights_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"policy.model_path='models/run/final': no such folder"):
        Policy("models/run/final").load()  # not a hub id (two slashes): no Hub request at all
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match=r"'runs/final': no such folder"):
        Policy("runs/final").load()  # owner/name in shape, but runs/ is a local folder
    assert time.monotonic() - started < 5
    with pytest.raises(ConfigError, match=r"'runs' is not a model folder \(no config.json in it\)"):
        Policy("runs").load()
    broken = tmp_path / "broken"
    shutil.copytree(resolve_model_path("tiny:qwen2"), broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])  # cut short, as by a failed download
    with pytest.raises(ConfigError, match=rf"{weights} is not a readable safetensors file"):
        Policy(str(broken)).load()


def test_a_negative_learning_rate_fails_at_construction():
    with pytest.raises(ConfigError, match=r"optimizer: Invalid learning rate: -1e-06; fix its init_args"):
        make_module(optimizer=lambda params: torch.optim.AdamW(params, lr=-1e-6))


# ------------------------------------------------------------------------- checkpoint files
WRITE_LIMITED = """
import resource
import sys

import torch

from vlrl.checkpointing import AtomicCheckpointIO, CheckpointError

target = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.zeros(4)}, target)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files of this process stop at 1 MiB
try:
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.zeros(1 << 20)}, target)
except CheckpointError as error:
    print(error)
"""


def test_a_failed_write_is_one_line_naming_the_file_and_the_cause(tmp_path):
    """A real write failure (the file size limit; a full disk fails the same way): torch's ``enforce fail at
    inline_container.cc`` becomes the file and the system's reason, and the previous checkpoint stays."""
    target = tmp_path / "last.ckpt"
    run = subprocess.run(
        [sys.executable, "-c", WRITE_LIMITED, str(target)], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    lines = run.stdout.strip().splitlines()
    assert lines == [
        f"could not write checkpoint {target}: file too large for this file system or process limit (File too "
        "large); the checkpoint there before (if any) is unchanged. Free space or point the checkpoint folder "
        "(ModelCheckpoint dirpath, trainer.default_root_dir) at a writable disk"
    ], run.stdout + run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD_NAME, "last.ckpt"]  # no partial file
    assert torch.load(target, weights_only=True)["global_step"] == 1


def test_unreadable_checkpoints_name_the_file(tmp_path):
    io = AtomicCheckpointIO()
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(ConfigError, match=rf"'{empty}' is empty \(0 bytes\)"):
        io.load_checkpoint(empty)
    whole = tmp_path / "whole.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.zeros(1000)}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=rf"'{cut}' is not a checkpoint .*truncated"):
        io.load_checkpoint(cut)


class Net(torch.nn.Module):
    def __init__(self, vision: bool, width: int) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.language = torch.nn.Linear(width, 2)
        if vision:
            self.model.visual = torch.nn.Linear(2, 2)


def test_a_checkpoint_of_another_model_is_told_by_module_not_by_every_key():
    with pytest.raises(RuntimeError) as raised:
        Net(vision=False, width=3).load_state_dict(Net(vision=True, width=4).state_dict())
    assert describe_state_dict_mismatch(str(raised.value)) == (
        "the checkpoint does not fit this model: 2 weights in the checkpoint are not in the model (model.visual: 2, "
        "e.g. model.visual.weight); 1 weights differ in shape (e.g. model.language.weight: [2, 4] in the checkpoint, "
        "[2, 3] here). Resume with the model the checkpoint was trained with (policy.model_path, lora, "
        "quantization), or start without ckpt_path"
    )
    from vlrl.cli import own_error

    assert own_error(raised.value) is raised.value  # the CLI prints it as that one line
