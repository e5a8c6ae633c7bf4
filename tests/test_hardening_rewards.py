"""A reward cannot stall, corrupt or silently ruin a run: hung and CPU-bound pure-Python rewards are stopped in
their worker process, a killed worker is replaced, a reward cannot change the inputs of the next, a reward that
never scores stops the run naming it, and ``RewardUnavailable`` stops the step."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from vlrl.rewards import JudgeReward, RewardFunction, RewardUnavailable, score
from vlrl.rewards.runner import FailureStreaks, RewardFailureError

pytestmark = pytest.mark.timeout(300)

N = 4
INPUTS = dict(answers=["1"] * N, choices=[None] * N, finish_reasons=["stop"] * N)


def run(rewards, texts=None, budget_s=30.0, **inputs):
    return score(rewards, texts or [f"answer {i}" for i in range(N)], time_budget_s=budget_s, **{**INPUTS, **inputs})


class Constant(RewardFunction):
    def __call__(self, completions, **kwargs):
        return [1.0] * len(completions)


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    """The worker process starts once (about a second or more here), before any budget is measured."""
    assert run([Constant()]).failures == {"constant": 0}


class BusyReward(RewardFunction):
    """Burns CPU in pure Python for ``seconds``, writing a heartbeat to ``path`` as it goes."""

    def __init__(self, path: str, seconds: float = 10.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path, self.seconds = path, seconds

    def __call__(self, completions, **kwargs):
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            sum(i * i for i in range(20_000))
            Path(self.path).write_text(repr(time.monotonic()))
        return [1.0] * len(completions)


def test_a_cpu_bound_reward_past_its_budget_is_stopped_not_left_running(tmp_path):
    heartbeat = tmp_path / "beat"
    start = time.perf_counter()
    scores = run([BusyReward(str(heartbeat)), Constant()], budget_s=0.5)
    assert time.perf_counter() - start < 5.0
    assert scores.failures == {"busy": 1, "constant": 0}
    assert "exceeded its time budget of 0.5 s (its worker process was stopped)" in scores.unusable["busy"]
    assert scores.total.tolist() == [1.0] * N  # busy scores 0, constant 1
    time.sleep(0.3)
    beat = heartbeat.read_text()
    time.sleep(1.0)
    assert heartbeat.read_text() == beat  # nothing runs the loop any more (a thread would go on for 10 s)
    assert run([Constant()]).failures == {"constant": 0}  # and the next step has a fresh worker


class SuicidalReward(RewardFunction):
    """Kills the process it is called in, unless that is the process that built it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.creator = os.getpid()

    def __call__(self, completions, **kwargs):
        if os.getpid() != self.creator:
            os.kill(os.getpid(), signal.SIGKILL)
        return [1.0] * len(completions)


def test_a_killed_worker_is_a_failure_of_that_reward_and_the_next_call_gets_a_new_worker():
    scores = run([SuicidalReward(), Constant()])
    assert scores.failures == {"suicidal": 1, "constant": 0}
    assert scores.unusable == {"suicidal": f"killed its worker process (exit code {-signal.SIGKILL})"}
    assert run([Constant()]).total.tolist() == [1.0] * N


class Mutating(RewardFunction):
    """Changes every input it is given, in place."""

    def __call__(self, completions, *, answers, choices, facts, **kwargs):
        completions.pop()
        answers[0] = "changed"
        choices[1].append("Z")
        facts["seen"].append("extra")
        return [0.0] * (len(completions) + 1)


class ThreadMutating(Mutating):
    isolation = "thread"


class Checking(RewardFunction):
    """1 per sample whose inputs are as the caller gave them."""

    def __call__(self, completions, *, answers, choices, facts, **kwargs):
        ok = len(completions) == N and answers[0] == "1" and choices[1] == ["A", "B"] and len(facts["seen"]) == N
        return [float(ok)] * len(completions)


@pytest.mark.parametrize("mutating", [Mutating, ThreadMutating])
def test_a_reward_cannot_change_the_inputs_of_the_next_reward_or_of_the_caller(mutating):
    texts, choices, facts = [f"answer {i}" for i in range(N)], [None, ["A", "B"], None, None], {"seen": [0] * N}
    scores = run([mutating(name="mutating"), Checking()], texts=texts, choices=choices, facts=facts)
    assert scores.failures == {"mutating": 0, "checking": 0}
    assert scores.components["checking"].tolist() == [1.0] * N
    assert len(texts) == N and choices[1] == ["A", "B"] and facts == {"seen": [0] * N}


class Unavailable(RewardFunction):
    def __call__(self, completions, **kwargs):
        raise RewardUnavailable("judge server down for 600 s, past its outage budget")


class ThreadUnavailable(Unavailable):
    isolation = "thread"


@pytest.mark.parametrize("reward", [Unavailable, ThreadUnavailable])
def test_reward_unavailable_is_re_raised_not_scored(reward):
    with pytest.raises(RewardUnavailable, match="judge server down for 600 s"):
        run([Constant(), reward(name="judge")])


class Drawing(RewardFunction):
    """Draws two numbers from Python's global generator per call."""

    def __call__(self, completions, **kwargs):
        return [random.random() + random.random()] * len(completions)


def test_a_worker_reward_moves_the_global_random_stream_as_it_would_in_process():
    random.seed(7)
    expected = [random.random() for _ in range(3)]
    random.seed(7)
    scores = run([Drawing()])
    assert scores.components["drawing"][0].item() == pytest.approx(expected[0] + expected[1])
    assert random.random() == expected[2]  # the trainer's stream continues after the reward's two draws


class Images(RewardFunction):
    def __call__(self, completions, *, images, **kwargs):
        return [float(images is not None)] * len(completions)


class ThreadImages(Images):
    isolation = "thread"


def test_pixels_go_to_thread_rewards_only():
    scores = run([Images(), ThreadImages()], images=[["pixels"]] * N)
    assert scores.components["images"].tolist() == [0.0] * N
    assert scores.components["thread_images"].tolist() == [1.0] * N


def test_isolation_is_a_documented_class_attribute():
    class Loads(RewardFunction):
        def setup(self, device):
            pass

    class LoadsButPure(Loads):
        isolation = "process"

    assert (RewardFunction.isolation, JudgeReward.isolation, Loads.isolation) == ("process", "thread", "thread")
    assert LoadsButPure.isolation == "process"
    with pytest.raises(ValueError, match=r"Odd.isolation='gpu' must be 'process' or 'thread'"):
        type("Odd", (RewardFunction,), {"isolation": "gpu"})


class Failing(RewardFunction):
    def __call__(self, completions, **kwargs):
        raise KeyError("no such column")


class PartlyNaN(RewardFunction):
    def __call__(self, completions, **kwargs):
        return [float("nan")] + [1.0] * (len(completions) - 1)


def test_only_calls_without_any_usable_score_count_towards_the_streak():
    scores = run([Failing(), PartlyNaN(), Constant()])
    assert scores.failures == {"failing": 1, "partly_na_n": 1, "constant": 0}
    assert scores.unusable == {"failing": "raised KeyError: 'no such column'"}
    streaks = FailureStreaks(limit=2)
    streaks.update(scores.unusable, list(scores.failures))
    with pytest.raises(RewardFailureError, match=r"reward 'failing' gave no usable score in 2 steps in a row"):
        streaks.update(scores.unusable, list(scores.failures))
    assert streaks.counts == {"failing": 2, "partly_na_n": 0, "constant": 0}
    with pytest.raises(ValueError, match=r"max_reward_failure_steps=0 must be a number of steps >= 1"):
        FailureStreaks(0)


def test_a_reward_failing_every_step_stops_the_run_naming_it():
    from tests.test_grpo import make_data, make_module, quiet_trainer  # here: workers import this module's rewards

    module = make_module(rewards=[Constant(), Failing()], max_reward_failure_steps=2)
    trainer = quiet_trainer(max_steps=5)
    with pytest.raises(RewardFailureError, match=r"reward 'failing' .* 2 steps in a row \(last: raised KeyError"):
        trainer.fit(module, datamodule=make_data())
    assert trainer.global_step == 1  # step 0 trained on the failure score; step 1 stopped the run


class SlowServedReward(RewardFunction):
    """A thread reward whose backend rides out an outage: it answers after 0.6 s and needs 2 s."""

    isolation = "thread"

    @property
    def min_time_budget_s(self) -> float:
        return 2.0

    def __call__(self, completions, **kwargs):
        time.sleep(0.6)
        return [1.0] * len(completions)


def test_a_reward_s_own_minimum_budget_outlasts_the_runner_s_so_an_outage_pauses_rather_than_scores_zero():
    scores = score(
        [SlowServedReward()], ["a"], answers=["a"], choices=[None], finish_reasons=["stop"], time_budget_s=0.2
    )
    assert scores.failures == {"slow_served": 0} and scores.total.tolist() == [1.0]


def test_a_served_judge_asks_for_its_backend_s_outage_budget():
    from vlrl.rewards import OpenAIReasoner

    judge = OpenAIReasoner("http://127.0.0.1:9", "judge", api_key_env=None, timeout_s=20, outage_budget_s=300)
    assert JudgeReward(judge, show_images=False).min_time_budget_s == 300 + 20 + 30
