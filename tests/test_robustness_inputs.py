"""Reliability against bad input: configuration errors caught before any weights load, hostile model
output through the real graders and reward runner, and NaN/inf gradients (skipped, then the run stops)."""

from __future__ import annotations

import re
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.test_grpo import CharReward, make_data, make_module, quiet_trainer
from tests.test_ppo import make_ppo
from vlrl.callbacks import Preemption, SelectiveSampleReplay
from vlrl.cli import main
from vlrl.data import Files, RLDataModule
from vlrl.methods.core import NonFiniteGradientsError
from vlrl.models import Policy
from vlrl.rewards import (
    AccuracyReward,
    BoxedFormatReward,
    InvalidResponsePenalty,
    NativeWaitBonus,
    OpenAIReasoner,
    RewardFunction,
    extract_answer,
    is_correct,
    score,
)
from vlrl.rewards.grading import math_equal

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- bad configuration
@pytest.fixture
def load_calls(monkeypatch) -> list[str]:
    """Every ``Policy.load`` call (the real one runs): a failed check must come before any of them."""
    calls: list[str] = []
    real = Policy.load

    def spy(self, *args, **kwargs):
        calls.append(self.model_path)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Policy, "load", spy)
    return calls


BAD_FITS = {
    "mini_batch": (
        lambda tmp: (make_module(mini_batch_size=3), make_data(), []),
        r"mini_batch_size=3 does not divide the update batch of 8 samples \(data.batch_size=2 prompts x group_size=4\)",
    ),
    "micro_above_mini": (
        lambda tmp: (make_module(mini_batch_size=4, micro_batch_size=8), make_data(), []),
        r"micro_batch_size=8 is larger than mini_batch_size=4",
    ),
    "replay_batch": (
        lambda tmp: (make_module(mini_batch_size=4), make_data(), [SelectiveSampleReplay(batch_size=6)]),
        r"mini_batch_size=4 does not divide the update batch of 6 samples \(SelectiveSampleReplay.batch_size\)",
    ),
    "critic_steps": (
        lambda tmp: (make_ppo(critic_steps=3), make_data(), []),
        r"critic_steps=3 does not divide the update batch of 8 samples",
    ),
    "missing_file": (
        lambda tmp: (make_module(), RLDataModule(train=Files(str(tmp / "gone.jsonl"))), []),
        r"data.train: path .*gone.jsonl does not exist",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FITS))
def test_bad_configuration_fails_before_the_model_loads(tmp_path, load_calls, case):
    build, message = BAD_FITS[case]
    module, data, callbacks = build(tmp_path)
    with pytest.raises(ValueError, match=message):
        quiet_trainer(max_steps=3, callbacks=callbacks).fit(module, datamodule=data)
    assert load_calls == []


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: OpenAIReasoner("http://localhost:8000/v1", model=" "), r"OpenAIReasoner.model=' ' is empty"),
        (lambda: make_module(max_nonfinite_steps=0), r"max_nonfinite_steps=0 must be >= 1"),
        (lambda: Preemption(signals=["SIGNOPE"]), r"unknown or uncatchable signal names \['SIGNOPE'\]"),
    ],
)
def test_bad_arguments_fail_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_the_cli_names_the_bad_key_before_loading_weights(tmp_path, load_calls, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-cli"])
    with pytest.raises(SystemExit) as exit_info:  # vlrl's own errors: one line, no traceback, exit 1
        main(["fit", "--config", str(REPO / "configs/demo/grpo.yaml"), "--model.init_args.group_size", "1"])
    assert exit_info.value.code == 1
    assert re.search(r"error: advantage='std' needs group_size >= 2 \(got 1\)", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/demo/grpo.yaml"),
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger",
                "false",
                "--data.init_args.train",
                '{"class_path": "vlrl.data.Files", "init_args": {"path": "%s"}}' % (tmp_path / "gone.jsonl"),
            ]
        )
    assert re.search(r"error: data.train: path .*gone.jsonl does not exist", capsys.readouterr().err)
    assert load_calls == []


# -------------------------------------------------------------------- hostile model output
HOSTILE = {
    "power_tower": r"so \boxed{9^{9^{9^{9}}}}",
    "power_tower_parens": r"\boxed{9^(9^(9^(9^9)))}",
    "exp_tower": r"\boxed{e^{e^{e^{e^{10}}}}}",
    "huge_factorial": r"\boxed{1000000!}",
    "long_answer": r"\boxed{" + "12345+" * 20_000 + "1}",
    "long_text": "7" * 100_000,
    "unbalanced_open": r"\boxed{" * 5_000 + "x",
    "stray_closers": "}" * 100_000 + r"\boxed{1}",
    "deep_braces": r"\boxed{" + "{" * 5_000 + "1" + "}" * 5_000 + "}",
    "deep_fracs": r"\boxed{" + r"\frac{1}{" * 2_000 + "2" + "}" * 2_000 + "}",
    "deep_sqrt_unclosed": r"\boxed{\sqrt{" * 3_000,
    "answer_phrases": "the answer is " * 20_000,
    "huge_matrix": r"\boxed{\begin{pmatrix}" + "1&" * 5_000 + r"1\end{pmatrix}}",
    "many_waits": "wait, " * 20_000 + r"\boxed{4}",
}
BOUND_S = 10.0  # generous: each takes milliseconds; the point is that none hangs


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_responses_grade_quickly_in_the_main_thread_and_in_a_worker(name):
    text = HOSTILE[name]
    start = time.perf_counter()
    extract_answer(text)
    results = [is_correct(text, gold, choices) for gold, choices in (("42", None), ("B", ["1", "2", "3"]))]
    results.append(math_equal(text[:5_000], r"9^{9^{9^{9}}}"))
    assert time.perf_counter() - start < BOUND_S
    assert results[:2] == [False, False]
    worker: list[float] = []
    thread = threading.Thread(target=lambda: (is_correct(text, "42"), worker.append(time.perf_counter())))
    start = time.perf_counter()
    thread.start()
    thread.join(BOUND_S)
    assert worker and worker[0] - start < BOUND_S  # off the main thread math-verify has no alarm: still bounded


def test_hostile_responses_through_the_reward_runner_stay_bounded_in_time_and_memory():
    texts = list(HOSTILE.values())
    rewards = [AccuracyReward(), BoxedFormatReward(), InvalidResponsePenalty(), NativeWaitBonus()]
    score(rewards, ["4"], answers=["4"], choices=[None], finish_reasons=["stop"])  # the worker starts once per run
    tracemalloc.start()
    start = time.perf_counter()
    scores = score(
        rewards,
        texts,
        answers=["4"] * len(texts),
        choices=[None] * len(texts),
        finish_reasons=["stop"] * len(texts),
        time_budget_s=BOUND_S,
    )
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < BOUND_S
    assert peak < 200 * 2**20  # bytes: far below what expanding any of these would take
    assert scores.failures == {fn.name: 0 for fn in rewards}  # every reward finished in time, finite
    assert torch.isfinite(scores.total).all()
    assert scores.components["accuracy"].tolist() == [0.0] * (len(texts) - 1) + [1.0]  # "many_waits" is 4


class HangingReward(RewardFunction):
    """Never returns within any budget (until released at the end of the test)."""

    release = threading.Event()

    def __call__(self, completions, **kwargs):
        self.release.wait(120)
        return [1.0] * len(completions)


def test_a_hanging_reward_scores_zero_is_counted_and_the_step_goes_on():
    try:
        module = make_module(rewards=[CharReward(), HangingReward()], reward_time_budget_s=0.5)
        trainer = quiet_trainer(max_steps=1)
        start = time.perf_counter()
        trainer.fit(module, datamodule=make_data())
        assert time.perf_counter() - start < 120
        assert trainer.global_step == 1
        assert float(trainer.callback_metrics["reward/failures/hanging"]) == 1.0
        assert float(trainer.callback_metrics["reward/hanging"]) == 0.0
        assert float(trainer.callback_metrics["reward/failures/char"]) == 0.0
    finally:
        HangingReward.release.set()


# --------------------------------------------------------------------------- NaN and inf
class PoisonGradients(pl.Callback):
    """Puts a NaN (or inf) into one gradient after the backward pass of the given steps; records weights."""

    def __init__(self, steps: set[int], value: float = float("nan")) -> None:
        self.steps, self.value = steps, value
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.skipped: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            grad.view(-1)[0] = self.value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.after[step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.skipped[step] = float(trainer.callback_metrics["update/nonfinite_skipped"])


def test_a_nonfinite_gradient_skips_the_update_and_training_goes_on():
    poison = PoisonGradients({1}, float("inf"))
    module = make_module()
    trainer = quiet_trainer(max_steps=3, callbacks=[poison])
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step == 3  # the skipped step still counts: schedules and data stay aligned
    assert poison.skipped == {0: 0.0, 1: 1.0, 2: 0.0}
    for name, value in poison.before[1].items():
        assert torch.equal(poison.after[1][name], value), name  # weights untouched by the poisoned step
    assert any(not torch.equal(poison.after[2][k], v) for k, v in poison.before[2].items())  # the next one trains
    state = module.optimizers().optimizer.state
    assert all(int(s["step"]) == 2 for s in state.values())  # Adam's moments skipped the bad step too


def test_nonfinite_gradients_in_a_row_stop_the_run_with_a_clear_message():
    trainer = quiet_trainer(max_steps=10, callbacks=[PoisonGradients({1, 2, 3})])
    with pytest.raises(NonFiniteGradientsError, match=r"2 optimizer steps in a row had NaN/inf gradients"):
        trainer.fit(make_module(max_nonfinite_steps=2), datamodule=make_data())
    assert trainer.global_step == 2  # step 1 skipped, step 2 stopped the run


def test_sft_shares_the_nonfinite_guard(tmp_path):
    from tests.test_sft import make_data as sft_data
    from tests.test_sft import make_module as sft_module
    from tests.test_sft import write_rows

    rows = [{"question": f"What is {i} + 1?", "response": f"It is {i + 1}."} for i in range(8)]
    data = sft_data(Files(str(write_rows(tmp_path / "rows.jsonl", rows)), require_answer=False), batch_size=4)
    trainer = quiet_trainer(max_steps=5, callbacks=[PoisonGradients({0, 1})])
    with pytest.raises(NonFiniteGradientsError, match=r"2 optimizer steps in a row"):
        trainer.fit(sft_module(max_nonfinite_steps=2), datamodule=data)
