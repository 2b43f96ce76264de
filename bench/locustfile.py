"""Locust users for the appliance: streaming chat clients with keys, priority classes, short and long prompts.

Locust lives in a venv of its own, never in the service's (it is not one of the service's dependencies):

    python3 -m venv .venv-locust && .venv-locust/bin/pip install locust==2.47.0
    .venv-locust/bin/locust -f bench/locustfile.py --headless -u 200 -r 20 -t 60s --host http://127.0.0.1:8080

``python -m bench.locust_load`` starts a fresh service, runs this file at several user counts and records the report.

Each user streams chat completions (``"stream": true`` with ``stream_options.include_usage``) and reads each stream
to ``data: [DONE]``. What it reports to Locust's statistics, by name:

- ``chat``: the request; a success is a stream read to ``[DONE]``, its response time is until the response's
  headers, its "content size" the completion tokens (the service's ``usage.completion_tokens``, else the content
  deltas counted);
- ``chat short`` and ``chat long``: the served streams again, their response time the whole stream;
- ``ttft``: time from sending the request to the first content token (also ``ttft <class>`` per priority class);
- ``rejected (429)``: the service said "not now" (queue deadline or queue full) with a ``Retry-After``; not a
  failure of the box: the user waits that long before its next task, as a well-behaved client does
  (``retry-after <class>`` keeps the waits asked, in ms);
- failures: any other status, an error event in the stream, a stream cut before ``[DONE]``, a connection error;
- ``healthz`` and ``readyz``: one background loop per Locust process polls each every 0.5 s (not a user).

Environment:

- ``LOCUST_API_KEYS``: comma-separated keys; each user takes one (round robin) as ``Authorization: Bearer``;
- ``LOCUST_PRIORITY_MIX``: weights of the ``X-Priority`` classes (default ``interactive=3,default=5,batch=2``);
- ``LOCUST_LONG_SHARE``: the share of long prompts (default 0.2);
- ``LOCUST_SHORT_TOKENS``, ``LOCUST_LONG_TOKENS``: ``max_tokens`` of a short and a long prompt's chat (16, 64);
- ``LOCUST_HEALTH_INTERVAL``: seconds between two health polls (default 0.5; 0: none).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time

import gevent
from locust import HttpUser, between, events, task
from locust.clients import HttpSession

SHORT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
    "What is 12 times 12?",
    "Suggest a name for a cat.",
    "What colour is the sky on a clear day?",
]
SHORT_TOKENS = int(os.environ.get("LOCUST_SHORT_TOKENS", "16"))
LONG_TOKENS = int(os.environ.get("LOCUST_LONG_TOKENS", "64"))
# A long prompt: a document to summarize, about 600 tokens, different in its first line every time (no prefix reuse).
DOCUMENT = " ".join([
    "The lighthouse stood on a rock a mile from the shore, and its keeper rowed out every evening to light the lamp.",
    "In winter the sea rose over the rock and the keeper stayed for weeks, reading by the light of the great lens.",
    "Ships passing in the night saw the beam sweep the water every ten seconds and knew where the reef lay.",
    "One year a storm broke the lens, and the keeper kept a fire burning on the gallery until the new one came.",
    "The village paid him in bread, fish and oil, and the children brought him letters from the mainland.",
] * 5)
LONG_ASKS = ["Summarize this story in three sentences.", "List the main events of this story.",
             "What does the keeper do in winter? Answer from the story.", "Write a title for this story."]

KEYS = [k.strip() for k in os.environ.get("LOCUST_API_KEYS", "").split(",") if k.strip()]
_next_key = itertools.count()


def priority_mix(text: str) -> tuple[list[str], list[float]]:
    """``interactive=3,default=5,batch=2`` -> the class names and their weights."""
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    return [name.strip() for name, _ in pairs], [float(weight) for _, weight in pairs]


CLASSES, WEIGHTS = priority_mix(os.environ.get("LOCUST_PRIORITY_MIX", "interactive=3,default=5,batch=2"))
LONG_SHARE = float(os.environ.get("LOCUST_LONG_SHARE", "0.2"))
HEALTH_INTERVAL = float(os.environ.get("LOCUST_HEALTH_INTERVAL", "0.5"))


def chat_body(long: bool, tag: str) -> dict:
    if long:
        text = f"Story {tag}.\n\n{DOCUMENT}\n\n{random.choice(LONG_ASKS)}"
    else:
        text = f"({tag}) {random.choice(SHORT_PROMPTS)}"
    return {"messages": [{"role": "user", "content": text}], "max_tokens": LONG_TOKENS if long else SHORT_TOKENS,
            "stream": True, "stream_options": {"include_usage": True}}


def retry_after(response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


class ChatUser(HttpUser):
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.headers = {"Content-Type": "application/json"}
        if KEYS:
            self.headers["Authorization"] = f"Bearer {KEYS[next(_next_key) % len(KEYS)]}"
        self.sent = 0

    @task
    def stream_chat(self) -> None:
        long = random.random() < LONG_SHARE
        cls = random.choices(CLASSES, WEIGHTS)[0]
        self.sent += 1
        body = chat_body(long, f"{id(self):x}-{self.sent}")
        fire = self.environment.events.request.fire
        start = time.perf_counter()
        wait = None
        # catch_response: this task decides what counts as a success. "chat" times the response's headers.
        with self.client.post("/v1/chat/completions", data=json.dumps(body), headers=self.headers | {"X-Priority": cls},
                              stream=True, catch_response=True, name="chat") as response:
            if response.status_code == 429:
                wait = retry_after(response)
                response.success()
                # Reported apart from "chat": a rejection, not a failure of the box.
                response.request_meta["name"] = "rejected (429)"
                response.request_meta["response_length"] = 0
            elif response.status_code != 200:
                cause = getattr(response, "error", None)  # status 0: the connection failed
                response.failure(f"HTTP {response.status_code}: {cause or response.text[:200]}")
                return
            else:
                error = self.read_stream(response)
                if error:
                    response.failure(error)
                    return
                response.request_meta["response_length"] = self.tokens
                response.success()
        if wait is not None:
            # Its Retry-After, as a "response time" in ms, to read the waits the service asked for.
            fire(request_type="WAIT", name=f"retry-after {cls}", response_time=wait * 1000, response_length=0,
                 exception=None, context={})
            gevent.sleep(wait)  # honour it before this user's next task
            return
        ttft = (self.first - start) * 1000
        for name in ("ttft", f"ttft {cls}"):
            fire(request_type="SSE", name=name, response_time=ttft, response_length=0, exception=None, context={})
        fire(request_type="SSE", name=f"chat {'long' if long else 'short'}", response_time=(time.perf_counter() - start) * 1000,
             response_length=self.tokens, exception=None, context={})

    def read_stream(self, response) -> str | None:
        """Read the SSE stream to [DONE]: self.first (when the first content token came), self.tokens; an error or None."""
        self.first, self.tokens = None, 0
        usage, deltas, done = 0, 0, False
        try:
            for raw in response.iter_lines():
                line = raw.decode() if isinstance(raw, bytes) else raw
                if line == "data: [DONE]":
                    done = True
                    break
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return f"error event after {deltas} deltas: {str(event['error'])[:200]}"
                if event.get("usage"):
                    usage = event["usage"].get("completion_tokens") or usage
                choice = event["choices"][0] if event.get("choices") else {}
                if (choice.get("delta") or {}).get("content"):
                    deltas += 1
                    if self.first is None:
                        self.first = time.perf_counter()
        except Exception as exc:  # a connection cut mid-stream
            return f"stream broken after {deltas} deltas: {type(exc).__name__}: {str(exc)[:150]}"
        if not done:
            return f"stream ended without [DONE] after {deltas} deltas"
        if self.first is None:
            return "no content token"
        self.tokens = usage or deltas
        return None


def poll(environment, path: str, offset: float) -> None:
    """GET path every HEALTH_INTERVAL s, its latency reported under its name; a session of its own."""
    session = HttpSession(base_url=environment.host, request_event=environment.events.request, user=None)
    gevent.sleep(offset)
    while True:
        began = time.monotonic()
        try:
            session.get(path, name=path.strip("/"), timeout=30)
        except Exception:  # reported by the session as a failure
            pass
        gevent.sleep(max(0.0, HEALTH_INTERVAL - (time.monotonic() - began)))


_pollers: list = []


@events.test_start.add_listener
def start_pollers(environment, **_kwargs) -> None:
    if HEALTH_INTERVAL > 0 and environment.host and not _pollers:
        _pollers.extend(gevent.spawn(poll, environment, path, offset)
                        for path, offset in (("/healthz", 0.0), ("/readyz", HEALTH_INTERVAL / 2)))


@events.test_stop.add_listener
def stop_pollers(**_kwargs) -> None:
    gevent.killall(_pollers)
    _pollers.clear()
