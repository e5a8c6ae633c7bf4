"""Reasoner backends: the HTTP client against a real loopback server, the HF model, the vLLM import path.

The HTTP tests start ``tests/openai_server.py`` as a subprocess: a real HTTP server on 127.0.0.1
whose answers are scripted per request (slow answers, 500s, malformed JSON, dropped connections),
so retries, timeouts and errors go through real sockets. Every test here is bounded by a timeout:
a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest
import torch

from tests.openai_server import ServerProcess
from vlrl.rewards import HFReasoner, OpenAIReasoner, Reasoner, ReasonerError, VLLMReasoner
from vlrl.rollout import Sampling

pytestmark = pytest.mark.timeout(60)

GREEDY = Sampling(temperature=0.0, max_new_tokens=8)


def ask(word: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say it. ANSWER={word}"}]


def reasoner_for(server: ServerProcess, **kwargs) -> OpenAIReasoner:
    kwargs = {"max_retries": 2, "backoff_s": 0.05, "timeout_s": 5.0, "api_key_env": "VLRL_TEST_REASONER_KEY", **kwargs}
    return OpenAIReasoner(server.base_url, "test-model", **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------- HTTP


def test_http_answers_in_order_with_bounded_concurrency_and_the_request_fields():
    words = ["red", "blue", "7", "circle", "left", "B"]
    with ServerProcess(actions=["slow:0.3"] * len(words)) as server:
        reasoner = reasoner_for(server, max_concurrency=2)
        sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=99)
        outputs = reasoner.generate([ask(w) for w in words], sampling, seed=10)
        log = server.log()
    assert [o.text for o in outputs] == [
        f"<think>From the caption.</think> The answer is \\boxed{{{w}}}." for w in words
    ]
    assert [o.finish_reason for o in outputs] == ["stop"] * len(words)
    assert [o.num_tokens for o in outputs] == [7] * len(words)  # the server counts words as tokens
    assert log["max_in_flight"] == 2
    bodies = sorted((r["body"] for r in log["requests"]), key=lambda b: b["seed"])
    assert [b["seed"] for b in bodies] == list(range(10, 16))  # seed + i: repeated prompts differ
    first = bodies[0]
    assert first["model"] == "test-model" and first["n"] == 1
    assert (first["max_tokens"], first["temperature"], first["top_p"]) == (99, 0.7, 0.9)
    assert "top_k" not in first  # not an OpenAI field: sent only when top_k > 0
    assert first["messages"] == ask("red")


def test_api_key_is_read_from_the_environment_per_request_and_never_kept(monkeypatch):
    with ServerProcess() as server:
        reasoner = reasoner_for(server)
        monkeypatch.delenv("VLRL_TEST_REASONER_KEY", raising=False)
        reasoner.generate([ask("a")], GREEDY)
        monkeypatch.setenv("VLRL_TEST_REASONER_KEY", "sk-test-secret-123")
        reasoner.generate([ask("b")], GREEDY)
        log = server.log()
    assert [r["authorization"] for r in log["requests"]] == [None, "Bearer sk-test-secret-123"]
    kept = repr(reasoner) + repr(vars(reasoner))
    assert "sk-test-secret-123" not in kept and "VLRL_TEST_REASONER_KEY" in kept


def test_slow_answer_times_out_then_the_retry_succeeds():
    with ServerProcess(actions=["slow:5", "ok"]) as server:
        start = time.monotonic()
        outputs = reasoner_for(server, timeout_s=0.5).generate([ask("red")], GREEDY)
        elapsed = time.monotonic() - start
        log = server.log()
    assert outputs[0].text.endswith("\\boxed{red}.")
    assert [r["action"] for r in log["requests"]] == ["slow:5", "ok"]
    assert elapsed < 4  # the slow answer was abandoned after 0.5 s, not awaited


def test_answers_that_stay_slow_end_in_a_clear_error():
    with ServerProcess(actions=["slow:5"] * 3) as server:
        start = time.monotonic()
        with pytest.raises(ReasonerError, match=r"no answer after 2 attempt\(s\).*timed out after 0.3 s"):
            reasoner_for(server, timeout_s=0.3, max_retries=1).generate([ask("red")], GREEDY)
        assert time.monotonic() - start < 4


def test_server_error_is_retried_then_reported():
    with ServerProcess(actions=["status:500", "ok"]) as server:
        outputs = reasoner_for(server).generate([ask("red")], GREEDY)
        assert len(server.log()["requests"]) == 2
    assert outputs[0].text.endswith("\\boxed{red}.")
    with ServerProcess(actions=["status:500"] * 3) as server:
        with pytest.raises(ReasonerError, match=r"no answer after 3 attempt\(s\).*HTTP 500.*scripted status 500"):
            reasoner_for(server, max_retries=2).generate([ask("red")], GREEDY)
        assert len(server.log()["requests"]) == 3


def test_client_errors_fail_at_once_and_malformed_answers_are_retried_a_few_times():
    with ServerProcess(actions=["status:400"]) as server:
        with pytest.raises(ReasonerError, match=r"/v1/chat/completions answered HTTP 400: .*scripted status 400"):
            reasoner_for(server).generate([ask("red")], GREEDY)
        assert len(server.log()["requests"]) == 1  # a bad request is not repeated
    with ServerProcess(actions=["malformed", "malformed", "ok"]) as server:
        (output,) = reasoner_for(server, malformed_retries=2).generate([ask("red")], GREEDY)
        assert len(server.log()["requests"]) == 3
    assert output.text.endswith("\\boxed{red}.")
    with ServerProcess(actions=["malformed"] * 3) as server:
        with pytest.raises(
            ReasonerError, match=r"answered 2 time\(s\) with malformed JSON .*choices.*OpenAI-compatible"
        ):
            reasoner_for(server, malformed_retries=1).generate([ask("red")], GREEDY)
        assert len(server.log()["requests"]) == 2


def test_dropped_connection_is_retried():
    with ServerProcess(actions=["hangup", "ok"]) as server:
        outputs = reasoner_for(server).generate([ask("red")], GREEDY)
        assert [r["action"] for r in server.log()["requests"]] == ["hangup", "ok"]
    assert outputs[0].finish_reason == "stop"


def test_refused_connection_ends_in_a_clear_error():
    reasoner = OpenAIReasoner(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=2, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(ReasonerError, match=r"no answer after 3 attempt\(s\).*cannot connect.*Is the server running"):
        reasoner.generate([ask("red")], GREEDY)
    assert time.monotonic() - start < 5


def test_one_failed_request_fails_the_batch_without_waiting_for_the_rest():
    with ServerProcess(actions=["status:400"] + ["slow:3"] * 7) as server:
        start = time.monotonic()
        with pytest.raises(ReasonerError, match="HTTP 400"):
            reasoner_for(server, max_concurrency=1).generate([ask(str(i)) for i in range(8)], GREEDY)
        assert time.monotonic() - start < 2
        assert len(server.log()["requests"]) == 1  # no request is sent once one has failed
    with ServerProcess(actions=["slow:3", "status:400"] + ["slow:3"] * 6) as server:
        start = time.monotonic()
        with pytest.raises(ReasonerError, match="HTTP 400"):
            reasoner_for(server, max_concurrency=4).generate([ask(str(i)) for i in range(8)], GREEDY)
        assert time.monotonic() - start < 2  # not held up by the slow requests still in flight
        assert len(server.log()["requests"]) <= 4


def test_truncated_answer_is_reported_as_length():
    with ServerProcess(actions=["truncated"]) as server:
        (output,) = reasoner_for(server).generate([ask("red")], GREEDY)
    assert output.finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "localhost:8000/v1"}, "base_url='localhost:8000/v1' must start with http://"),
        ({"max_concurrency": 0}, "max_concurrency=0 must be >= 1"),
        ({"timeout_s": 0}, "timeout_s=0 must be > 0"),
        ({"max_retries": -1}, "max_retries=-1"),
        ({"outage_budget_s": -1}, "outage_budget_s=-1 must be >= 0 seconds"),
        ({"backoff_s": 5, "max_backoff_s": 1}, "max_backoff_s=1 must be >= backoff_s=5"),
        ({"max_n": 0}, "max_n=0 must be >= 1"),
        ({"max_model_len": 0}, "max_model_len=0 must be >= 1 tokens"),
    ],
)
def test_http_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OpenAIReasoner(**{"base_url": "http://localhost:8000/v1", "model": "m", **kwargs})


# ------------------------------------------------------------------------- HF and vLLM


@pytest.fixture(scope="module")
def hf_reasoner() -> HFReasoner:
    reasoner = HFReasoner("tiny:qwen2", dtype="float32", max_batch_size=2)
    reasoner.setup(torch.device("cpu"))
    return reasoner


def test_hf_reasoner_batches_like_single_prompts(hf_reasoner):
    """Greedy answers of a padded batch equal those of each prompt alone (left padding is right)."""
    prompts = [ask("red"), [{"role": "user", "content": "A much longer question about the shapes in the image?"}]]
    prompts.append([{"role": "user", "content": "Hi"}])
    batched = hf_reasoner.generate(prompts, GREEDY)
    alone = [hf_reasoner.generate([p], GREEDY)[0] for p in prompts]
    assert batched == alone
    for output in batched:
        assert 1 <= output.num_tokens <= GREEDY.max_new_tokens
        assert output.finish_reason == ("length" if output.num_tokens == GREEDY.max_new_tokens else "stop")
    assert all(not p.requires_grad for p in hf_reasoner.model.parameters())


def test_hf_reasoner_sampling_is_seeded(hf_reasoner):
    sampling = Sampling(temperature=1.0, max_new_tokens=12)
    prompts = [ask("red")] * 4
    first = hf_reasoner.generate(prompts, sampling, seed=3)
    assert hf_reasoner.generate(prompts, sampling, seed=3) == first
    assert len({o.text for o in first}) > 1  # repeated prompts are sampled independently
    assert hf_reasoner.generate(prompts, sampling, seed=4) != first


def test_hf_reasoner_needs_setup_first():
    with pytest.raises(RuntimeError, match="before setup"):
        HFReasoner("tiny:qwen2").generate([ask("red")], GREEDY)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_reasoner_explains_a_missing_vllm():
    reasoner = VLLMReasoner("tiny:qwen2")  # constructing it never imports vLLM
    with pytest.raises(ImportError, match="VLLMReasoner needs vLLM .*HFReasoner.*OpenAIReasoner"):
        reasoner.setup(torch.device("cpu"))


def test_backends_follow_the_protocol():
    backends = [HFReasoner("tiny:qwen2"), VLLMReasoner("tiny:qwen2"), OpenAIReasoner("http://localhost:1/v1", "m")]
    assert all(isinstance(b, Reasoner) for b in backends)
