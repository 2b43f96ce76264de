"""Constrained decoding: JSON schemas and Lark grammars compiled by llguidance, one mask per sequence per step.

Two halves, one engine:
- The service compiles what a request asks for (``json_object``, a JSON schema, a Lark or GBNF grammar) to an
  llguidance grammar and validates it before the request queues, so an unsupported schema is a 400 naming the
  unsupported part, not a failure mid-generation. Compiled grammars are cached per source.
- The runner turns a grammar into a ``Constraint`` for one sequence: before each step it fills the bitmask of the
  tokens that may come next, the backend sets every other logit to minus infinity before its sampler runs, and
  the sampled token advances the constraint. Both backends share this code; only the logits differ in where they
  live.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

import llguidance
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.gbnf_to_lark import any_to_lark

# One spelling of JSON: ", " and ": " between items and no other whitespace. With free whitespace a small model
# can spend its whole max_tokens on newlines inside valid JSON.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}
CACHED_MATCHERS = 64  # compiled grammars kept per model in the runner


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled; the message names what llguidance refused."""


# -- the service: request -> grammar -------------------------------------------------------------------
def json_schema_grammar(schema: dict | None) -> str:
    """The grammar of JSON text that validates against ``schema`` (None: any JSON object)."""
    return _compiled("json", json.dumps(ANY_OBJECT if schema is None else schema, sort_keys=True))


def lark_grammar(lark: str) -> str:
    return _compiled("lark", lark)


def text_grammar(text: str) -> str:
    """A Lark grammar, or a llama.cpp GBNF one (``root ::= ...``) through llguidance's own translation to Lark."""
    try:
        lark = any_to_lark(text)
    except Exception as exc:  # the translator raises plain exceptions on a bad GBNF grammar
        raise GrammarError(f"not a GBNF or Lark grammar llguidance can read: {exc}") from None
    return _compiled("lark", lark)


@lru_cache(maxsize=256)
def _compiled(kind: str, source: str) -> str:
    try:
        if kind == "json":
            grammar = LLMatcher.grammar_from_json_schema(source, overrides=JSON_OPTIONS)
        else:
            grammar = LLMatcher.grammar_from_lark(source)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError("; ".join(messages))
    return grammar


# -- the runner: grammar -> a mask per step ----------------------------------------------------------
class Constraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: LLMatcher, n_vocab: int):
        self.matcher = matcher
        self.bitmask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def mask(self) -> np.ndarray:
        """Bit i of the result is set when token i may come next."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        return self.bitmask

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing more may follow: the output is whole (a JSON value closed, say)."""
        return self.matcher.is_stopped()


def apply_mask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """Set the logit of every token the mask leaves out to minus infinity, in place."""
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")
    n = min(len(logits), len(allowed))
    logits[:n][allowed[:n] == 0] = -np.inf
    logits[n:] = -np.inf


class Grammars:
    """A model's grammar engine: its vocabulary as llguidance sees it (built on first use, ~1 s) and its compiled
    grammars, cached. Thread-safe: requests are prepared on the runner's reader thread."""

    def __init__(self, vocabulary: Callable[[], LLTokenizer], n_vocab: int):
        self._vocabulary, self.n_vocab = vocabulary, n_vocab
        self._tokenizer: LLTokenizer | None = None
        self._matchers: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def constraint(self, grammar: str) -> Constraint:
        with self._lock:
            matcher = self._matchers.pop(grammar, None) or self._compile(grammar)
            self._matchers[grammar] = matcher
            while len(self._matchers) > CACHED_MATCHERS:
                self._matchers.popitem(last=False)
            return Constraint(matcher.deep_copy(), self.n_vocab)

    def _compile(self, grammar: str) -> LLMatcher:
        if self._tokenizer is None:
            self._tokenizer = self._vocabulary()
        matcher = LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


def grammars_for(backend, n_vocab: int) -> Grammars:
    """The grammar engine of a loaded backend (``appliance.backends.base.Backend``)."""
    return Grammars(lambda: vocabulary(n_vocab, backend.token_bytes, backend.is_end_of_generation,
                                       lambda text: backend.tokenize(text, add_special=False, parse_special=False)),
                    n_vocab)


def vocabulary(n_vocab: int, token_bytes: Callable[[int], bytes], is_end: Callable[[int], bool],
               tokenize: Callable[[str], list[int]]) -> LLTokenizer:
    """The vocabulary of any backend, as llguidance takes it: each id's bytes, with control tokens (which print
    nothing) marked special, and every end-of-generation id as an end of the grammar."""
    tokens = [token_bytes(i) or b"\xff<|control_%d|>" % i for i in range(n_vocab)]
    ends = [i for i in range(n_vocab) if is_end(i)]
    return LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokens, ends, tokenize)), n_vocab=n_vocab,
                       eos_token=ends or None)


class _Vocabulary:
    """The shape llguidance's TokenizerWrapper reads."""

    def __init__(self, tokens: list[bytes], ends: list[int], tokenize: Callable[[str], list[int]]):
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, (ends or [0])[0], None
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]
        self._tokenize = tokenize

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")  # tells TokenizerWrapper to pass str
        return self._tokenize(text)
