"""One logged generation: a place in the queue, the runner's events, and a log row finished however it ends.

A request is one model session: it wakes the box once, waits for a slot,
goes to the runner (which renders, tokenizes, checks the context and
generates in one pass), and its row is completed exactly once: done, refused,
cancelled (499: the client left), failed, or cut off by a runner crash or a
shutdown.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from appliance import metrics
from appliance.backends.base import BackendError, SamplingParams, Usage
from appliance.db import Database
from appliance.errors import APIError, InvalidRequest, ServiceUnavailable
from appliance.runner.supervisor import ModelRunner, RunnerCrashed
from appliance.runner import protocol as msg
from appliance.scheduler import Admission, Cancelled

POLL = 0.1  # seconds between checks for a client that left, while waiting for tokens
CANCEL_GRACE = 30  # seconds the runner gets to confirm a cancel before the request gives up on it


@dataclass
class Cancellation:
    """Why a generation should stop early: the client left, or the service is shutting down."""

    client_gone: Callable[[], bool]
    shutting_down: Callable[[], bool]

    def __call__(self) -> bool:
        return self.client_gone() or self.shutting_down()

    def status(self) -> tuple[int, str]:
        if self.shutting_down():
            return 503, "service shutting down"
        return 499, "client disconnected"


class GenerationFailed(APIError):
    """The engine failed or its runner died mid-request (our fault, so a 5xx)."""

    type = "server_error"


@dataclass
class Generation:
    runner: ModelRunner
    db: Database
    admission: Admission
    log_id: int
    started: float  # the request's arrival (perf_counter): time to first token includes the queue
    cancel: Cancellation
    client: str
    priority: str | None
    limits: tuple[int | None, int | None] = (None, None)  # the client's own requests and tokens per minute
    text: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    ttft_ms: float | None = None
    finished: bool = False
    _first: float | None = None
    _stream = None
    _ticket = None
    _using = False

    def __post_init__(self):
        self._observe = metrics.generation_observer()  # built now: a stream finishes outside its request

    # -- start: everything that can still become a plain HTTP error ---------------
    def start(self, messages: list[dict] | None, prompt: str | None, params: SamplingParams) -> None:
        """Queue, wake, load and submit; raises an APIError (the caller's error handler answers it)."""
        try:
            self._ticket = self.admission.admit(self.client, self.priority, self.limits)
            self._using = True
            self.runner.begin_use()
            self._ticket.wait(self.cancel)
            if self.cancel():  # the client left while the box woke: drop it before its prefill
                raise Cancelled()
            self.runner.ensure_loaded()
            self._stream = self.runner.submit(messages, prompt, params)
            self._admitted(self._stream.get())
        except Cancelled:
            status, reason = self.cancel.status()
            self._release()
            raise ServiceUnavailable(f"request cancelled while queued: {reason}", code="cancelled", status=status) from None
        except BackendError as exc:
            self._release()
            name = self.runner.name
            raise ServiceUnavailable(f"model {name!r} failed to load: {exc}", code="model_load_failed") from None
        except BaseException:
            self._release()
            raise

    def _admitted(self, event) -> None:
        if isinstance(event, msg.Refused):
            raise InvalidRequest(event.message, param=event.param, code=event.code)
        if isinstance(event, RunnerCrashed):
            raise ServiceUnavailable(event.message, code="runner_crashed")
        if isinstance(event, msg.Failed):
            raise GenerationFailed(event.message, code="generation_failed", status=500)
        self.usage.prompt_tokens, self.usage.cached_tokens = event.prompt_tokens, event.cached_tokens

    # -- the tokens ----------------------------------------------------------
    def outputs(self) -> Iterator[msg.Output]:
        """The runner's text for this request; raises GenerationFailed if the engine or its runner fails."""
        cancel_sent = None
        while True:
            try:
                event = self._stream.get(timeout=POLL)
            except queue.Empty:
                if cancel_sent is not None and time.monotonic() - cancel_sent > CANCEL_GRACE:
                    self.finish_reason = "cancelled"
                    return
                cancel_sent = cancel_sent or self._cancel_if_gone()
                continue
            if isinstance(event, (msg.Failed, RunnerCrashed)):
                raise _failure(event)
            self._record(event)
            yield event
            if event.finish_reason:
                return
            cancel_sent = cancel_sent or self._cancel_if_gone()

    def _cancel_if_gone(self) -> float | None:
        """Ask the runner to stop this request if its client left or the service stops; when it was asked."""
        if not self.cancel():
            return None
        self.runner.cancel(self._stream)
        return time.monotonic()

    def _record(self, output: msg.Output) -> None:
        if self._first is None:
            self._first = time.perf_counter()
            self.ttft_ms = (self._first - self.started) * 1000
        self.text.append(output.text)
        self.usage.completion_tokens = output.completion_tokens
        if output.finish_reason:
            self.finish_reason = output.finish_reason

    def run_to_end(self) -> None:
        """Consume the whole generation (non-streamed requests), finishing the row however it ends."""
        try:
            for _ in self.outputs():
                pass
        except GenerationFailed as exc:
            self.finish(exc.status, exc.message)
            raise
        if self.finish_reason == "cancelled":
            status, reason = self.cancel.status()
            self.finish(status, reason)
            raise ServiceUnavailable(f"generation cancelled: {reason}", code="cancelled", status=status)
        self.finish(200)

    # -- the end -------------------------------------------------------------
    def finish(self, status: int, error: str | None = None) -> None:
        """Complete the log row, free the slot and the power manager's count; only the first call counts."""
        if self.finished:
            return
        self.finished = True
        if self._stream is not None and self.finish_reason is None:
            self.runner.cancel(self._stream)  # the client left mid-way: free the slot at the next step
            self.finish_reason = "cancelled"
        self._release()
        end = time.perf_counter()
        tokens_per_s = None
        if self._first is not None and self.usage.completion_tokens > 1 and end > self._first:
            # Decode speed: the first token's time belongs to prefill (time to first token).
            tokens_per_s = (self.usage.completion_tokens - 1) / (end - self._first)
        self.db.finish_request(
            self.log_id, status=status, error=error, response=self.response_text, finish_reason=self.finish_reason,
            prompt_tokens=self.usage.prompt_tokens, completion_tokens=self.usage.completion_tokens,
            ttft_ms=self.ttft_ms, total_ms=(end - self.started) * 1000, tokens_per_s=tokens_per_s,
        )
        self._observe(status=status, model=self.runner.name, seconds=end - self.started,
                      ttft_s=None if self.ttft_ms is None else self.ttft_ms / 1000,
                      prompt_tokens=self.usage.prompt_tokens, completion_tokens=self.usage.completion_tokens,
                      tokens_per_s=tokens_per_s)

    def _release(self) -> None:
        if self._ticket is not None:
            self._ticket.release(self.usage.completion_tokens)
        if self._using:
            self._using = False
            self.runner.end_use()

    @property
    def response_text(self) -> str:
        return "".join(self.text)


def _failure(event: msg.Failed | RunnerCrashed) -> GenerationFailed:
    if isinstance(event, RunnerCrashed):  # retrying may well work: a new runner is starting
        return GenerationFailed(event.message, code="runner_crashed", status=503)
    return GenerationFailed(event.message, code="generation_failed", status=500)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_json(usage: Usage) -> dict:
    out = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
           "total_tokens": usage.total_tokens}
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return out


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode("utf-8")
