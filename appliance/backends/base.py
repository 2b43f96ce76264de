"""The one interface every inference engine implements: a batched step over slots.

A backend lives in the runner process (``appliance.runner.worker``), never in
the HTTP process. It holds one KV cache with ``n_slots`` sequences. Each call
of ``step`` runs one batched forward pass: the next token of every generating
sequence plus chunks of the prompts of new ones, and samples the next token of
every sequence that asked for it. Everything above the token level (turning
tokens into text, stop strings, max_tokens, prefix reuse, cancellation) lives
once in ``appliance.runner.scheduler``, so llama.cpp and ONNX Runtime behave
the same through the API.

Tokenizing and the chat template may be called from another thread than the
step loop: they touch only the vocabulary, never the KV cache.

Reports and benches that score a model, never the service, use two more public
calls: ``Backend.logits`` (every position's logits of one token sequence) and
``token_stream`` (the raw token ids one sequence samples).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the rest of the slot's context
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    # Penalties on the tokens this request generated, as llama.cpp applies them: within the last
    # repeat_last_n of them, a token's logit is divided by repeat_penalty (multiplied where negative), then
    # lowered by frequency_penalty x its count and by presence_penalty once (OpenAI's meaning).
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # 0: off; -1: the whole context
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); -100 or less bans it
    grammar: str | None = None  # an llguidance grammar the output must follow (appliance.grammar)
    logprobs: int | None = None  # None: none; n: each sampled token's log-probability and the n likeliest
    n: int = 1  # choices: sequences that share the prompt's KV cache, each sampled on its own

    @property
    def penalizes(self) -> bool:
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                            or self.presence_penalty != 0.0)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (its raw logits: before penalties, biases and grammar
    masks), and the likeliest tokens at that position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The log-softmax of one position's logits, for ``token`` and the ``top`` likeliest (largest first)."""
    import numpy as np

    shifted = logits.astype(np.float64) - float(np.max(logits))
    log_probs = shifted - np.log(np.exp(shifted).sum())
    top = min(top, len(log_probs))
    best = np.argpartition(-log_probs, top - 1)[:top] if top > 0 else np.array([], dtype=np.int64)
    best = best[np.argsort(-log_probs[best], kind="stable")]
    return TokenLogprob(token, float(log_probs[token]), tuple((int(t), float(log_probs[t])) for t in best))


BAN = -100.0  # a logit bias this low bans its token, as OpenAI's -100 does


def banned_or(bias: float) -> float:
    """The bias to add to a logit: minus infinity for a ban, so no sampler can still pick the token."""
    return float("-inf") if bias <= BAN else bias


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier request

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Feed:
    """Tokens of one sequence for one step, starting at position ``pos`` of its slot."""

    slot: int
    tokens: list[int]
    pos: int
    sample: bool  # sample the token after the last one (a prompt's last chunk, or a generating sequence)
    # More slots that sample their own first token from the same logits: the other choices of a request with n > 1,
    # which share this prompt (the scheduler copies its KV cache to them after the step).
    also: tuple[int, ...] = ()


@dataclass
class ModelFacts:
    """What the loaded model is, for /v1/models, /readyz and the context checks."""

    context_length: int  # tokens one slot holds (prompt + completion)
    n_slots: int
    n_batch: int  # most tokens one step may feed
    n_vocab: int = 0  # token ids are 0..n_vocab-1 (0: not known)
    info: dict = field(default_factory=dict)


class BackendError(RuntimeError):
    """The engine itself failed (could not load, crashed mid-generation)."""


class Backend(abc.ABC):
    """Base class of the inference engines; see ``appliance.backends.register``."""

    name: str = ""
    options: tuple[str, ...] = ()  # extra settings create_backend passes to this backend, e.g. ("provider",)

    def __init__(self, model_path, threads: int, context_length: int, n_slots: int):
        self.model_path = model_path
        self.threads = threads
        self.requested_context_length = context_length
        self.n_slots = n_slots
        # Set by step for the sequences whose params ask for logprobs: the sampled token's, by slot.
        self.logprobs: dict[int, TokenLogprob] = {}

    # -- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> ModelFacts: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- tokens (any thread) -------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of text. ``parse_special``: control-token text (``<|im_start|>``) becomes those
        tokens; without it, such text is tokenized as the plain characters it is."""

    @abc.abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes one generated token stands for (may be part of a UTF-8 character; control tokens: b"")."""

    @abc.abstractmethod
    def is_end_of_generation(self, token: int) -> bool: ...

    @abc.abstractmethod
    def chat_template(self) -> tuple[str, str, str]:
        """(jinja template, bos token text, eos token text) from the model's own files."""

    @property
    def bos_token(self) -> int | None:
        """The id a tokenizer puts first, if any (a template that writes it too would give two)."""
        return None

    # -- the step loop (one thread only) ---------------------------------------
    @abc.abstractmethod
    def start_sequence(self, slot: int, keep: int, params: SamplingParams) -> None:
        """Prepare ``slot`` for a new request: keep the first ``keep`` tokens of its KV cache, drop the rest,
        and set up its sampler."""

    @abc.abstractmethod
    def step(self, feeds: list[Feed], masks: dict[int, np.ndarray] | None = None) -> dict[int, int]:
        """One batched forward pass; the sampled next token of every feed with ``sample``, by slot. ``masks``: by
        slot, a bitmask of the tokens that may be sampled (``appliance.grammar.apply_mask``), applied before
        any other sampling step."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Drop the whole KV cache (the model stays loaded)."""

    def copy_sequence(self, source: int, target: int) -> None:
        """Make slot ``target``'s KV cache a copy of slot ``source``'s (a prompt prefilled once for n choices)."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} backend cannot share a prompt between "
                                  "sequences: send n=1")

    # -- scoring (reports and benches, never while requests run) -----------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        """The logits after each of ``tokens`` (float32, [len(tokens), vocab]), run as one new sequence with
        nothing sampled. It may use slot 0's cache and leaves it empty."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} backend gives no logits")


def token_stream(backend: Backend, facts: ModelFacts, prompt: list[int], params: SamplingParams) -> Iterator[int]:
    """The tokens one sequence samples in slot 0, with no end: raw token ids for reports and benches (the
    runner's scheduler is what stops a request and turns its tokens into text)."""
    backend.start_sequence(0, 0, params)
    pos = 0
    for start in range(0, len(prompt), facts.n_batch):
        chunk = prompt[start : start + facts.n_batch]
        token = backend.step([Feed(0, chunk, pos, sample=start + len(chunk) == len(prompt))]).get(0)
        pos += len(chunk)
    while True:
        yield token
        token = backend.step([Feed(0, [token], pos, sample=True)])[0]
        pos += 1
