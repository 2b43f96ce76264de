"""The runner's step loop: continuous batching over slots, with prefix reuse.

One thread owns the backend. Each step feeds one token of every generating
sequence plus chunks of the prompts of new ones (chunked prefill within the
backend's ``n_batch``), runs one batched decode, and turns each sampled token
into text (UTF-8 never split, stop strings never leaked). A request joins at
the next step and leaves when it is done or cancelled; its slot then keeps
its KV cache, so the next turn of the same conversation re-uses the common
prefix instead of recomputing it.

The service admits at most ``n_slots`` requests at a time (its queue holds
the rest), so a request that arrives here always finds a free slot.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from appliance.backends.base import Backend, BackendError, Feed, ModelFacts, SamplingParams, TokenLogprob
from appliance.backends.decoding import StopMatcher, Utf8Stream
from appliance.chat_template import ChatTemplateError
from appliance.grammar import Constraint, GrammarError, Grammars, grammars_for
from appliance.runner import protocol as msg
from appliance.runner.prompt import chat_tokens, completion_tokens


@dataclass
class Prepared:
    """A request tokenized and checked against the context, ready for a slot."""

    id: int
    tokens: list[int]
    params: SamplingParams
    constraint: Constraint | None = None  # the grammar its output follows


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    constraint: Constraint | None = None
    fed: int = 0  # prompt tokens already in the slot's KV cache
    generated: int = 0
    next_token: int | None = None  # sampled, not yet fed
    cancelled: bool = False
    index: int = 0  # which of its request's choices
    choices: tuple[int, ...] = ()  # the slots of its request's other choices, waiting for this prompt's prefill
    copies_prompt: bool = False  # another choice's: gets that prefill's KV cache instead of computing its own
    utf8: Utf8Stream = field(default_factory=Utf8Stream)
    stops: StopMatcher = None

    def __post_init__(self):
        self.stops = StopMatcher(self.params.stop)


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what its KV cache holds, in order
    seq: Sequence | None = None
    last_used: float = 0.0


def prepare(backend: Backend, facts: ModelFacts, submit: msg.Submit,
            grammars: Grammars | None = None) -> Prepared | msg.Refused:
    """Render, tokenize and check the context of one request, and set up its grammar (any thread: touches only the
    vocabulary)."""
    try:
        if submit.messages is not None:
            tokens = chat_tokens(backend, submit.messages, submit.tools)
        else:
            tokens = completion_tokens(backend, submit.prompt or "")
    except (ChatTemplateError, BackendError) as exc:
        return msg.Refused(submit.id, str(exc), code="chat_template_error", param="messages")
    param = "messages" if submit.messages is not None else "prompt"
    unknown = [token for token, _ in submit.params.logit_bias if facts.n_vocab and not 0 <= token < facts.n_vocab]
    if unknown:
        return msg.Refused(submit.id, f"logit_bias names token ids this model does not have: {unknown[:5]}; its ids "
                           f"are 0 to {facts.n_vocab - 1}", code="invalid_value", param="logit_bias")
    if not tokens:
        return msg.Refused(submit.id, "the prompt is empty: send some text to complete", code="empty_prompt", param=param)
    context = facts.context_length
    room = context - len(tokens)
    if room < 1:
        return msg.Refused(submit.id, f"the prompt is {len(tokens)} tokens; this model's context is {context} tokens "
                           "per request. Shorten the prompt.", code="context_length_exceeded", param=param)
    wanted = submit.params.max_tokens
    if wanted is not None and wanted > room:
        return msg.Refused(submit.id, f"max_tokens={wanted} does not fit: the prompt takes {len(tokens)} of the "
                           f"{context} tokens of context, so at most {room} can be generated",
                           code="context_length_exceeded", param="max_tokens")
    constraint = None
    if submit.params.grammar is not None:
        try:
            constraint = (grammars or grammars_for(backend, facts.n_vocab)).constraint(submit.params.grammar)
        except GrammarError as exc:
            return msg.Refused(submit.id, f"this model cannot follow the requested format: {exc}",
                               code="invalid_grammar", param="response_format")
    return Prepared(submit.id, tokens, replace(submit.params, max_tokens=wanted or room), constraint)


class Scheduler:
    def __init__(self, backend: Backend, facts: ModelFacts, emit: Callable[[object], None],
                 stream_interval: float = 0.0):
        self.backend, self.facts, self.emit = backend, facts, emit
        self.slots = [Slot(i) for i in range(facts.n_slots)]
        self.inbox: queue.Queue = queue.Queue()  # Prepared, Cancel, ReleaseCache, Shutdown
        self._waiting: list[Prepared] = []  # only if the service ever sends more than there are slots
        self._running = True
        self.stream_interval = stream_interval
        self._outbox: dict[tuple[int, int], msg.Output] = {}  # text not sent yet, by (request, choice)
        self._streaming: set[tuple[int, int]] = set()  # choices whose first text has gone out
        self._prefilled = 0  # prompt tokens computed since the last Step went out
        self._last_sent = 0.0
        self.grammars = grammars_for(backend, facts.n_vocab)

    def prime(self) -> int:
        """Prefill the chat template's preamble (a default system prompt, say) into every slot, as a model that
        has served a while holds it: the first requests of a model just loaded, swapped in or woken from deep
        idle then reuse it instead of each prefilling it again (llama-server's old --system-prompt-file did the
        same). Returns the tokens primed: none where the template renders no plain chat, its preamble is over
        one step, or the engine fails at it (a head start lost, nothing more)."""
        try:
            tokens = template_preamble(self.backend)
            if not 1 < len(tokens) <= min(self.facts.n_batch, self.facts.context_length - 1):
                return 0
            primed = self._prime(tokens)
        except Exception:  # noqa: BLE001 - priming is an optimisation: the model serves without it
            self.backend.clear()
            return 0
        for slot in primed:
            slot.tokens[:] = tokens
        return len(tokens)

    def _prime(self, tokens: list[int]) -> list[Slot]:
        """All but the last token into the first slot, copied to the others; then the last token into every slot
        in one step. llama.cpp copies whole KV streams, at the next decode: this way now, not in a request."""
        first, *others = self.slots
        self.backend.step([Feed(first.index, tokens[:-1], 0, sample=False)])
        primed = [first]
        if type(self.backend).copy_sequence is not Backend.copy_sequence:  # an engine that cannot: slot 0 alone
            for slot in others:
                self.backend.copy_sequence(first.index, slot.index)
            primed += others
        self.backend.step([Feed(slot.index, tokens[-1:], len(tokens) - 1, sample=False) for slot in primed])
        return primed

    # -- the loop ----------------------------------------------------------
    def run(self) -> None:
        while self._running:
            self.tick(block=not any(s.seq for s in self.slots) and not self._waiting)

    def tick(self, block: bool = False) -> None:
        """Take what arrived (waiting for it if ``block``), then run one step."""
        self._drain(block)
        self._assign()
        outputs = self._drop_cancelled()
        feeds = self._feeds()
        if feeds:
            outputs += self._step(feeds)
        self._send(outputs, batch_size=len(feeds))

    def _send(self, outputs: list[msg.Output], batch_size: int) -> None:
        """Text goes out at most every ``stream_interval`` seconds; a request's first text and every end at once.

        Each message wakes the service's threads, which on a small box take the CPU from the decode:
        a few tokens a message instead of one keeps streams smooth to the eye and the engine busy.
        """
        urgent = False
        for output in outputs:
            key = (output.id, output.index)
            held = self._outbox.get(key)
            if held is not None:
                output = replace(output, text=held.text + output.text, logprobs=held.logprobs + output.logprobs)
            self._outbox[key] = output
            urgent |= output.finish_reason is not None or key not in self._streaming
        now = time.monotonic()
        if self._outbox and (urgent or now - self._last_sent >= self.stream_interval):
            self._flush(batch_size)
            self._last_sent = now

    def _flush(self, batch_size: int) -> None:
        for key, output in self._outbox.items():
            if output.finish_reason:
                self._streaming.discard(key)
            else:
                self._streaming.add(key)
        self.emit(msg.Step(batch_size=batch_size, outputs=list(self._outbox.values()), prefilled=self._prefilled))
        self._outbox.clear()
        self._prefilled = 0

    def _drain(self, block: bool) -> None:
        drain(self.inbox, self._handle, block)

    def _handle(self, item) -> None:
        if isinstance(item, Prepared):
            self._waiting.append(item)
        elif isinstance(item, msg.Cancel):
            for seq in self._sequences():
                if seq.id == item.id:
                    seq.cancelled = True
            self._waiting = [p for p in self._waiting if p.id != item.id]
        elif isinstance(item, msg.ReleaseCache):
            self._release_cache()
        elif isinstance(item, msg.Shutdown):
            self._running = False

    def _sequences(self) -> list[Sequence]:
        return [s.seq for s in self.slots if s.seq]

    # -- slots and prefix reuse ----------------------------------------------
    def _assign(self) -> None:
        while self._waiting:
            free = [s for s in self.slots if s.seq is None]
            if len(free) < self._waiting[0].params.n:  # the service admits a request only when its slots are free
                return
            request = self._waiting.pop(0)
            slot = self._pick_slot(free, request)
            # A seeded request must not depend on what ran before it: prefill it whole.
            reuse = 0 if request.params.seed is not None else _common_prefix(slot.tokens, request.tokens)
            keep = min(reuse, len(request.tokens) - 1)  # the last prompt token is fed again for its logits
            del slot.tokens[keep:]
            try:
                self.backend.start_sequence(slot.index, keep, request.params)
                slot.seq = Sequence(request.id, request.tokens, request.params, request.constraint, fed=keep)
                slot.seq.choices = tuple(self._start_choice(request, i).index for i in range(1, request.params.n))
            except Exception as exc:  # e.g. a sampler setting the engine refused: this request fails, not the runner
                for busy in self.slots:
                    if busy.seq is not None and busy.seq.id == request.id:
                        busy.seq = None
                self.emit(msg.Failed(request.id, f"the engine refused the request's settings: {exc}"))
                continue
            self.emit(msg.Admitted(request.id, prompt_tokens=len(request.tokens), cached_tokens=keep))

    def _start_choice(self, request: Prepared, index: int) -> Slot:
        """Choice ``index`` (n > 1) in a slot of its own, waiting for the first choice's prefill; a seeded request's
        choices draw from seed + index, so each differs and all are reproducible."""
        slot = self._pick_slot([s for s in self.slots if s.seq is None], request)
        slot.tokens.clear()
        seed = request.params.seed
        params = replace(request.params, seed=None if seed is None else (seed + index) % SEEDS)
        self.backend.start_sequence(slot.index, 0, params)
        constraint = self.grammars.constraint(params.grammar) if params.grammar is not None else None
        slot.seq = Sequence(request.id, request.tokens, params, constraint, index=index, copies_prompt=True)
        return slot

    def _pick_slot(self, free: list[Slot], request: Prepared) -> Slot:
        """The idle slot holding the longest prefix of the request, where that prefix is long. Else the one
        that keeps the busy slots packed; of those, the one with the longest prefix, then the one whose cache
        loses least (another conversation may come back for it), then the lowest."""
        reuse = {s.index: _common_prefix(s.tokens, request.tokens) for s in free}
        best = max(free, key=lambda s: (reuse[s.index], -s.last_used))
        if reuse[best.index] >= REUSE_WORTH_SPREADING:
            return best
        busy = [s.index for s in self.slots if s.seq]
        return min(free, key=lambda s: (_span([*busy, s.index]), -reuse[s.index], len(s.tokens) - reuse[s.index],
                                        s.index))

    def _release_cache(self) -> None:
        if not any(s.seq for s in self.slots):
            self.backend.clear()
            for slot in self.slots:
                slot.tokens.clear()

    # -- one step ----------------------------------------------------------
    def _feeds(self) -> list[Feed]:
        feeds = [Feed(s.index, [s.seq.next_token], len(s.tokens), sample=True)
                 for s in self.slots if s.seq and s.seq.next_token is not None]
        budget = self.facts.n_batch - len(feeds)
        prefilling = sorted((s for s in self.slots if s.seq and s.seq.next_token is None and not s.seq.copies_prompt),
                            key=lambda s: s.seq.id)
        for slot in prefilling:
            if budget <= 0:
                break
            seq = slot.seq
            chunk = seq.prompt[seq.fed : seq.fed + budget]
            last = seq.fed + len(chunk) == len(seq.prompt)
            feeds.append(Feed(slot.index, chunk, len(slot.tokens), sample=last, also=seq.choices if last else ()))
            budget -= len(chunk)
        return feeds

    def _step(self, feeds: list[Feed]) -> list[msg.Output]:
        masks = {i: self.slots[i].seq.constraint.mask() for f in feeds if f.sample for i in (f.slot, *f.also)
                 if self.slots[i].seq.constraint is not None}
        try:
            sampled = self.backend.step(feeds, masks)
        except BackendError as exc:
            self._fail_all(str(exc))
            return []
        outputs = []
        for feed in feeds:
            slot = self.slots[feed.slot]
            slot.tokens += feed.tokens
            seq = slot.seq
            if seq.next_token is None:
                seq.fed += len(feed.tokens)
                self._prefilled += len(feed.tokens)
            for choice in (slot, *self._copy_prompt(slot, feed.also)):
                if choice.index in sampled:
                    output = self._on_token(choice, sampled[choice.index], self.backend.logprobs.get(choice.index))
                    if output is not None:
                        outputs.append(output)
        return outputs

    def _copy_prompt(self, slot: Slot, choices: tuple[int, ...]) -> list[Slot]:
        """The other choices of the request whose prompt ``slot`` just prefilled, each given a copy of its KV cache."""
        copied = []
        for index in choices:
            choice = self.slots[index]
            self.backend.copy_sequence(slot.index, index)
            choice.tokens = list(slot.tokens)
            choice.seq.fed, choice.seq.copies_prompt = len(choice.seq.prompt), False
            copied.append(choice)
        return copied

    def _on_token(self, slot: Slot, token: int, logprob: TokenLogprob | None) -> msg.Output | None:
        seq = slot.seq
        if self.backend.is_end_of_generation(token):
            return self._finish(slot, _tail(seq), "stop")
        entries = (self._logprob_entry(logprob),) if logprob else ()
        seq.generated += 1
        if seq.constraint is not None:
            try:
                seq.constraint.advance(token)
            except GrammarError as exc:  # the mask allowed the token, so only a bug in the engine gets here
                return self._fail(slot, f"the output left its grammar: {exc}")
        text = seq.stops.push(seq.utf8.push(self.backend.token_bytes(token)))
        if seq.stops.stopped:
            return self._finish(slot, text, "stop")
        if seq.constraint is not None and seq.constraint.complete:  # nothing may follow but the end
            return self._finish(slot, text + _tail(seq), "stop", entries)
        if seq.generated >= seq.params.max_tokens or len(slot.tokens) >= self.facts.context_length:
            return self._finish(slot, text + _tail(seq), "length", entries)
        seq.next_token = token
        return msg.Output(seq.id, text, seq.generated, logprobs=entries, index=seq.index) if text or entries else None

    def _logprob_entry(self, logprob: TokenLogprob) -> msg.Logprob:
        token_bytes = self.backend.token_bytes
        return (token_bytes(logprob.token), logprob.logprob, tuple((token_bytes(t), lp) for t, lp in logprob.top))

    def _finish(self, slot: Slot, text: str, reason: str, entries: tuple = ()) -> msg.Output:
        seq, slot.seq, slot.last_used = slot.seq, None, time.monotonic()
        return msg.Output(seq.id, text, seq.generated, finish_reason=reason, logprobs=entries, index=seq.index)

    def _fail(self, slot: Slot, message: str) -> None:
        """One sequence failed: its request fails, every choice of it."""
        seq = slot.seq
        for other in self.slots:
            if other.seq is not None and other.seq.id == seq.id:
                self._outbox.pop((seq.id, other.seq.index), None)
                self._streaming.discard((seq.id, other.seq.index))
                other.seq = None
        self.emit(msg.Failed(seq.id, message))

    def _drop_cancelled(self) -> list[msg.Output]:
        """A cancelled sequence leaves before the next decode, freeing its slot."""
        return [self._finish(s, "", "cancelled") for s in self.slots if s.seq and s.seq.cancelled]

    def _fail_all(self, message: str) -> None:
        if self._outbox:
            self._flush(batch_size=0)  # what they produced before the failure
        failed = set()
        for slot in self.slots:
            if slot.seq:
                self._streaming.discard((slot.seq.id, slot.seq.index))
                if slot.seq.id not in failed:  # once per request, whatever its choices
                    failed.add(slot.seq.id)
                    self.emit(msg.Failed(slot.seq.id, f"the engine failed: {message}"))
                slot.seq = None
        self.backend.clear()
        for slot in self.slots:
            slot.tokens.clear()


def drain(inbox: queue.Queue, handle: Callable[[object], None], block: bool) -> None:
    """Handle everything in a runner's inbox, first waiting for something to arrive if ``block``."""
    if not block and inbox.empty():  # the usual case between two decode steps: no exception raised and caught
        return
    try:
        item = inbox.get() if block else inbox.get_nowait()
        while True:
            handle(item)
            item = inbox.get_nowait()
    except queue.Empty:
        pass


def _tail(seq: Sequence) -> str:
    """Text held back at the end: a partial UTF-8 character, the start of a stop string that never came."""
    return seq.stops.push(seq.utf8.flush()) + seq.stops.flush()


# Reusing this many cached tokens is worth a slot away from the busy ones. llama.cpp attends over the KV
# streams from the lowest busy slot to the highest (one stream per slot), so four sequences spread over
# slots 0, 2, 5 and 7 decode at 0.67x the speed of four in slots 0-3 (bench/results/slot_span/summary.md): a slot
# that spreads the batch slows every sequence in it for as long as they run, while a short prefix is
# prefilled again in a fraction of a second.
REUSE_WORTH_SPREADING = 256
SEEDS = 2**32 - 1  # the engines take seeds 0 .. 2**32 - 2 (llama.cpp reads 0xFFFFFFFF as "random")


def template_preamble(backend: Backend) -> list[int]:
    """The tokens every chat that brings no system message starts with: what the chat template writes before the
    first user message's text. Empty where the template cannot render a plain chat."""
    try:
        a, b = (chat_tokens(backend, [{"role": "user", "content": text}]) for text in ("a", "b"))
    except (ChatTemplateError, BackendError):  # BackendError: a model without a chat template
        return []
    return a[:_common_prefix(a, b)]


def _span(indices: list[int]) -> int:
    return max(indices) - min(indices) + 1


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
