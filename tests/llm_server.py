"""A local, scriptable OpenAI-compatible chat server for tests (POST /v1/chat/completions).

It speaks the real wire protocol, so the real `openai` client runs against it. Behaviours are queued
(`server.enqueue(RateLimited(1.0), ServerError(500))`) and consumed one per request, in arrival order;
when the queue is empty every request gets `Answer(server.answer)`. Every request is recorded.

Besides transport failures it answers the way real models go wrong: `Refusal` (the API's `refusal`
field, or `as_text` a refusal in prose), `Truncated` (cut off at max_tokens, finish_reason "length"),
and, as content for `Answer`, `in_prose(...)`, `fenced(...)`, `REFUSAL_TEXT`, a label that restates the
prompt or scores out of range (any string).

    with FakeLLMServer(answer=lambda messages: '{"label": "x"}') as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k")
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Answer:
    """Reply 200 with a chat completion of `content` (a string, or a function of the messages)."""

    content: str | Callable[[Messages], str]
    finish_reason: str = "stop"


REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class Refusal:
    """Reply 200 with a refusal: the `refusal` field and no content (`as_text`: the refusal as content)."""

    message: str = REFUSAL_TEXT
    as_text: bool = False


@dataclass(frozen=True)
class Truncated:
    """Reply 200 with the first `keep` characters of the answer (default: half) and finish_reason
    "length", as a model that hit max_tokens."""

    content: str | Callable[[Messages], str] | None = None  # None: the server's answer
    keep: int | None = None


def in_prose(answer: str) -> str:
    """The answer wrapped in chatty prose, as models often reply."""
    return f"Sure! Having looked at the examples, here is my answer:\n{answer}\nLet me know if you need more."


def fenced(answer: str) -> str:
    """The answer in a Markdown code fence."""
    return f"```json\n{answer}\n```"


@dataclass(frozen=True)
class RateLimited:
    """Reply 429 with a `Retry-After` header (seconds)."""

    retry_after: float = 1.0


@dataclass(frozen=True)
class ServerError:
    """Reply with an error status (500, 502, 503, 400, 401, ...) and an OpenAI-style error body."""

    status: int = 500
    message: str = "internal error"


@dataclass(frozen=True)
class Delay:
    """Wait `seconds` before answering (longer than the client timeout makes the client time out)."""

    seconds: float
    then: Answer | None = None


@dataclass(frozen=True)
class Malformed:
    """Reply 200 with a body that is not valid JSON."""

    body: bytes = b'{"id": "chatcmpl-broken", "choices": [ this is not json'


Behaviour = Answer | RateLimited | ServerError | Delay | Malformed | Refusal | Truncated


@dataclass
class RecordedRequest:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]
    raw_body: bytes
    body: Any
    received_at: float = field(default_factory=time.monotonic)

    @property
    def messages(self) -> Messages:
        return list(self.body.get("messages", [])) if isinstance(self.body, dict) else []


def _completion(
    content: str | None, model: str, finish_reason: str = "stop", refusal: str | None = None
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class FakeLLMServer:
    """OpenAI-compatible chat server on 127.0.0.1 (random port) running in a daemon thread."""

    def __init__(
        self, answer: str | Callable[[Messages], str] = '{"label": "test", "description": "A test."}'
    ):
        self.answer = answer
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-llm", daemon=True)

    @property
    def base_url(self) -> str:
        """The `base_url` to give an OpenAI client (ends in /v1)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def enqueue(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        with self._lock:
            self._queue.extend(behaviours)

    def start(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next(self) -> Behaviour:
        with self._lock:
            return self._queue.popleft() if self._queue else Answer(self.answer)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                record = RecordedRequest(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, raw, body
                )
                server._record(record)
                try:
                    self._respond(record)
                finally:
                    server._done()

            def _respond(self, record: RecordedRequest) -> None:
                if record.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, json.dumps({"error": {"message": f"no route {record.path}"}}).encode())
                    return
                behaviour = server._next()
                if isinstance(behaviour, Delay):
                    time.sleep(behaviour.seconds)
                    behaviour = behaviour.then or Answer(server.answer)
                if isinstance(behaviour, RateLimited):
                    error = {"error": {"message": "rate limited", "type": "rate_limit_error"}}
                    self._send(429, json.dumps(error).encode(), {"Retry-After": f"{behaviour.retry_after:g}"})
                elif isinstance(behaviour, ServerError):
                    error = {"error": {"message": behaviour.message, "type": "server_error"}}
                    self._send(behaviour.status, json.dumps(error).encode())
                elif isinstance(behaviour, Malformed):
                    self._send(200, behaviour.body)
                else:
                    model = record.body.get("model", "fake") if isinstance(record.body, dict) else "fake"
                    self._send(200, json.dumps(self._completion(behaviour, record.messages, model)).encode())

            def _completion(self, behaviour: Behaviour, messages: Messages, model: str) -> dict[str, Any]:
                def text_of(content: str | Callable[[Messages], str] | None) -> str:
                    content = server.answer if content is None else content
                    return content(messages) if callable(content) else content

                if isinstance(behaviour, Refusal):
                    if behaviour.as_text:
                        return _completion(behaviour.message, model)
                    return _completion(None, model, refusal=behaviour.message)
                if isinstance(behaviour, Truncated):
                    text = text_of(behaviour.content)
                    keep = len(text) // 2 if behaviour.keep is None else behaviour.keep
                    return _completion(text[:keep], model, finish_reason="length")
                assert isinstance(behaviour, Answer)
                return _completion(text_of(behaviour.content), model, finish_reason=behaviour.finish_reason)

        return Handler
