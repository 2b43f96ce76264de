"""Admission in front of the runner's slots: a priority queue admitted by deadline, with aging, and token buckets.

A request first passes its client's token buckets (requests per minute,
generated tokens per minute), then joins the queue of its priority class if
the box expects to start it within that class's deadline (its ``timeout``):
the expected wait is the queue ahead of it divided by the measured
throughput (slots over the recent time a request holds one). When it
cannot, it gets 429 with a Retry-After of the honest estimate of when it
could, so a client that honours it gets in on its next try. ``queue_size``
stays as a hard bound on memory. The runner has ``slots`` sequences;
whenever one is free the waiting request with the highest priority runs,
FIFO within a class. Waiting raises a request's priority by one class every
``aging`` seconds, so batch work is never starved. A request that still
waits past its class's timeout gets a clear 503.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

from appliance.config import DEFAULT_CLASS, DEFAULT_CLASSES, PriorityClass
from appliance.errors import APIError, InvalidRequest


HOLDS_KEPT = 64  # recent slot holding times the throughput is measured over
WAIT_CHECK = 1.0  # seconds between a queued request's own looks at its client, its deadline and its turn


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, code: str, retry_after: float):
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after + 0.999))


class QueueTimeout(APIError):
    status = 503
    type = "server_error"

    def __init__(self, message: str):
        super().__init__(message, code="queue_timeout")


class Cancelled(Exception):
    """The client left or the service is stopping while the request waited."""


class TokenBucket:
    def __init__(self, per_minute: float, clock: Callable[[], float]):
        self.rate, self.capacity, self.clock = per_minute / 60.0, float(per_minute), clock
        self.level, self.stamp = self.capacity, clock()

    def refill(self) -> float:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.level

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.refill()) / self.rate)


class Ticket:
    """One request's place: waiting, then holding a slot until released."""

    def __init__(self, admission: Admission, cls: PriorityClass, client: str, seq: int,
                 limits: tuple[int | None, int | None] = (None, None), size: int = 1):
        self.admission, self.cls, self.client, self.seq = admission, cls, client, seq
        self.size = size  # slots it holds at once: a request's n choices
        self.limits = limits  # the client's own buckets, should they be rebuilt before it is released
        self.arrived = admission.clock()
        self.started: float | None = None  # when it got its slot
        self.turn = threading.Condition(admission.lock)  # notified when it may be its turn
        self.running = False
        self.done = False

    def effective_priority(self, now: float) -> float:
        return self.cls.priority + (now - self.arrived) / self.admission.aging

    def wait(self, cancelled: Callable[[], bool]) -> None:
        """Block until this request may run; raises QueueTimeout or Cancelled."""
        self.admission._wait(self, cancelled)

    def release(self, completion_tokens: int = 0) -> None:
        self.admission._release(self, completion_tokens)


class ClientBuckets:
    """Each client's token buckets (requests and generated tokens per minute), shared by every model's queue."""

    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0, clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm, self.clock = requests_per_minute, tokens_per_minute, clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def _pair(self, client: str, limits: tuple[int | None, int | None]) -> tuple[TokenBucket | None, TokenBucket | None]:
        if client not in self._buckets:
            if len(self._buckets) > 10_000:  # forget clients whose buckets are full again
                self._buckets = {k: v for k, v in self._buckets.items() if not _all_full(v)}
            rpm = self.rpm if limits[0] is None else limits[0]
            tpm = self.tpm if limits[1] is None else limits[1]
            self._buckets[client] = (TokenBucket(rpm, self.clock) if rpm else None,
                                     TokenBucket(tpm, self.clock) if tpm else None)
        return self._buckets[client]

    def check(self, client: str, limits: tuple[int | None, int | None]) -> None:
        """Raise 429 when the client has no request or token left this minute."""
        with self._lock:
            requests, tokens = self._pair(client, limits)
            if requests is not None and requests.refill() < 1:
                raise TooManyRequests(f"rate limit: {requests.capacity:.0f} requests per minute per client",
                                      code="rate_limit_requests", retry_after=requests.seconds_until(1))
            if tokens is not None and tokens.refill() <= 0:
                raise TooManyRequests(f"rate limit: {tokens.capacity:.0f} generated tokens per minute per client",
                                      code="rate_limit_tokens", retry_after=tokens.seconds_until(1))

    def take_request(self, client: str, limits: tuple[int | None, int | None], count: int = 1) -> None:
        with self._lock:
            requests, _ = self._pair(client, limits)
            if requests is not None:
                requests.level -= count

    def spend_tokens(self, client: str, limits: tuple[int | None, int | None], count: int) -> None:
        with self._lock:
            _, tokens = self._pair(client, limits)
            if tokens is not None:
                tokens.refill()
                tokens.level -= count


class Admission:
    """One model's queue in front of its runner's slots; ``buckets`` may be shared with other models' queues."""

    def __init__(self, slots: int, queue_size: int, classes: list[dict] | tuple = DEFAULT_CLASSES, aging: float = 30.0,
                 requests_per_minute: int = 0, tokens_per_minute: int = 0, clock: Callable[[], float] = time.monotonic,
                 buckets: ClientBuckets | None = None):
        self.slots, self.queue_size, self.aging, self.clock = slots, queue_size, aging, clock
        self.classes = {c["name"]: PriorityClass(**c) for c in classes}
        self.buckets = buckets or ClientBuckets(requests_per_minute, tokens_per_minute, clock)
        self.lock = threading.Lock()  # the queue's; each waiting ticket has a condition on it
        self._cond = threading.Condition(self.lock)
        self._waiting: list[Ticket] = []
        self._running = 0
        self._per_class: dict[str, int] = {name: 0 for name in self.classes}
        self._seq = itertools.count()
        self._waits = deque(maxlen=1000)  # seconds each recent request waited for its slot
        self._holds = deque(maxlen=HOLDS_KEPT)  # seconds each recent request held its slot

    # -- admission -----------------------------------------------------------
    def admit(self, client: str, class_name: str | None, limits: tuple[int | None, int | None] = (None, None),
              size: int = 1) -> Ticket:
        """``limits``: the client's own (requests, tokens) per minute, e.g. its key's; None: the service's. ``size``:
        the slots it needs at once (n choices), each counted as a request in the client's bucket."""
        cls = self._class(class_name)
        if size > self.slots:
            raise InvalidRequest(f"n={size} needs {size} slots at once; this model has {self.slots} (its parallel "
                                 "setting): send a smaller n, or several requests", param="n", code="invalid_value")
        with self._cond:
            self.buckets.check(client, limits)
            if len(self._waiting) >= self.queue_size and self._running >= self.slots:
                # When the queue ahead will have started: one free place would go to one of the many
                # clients told to come back, so a shorter wait only brings them back to a full queue.
                raise TooManyRequests(f"the queue is full ({self.queue_size} requests waiting for "
                                      f"{self.slots} slots); retry after the time given in Retry-After",
                                      code="queue_full", retry_after=self.expected_wait(cls))
            if cls.max_concurrency and self._per_class[cls.name] >= cls.max_concurrency:
                raise TooManyRequests(f"priority class {cls.name!r} already has its {cls.max_concurrency} requests "
                                      "in flight; retry later", code="class_busy", retry_after=self._seconds_per_start())
            self._check_deadline(cls)
            self.buckets.take_request(client, limits, size)
            self._per_class[cls.name] += 1
            ticket = Ticket(self, cls, client, next(self._seq), limits, size)
            self._waiting.append(ticket)
            return ticket

    def _class(self, name: str | None) -> PriorityClass:
        name = name or DEFAULT_CLASS
        if name not in self.classes:
            raise InvalidRequest(f"unknown priority class {name!r}: use one of {', '.join(self.classes)}",
                                 param="priority", code="invalid_value")
        return self.classes[name]

    # -- the expected wait ---------------------------------------------------------------
    def _seconds_per_start(self) -> float:
        """Seconds between two requests getting a slot, at the throughput measured lately; 0 before any."""
        if not self._holds:
            return 0.0
        return statistics.median(self._holds) / self.slots

    def expected_wait(self, cls: PriorityClass) -> float:
        """Seconds a request of ``cls`` arriving now would wait for its slot: the queue ahead of it at the
        measured throughput (waiting requests of its priority or higher; lower ones it overtakes)."""
        ahead = sum(t.cls.priority >= cls.priority for t in self._waiting)
        starts_needed = ahead + 1 - max(0, self.slots - self._running)
        return max(0, starts_needed) * self._seconds_per_start()

    def _check_deadline(self, cls: PriorityClass) -> None:
        wait = self.expected_wait(cls)
        if cls.timeout and wait > cls.timeout:
            raise TooManyRequests(
                f"the box expects to start this request in {wait:.0f} s, past the {cls.timeout:.0f} s deadline of "
                f"priority class {cls.name!r}; retry after the time given in Retry-After", code="queue_deadline",
                retry_after=wait - cls.timeout)

    # -- waiting -----------------------------------------------------------
    def _wait(self, ticket: Ticket, cancelled: Callable[[], bool]) -> None:
        with self._cond:
            while not self._my_turn(ticket):
                waited = self.clock() - ticket.arrived
                if cancelled():
                    self._leave(ticket)
                    raise Cancelled()
                if ticket.cls.timeout and waited >= ticket.cls.timeout:
                    self._leave(ticket)
                    raise QueueTimeout(f"waited {waited:.0f} s for a free slot, the timeout of priority class "
                                       f"{ticket.cls.name!r}; the box is busy, retry later")
                # Woken when it may be its turn (_wake_next); the timeout re-checks cancellation and the deadline.
                ticket.turn.wait(WAIT_CHECK)
            self._waiting.remove(ticket)
            self._running += ticket.size
            ticket.running = True
            ticket.started = self.clock()
            self._waits.append(ticket.started - ticket.arrived)
            self._wake_next()

    def _my_turn(self, ticket: Ticket) -> bool:
        if self._running + ticket.size > self.slots:
            return False
        now = self.clock()
        best = max(self._waiting, key=lambda t: (t.effective_priority(now), -t.seq))
        return best is ticket

    def _leave(self, ticket: Ticket) -> None:
        self._waiting.remove(ticket)
        self._per_class[ticket.cls.name] -= 1
        ticket.done = True
        self._wake_next()

    def _wake_next(self) -> None:
        """Wake only the waiting request whose turn it now is: hundreds waking to scan the queue cost the HTTP
        threads (and health checks) the GIL under load."""
        if self._waiting and self._running < self.slots:
            now = self.clock()
            max(self._waiting, key=lambda t: (t.effective_priority(now), -t.seq)).turn.notify()

    def _release(self, ticket: Ticket, completion_tokens: int) -> None:
        with self._cond:
            if ticket.done:
                return
            ticket.done = True
            if ticket.running:
                self._running -= ticket.size
                self._holds.append(self.clock() - ticket.started)
            else:
                self._waiting.remove(ticket)
            self._per_class[ticket.cls.name] -= 1
            self.buckets.spend_tokens(ticket.client, ticket.limits, completion_tokens)
            self._wake_next()

    def stats(self) -> dict:
        with self._cond:
            waits = sorted(self._waits)
            return {
                "slots": self.slots,
                "busy_slots": self._running,
                "queue_depth": len(self._waiting),
                "queue_size": self.queue_size,
                "queued_by_class": {name: sum(t.cls.name == name for t in self._waiting) for name in self.classes},
                "wait_ms_p50": round(waits[len(waits) // 2] * 1000, 1) if waits else None,
                "wait_ms_p99": round(waits[int(len(waits) * 0.99)] * 1000, 1) if waits else None,
                "expected_wait_s": {name: round(self.expected_wait(cls), 2) for name, cls in self.classes.items()},
            }


def _all_full(buckets) -> bool:
    return all(b is None or b.refill() >= b.capacity for b in buckets)
