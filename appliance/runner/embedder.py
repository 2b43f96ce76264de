"""The runner's loop for an embedding model: batched forward passes over the inputs of every request in it.

The reader thread tokenizes a request and checks each input against the context (``prepare``); the
loop's thread owns the engine. Each step packs one batch, up to the engine's sequences and tokens,
taking the next input of each running request in turn: a request of one sentence that arrives while
one of two thousand runs is done at the next step, and the big one's inputs share batches with it.
A request's vectors go back in one message once all its inputs are done; a cancelled one is dropped
between two steps.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.backends.base import BackendError, ModelFacts
from appliance.backends.embedding import EmbeddingBackend
from appliance.runner import protocol as msg
from appliance.runner.scheduler import drain

NOT_FOR_CHAT = ("is an embedding model: it makes vectors at POST /v1/embeddings and does not generate text; "
                "send chat and completions to a chat model (GET /v1/models lists each model's kind)")


@dataclass
class Job:
    """One request's inputs as token ids, and the vectors made so far."""

    id: int
    sequences: list[list[int]]
    vectors: list[bytes | None] = field(default_factory=list)
    next: int = 0  # the first input not yet in a batch

    def __post_init__(self):
        self.vectors = [None] * len(self.sequences)

    @property
    def done(self) -> bool:
        return all(v is not None for v in self.vectors)


def prepare(backend: EmbeddingBackend, facts: ModelFacts, submit: msg.Submit) -> Job | msg.Refused:
    """Tokenize and check every input of one request (the reader's thread: touches only the vocabulary)."""
    if not isinstance(submit.params, msg.EmbedParams):
        return msg.Refused(submit.id, f"this model {NOT_FOR_CHAT}", code="model_kind_mismatch", param="model")
    sequences = []
    for i, item in enumerate(submit.params.inputs):
        tokens = backend.tokenize(item) if isinstance(item, str) else list(item)
        problem = _problem(tokens, facts, isinstance(item, str))
        if problem:
            code, text = problem
            return msg.Refused(submit.id, f"input[{i}] {text}", code=code, param="input")
        sequences.append(tokens)
    return Job(submit.id, sequences)


def _problem(tokens: list[int], facts: ModelFacts, text: bool) -> tuple[str, str] | None:
    if not tokens:
        return "empty_input", "is empty: every input needs at least one token"
    if len(tokens) > facts.context_length:
        made = "the text is" if text else "the token array has"
        return "context_length_exceeded", (f"is too long: {made} {len(tokens)} tokens and this model takes at most "
                                           f"{facts.context_length} per input. Shorten or split it.")
    bad = [t for t in tokens if not 0 <= t < facts.n_vocab] if facts.n_vocab else []
    if bad:
        return "invalid_value", f"holds token ids this model does not have: {bad[:5]}; its ids are 0 to {facts.n_vocab - 1}"
    return None


class Embedder:
    def __init__(self, backend: EmbeddingBackend, facts: ModelFacts, emit: Callable[[object], None]):
        self.backend, self.facts, self.emit = backend, facts, emit
        self.dimensions = int(facts.info["dimensions"])
        self.inbox: queue.Queue = queue.Queue()  # Job, Cancel, ReleaseCache, Shutdown
        self.jobs: list[Job] = []
        self._running = True

    def run(self) -> None:
        while self._running:
            self._drain(block=not self.jobs)
            if self.jobs:
                self.step()

    def _drain(self, block: bool) -> None:
        drain(self.inbox, self._handle, block)

    def _handle(self, item) -> None:
        if isinstance(item, Job):
            self.jobs.append(item)
            self.emit(msg.Admitted(item.id, prompt_tokens=sum(map(len, item.sequences)), cached_tokens=0))
        elif isinstance(item, msg.Cancel):
            self._cancel(item.id)
        elif isinstance(item, msg.Shutdown):
            self._running = False
            self.jobs.clear()

    def _cancel(self, request_id: int) -> None:
        if any(job.id == request_id for job in self.jobs):
            self.jobs = [job for job in self.jobs if job.id != request_id]
            self.emit(msg.Step(0, [msg.Output(request_id, "", 0, finish_reason="cancelled")]))

    # -- one batch --------------------------------------------------------------------------------
    def step(self) -> None:
        batch = self.next_batch()
        try:
            data = self.backend.embed([job.sequences[i] for job, i in batch])
        except BackendError as exc:
            self._fail({job.id for job, _ in batch}, str(exc))
            return
        width = self.dimensions * 4
        for n, (job, i) in enumerate(batch):
            job.vectors[i] = data[n * width : (n + 1) * width]
        finished = [job for job in self.jobs if job.done]
        self.jobs = [job for job in self.jobs if not job.done]
        self.emit(msg.Step(len(batch), [self._result(job) for job in finished]))

    def next_batch(self) -> list[tuple[Job, int]]:
        """The next input of each running request in turn, while the batch has room for it."""
        batch, tokens, added = [], 0, True
        while added and len(batch) < self.facts.n_slots:
            added = False
            for job in self.jobs:
                if job.next < len(job.sequences) and len(batch) < self.facts.n_slots:
                    size = len(job.sequences[job.next])
                    if tokens + size <= self.facts.n_batch:
                        batch.append((job, job.next))
                        job.next, tokens, added = job.next + 1, tokens + size, True
        return batch

    def _result(self, job: Job) -> msg.Vectors:
        return msg.Vectors(job.id, "", 0, finish_reason="stop", data=b"".join(job.vectors), dimensions=self.dimensions)

    def _fail(self, ids: set[int], message: str) -> None:
        self.jobs = [job for job in self.jobs if job.id not in ids]
        for request_id in sorted(ids):
            self.emit(msg.Failed(request_id, f"the engine failed: {message}"))
