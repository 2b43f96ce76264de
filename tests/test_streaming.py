"""The server truly streams, stops generating for a client that leaves, and loses no log row on shutdown."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import pytest
from tests.helpers import open_stream, read_event

pytestmark = pytest.mark.slow

LONG = {
    "messages": [{"role": "user", "content": "Write the numbers from 1 to 200, one per line."}],
    "max_tokens": 400,
    "temperature": 0,
    "stream": True,
}


def first_content_event(stream) -> float:
    while True:
        event = read_event(stream)
        if event["choices"] and event["choices"][0]["delta"].get("content"):
            return time.perf_counter()


def test_first_token_reaches_the_client_long_before_the_end(service):
    start = time.perf_counter()
    stream = open_stream(service.port, LONG)
    first = first_content_event(stream)
    # While we hold the first token, the server is still generating: its log row is open.
    assert service.last_row(wait_finished=False)["finished"] is None
    events = 1
    while read_event(stream) != "[DONE]":
        events += 1
    end = time.perf_counter()
    stream.close()
    row = service.last_row()
    assert row["completion_tokens"] >= 100, "the prompt should give a long answer"
    assert events >= 10  # many events, not one at the end (text is sent every stream_interval, 25 ms)
    assert first - start < (end - start) / 4, f"first token at {first - start:.2f}s of {end - start:.2f}s"


def test_client_disconnect_stops_the_generation(service):
    stream = open_stream(service.port, LONG)
    first_content_event(stream)
    stream.close()  # hang up mid-stream
    row = service.last_row(timeout=10)
    assert row["finished"] is not None, "the generation should end soon after the client leaves"
    assert row["status"] == 499
    assert row["error"] == "client disconnected"
    assert row["finish_reason"] == "cancelled"
    assert row["completion_tokens"] < LONG["max_tokens"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_mid_stream_keeps_every_row(fresh_service, sig):
    svc = fresh_service()
    stream = open_stream(svc.port, LONG)
    first_content_event(stream)
    assert svc.stop(sig, timeout=30) == 0, svc.output()
    rows = svc.rows()
    stream_row = rows[-1]
    assert stream_row["finished"] is not None
    assert stream_row["status"] in (499, 503)
    assert stream_row["finish_reason"] == "cancelled"
    assert stream_row["completion_tokens"] < LONG["max_tokens"]
    assert all(r["finished"] for r in rows)


def test_concurrent_requests_take_turns_and_all_succeed(service):
    results = []

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
        body = {"prompt": f"Number {i}:", "max_tokens": 8, "temperature": 0}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        results.append(conn.getresponse().status)
        conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 6
