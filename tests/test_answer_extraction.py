"""Model-based answer extraction: the benchmarks' prompts, the cache, the fault model, rules-first grading.

The HTTP tests talk to ``tests/openai_server.py`` (a real loopback server whose answers are scripted
with ``replies``: the extraction model's answer for a response that contains a given text); the
plumbing test runs a real ``HFReasoner`` on the tiny offline text model.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.openai_server import ServerProcess
from vlrl.rewards import (
    Grade,
    HFReasoner,
    ModelExtractor,
    OpenAIReasoner,
    ReasonerOutput,
    ReasonerUnavailable,
    grade_with_extraction,
)
from vlrl.rewards.answer_extraction import MATHVERSE_DEMOS, MATHVERSE_PROMPT, MATHVISTA_DEMOS, read_extraction
from vlrl.rollout import Sampling

pytestmark = pytest.mark.timeout(60)

BAR_Q = (
    "Hint: Please answer the question requiring an integer answer.\nQuestion: What is the value of the smallest bar?"
)
BAR_R = "The smallest bar in the chart has a value of one."  # no digit: the rules read nothing
SQUIRREL_Q = "What happens to the squirrels if the trees die?\nChoices:\n(A) increase\n(B) decrease\n(C) stay the same"
SQUIRREL_R = "Looking closely, the squirrels would have less food."
SQUIRREL_CHOICES = ["increase", "decrease", "stay the same"]


def reasoner_for(server: ServerProcess, **kwargs) -> OpenAIReasoner:
    kwargs = {"max_retries": 2, "backoff_s": 0.05, "timeout_s": 5.0, "max_concurrency": 1, **kwargs}
    return OpenAIReasoner(server.base_url, "extractor", **kwargs)


def replies(**texts: str) -> str:
    return json.dumps(texts)


def sent(server: ServerProcess) -> list[str]:
    """The user message of every request the server received, in order."""
    return [r["body"]["messages"][-1]["content"] for r in server.log()["requests"]]


# ------------------------------------------------------------------------------ prompts


def test_the_prompts_are_the_benchmarks_own_text():
    """The demo texts are verbatim (hashes of the upstream files' strings) and are put together as the scripts do."""
    assert hashlib.sha256(MATHVISTA_DEMOS.encode()).hexdigest() == (
        "2c251ab9e219c5d7db855ad5a9ef44d5bdb10639244b8d28e3ee66a5bda3f71c"
    )
    assert hashlib.sha256(MATHVERSE_DEMOS.encode()).hexdigest() == (
        "db92d43cb65de2ab70bad449cb5492d3c9f5233c64b61d917b47829887162c05"
    )
    assert MATHVISTA_DEMOS.startswith("Please read the following example. Then extract the answer")
    assert MATHVISTA_DEMOS.endswith("Model response: The correct answer is (B) 8/11.\n\nExtracted answer: B")
    assert MATHVERSE_DEMOS.endswith("Extracted answer: f(x) = -x^2 - 2x + 1\n\n7.")
    assert MATHVERSE_PROMPT == MATHVERSE_DEMOS + "\n\nModel response: '{response}'\nExtracted Answer: "


def test_prompt_contents_demos_question_and_response_over_http():
    with ServerProcess(replies=replies(**{"smallest bar": "1"})) as server:
        extractor = ModelExtractor(reasoner_for(server))
        assert extractor.extract([BAR_Q], [BAR_R]) == ["1"]
        (request,) = server.log()["requests"]
    body = request["body"]
    assert body["messages"] == [
        {"role": "user", "content": f"{MATHVISTA_DEMOS}\n\n{BAR_Q}\n\n{BAR_R}\n\nExtracted answer: "}
    ]
    assert (
        "Question: Which number is missing?\n\nModel response: The number missing in the sequence is 14."
        in (body["messages"][0]["content"])
    )
    assert (body["temperature"], body["max_tokens"]) == (0.0, 64)  # greedy and short by default


def test_mathverse_prompt_and_own_templates():
    question = "Find {x} in \\frac{a}{b}; the {response} placeholder is text here"
    with ServerProcess(replies=replies(**{"smallest bar": "1"})) as server:
        assert ModelExtractor(reasoner_for(server), prompt="mathverse").extract([question], [BAR_R]) == ["1"]
        own = ModelExtractor(reasoner_for(server), prompt="Q: {question}\nR: {response}\nA:")
        assert own.extract([question], [BAR_R]) == ["1"]
        mathverse, mine = sent(server)
    assert mathverse == f"{MATHVERSE_DEMOS}\n\nModel response: '{BAR_R}'\nExtracted Answer: "  # no question shown
    assert mine == f"Q: {question}\nR: {BAR_R}\nA:"  # braces in the question are left alone, filled once


@pytest.mark.parametrize(
    ("text", "finish_reason", "expected"),
    [
        ("14", "stop", "14"),
        ("  Extracted answer: 14\n", "stop", "14"),
        ("Extracted Answer: extracted answer: B", "stop", "B"),  # MathVerse: "sometimes gpt will repeat"
        ("<think>The response says 3.</think>\n\n3", "stop", "3"),
        ("<think>The response says", "stop", None),  # still thinking
        ("B\n\nHint: Please answer the question", "stop", "B"),  # ran on into the next demo
        ("Domain: (-3, 3]\nRange: (-4, 1]", "stop", "Domain: (-3, 3]\nRange: (-4, 1]"),  # MathVerse demo 3
        ("null", "stop", None),  # MathVerse demo 4: no answer in the response
        ("   ", "stop", None),
        ("1", "length", None),  # cut off: not a whole answer
    ],
)
def test_read_extraction(text, finish_reason, expected):
    assert read_extraction(ReasonerOutput(text, finish_reason, 3)) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "mathvist"}, r"prompt='mathvist' is neither a prompt name \(mathvista, mathverse\).*\{response\}"),
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
    ],
)
def test_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelExtractor(OpenAIReasoner("http://localhost:1/v1", "m"), **kwargs)


# -------------------------------------------------------------------------------- cache


def test_cache_answers_a_second_call_and_a_new_extractor_and_reads_every_rank(tmp_path):
    cache = tmp_path / "extraction"
    questions, responses = [BAR_Q, SQUIRREL_Q, BAR_Q], [BAR_R, SQUIRREL_R, BAR_R]
    with ServerProcess(replies=replies(**{"smallest bar": "1", "squirrels": "B"})) as server:
        first = ModelExtractor(reasoner_for(server), cache_dir=str(cache))
        assert first.extract(questions, responses) == ["1", "B", "1"]
        assert first.stats == {"requests": 2, "cache_hits": 1, "failures": 0}  # the repeated row is asked once
        assert first.extract(questions, responses) == ["1", "B", "1"]
        assert first.stats == {"requests": 2, "cache_hits": 4, "failures": 0}
        again = ModelExtractor(reasoner_for(server), cache_dir=str(cache))
        assert again.extract(questions[:2], responses[:2]) == ["1", "B"]
        assert again.stats == {"requests": 0, "cache_hits": 2, "failures": 0}
        assert len(server.log()["requests"]) == 2
        assert [path.name for path in cache.iterdir()] == ["rank0.jsonl"]
        assert len((cache / "rank0.jsonl").read_text().splitlines()) == 2

        # another rank's file is read, and an interrupted write (a cut-off last line) is skipped
        (cache / "rank0.jsonl").rename(cache / "rank3.jsonl")
        (cache / "rank0.jsonl").write_text('{"key": "ab')
        third = ModelExtractor(reasoner_for(server), cache_dir=str(cache))
        assert third.extract([BAR_Q, "Another question"], [BAR_R, SQUIRREL_R]) == ["1", "B"]
        assert third.stats == {"requests": 1, "cache_hits": 1, "failures": 0}
        assert len(server.log()["requests"]) == 3
    lines = (cache / "rank0.jsonl").read_text().splitlines()
    assert lines[0] == '{"key": "ab' and json.loads(lines[1])["answer"] == "B"  # the new record on a line of its own
    fourth = ModelExtractor(OpenAIReasoner("http://127.0.0.1:1/v1", "m", max_retries=0), cache_dir=str(cache))
    assert fourth.extract([BAR_Q, "Another question"], [BAR_R, SQUIRREL_R]) == ["1", "B"]  # no server needed
    assert fourth.stats["requests"] == 0


# --------------------------------------------------------------------------- the faults


def test_failures_are_none_and_counted_and_one_bad_row_costs_only_itself():
    rows = ["row-ok", "row-empty", "row-null", "row-malformed"]
    # four requests for the batch (the 4th malformed fails it), then one per row (the 4th malformed again)
    actions = ["ok", "ok", "ok", "malformed", "ok", "ok", "ok", "malformed"]
    server_replies = {"row-empty": "", "row-null": "null", "row-ok": "7"}
    with ServerProcess(actions=actions, replies=json.dumps(server_replies)) as server:
        extractor = ModelExtractor(reasoner_for(server, malformed_retries=0))
        assert extractor.extract(["Q"] * 4, rows) == ["7", None, None, None]
        assert extractor.stats == {"requests": 4, "cache_hits": 0, "failures": 3}
        assert len(server.log()["requests"]) == 8
    with ServerProcess(actions=["status:400"], replies=json.dumps(server_replies)) as server:
        extractor = ModelExtractor(reasoner_for(server))
        assert extractor.extract(["Q"], ["row-ok"]) == [None]  # a refused request: that row fails
        assert extractor.extract(["Q"], ["row-ok"]) == ["7"]  # failures are not cached: asked again
        assert extractor.stats == {"requests": 2, "cache_hits": 0, "failures": 1}


def test_an_outage_past_the_budget_raises_and_the_answered_batches_stay_cached(tmp_path):
    questions, responses = ["Q"] * 4, [f"response {i} of the smallest bar" for i in range(4)]
    with ServerProcess(outage="2:inf", replies=replies(**{"smallest bar": "1"})) as server:
        reasoner = reasoner_for(server, max_retries=None, outage_budget_s=0.3)
        extractor = ModelExtractor(reasoner, cache_dir=str(tmp_path), batch_size=2)
        with pytest.raises(ReasonerUnavailable, match="outage_budget_s=0.3"):
            extractor.extract(questions, responses)
    with ServerProcess(replies=replies(**{"smallest bar": "1"})) as server:  # the server is back
        resumed = ModelExtractor(reasoner_for(server), cache_dir=str(tmp_path), batch_size=2)
        assert resumed.extract(questions, responses) == ["1"] * 4
        assert resumed.stats == {"requests": 2, "cache_hits": 2, "failures": 0}  # the first batch is not asked again
        assert sent(server) == [resumed.render("Q", r) for r in responses[2:]]


# ------------------------------------------------------------------------ rules first


def test_grade_with_extraction_asks_the_model_only_for_unreadable_rows():
    responses = [
        "So the missing number is \\boxed{14}.",
        BAR_R,
        SQUIRREL_R,
        "I cannot tell from the picture.",
        "Tom is older than Anna by five point seven years.",
    ]
    answers = ["14", "1", "decrease", "3", "5"]
    choices = [None, None, SQUIRREL_CHOICES, None, None]
    questions = ["Which number is missing?", BAR_Q, SQUIRREL_Q, "How many cats?", "Age gap? (Unit: years)"]
    kwargs = [{}, {}, {}, {}, {"answer_type": "integer", "unit": "years"}]
    server_replies = {"smallest bar": "1", "squirrels": "B", "cannot tell": "null", "five point seven": "5.7 years"}
    assert (
        grade_with_extraction(responses, answers, choices, questions, kwargs)
        == [Grade(True, "14")] + [Grade(False, None)] * 4
    )  # without a model: only the marked answer is read
    with ServerProcess(replies=json.dumps(server_replies)) as server:
        extractor = ModelExtractor(reasoner_for(server))
        grades = grade_with_extraction(responses, answers, choices, questions, kwargs, extractor)
        asked = sent(server)
    assert grades == [
        Grade(True, "14"),  # the rules read it: never asked
        Grade(True, "1"),
        Grade(True, "B"),  # the option letter the model read, graded against the gold option text
        Grade(False, None),  # the model read no answer either
        Grade(True, "5.7"),  # MathVista's integer rule on the model's answer: int(5.7) == 5, unit removed
    ]
    assert len(asked) == 4 and not any("boxed{14}" in text for text in asked)
    assert extractor.stats == {"requests": 4, "cache_hits": 0, "failures": 1}
    # the grading keywords reach the regrade: without answer_type, "5.7 years" is not 5
    with ServerProcess(replies=json.dumps(server_replies)) as server:
        (grade,) = grade_with_extraction(
            responses[4:], ["5"], [None], questions[4:], None, ModelExtractor(reasoner_for(server))
        )
    assert grade == Grade(False, "5.7 years")
    with pytest.raises(ValueError, match="choices has 1 rows for 5 responses"):
        grade_with_extraction(responses, answers, [None], questions, kwargs, extractor)


# ------------------------------------------------------------------- HF plumbing, config


def test_hf_reasoner_plumbing_on_the_tiny_model():
    reasoner = HFReasoner("tiny:qwen2", dtype="float32", max_batch_size=2)
    sampling = Sampling(temperature=0.0, max_new_tokens=6)
    extractor = ModelExtractor(reasoner, sampling=sampling, batch_size=2)
    extractor.setup(torch.device("cpu"))
    questions, responses = [BAR_Q, SQUIRREL_Q, "Which number is missing?"], [BAR_R, SQUIRREL_R, "It is 14."]
    found = extractor.extract(questions, responses)
    direct = reasoner.generate(
        [[{"role": "user", "content": extractor.render(q, r)}] for q, r in zip(questions, responses, strict=True)],
        sampling,
    )
    assert found == [read_extraction(output) for output in direct]  # the rendered prompt, greedy, read alike
    assert extractor.stats == {"requests": 3, "cache_hits": 0, "failures": found.count(None)}
    assert extractor.extract(questions, responses) == found
    assert extractor.stats["requests"] == 3 + found.count(None)  # answers are cached, failures asked again


def test_an_eval_config_names_the_extractor():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--extractor", type=ModelExtractor)
    config = {
        "class_path": "vlrl.rewards.ModelExtractor",
        "init_args": {
            "reasoner": {
                "class_path": "vlrl.rewards.OpenAIReasoner",
                "init_args": {"base_url": "http://localhost:8000/v1", "model": "Qwen/Qwen2.5-7B-Instruct"},
            },
            "prompt": "mathverse",
            "cache_dir": "runs/eval/extraction",
            "sampling": {"temperature": 0.0, "max_new_tokens": 32},
        },
    }
    extractor = parser.instantiate_classes(parser.parse_object({"extractor": config})).extractor
    assert isinstance(extractor, ModelExtractor) and isinstance(extractor.reasoner, OpenAIReasoner)
    assert extractor.prompt == MATHVERSE_PROMPT and extractor.sampling.max_new_tokens == 32
