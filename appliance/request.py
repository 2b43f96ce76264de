"""One logged request, from its arrival to the end of its row: inserted once, finished exactly once.

Every state-changing request (an HTTP POST, a turn of ``appliance chat``) is a
``LoggedRequest``. It inserts its row on arrival, learns what was asked
(``describe``), may carry a generation, and finishes the row once however the
request ends: answered, refused, failed, cancelled because the client left
(499) or because the service stops (503). ``outcome`` is the one place that
decides that final status; the HTTP layer, the SSE stream and the CLI only
call ``finish``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.db import Database
from appliance.errors import APIError, GenerationFailed


@dataclass
class Cancellation:
    """Why a request should stop early: its client left, or the service is shutting down."""

    client_gone: Callable[[], bool]
    shutting_down: Callable[[], bool]
    left: str = "client disconnected"  # the reason recorded when the client left

    def __call__(self) -> bool:
        return self.client_gone() or self.shutting_down()

    def status(self) -> tuple[int, str]:
        if self.shutting_down():
            return 503, "service shutting down"
        return 499, self.left


NEVER = Cancellation(client_gone=lambda: False, shutting_down=lambda: False)


class LoggedRequest:
    """A request's row and how it ends. ``observers`` hear of the end (the metrics), once, after the row is written."""

    def __init__(self, db: Database, endpoint: str, client: str | None, key_id: str | None = None,
                 role: str | None = None, cancel: Cancellation = NEVER,
                 observers: tuple[Callable[[LoggedRequest], None], ...] = (), **row):
        self.db = db
        self.endpoint = endpoint
        self.role = role
        self.cancel = cancel
        self.observers = observers
        self.started = time.perf_counter()  # arrival: time to first token includes the queue
        self.model: str | None = row.get("model")
        self.generation = None  # set once the request is a generation (appliance.generation.Generation)
        self.error: APIError | None = None
        self.streaming = False  # the response body, not the view, ends this request
        self.status: int | None = None
        self.seconds: float | None = None
        self.finished = False
        self.id = db.start_request(endpoint=endpoint, client=client, key_id=key_id, **row)

    def describe(self, model: str, prompt: str, stream: bool) -> None:
        """Write what the request asks into its row now, before it waits for a slot."""
        self.model = model
        self.db.update_request(self.id, model=model, prompt=prompt, stream=int(stream))

    def fail(self, error: APIError) -> None:
        """The request ends with this error (the first one recorded is the one that counts)."""
        if self.error is None:
            self.error = error

    def outcome(self) -> tuple[int, str | None]:
        """The final status and error.

        A generation that did not end by itself was cancelled: the cancel's reason, even where the HTTP
        layer answered with an error of its own, unless the engine failed. Else the recorded error, else 200.
        """
        generation = self.generation
        if generation is not None and generation.interrupted and not isinstance(self.error, GenerationFailed):
            return self.cancel.status()
        if self.error is not None:
            return self.error.status, self.error.message
        return 200, None

    def finish(self) -> None:
        """Stop the generation if it still runs, complete the row and tell the observers; only the first call counts."""
        if self.finished:
            return
        self.finished = True
        fields = {}
        if self.generation is not None:
            self.generation.stop()
            fields = self.generation.row_fields()
        self.status, error = self.outcome()
        self.seconds = time.perf_counter() - self.started
        self.db.finish_request(self.id, status=self.status, error=error, total_ms=self.seconds * 1000, **fields)
        for observe in self.observers:
            observe(self)
