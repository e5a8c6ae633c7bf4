"""Served reasoners as real servers behave: outages, context limits, reasoning models, n answers per request.

Every test talks HTTP to ``tests/openai_server.py`` (a real loopback server, answers scripted): it goes
down for a while (HTTP 503 and dropped connections alternately) or for good, lists its model with
``max_model_len`` and refuses over-long requests with vLLM's HTTP 400, answers as a reasoning model
whose chat template opened ``<think>`` or whose reasoning parser returns ``reasoning_content``.

The chat templates of QwQ-32B and DeepSeek-R1-Distill-Qwen are the real ones (the ``chat_template`` of
``Qwen/QwQ-32B`` and ``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B`` on the Hugging Face hub, as published in
their ``tokenizer_config.json``), applied to the tiny offline tokenizer.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from tests.openai_server import ServerProcess
from vlrl.errors import AllRanksError
from vlrl.models.tiny import resolve_model_path
from vlrl.rewards import CaptionReward, OpenAIReasoner, ReasonerError, ReasonerUnavailable, RewardUnavailable
from vlrl.rewards.reasoners import agreed, think_prefix, thinks, whole_trajectory
from vlrl.rollout import Sampling

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
GREEDY = Sampling(temperature=0.0, max_new_tokens=8)
WHOLE = "<think>\nFrom the caption.\n</think>\n\nThe answer is \\boxed{red}."

# Qwen/QwQ-32B, tokenizer_config.json "chat_template" (the tools branch included, as published).
QWQ_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- '' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}'
    '{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    '{%- elif message.role == "assistant" and not message.tool_calls %}'
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    '{%- elif message.role == "assistant" %}'
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{{- '<|im_start|>' + message.role }}{%- if message.content %}{{- '\\n' + content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    '{%- elif message.role == "tool" %}'
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}{{- '<|im_start|>user' }}"
    "{%- endif %}{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

# deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, tokenizer_config.json "chat_template".
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


def ask(word: str, padding: str = "") -> list[dict]:
    return [{"role": "user", "content": f"Say it.{padding} ANSWER={word}"}]


def reasoner_for(server: ServerProcess, **kwargs) -> OpenAIReasoner:
    kwargs = {"backoff_s": 0.05, "max_backoff_s": 0.2, "timeout_s": 5.0, "api_key_env": None, **kwargs}
    return OpenAIReasoner(server.base_url, "test-model", **kwargs)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """The tiny tokenizer saved three times: with its own (Qwen2.5) template, QwQ's and R1-Distill's."""
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for name, template in (("qwen", None), ("qwq", QWQ_TEMPLATE), ("r1", R1_DISTILL_TEMPLATE)):
        tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny:qwen2"))
        if template is not None:
            tok.chat_template = template
            tok.bos_token = "<|endoftext|>"
        folders[name] = root / name
        tok.save_pretrained(folders[name])
    return folders


# ------------------------------------------------------------------------------ outages


def test_a_server_down_for_a_while_is_waited_for_within_the_budget():
    """Down from the 2nd request for 1.5 s (503, dropped connection, ...): every prompt gets its answer."""
    with ServerProcess(outage="1:1.5") as server:
        start = time.monotonic()
        outputs = reasoner_for(server, outage_budget_s=20).generate([ask(w) for w in ("a", "b", "c")], GREEDY)
        elapsed = time.monotonic() - start
        actions = [r["action"] for r in server.log()["requests"]]
    assert all(o.text.endswith(f"\\boxed{{{w}}}.") for o, w in zip(outputs, "abc", strict=True))
    assert actions[0] == "ok" and {"status:503", "hangup"} <= set(actions) and actions[-1] == "ok"
    assert 1.4 < elapsed < 10  # it waited the outage out, no longer


def test_a_server_down_past_the_budget_ends_in_a_clear_error_that_stops_the_step():
    with ServerProcess(outage="0:inf") as server:
        start = time.monotonic()
        with pytest.raises(ReasonerUnavailable) as caught:
            reasoner_for(server, outage_budget_s=1.0).generate([ask("a"), ask("b")], GREEDY)
        elapsed = time.monotonic() - start
        assert len(server.log()["requests"]) > 4  # retried with backoff until the budget ran out
    message = str(caught.value)
    assert f"{server.base_url}/chat/completions: no answer after" in message
    assert "outage_budget_s=1" in message and "raise outage_budget_s" in message
    assert isinstance(caught.value, RewardUnavailable)  # the reward runner re-raises it instead of scoring 0
    assert 1.0 <= elapsed < 3


def test_requests_in_flight_are_abandoned_so_the_process_exits_at_once(tmp_path):
    """One request hangs for 60 s, another fails: the error comes at once and the process exits within seconds."""
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from vlrl.rewards import OpenAIReasoner, ReasonerError
            from vlrl.rollout import Sampling

            reasoner = OpenAIReasoner(sys.argv[1], "m", api_key_env=None, timeout_s=600, max_concurrency=2)
            prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(2)]
            try:
                reasoner.generate(prompts, Sampling(max_new_tokens=4))
            except ReasonerError as error:
                print("RAISED", error, flush=True)
                sys.exit(3)
            """
        )
    )
    with ServerProcess(actions=["slow:60", "status:400"]) as server:
        process = subprocess.Popen(
            [sys.executable, str(script), server.base_url], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        line = process.stdout.readline()
        raised = time.monotonic()
        code = process.wait(timeout=50)
        exited = time.monotonic()
        process.stdout.close()
    assert line.startswith("RAISED") and "HTTP 400" in line
    assert code == 3
    assert (
        exited - raised < 30
    )  # interpreter teardown only (slow on a loaded machine), not the 60 s of the hung request


def test_every_rank_stops_when_one_ranks_reasoner_gives_up(tmp_path):
    """Two gloo ranks: rank 1's reasoner fails, rank 0's succeeds; both raise ReasonerStopped (an AllRanksError, so
    the exception handler may save collectively) at the same step."""
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_agree_on_rank, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
    assert results[1] == "ReasonerStopped: ReasonerUnavailable: down (AllRanksError)"
    assert results[0] == (
        "ReasonerStopped: the reasoner of another rank gave up (its error is in that rank's log): every rank stops "
        "(AllRanksError)"
    )


def _agree_on_rank(rank: int, world: int, store: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)

    def call() -> str:
        if rank == 1:
            raise ReasonerUnavailable("down")
        return "answers"

    try:
        agreed(call, torch.device("cpu"))
        results[rank] = "no error"
    except ReasonerError as error:
        kind = " (AllRanksError)" if isinstance(error, AllRanksError) else ""
        results[rank] = f"{type(error).__name__}: {error}{kind}"
    assert agreed(lambda: "fine", torch.device("cpu")) == "fine"  # the next step, all well: no error anywhere
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------ context


@pytest.fixture(scope="module")
def counted(tokenizers):
    """A server with a 64-token context that counts prompts with the tiny tokenizer and refuses what overflows."""
    with ServerProcess(model="test-model", max_model_len=64, tokenizer=tokenizers["qwen"]) as server:
        yield server


def test_requests_are_fitted_to_the_context_and_never_refused(counted, tokenizers):
    tok = AutoTokenizer.from_pretrained(tokenizers["qwen"])

    def tokens(messages):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    short, medium, long = ask("a"), ask("b", " pad" * 10), ask("c", " pad" * 15)
    assert tokens(short) + 8 <= 64 < tokens(medium) + 8 and tokens(medium) < 64 <= tokens(long)
    reasoner = reasoner_for(counted, tokenizer=str(tokenizers["qwen"]))
    reasoner.setup(torch.device("cpu"))
    assert reasoner.max_model_len == 64  # from GET /v1/models
    outputs = reasoner.generate([short, medium, long], GREEDY)
    requests = sorted(counted.log()["requests"], key=lambda r: r["body"]["messages"][0]["content"])
    assert len(requests) == 2  # the long prompt is never sent
    assert [r["body"]["max_tokens"] for r in requests] == [8, 64 - tokens(medium)]
    assert [r["prompt_tokens"] for r in requests] == [tokens(short), tokens(medium)]
    assert [r["action"] for r in requests] == ["ok", "ok"]
    assert [o.shortened for o in outputs] == [False, True, True]
    assert (outputs[2].text, outputs[2].finish_reason, outputs[2].num_tokens) == ("", "length", 0)


def test_without_a_tokenizer_an_over_long_request_fails_clearly(counted):
    with pytest.raises(ReasonerError, match=r"HTTP 400: .*maximum context length is 64.*set tokenizer: test-model"):
        reasoner_for(counted).generate([ask("b", " pad" * 10)], GREEDY)


def test_the_context_is_checked_before_the_first_step(counted, tokenizers, caplog):
    reasoner = reasoner_for(counted, tokenizer=str(tokenizers["qwen"]))
    reward = CaptionReward(reasoner, system_prompt=None, sampling=Sampling(max_new_tokens=16))
    fixed = reasoner_for(counted, tokenizer=str(tokenizers["qwen"]))
    fixed.setup(torch.device("cpu"))
    prompt = fixed.prompt_tokens(reward.build_prompts([""], [""], [None])[0])
    reward.setup(torch.device("cpu"), caption_tokens=64 - prompt - 16)  # exactly fits: no warning
    assert not [r for r in caplog.records if "shortened" in r.getMessage()]
    reward.setup(torch.device("cpu"), caption_tokens=64 - prompt - 15)  # one token short: answers shortened
    assert [r for r in caplog.records if f"= {64 + 1} (plus the question)" in r.getMessage()]
    with pytest.raises(ValueError, match=r"max_model_len=64 .* holds no answer.*--max-model-len 80 or more"):
        reward.setup(torch.device("cpu"), caption_tokens=64 - prompt)


def test_setup_names_the_served_models_when_the_model_is_not_among_them(counted):
    reasoner = OpenAIReasoner(counted.base_url, "other-model", api_key_env=None)
    with pytest.raises(ValueError, match=r"model='other-model' is not served at .*it serves \['test-model'\]"):
        reasoner.setup(torch.device("cpu"))


# ------------------------------------------------------------------------ reasoning models


def test_the_real_reasoning_templates_open_think_themselves(tokenizers):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour?"}]
    rendered = {}
    for name, folder in tokenizers.items():
        tok = AutoTokenizer.from_pretrained(folder)
        rendered[name] = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered["qwq"].endswith("<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert rendered["r1"] == "<|endoftext|>Be brief.<｜User｜>What colour?<｜Assistant｜><think>\n"
    assert [think_prefix(rendered[n]) for n in ("qwen", "qwq", "r1")] == ["", "<think>\n", "<think>\n"]
    assert think_prefix("<think>a</think> done <|im_start|>assistant\n") == ""


@pytest.mark.parametrize("template", ["qwq", "r1"])
@pytest.mark.parametrize("style", ["open", "parsed"])
def test_reasoning_model_trajectories_are_whole(tokenizers, template, style):
    """The template opened <think> (content starts inside it) or the reasoning parser split it off: whole either way."""
    with ServerProcess(style=style) as server:
        with_template = reasoner_for(server, tokenizer=str(tokenizers[template])).generate([ask("red")], GREEDY)
        without = reasoner_for(server).generate([ask("red")], GREEDY)
    assert with_template[0].text == WHOLE and without[0].text == WHOLE
    assert thinks(WHOLE) and not thinks("The answer is \\boxed{red}.") and not thinks("From it.</think> red")


def test_whole_trajectory_by_hand():
    assert whole_trajectory("Count.\n</think>\n\n3", prefix="<think>\n") == "<think>\nCount.\n</think>\n\n3"
    assert whole_trajectory("\n\n3", reasoning="Count.\n") == "<think>\nCount.\n</think>\n\n3"
    assert whole_trajectory("", reasoning="Count and") == "<think>\nCount and"  # cut off while thinking
    assert whole_trajectory("Count.</think> 3") == "<think>\nCount.</think> 3"
    assert whole_trajectory("<think>x</think> 3", prefix="<think>\n") == "<think>x</think> 3"  # already whole
    assert whole_trajectory("Just 3.") == "Just 3."


# ------------------------------------------------------------------------- n per request


def test_k_answers_of_a_prompt_go_as_one_request_with_n():
    prompts = [ask("a")] * 3 + [ask("b")] + [ask("c")] * 2
    with ServerProcess() as server:
        outputs = reasoner_for(server).generate(prompts, GREEDY, seed=10)
        bodies = sorted((r["body"] for r in server.log()["requests"]), key=lambda b: b["seed"])
    assert [(b["n"], b["seed"]) for b in bodies] == [(3, 10), (1, 13), (2, 14)]  # seed + index of the first prompt
    assert [o.text[-3] for o in outputs] == ["a", "a", "a", "b", "c", "c"]
    assert [o.num_tokens for o in outputs] == [7] * 6  # usage sums the n answers (21 for n=3): shared out
    with ServerProcess() as server:
        reasoner_for(server, max_n=2).generate(prompts, GREEDY, seed=10)
        bodies = sorted((r["body"] for r in server.log()["requests"]), key=lambda b: b["seed"])
    assert [(b["n"], b["seed"]) for b in bodies] == [(2, 10), (1, 12), (1, 13), (2, 14)]
