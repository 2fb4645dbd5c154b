"""A small OpenAI-compatible /v1/chat/completions server on 127.0.0.1, for tests and benchmarks.

It answers in a background thread (stdlib ThreadingHTTPServer, one thread per connection) with a reply
derived from the prompt, so callers can check results:
- with a `response_format`: the JSON object {"echo": <prompt>, "n_chars": len(prompt)},
- without: the text "echo: <prompt>",
where <prompt> is the text of the first user message (a repair turn keeps it, so it counts for the same
prompt). Knobs: a fixed latency, a scripted list of actions per prompt (FAULTS), an expected API key
(401 otherwise), `hold_after(n)` to stall every request after the n-th until `release()`, and
`json_reply`, a function prompt -> object whose JSON replaces the echo object (to answer a schema), and
`text_reply`, a function prompt -> str that replaces the "echo: <prompt>" text (e.g. a Yes/No judge).
It counts requests per prompt, the most requests in flight at once, and records Authorization headers.

    with FakeLLMServer(latency_s=0.01) as server:
        server.script("hello", "429", "truncated")  # 1st request: 429, 2nd: cut-off JSON, then normal
        ... LLMConfig(base_url=server.base_url, ...)

`python -m synthvlm.llm.fake_server --latency 0.2` serves until interrupted (for benchmarks run
in a separate process).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from synthvlm.testing.loopback import LoopbackServer

# Scripted actions for one request:
#   ok            normal reply
#   429           HTTP 429 with Retry-After: <retry_after_s>
#   500           HTTP 500, no Retry-After (the client backs off on its own)
#   hang          sleep <hang_s> (past the client timeout) before replying
#   truncated     half of the JSON reply, finish_reason "length"
#   invalid_json  a reply that is not JSON, finish_reason "stop"
#   wrong_schema  valid JSON without the expected fields
#   empty_choices HTTP 200 with "choices": [] (a malformed answer some proxies and servers send)
#   no_message    HTTP 200 whose only choice has no "message"
FAULTS = (
    "ok",
    "429",
    "500",
    "hang",
    "truncated",
    "invalid_json",
    "wrong_schema",
    "empty_choices",
    "no_message",
)


class FakeLLMServer(LoopbackServer):
    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        hang_s: float = 1.0,
        retry_after_s: float = 0.05,
        api_key: str | None = None,
        json_reply: Callable[[str], Any] | None = None,
        text_reply: Callable[[str], str] | None = None,
    ):
        super().__init__()
        self.latency_s = latency_s
        self.json_reply = json_reply
        self.text_reply = text_reply
        self.hang_s = hang_s
        self.retry_after_s = retry_after_s
        self.api_key = api_key
        self.requests_by_prompt: Counter[str] = Counter()
        self.arrivals: defaultdict[str, list[float]] = defaultdict(list)  # time.monotonic() per request
        self.authorization_headers: list[str | None] = []
        self.bodies: list[dict[str, Any]] = []  # request JSON bodies, in arrival order
        self.total_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._scripts: defaultdict[str, deque[str]] = defaultdict(deque)
        self._hold_after: int | None = None
        self._released = threading.Event()
        self._lock = threading.Lock()

    # ---- control ------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def _bind(self, port: int) -> ThreadingHTTPServer:
        return _Server(("127.0.0.1", port), _Handler)

    def stop(self) -> None:
        self.release()  # stalled handlers answer, so shutdown does not wait on them
        super().stop()

    def script(self, prompt: str, *actions: str) -> None:
        """The next requests for `prompt` get these actions in order; later ones are answered normally."""
        unknown = [a for a in actions if a not in FAULTS]
        if unknown:
            raise ValueError(f"unknown actions {unknown}; allowed: {FAULTS}")
        with self._lock:
            self._scripts[prompt].extend(actions)

    def clear_scripts(self) -> None:
        with self._lock:
            self._scripts.clear()

    def hold_after(self, n: int) -> None:
        """Answer the first `n` requests (counted from server start), stall the rest until release()."""
        self._released.clear()
        self._hold_after = n

    def release(self) -> None:
        self._hold_after = None
        self._released.set()

    # ---- request handling (handler threads) -----------------------------------------------------------

    def _admit(self, prompt: str, authorization: str | None, body: dict[str, Any]) -> tuple[str, int]:
        with self._lock:
            self.total_requests += 1
            self.bodies.append(body)
            self.requests_by_prompt[prompt] += 1
            self.arrivals[prompt].append(time.monotonic())
            self.authorization_headers.append(authorization)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            queue = self._scripts.get(prompt)
            action = queue.popleft() if queue else "ok"
            return action, self.total_requests

    def _finish(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _wait_if_held(self, number: int) -> None:
        limit = self._hold_after
        if limit is not None and number > limit:
            self._released.wait()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # stalled handlers must not keep the process alive
    # socketserver's default listen backlog is 5: a burst of new connections would see dropped SYNs
    # (retransmitted after 1 s, i.e. connect timeouts). Real servers use a far larger backlog.
    request_queue_size = 1024
    fake: FakeLLMServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed between requests (the SIGKILL tests) resets its keep-alive connection: that is
        # the client's doing, not a server error worth a traceback on stderr.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read their own logs
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        expected = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(expected)
        if len(raw) < expected:
            # The client died mid-request (e.g. SIGKILL after the headers): a real server never
            # processes such a request, so it is not counted as asked.
            self.close_connection = True
            return
        body = json.loads(raw or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        authorization = self.headers.get("Authorization")
        prompt = _first_user_text(body.get("messages", []))
        action, number = fake._admit(prompt, authorization, body)
        try:
            fake._wait_if_held(number)
            if fake.api_key is not None and authorization != f"Bearer {fake.api_key}":
                self._send_json(
                    401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}}
                )
                return
            self._respond(fake, action, prompt, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before we answered
        finally:
            fake._finish()

    def _respond(self, fake: FakeLLMServer, action: str, prompt: str, body: dict[str, Any]) -> None:
        if action == "429":
            error = {"error": {"message": "rate limited", "type": "rate_limit_error"}}
            self._send_json(429, error, headers={"Retry-After": str(fake.retry_after_s)})
            return
        if action == "500":
            self._send_json(500, {"error": {"message": "internal error", "type": "server_error"}})
            return
        time.sleep(fake.hang_s if action == "hang" else fake.latency_s)
        content, finish_reason = _reply(
            action, prompt, "response_format" in body, fake.json_reply, fake.text_reply
        )
        payload = _completion(body, content, finish_reason)
        if action == "empty_choices":
            payload["choices"] = []
        elif action == "no_message":
            del payload["choices"][0]["message"]
        self._send_json(200, payload)

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _first_user_text(messages: list[dict[str, Any]]) -> str:
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


def _reply(
    action: str,
    prompt: str,
    json_wanted: bool,
    json_reply: Callable[[str], Any] | None = None,
    text_reply: Callable[[str], str] | None = None,
) -> tuple[str, str]:
    if action == "invalid_json":
        return "Sure! Here is the answer: {echo: " + prompt, "stop"
    if action == "wrong_schema":
        return json.dumps({"unexpected": prompt}), "stop"
    if json_wanted:
        reply = json_reply(prompt) if json_reply else {"echo": prompt, "n_chars": len(prompt)}
        text = json.dumps(reply)
    else:
        text = text_reply(prompt) if text_reply else f"echo: {prompt}"
    if action == "truncated":
        return text[: max(1, len(text) // 2)], "length"
    return text, "stop"


def _completion(body: dict[str, Any], content: str, finish_reason: str) -> dict[str, Any]:
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion_tokens = len(content.split())
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    args = parser.parse_args(argv)
    server = FakeLLMServer(latency_s=args.latency).start(port=args.port)
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
