"""A small OpenAI-compatible chat-completions server for tests: real HTTP on loopback, canned answers.

It is a real HTTP server (``http.server``, one thread per request) that an ``OpenAIReasoner`` talks
to over a real socket; only what it answers is scripted. Run it as a process::

    python tests/openai_server.py --actions '["slow:2", "status:500", "ok"]' --answer red

It prints ``PORT <n>`` once it listens on 127.0.0.1. Each ``POST /v1/chat/completions`` takes the
next action of ``--actions`` (once they are used up, ``ok``):

    ok           200 with a chat completion of ``n`` choices whose content ends in \\boxed{<word>}
    slow:<s>     wait s seconds, then as ``ok``
    truncated    as ``ok``, with finish_reason "length"
    status:<c>   HTTP status c with a JSON error body
    malformed    200 with a body that is not JSON
    hangup       close the connection without answering

The boxed word: the text after ``ANSWER=`` in the last user message if there is one; else, with
``--parity EVEN,ODD``, EVEN when that message has an even number of characters and ODD otherwise;
else ``--answer``. With ``--replies '{"SUBSTRING": "TEXT"}'``, an answer to a request whose last user
message contains SUBSTRING is TEXT exactly (no think block, no box; ``""``: an empty answer), as an
answer-extraction model replies. ``GET /log`` returns every request received (body, Authorization
header, action, arrival ``time.time()``, prompt tokens where counted) and the most requests that were
in flight at once.

Like a real server it can also (each off unless asked for):

- go down: ``--outage AFTER:SECONDS`` answers the first AFTER requests, then for SECONDS (``inf``:
  for good) answers every request alternately with HTTP 503 and a dropped connection, as a
  ``vllm serve`` that restarts does, then serves again;
- list its model: ``--model NAME [--max-model-len N]`` answers ``GET /v1/models`` as vLLM does
  (with ``max_model_len``); without ``--model`` that route is 404, as on servers that list none;
- refuse over-long requests: with ``--tokenizer DIR`` and ``--max-model-len N``, a request whose
  prompt (rendered with the tokenizer's chat template) + ``max_tokens`` exceeds N gets vLLM's
  HTTP 400;
- answer as a reasoning model (``--style``): ``plain`` (default) ``<think>From the caption.</think>
  The answer is \\boxed{w}.``; ``open``: the template opened ``<think>``, so the content starts
  inside it (``From the caption.\\n</think>\\n\\nThe answer is ...``); ``parsed``: vLLM's
  reasoning parser is on, the reasoning comes in ``reasoning_content`` and the content is the rest.

``ServerProcess`` starts the script as a subprocess for a test and stops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REASONING = "From the caption."
ANSWER = "The answer is \\boxed{{{}}}."


class State:
    """What the server was told to do and what it has seen, shared by the request threads."""

    def __init__(
        self,
        actions: list[str],
        answer: str,
        parity: tuple[str, str] | None,
        outage: tuple[int, float] | None = None,
        style: str = "plain",
        replies: dict[str, str] | None = None,
    ) -> None:
        self.actions = list(actions)
        self.replies = dict(replies or {})
        self.answer = answer
        self.parity = parity
        self.outage = outage
        self.style = style
        self.down_since: float | None = None
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def begin(self, body: Any, authorization: str | None, prompt_tokens: int | None) -> str:
        with self.lock:
            count = len(self.requests)
            action = self.actions[count] if count < len(self.actions) else "ok"
            if self.outage is not None and count >= self.outage[0]:
                self.down_since = self.down_since or time.monotonic()
                if time.monotonic() - self.down_since < self.outage[1]:
                    action = "status:503" if count % 2 == 0 else "hangup"
            entry = {"body": body, "authorization": authorization, "action": action, "time": time.time()}
            if prompt_tokens is not None:
                entry["prompt_tokens"] = prompt_tokens
            self.requests.append(entry)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return action

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def word(self, body: dict[str, Any]) -> str:
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        marker = re.search(r"ANSWER=(\S+)", user)
        if marker:
            return marker.group(1)
        if self.parity:
            return self.parity[len(user) % 2]
        return self.answer

    def reply(self, body: dict[str, Any]) -> str | None:
        """The ``--replies`` text for this request (the first substring found), None if none applies."""
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        return next((text for key, text in self.replies.items() if key in user), None)


def completion(
    body: dict[str, Any], word: str, finish_reason: str, style: str, content: str | None = None
) -> dict[str, Any]:
    """A chat completion with ``n`` equal choices; usage counts words as tokens, summed over the choices.

    ``content``: the whole answer text, as it is (instead of reasoning + the boxed word).
    """
    answer = ANSWER.format(word)
    if content is not None:
        message, words = {"role": "assistant", "content": content}, len(content.split())
    elif style == "parsed":
        message = {"role": "assistant", "reasoning_content": REASONING + "\n", "content": "\n\n" + answer}
        words = len(REASONING.split()) + len(answer.split())
    else:
        content = f"<think>{REASONING}</think> {answer}" if style == "plain" else f"{REASONING}\n</think>\n\n{answer}"
        message, words = {"role": "assistant", "content": content}, len(content.split())
    n = int(body.get("n") or 1)
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": i, "message": message, "finish_reason": finish_reason} for i in range(n)],
        "usage": {"prompt_tokens": 1, "completion_tokens": words * n, "total_tokens": 1},
    }


class Handler(BaseHTTPRequestHandler):
    state: State  # set on the class by main()
    model: str | None = None
    max_model_len: int | None = None
    tokenizer: Any = None

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read /log instead
        pass

    def send_json(self, status: int, payload: Any) -> None:
        self.send_raw(status, json.dumps(payload).encode())

    def send_raw(self, status: int, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. timed out) before the answer came

    def do_GET(self) -> None:
        if self.path == "/v1/models" and self.model is not None:
            entry = {"id": self.model, "object": "model", "owned_by": "vllm", "max_model_len": self.max_model_len}
            self.send_json(200, {"object": "list", "data": [entry]})
            return
        if self.path != "/log":
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        with self.state.lock:
            self.send_json(200, {"requests": self.state.requests, "max_in_flight": self.state.max_in_flight})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        prompt_tokens = self.count(body)
        action = self.state.begin(body, self.headers.get("Authorization"), prompt_tokens)
        try:
            if action == "ok" and prompt_tokens is not None and prompt_tokens + body["max_tokens"] > self.max_model_len:
                self.send_json(400, {"error": {"message": too_long(self.max_model_len, prompt_tokens, body)}})
            else:
                self.act(action, body)
        finally:
            self.state.end()

    def count(self, body: dict[str, Any]) -> int | None:
        """Prompt tokens of a request as vLLM counts them (with ``--tokenizer`` and ``--max-model-len``)."""
        if self.tokenizer is None or self.max_model_len is None:
            return None
        kwargs = body.get("chat_template_kwargs") or {}
        text = self.tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, tokenize=False, **kwargs
        )
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def act(self, action: str, body: dict[str, Any]) -> None:
        kind, _, arg = action.partition(":")
        if kind == "slow":
            time.sleep(float(arg))
        if kind == "hangup":
            self.close_connection = True
        elif kind == "malformed":
            self.send_raw(200, b'{"choices": [{"message": ')
        elif kind == "status":
            self.send_json(int(arg), {"error": {"message": f"scripted status {arg}"}})
        else:
            reason = "length" if kind == "truncated" else "stop"
            content = self.state.reply(body)
            self.send_json(200, completion(body, self.state.word(body), reason, self.state.style, content))


def too_long(max_model_len: int, prompt_tokens: int, body: dict[str, Any]) -> str:
    """vLLM's answer to a request longer than the context."""
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + body['max_tokens']} tokens ({prompt_tokens} in the messages, {body['max_tokens']} in the "
        "completion). Please reduce the length of the messages or completion."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", default="[]", help="JSON list of per-request actions")
    parser.add_argument("--answer", default="none", help="boxed word when no other rule applies")
    parser.add_argument("--parity", default=None, help="EVEN,ODD: boxed word by the user message's length parity")
    parser.add_argument("--outage", default=None, help="AFTER:SECONDS: down after AFTER requests, for SECONDS (inf)")
    parser.add_argument("--style", default="plain", choices=["plain", "open", "parsed"], help="how reasoning is sent")
    parser.add_argument("--replies", default="{}", help='JSON {"SUBSTRING": "TEXT"}: answer TEXT exactly')
    parser.add_argument("--model", default=None, help="the model GET /v1/models lists (none: 404)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context in tokens, in GET /v1/models")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir: refuse requests past --max-model-len")
    args = parser.parse_args(argv)
    parity = tuple(args.parity.split(",")) if args.parity else None
    after, _, seconds = (args.outage or "").partition(":")
    outage = (int(after), float(seconds)) if args.outage else None
    Handler.state = State(json.loads(args.actions), args.answer, parity, outage, args.style, json.loads(args.replies))
    Handler.model, Handler.max_model_len = args.model, args.max_model_len
    if args.tokenizer:
        from transformers import AutoTokenizer

        Handler.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


class ServerProcess:
    """Runs this script in a subprocess: ``with ServerProcess(actions=[...]) as server: server.base_url``.

    Further keywords are the script's options (``outage="4:2"``, ``style="open"``, ``model="m"``,
    ``max_model_len=64``, ``tokenizer=path``, ``replies=json.dumps({...})``).
    """

    def __init__(
        self, actions: list[str] | None = None, answer: str = "none", parity: str | None = None, **options: Any
    ) -> None:
        self.args = ["--actions", json.dumps(actions or []), "--answer", answer]
        if parity:
            self.args += ["--parity", parity]
        for name, value in options.items():
            self.args += [f"--{name.replace('_', '-')}", str(value)]
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(
            [sys.executable, __file__, *self.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"the test server did not start: {line!r} {self.process.stderr.read()}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stdout.close()
        self.process.stderr.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/log", timeout=10) as response:
            return json.loads(response.read())


if __name__ == "__main__":
    main()
