"""A local HTTP server speaking Anthropic's Messages API, for driving the real `anthropic` client.

    with FakeAnthropic() as server:        # http://127.0.0.1:<free port>
        server.script("429", "529", "500", "malformed", "duplicates")
        ... ANTHROPIC_BASE_URL=server.url ...
        server.requests, server.max_in_flight

`POST /v1/messages` answers with numbered questions, as many as the prompt asks for (the number
before the word "questions"), in rotating formats: a JSON array, a numbered list, a fenced JSON
array, a bulleted list. Every question is new (a server-wide counter), except in "duplicates"
replies. Each request takes `delay_s`, so requests in flight at once can be counted; a pair
(low, high) draws each request's latency uniformly from it, as a real API's varies.

`deterministic=True` makes every reply a function of its prompt alone (the n-th question of a
prompt is always the same), so two runs that send the same prompts get the same questions in
whatever order their requests arrive. With it, `reply_size=(8, 2)` makes every reply 8 questions,
however many were asked, the last 2 of them repeats of its first (case changed): a generator of
more than 6 then needs rounds of requests, one after another, as with an LLM that writes fewer
than it is asked.

`judge`, if given, answers the prompts of `bgit eval`'s judge (those asking for "one integer"): it
takes the prompt and returns the reply's text.

Scripted behaviours, consumed one per request in order (then normal replies again):
    "429"         rate limited, with a `retry-after` header
    "529"         overloaded_error
    "500"         api_error
    "malformed"   a 200 reply whose text holds no questions
    "not_json"    a 200 reply whose body is cut off mid-JSON
    "duplicates"  a 200 reply repeating questions (case and spacing changed), half of them new
`fail_from(n)` answers 500 to every request after the first n, until `recover()`.
`refuse(text)` answers 400 (not retried) to every prompt containing `text`, until `recover()`.
`hold(text, until)` keeps every request whose prompt contains `text` waiting until `until()` is
true (at most `timeout_s`), then answers it; `released[text]` says whether `until()` came true.
`api_key`, if given, is the only key accepted: any other gets 401 authentication_error.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_TYPES = {429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
COUNT = re.compile(r"(\d+) (?:\w+ ){0,3}questions")


class FakeAnthropic:
    def __init__(self, delay_s: float | tuple[float, float] = 0.2, retry_after: str = "1",
                 judge: Callable[[str], str] | None = None, deterministic: bool = False,
                 api_key: str | None = None, reply_size: tuple[int, int] | None = None):
        self.delay_s = delay_s
        self.reply_size = reply_size
        self.api_key = api_key
        self.deterministic = deterministic
        self.judge = judge
        self.retry_after = retry_after
        self.requests = 0  # every POST, failed ones included
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[str] = []
        self.bodies: list[dict] = []  # the request bodies as sent
        self.last_api_key: str | None = None
        self._script: list[str] = []
        self._fail_from: int | None = None
        self._refused: str | None = None
        self._holds: dict[str, tuple[Callable[[], bool], float]] = {}
        self.released: dict[str, bool] = {}
        self._questions_made = 0
        self._recent: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def script(self, *behaviours: str) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def fail_from(self, count: int) -> None:
        """Answer 500 to every request after the first `count` (counted from now on)."""
        with self._lock:
            self._fail_from = self.requests + count

    def refuse(self, text: str) -> None:
        """Answer 400 invalid_request_error to every prompt that contains `text`."""
        with self._lock:
            self._refused = text

    def hold(self, text: str, until: Callable[[], bool], timeout_s: float = 120) -> None:
        with self._lock:
            self._holds[text] = (until, timeout_s)

    def _wait_for_holds(self, prompt: str) -> None:
        for text, (until, timeout_s) in list(self._holds.items()):
            if text in prompt:
                deadline = time.monotonic() + timeout_s
                while not until() and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.released[text] = until()

    def recover(self) -> None:
        with self._lock:
            self._fail_from = None
            self._refused = None

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = self.max_in_flight = 0
            self.prompts.clear()
            self.bodies.clear()

    # --- the replies ---
    def _behaviour(self) -> str:
        """What to do with the request just counted (call under the lock)."""
        if self._fail_from is not None and self.requests > self._fail_from:
            return "500"
        return self._script.pop(0) if self._script else "normal"

    def _questions(self, count: int, behaviour: str) -> list[str]:
        """`count` questions (call under the lock). In "duplicates" replies half are repeats of
        earlier replies' questions or of this one's, with case and spacing changed."""
        repeated = count // 2 if behaviour == "duplicates" else 0
        fresh = []
        for _ in range(count - repeated):
            self._questions_made += 1
            fresh.append(f"Question {self._questions_made}: what happens when topic {self._questions_made} meets a pirate?")
        pool = self._recent[: repeated // 2] + fresh
        repeats = [q.upper() if i % 2 else q.replace(" ", "  ") for i, q in enumerate(pool[:repeated])]
        self._recent = (fresh + self._recent)[:100]
        return fresh + repeats

    def _reply_text(self, prompt: str, behaviour: str) -> str:
        if behaviour == "malformed":
            return "I am sorry, but I would rather talk about the weather today."
        if self.judge and "one integer" in prompt:
            return self.judge(prompt)
        match = COUNT.search(prompt)
        count = int(match.group(1)) if match else 5
        if self.deterministic:
            digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
            size, repeats = self.reply_size or (count, 0)
            fresh = [f"Question {digest}-{i}: what would a pirate say about topic {i}?" for i in range(size - repeats)]
            return json.dumps(fresh + [question.upper() for question in fresh[:repeats]])
        with self._lock:
            questions = self._questions(count, behaviour)
            style = self._questions_made % 4
        if style == 0:
            return json.dumps(questions)
        if style == 1:
            return "Here are your questions:\n\n" + "\n".join(f"{i + 1}. {q}" for i, q in enumerate(questions))
        if style == 2:
            return "```json\n" + json.dumps(questions, indent=2) + "\n```"
        return "\n".join(f"- {q}" for q in questions)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.requests += 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    bearer = self.headers.get("authorization", "").removeprefix("Bearer ")
                    key = fake.last_api_key = self.headers.get("x-api-key") or bearer or None
                    behaviour = fake._behaviour()
                try:
                    delay = fake.delay_s
                    time.sleep(random.uniform(*delay) if isinstance(delay, tuple) else delay)
                    if self.path != "/v1/messages":
                        self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
                        return
                    prompt = "".join(
                        part["text"] if isinstance(part, dict) else part
                        for message in request.get("messages", [])
                        for part in ([message["content"]] if isinstance(message["content"], str) else message["content"])
                    )
                    with fake._lock:
                        fake.prompts.append(prompt)
                        fake.bodies.append(request)
                    fake._wait_for_holds(prompt)
                    if fake.api_key is not None and key != fake.api_key:
                        error = {"type": "authentication_error", "message": "invalid x-api-key"}
                        self._send(401, {"type": "error", "error": error})
                        return
                    if fake._refused is not None and fake._refused in prompt:
                        error = {"type": "invalid_request_error", "message": "scripted refusal"}
                        self._send(400, {"type": "error", "error": error})
                        return
                    if behaviour in ("429", "500", "529"):
                        status = int(behaviour)
                        headers = {"retry-after": fake.retry_after} if status == 429 else None
                        error = {"type": ERROR_TYPES[status], "message": f"scripted {status}"}
                        self._send(status, {"type": "error", "error": error}, headers)
                        return
                    if behaviour == "not_json":
                        self.send_response(200)
                        self.send_header("content-type", "application/json")
                        self.send_header("content-length", "24")
                        self.end_headers()
                        self.wfile.write(b'{"id": "msg_cut", "type"')
                        return
                    text = fake._reply_text(prompt, behaviour)
                    self._send(200, {
                        "id": f"msg_fake_{fake.requests}",
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "text", "text": text}],
                        "model": request.get("model", "claude-fake"),
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": len(prompt.split()), "output_tokens": len(text.split())},
                    })
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

        return Handler
