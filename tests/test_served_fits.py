"""Short real RACRO and SOPHIA fits against a served reasoner that goes down mid-run.

The reasoner is ``OpenAIReasoner`` talking HTTP to ``tests/openai_server.py`` (a real loopback server): it
answers the first requests, then for a few seconds answers HTTP 503 and drops connections alternately, as a
restarting ``vllm serve`` does, then serves again; every step of the fit must finish, none trained on rewards
of a dead server. A server that stays down past the outage budget ends the fit with ``ReasonerUnavailable``
(naming the URL and the budget) within seconds of the budget running out.
"""

from __future__ import annotations

import time

import pytest
from lightning.pytorch.callbacks import Callback

from tests.openai_server import ServerProcess
from tests.test_grpo import make_data, quiet_trainer
from tests.test_racro import make_racro
from tests.test_sophia import make_sophia, rl_data, write_rows
from vlrl.rewards import OpenAIReasoner, ReasonerUnavailable

pytestmark = pytest.mark.timeout(240)


def served(server: ServerProcess, budget_s: float) -> OpenAIReasoner:
    return OpenAIReasoner(
        server.base_url, "served", api_key_env=None, timeout_s=30, outage_budget_s=budget_s, backoff_s=0.1,
        max_backoff_s=0.5,
    )  # fmt: skip


class Rewards(Callback):
    """The reasoner accuracy of every finished step (RACRO) or the visual reward (SOPHIA)."""

    def __init__(self, key: str) -> None:
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics[self.key]))


def outage_seen(server: ServerProcess) -> list[str]:
    actions = [r["action"] for r in server.log()["requests"]]
    assert {"status:503", "hangup"} <= set(actions), actions
    return actions


def test_racro_fit_rides_out_an_outage_and_finishes_every_step():
    """2 prompts x G=4 captions per step, one request each: down from the 6th request (mid step 1) for 2 s.
    The server always boxes "red" and the gold answers are not all red, so the reward is the same per row
    whether or not the server had been down: every step's reasoner accuracy is its real one, never 0 by failure."""
    rewards = Rewards("reasoner/accuracy")
    with ServerProcess(answer="red", outage="5:2") as server:
        module = make_racro(served(server, budget_s=30))
        trainer = quiet_trainer(max_steps=2, callbacks=[rewards])
        trainer.fit(module, datamodule=make_data())
        outage_seen(server)
        answered = sum(r["body"]["n"] for r in server.log()["requests"] if r["action"] == "ok")
    assert trainer.global_step == 2 and len(rewards.values) == 2
    assert answered == 2 * 2 * 4  # every caption of every step was answered, once
    assert all(0.0 <= r <= 1.0 for r in rewards.values)


def test_sophia_fit_rides_out_an_outage_and_finishes_every_step(tmp_path):
    """K=2 descriptions x N=2 trajectories per question (one request with n=2 per description); every trajectory
    is right ("red"), so every step keeps one trajectory per question: R(c) = 1 in every step, outage or not."""
    rewards = Rewards("sophia/visual_reward_mean")
    with ServerProcess(answer="red", outage="2:2") as server:
        module = make_sophia(served(server, budget_s=30))
        trainer = quiet_trainer(max_steps=2, callbacks=[rewards])
        trainer.fit(module, datamodule=rl_data(write_rows(tmp_path, 4)))
        actions = outage_seen(server)
        bodies = [r["body"] for r in server.log()["requests"] if r["action"] == "ok"]
    assert trainer.global_step == 2 and rewards.values == [1.0, 1.0]
    assert sum(b["n"] for b in bodies) == 2 * 2 * 2 * 2 and all(b["n"] >= 2 for b in bodies)  # steps x B x K x N
    assert actions[-1] == "ok"


def test_a_server_that_stays_down_ends_the_fit_with_a_clear_error_within_seconds():
    """Down for good from the 2nd step on (RACRO: 2 prompts x 4 captions a step): step 1 finishes, step 2 stops
    once the 2 s budget is spent, counted from the first failed request."""
    with ServerProcess(answer="red", outage="8:inf") as server:
        module = make_racro(served(server, budget_s=2))
        trainer = quiet_trainer(max_steps=4)
        with pytest.raises(
            ReasonerUnavailable, match=rf"{server.base_url}/chat/completions: no answer .*outage_budget_s=2"
        ):
            trainer.fit(module, datamodule=make_data())
        stopped = time.time()
        requests = server.log()["requests"]
    first_down = min(r["time"] for r in requests if r["action"] != "ok")
    assert [r["action"] for r in requests[:8]] == ["ok"] * 8 and len(requests) > 8 + 4  # retried, then given up
    assert trainer.global_step == 1  # the completed step stands; the failing one trained nothing
    assert 2 <= stopped - first_down < 2 + 3  # the budget, then out at once: no wait for requests in flight
