"""One embeddings request: a generation whose only output is the vectors of its inputs.

It is an ``appliance.generation.Generation``, so it takes the same way as a chat request: its client's
token buckets, a place in the model's priority queue, the power manager's wake, load on demand,
cancellation when its client leaves or the service stops, and a slot released however it ends. The
runner answers Admitted with the inputs' token count, then one ``Vectors`` with every vector.
A request's input tokens are what it spends of its client's tokens per minute (``rate_limit_tpm``),
as OpenAI counts embeddings.

The log row records the sha256 of the vectors (float32 little-endian, in input order), never the vectors.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from appliance.backends.base import BackendError
from appliance.generation import Generation
from appliance.runner import protocol as msg
from appliance.probe import FAILURES, next_event
from appliance.runner.supervisor import ModelRunner

PROBE_INPUTS = ("Hello",)  # the live health check's and a swap's warm-up for an embedding model


@dataclass
class Embedding(Generation):
    """Started with ``start(None, None, EmbedParams(inputs))``; ``result`` holds the vectors once it has run."""

    result: msg.Vectors | None = None

    def _record(self, output: msg.Output) -> None:
        super()._record(output)
        if isinstance(output, msg.Vectors):
            self.result = output

    def _release(self) -> None:
        if self._ticket is not None:  # what the request spent is its input tokens: none are generated
            self._ticket.release(self.usage.prompt_tokens)
            self._ticket = None
        super()._release()

    def row_fields(self) -> dict:
        digest = hashlib.sha256(self.result.data).hexdigest() if self.result is not None else None
        return super().row_fields() | {"response": None, "response_sha256": digest, "tokens_per_s": None}


def probe(runner: ModelRunner, timeout: float, inputs: tuple[str, ...] = PROBE_INPUTS) -> str | None:
    """Embed the probe inputs on a loaded model; None when their vectors came back in time, else why not."""
    deadline = time.monotonic() + timeout
    try:
        stream = runner.submit(None, None, msg.EmbedParams(inputs))
    except BackendError as exc:
        return f"the embedding probe could not start: {exc}"
    while True:
        event = next_event(runner, stream, deadline)
        if event is None:
            return f"the embedding probe got no vectors in the {timeout:.0f} s allowed"
        if isinstance(event, FAILURES):
            return f"the embedding probe failed: {event.message}"
        if isinstance(event, msg.Vectors):
            return None if len(event.data) == 4 * event.dimensions * len(inputs) else "the embedding probe got no vectors"
