"""A small OpenAI-compatible chat-completions server for tests: real HTTP on loopback, canned answers.

It is a real HTTP server (``http.server``, one thread per request) that an ``OpenAIReasoner`` talks
to over a real socket; only what it answers is scripted. Run it as a process::

    python tests/openai_server.py --actions '["slow:2", "status:500", "ok"]' --answer red

It prints ``PORT <n>`` once it listens on 127.0.0.1. Each ``POST /v1/chat/completions`` takes the
next action of ``--actions`` (once they are used up, ``ok``):

    ok           200 with a chat completion whose content ends in \\boxed{<word>} (see below)
    slow:<s>     wait s seconds, then as ``ok``
    truncated    as ``ok``, with finish_reason "length"
    status:<c>   HTTP status c with a JSON error body
    malformed    200 with a body that is not JSON
    hangup       close the connection without answering

The boxed word: the text after ``ANSWER=`` in the last user message if there is one; else, with
``--parity EVEN,ODD``, EVEN when that message has an even number of characters and ODD otherwise;
else ``--answer``. ``GET /log`` returns every request received (body, Authorization header, action)
and the most requests that were in flight at once.

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


class State:
    """What the server was told to do and what it has seen, shared by the request threads."""

    def __init__(self, actions: list[str], answer: str, parity: tuple[str, str] | None) -> None:
        self.actions = list(actions)
        self.answer = answer
        self.parity = parity
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def begin(self, body: Any, authorization: str | None) -> str:
        with self.lock:
            action = self.actions[len(self.requests)] if len(self.requests) < len(self.actions) else "ok"
            self.requests.append({"body": body, "authorization": authorization, "action": action})
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


def completion(body: dict[str, Any], content: str, finish_reason: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": len(content.split()), "total_tokens": 1},
    }


class Handler(BaseHTTPRequestHandler):
    state: State  # set on the class by main()

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
        if self.path != "/log":
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        with self.state.lock:
            self.send_json(200, {"requests": self.state.requests, "max_in_flight": self.state.max_in_flight})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        action = self.state.begin(body, self.headers.get("Authorization"))
        try:
            self.act(action, body)
        finally:
            self.state.end()

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
            content = f"<think>From the caption.</think> The answer is \\boxed{{{self.state.word(body)}}}."
            self.send_json(200, completion(body, content, "length" if kind == "truncated" else "stop"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", default="[]", help="JSON list of per-request actions")
    parser.add_argument("--answer", default="none", help="boxed word when no other rule applies")
    parser.add_argument("--parity", default=None, help="EVEN,ODD: boxed word by the user message's length parity")
    args = parser.parse_args(argv)
    parity = tuple(args.parity.split(",")) if args.parity else None
    Handler.state = State(json.loads(args.actions), args.answer, parity)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


class ServerProcess:
    """Runs this script in a subprocess: ``with ServerProcess(actions=[...]) as server: server.base_url``."""

    def __init__(self, actions: list[str] | None = None, answer: str = "none", parity: str | None = None) -> None:
        self.args = ["--actions", json.dumps(actions or []), "--answer", answer]
        if parity:
            self.args += ["--parity", parity]
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
