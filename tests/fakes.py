"""Test doubles for the fast tier: a fake engine and a runner on a thread; never the proof that a feature works.

The fake engine answers canned text, one byte a token, with real batching bookkeeping.

The "model file" is a JSON file: ``{"reply": "...", "context_length": 256,
"step_seconds": 0.0, "load_seconds": 0.0, "fail_on": "text", "chat_template": "..."}``. Every sequence answers ``reply``
(then ends), one byte per step; where a grammar's mask leaves the next byte out, it takes the lowest token the
mask allows instead. A prompt containing ``fail_on`` makes the
step fail as an engine error would. Tokens are the prompt's UTF-8 bytes;
``<|im_start|>`` and ``<|im_end|>`` are control tokens 256 and 257, which
only a template may produce.

``FakeBackend`` serves models of format ``fake``: importing this module registers it through
``appliance.backends.register``, the call a plugin makes. ``spawn_thread`` is a runner factory
for ``ModelRunner(spawn=...)``: the runner's real serve loop on a thread of the test process.
"""

from __future__ import annotations

import json
import threading
import time
from multiprocessing import Pipe
from pathlib import Path

import numpy as np

from appliance.backends import register
from appliance.backends.base import Backend, BackendError, Feed, ModelFacts, SamplingParams, TokenLogprob
from appliance.runner.worker import serve

SPECIALS = {"<|im_start|>": 256, "<|im_end|>": 257}
EOS = SPECIALS["<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, model_path, threads: int, context_length: int, n_slots: int):
        super().__init__(model_path, threads, context_length, n_slots)
        self.config: dict = {}
        self.steps: list[list[Feed]] = []  # every step's feeds, for tests that look at the batching
        self.copies: list[tuple[int, int]] = []  # (source, target) of every KV copy, for tests of n > 1
        self._kv: dict[int, list[int]] = {}
        self._produced: dict[int, int] = {}
        self._top: dict[int, int | None] = {}

    def load(self) -> ModelFacts:
        try:
            self.config = json.loads(Path(self.model_path).read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"fake model {self.model_path} is unreadable: {exc}") from exc
        self.reply = self.config.get("reply", "Hello from the fake engine.").encode()
        time.sleep(self.config.get("load_seconds", 0.0))
        context = min(self.requested_context_length, self.config.get("context_length", 256))
        return ModelFacts(context_length=context, n_slots=self.n_slots, n_batch=self.config.get("n_batch", 64),
                          n_vocab=258,
                          info={"backend": self.name, "quantization": "none", "architecture": "fake"})

    def close(self) -> None:
        self._kv.clear()

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        tokens = []
        while text:
            special = next((s for s in SPECIALS if parse_special and text.startswith(s)), None)
            if special:
                tokens.append(SPECIALS[special])
                text = text[len(special):]
            else:
                tokens += text[0].encode()
                text = text[1:]
        return tokens

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOS

    def chat_template(self) -> tuple[str, str, str]:
        return self.config.get("chat_template", TEMPLATE), "", "<|im_end|>"

    def start_sequence(self, slot: int, keep: int, params: SamplingParams) -> None:
        self._kv[slot] = self._kv.get(slot, [])[:keep]
        self._produced[slot] = 0
        self._top[slot] = params.logprobs

    def step(self, feeds: list[Feed], masks: dict | None = None) -> dict[int, int]:
        self.steps.append(feeds)
        time.sleep(self.config.get("step_seconds", 0.0))
        out = {}
        for feed in feeds:
            kv = self._kv.setdefault(feed.slot, [])
            if feed.pos != len(kv):
                raise BackendError(f"slot {feed.slot}: position {feed.pos} does not continue its {len(kv)} tokens")
            kv += feed.tokens
            if self.config.get("fail_on") and self.config["fail_on"].encode() in bytes(t for t in kv if t < 256):
                raise BackendError("the fake engine was told to fail on this prompt")
            for slot in (feed.slot, *feed.also) if feed.sample else ():
                n = self._produced[slot]
                token = self.reply[n] if n < len(self.reply) else EOS
                out[slot] = _allowed(token, masks.get(slot)) if masks and slot in masks else token
                self._produced[slot] = n + 1
        # Logprobs of a made-up distribution: the token it says, then the next byte up, then the next.
        self.logprobs = {slot: TokenLogprob(token, -0.25, tuple((token + i, -0.25 - i) for i in range(self._top[slot])))
                         for slot, token in out.items() if self._top.get(slot) is not None}
        return out

    def clear(self) -> None:
        self._kv.clear()

    def copy_sequence(self, source: int, target: int) -> None:
        self._kv[target] = list(self._kv.get(source, []))
        self.copies.append((source, target))


def _allowed(token: int, mask) -> int:
    if mask is None:
        return token
    allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))
    return token if token in allowed else int(allowed[0])


register("fake", FakeBackend)


class ThreadRunner:
    """A runner on a thread of the test process, in place of a runner process."""

    pid = None

    def __init__(self, thread: threading.Thread):
        self.thread = thread

    def alive(self) -> bool:
        return self.thread.is_alive()

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def kill(self) -> None:
        pass

    def exit_status(self) -> str:
        return "thread ended"


def spawn_thread(spec: dict):
    """The runner factory of the fast tier: ``ModelRunner(entry, ..., spawn=spawn_thread)``."""
    ours, theirs = Pipe()

    def run():
        try:
            serve(theirs, spec)
        finally:
            theirs.close()

    thread = threading.Thread(target=run, name="runner-thread", daemon=True)
    thread.start()
    return ours, ThreadRunner(thread)
