"""The small typed messages that cross the pipe between the service and a runner process.

service -> runner: Submit, Cancel, ReleaseCache, Shutdown
runner -> service: Ready or LoadFailed once at start, then Admitted or Refused for
every Submit, a Step after every batched decode (text of each sequence in it),
and Failed when the engine fails a sequence.

An embedding model's runner takes a Submit whose params are ``EmbedParams`` and answers
Admitted or Refused, then one Step holding the request's ``Vectors`` (or Failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.backends.base import ModelFacts, SamplingParams


@dataclass(frozen=True)
class EmbedParams:
    """What an embeddings request asks: the vector of each input, a text or token ids, in order."""

    inputs: tuple[str | tuple[int, ...], ...]


@dataclass(frozen=True)
class Submit:
    id: int
    params: SamplingParams | EmbedParams  # a generation's sampling, or an embeddings request's inputs
    messages: list[dict] | None = None  # a chat: rendered with the model's template
    prompt: str | None = None  # a plain completion
    tools: list[dict] | None = None  # a chat's tools, for its prompt (appliance.tools)


@dataclass(frozen=True)
class Cancel:
    id: int


@dataclass(frozen=True)
class ReleaseCache:
    """Drop the KV cache of idle slots (the box goes idle)."""


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    facts: ModelFacts


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class Admitted:
    id: int
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV an idle slot already held


@dataclass(frozen=True)
class Refused:
    """The request cannot run on this model (too long for the context, the template refused it): a 400."""

    id: int
    message: str
    code: str
    param: str | None = None


# A sampled token's bytes and log-probability, and the likeliest tokens' (bytes, log-probability) at its place.
Logprob = tuple[bytes, float, tuple[tuple[bytes, float], ...]]


@dataclass(frozen=True)
class Output:
    """What one sequence produced in one step. ``finish_reason`` set: its last output, its slot is free."""

    id: int
    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    logprobs: tuple[Logprob, ...] = ()  # one per token sampled in this output, when the request asked
    index: int = 0  # which of the request's choices (n > 1)


@dataclass(frozen=True)
class Vectors(Output):
    """An embeddings request's result, its one and final output (``finish_reason`` "stop", no text): one vector
    per input, L2-normalised, as float32 little-endian one after another."""

    data: bytes = b""
    dimensions: int = 0


@dataclass(frozen=True)
class Step:
    batch_size: int  # sequences in this decode
    outputs: list[Output] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens computed since the last Step (a choice that copies a prompt computes none)


@dataclass(frozen=True)
class Failed:
    """The engine failed this sequence (a 500); its slot is free."""

    id: int
    message: str
