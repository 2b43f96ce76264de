"""One generation: a place in the queue, a slot in the runner, and the runner's events as they come.

A generation is one model session: it wakes the box once, waits for a slot,
goes to the runner (which renders, tokenizes, checks the context and
generates in one pass) and records what comes back. Its request
(``appliance.request.LoggedRequest``) owns the log row and ends it; ``stop``
frees the slot and the power manager's count however the generation ends.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.admission import Admission, Cancelled
from appliance.backends.base import BackendError, SamplingParams, Usage
from appliance.errors import GenerationFailed, InvalidRequest, ServiceUnavailable, hide_paths
from appliance.request import Cancellation
from appliance.runner import protocol as msg
from appliance.runner.supervisor import ModelRunner, RunnerCrashed

POLL = 0.1  # seconds between checks for a client that left, while waiting for tokens
CANCEL_GRACE = 30  # seconds the runner gets to confirm a cancel before the request gives up on it


@dataclass
class Choice:
    """One of a generation's answers (a request with n > 1 has n, sharing its prompt)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[msg.Logprob] = field(default_factory=list)  # one per token, when the request asked
    finish_reason: str | None = None
    tokens: int = 0

    @property
    def response_text(self) -> str:
        return "".join(self.text)


@dataclass
class Generation:
    runner: ModelRunner
    admission: Admission
    started: float  # the request's arrival (perf_counter): time to first token includes the queue
    cancel: Cancellation
    client: str
    priority: str | None
    limits: tuple[int | None, int | None] = (None, None)  # the client's own requests and tokens per minute
    load: Callable[[], object] | None = None  # brings the model in (the pool's makes room first); None: the runner's
    choices: list[Choice] = field(default_factory=lambda: [Choice()])
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None  # set when every choice has finished (or the generation was cancelled)
    ttft_ms: float | None = None
    _first: float | None = None
    _ended: float | None = None
    _stream = None
    _ticket = None
    priority_class: str | None = None  # the class it was admitted in (None: never admitted)
    _using = False

    # -- start: everything that can still become a plain HTTP error ---------------
    def start(self, messages: list[dict] | None, prompt: str | None, params: SamplingParams,
              tools: list[dict] | None = None) -> None:
        """Queue, wake, load and submit; raises an APIError (the caller's error handler answers it)."""
        n = getattr(params, "n", 1)
        self.choices = [Choice() for _ in range(n)]
        try:
            self._ticket = self.admission.admit(self.client, self.priority, self.limits, size=n)
            self.priority_class = self._ticket.cls.name
            self._using = True
            self.runner.begin_use()
            self._ticket.wait(self.cancel)
            if self.cancel():  # the client left while the box woke: drop it before its prefill
                raise Cancelled()
            (self.load or self.runner.ensure_loaded)()
            self._stream = self.runner.submit(messages, prompt, params, tools)
            self._admitted(self._stream.get())
        except Cancelled:
            status, reason = self.cancel.status()
            self._release()
            raise ServiceUnavailable(f"request cancelled while queued: {reason}", code="cancelled", status=status) from None
        except BackendError as exc:
            self._release()
            name = self.runner.name
            raise ServiceUnavailable(f"model {name!r} failed to load: {hide_paths(str(exc))} (GET /api/status, for "
                                     "admins, has the whole reason)", code="model_load_failed") from None
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
            if self.finish_reason:
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
        choice = self.choices[output.index]
        choice.text.append(output.text)
        choice.logprobs += output.logprobs
        choice.tokens = output.completion_tokens
        choice.finish_reason = output.finish_reason or choice.finish_reason
        self.usage.completion_tokens = sum(c.tokens for c in self.choices)
        if all(c.finish_reason for c in self.choices):
            self.finish_reason = self.choices[0].finish_reason

    def run_to_end(self) -> None:
        """Consume the whole generation (non-streamed requests); a cancelled one raises with the cancel's status."""
        for _ in self.outputs():
            pass
        if self.cancelled:
            status, reason = self.cancel.status()
            raise ServiceUnavailable(f"generation cancelled: {reason}", code="cancelled", status=status)

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == "cancelled"

    @property
    def interrupted(self) -> bool:
        """It did not end by itself: cancelled, or still running (its client left mid-way)."""
        return self.finish_reason in (None, "cancelled")

    # -- the end -------------------------------------------------------------
    def stop(self) -> None:
        """Free the slot and the power manager's count; a generation still running is cancelled (its client left)."""
        if self._ended is not None:
            return
        self._ended = time.perf_counter()
        if self._stream is not None and self.finish_reason is None:
            self.runner.cancel(self._stream)  # the client left mid-way: free the slot at the next step
            self.finish_reason = "cancelled"
        self._release()

    def row_fields(self) -> dict:
        """What the log row records of this generation (after ``stop``)."""
        return {"response": self.response_text, "finish_reason": self.finish_reason,
                "prompt_tokens": self.usage.prompt_tokens, "completion_tokens": self.usage.completion_tokens,
                "ttft_ms": self.ttft_ms, "tokens_per_s": self.tokens_per_s,
                "priority": self.priority_class}

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: the first token's time belongs to prefill (time to first token)."""
        if self._first is None or self._ended is None or self.usage.completion_tokens <= 1 or self._ended <= self._first:
            return None
        return (self.usage.completion_tokens - 1) / (self._ended - self._first)

    def _release(self) -> None:
        if self._ticket is not None:
            self._ticket.release(self.usage.completion_tokens)
            self._ticket = None
        if self._using:
            self._using = False
            self.runner.end_use()

    @property
    def response_text(self) -> str:
        """What the log keeps: the answer, or with n > 1 the answers as a JSON list."""
        if len(self.choices) == 1:
            return self.choices[0].response_text
        return json.dumps([c.response_text for c in self.choices], ensure_ascii=False)


def _failure(event: msg.Failed | RunnerCrashed) -> GenerationFailed:
    if isinstance(event, RunnerCrashed):  # retrying may well work: a new runner is starting
        return GenerationFailed(event.message, code="runner_crashed", status=503)
    return GenerationFailed(event.message, code="generation_failed", status=500)
