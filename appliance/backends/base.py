"""The one interface every inference engine implements.

A backend knows how to load a model, tokenize, and sample the next token.
Everything above the token level (UTF-8 joining, stop strings, max_tokens,
cancellation, usage counts) lives here once, so llama.cpp and ONNX Runtime
behave the same through the API.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field

from appliance.backends.decoding import StopMatcher, Utf8Stream
from appliance.chat_template import render_chat


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Chunk:
    """A piece of generated text. The last chunk of a generation has a finish_reason."""

    text: str
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    usage: Usage = field(default_factory=Usage)


class BackendError(RuntimeError):
    """The engine itself failed (could not load, crashed mid-generation)."""


class Backend(abc.ABC):
    """Base class of the inference engines; see ``appliance.backends.register``."""

    name: str = ""

    def __init__(self, model_path, threads: int, context_length: int):
        self.model_path = model_path
        self.threads = threads
        self.requested_context_length = context_length

    # -- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> None: ...

    @abc.abstractmethod
    def unload(self) -> None: ...

    @property
    @abc.abstractmethod
    def is_loaded(self) -> bool: ...

    def release_cache(self) -> None:
        """Drop what the next request can rebuild cheaply (the KV cache); the model stays loaded."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Tokens of context the loaded model serves (prompt + completion)."""

    # -- tokens ------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text are parsed as such."""

    @abc.abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes one generated token stands for (may be part of a UTF-8 character)."""

    @abc.abstractmethod
    def is_end_of_generation(self, token: int) -> bool: ...

    @abc.abstractmethod
    def sample_tokens(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield sampled token ids one by one, without end; the caller decides when to stop."""

    @abc.abstractmethod
    def chat_template(self) -> tuple[str, str, str]:
        """(jinja template, bos token text, eos token text) from the model's own files."""

    def info(self) -> dict:
        """Facts about the loaded model for /v1/models and /readyz."""
        return {"backend": self.name, "context_length": self.context_length if self.is_loaded else None}

    # -- shared behaviour --------------------------------------------------
    def render_chat(self, messages: list[dict]) -> str:
        template, bos, eos = self.chat_template()
        return render_chat(template, messages, bos_token=bos, eos_token=eos)

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Chunk]:
        """Stream the completion of a tokenized prompt as text chunks.

        ``cancelled`` is polled after every token; when it answers True the
        generation ends with finish_reason "cancelled".
        """
        usage = Usage(prompt_tokens=len(prompt))
        text = Utf8Stream()
        stops = StopMatcher(params.stop)
        finish = "length"
        with closing(self.sample_tokens(prompt, params)) as tokens:
            for token in tokens:
                if self.is_end_of_generation(token):
                    finish = "stop"
                    break
                usage.completion_tokens += 1
                piece = stops.push(text.push(self.token_bytes(token)))
                if piece:
                    yield Chunk(piece, usage=usage)
                if stops.stopped:
                    finish = "stop"
                    break
                if usage.completion_tokens >= params.max_tokens:
                    break
                if cancelled():
                    finish = "cancelled"
                    break
        tail = "" if stops.stopped else stops.push(text.flush()) + stops.flush()
        yield Chunk(tail, finish_reason=finish, usage=usage)
