"""Asking a loaded model for a tiny generation: the swap's warm-up and the pool's live health checks; and a
swap's carry-over of the chats the old model served last into the new one's slots.

A probe goes to the runner directly, not through a queue or the request log: it is never user
activity for the idle timers, never a log row, and it only runs on a model that is loaded.
"""

from __future__ import annotations

import queue
import time

from appliance.backends.base import BackendError, SamplingParams
from appliance.runner import protocol as msg
from appliance.runner.supervisor import ModelRunner, RunnerCrashed

# The warm-up probe's prompts: plain text, so base and chat models alike must continue them.
PROBE_PROMPTS = ("The capital of France is", "1, 2, 3, 4,")
LIVE_PROBE = ("Hello",)  # the live health check's: as small as a generation gets
LIVE_PROBE_TOKENS = 2
FAILURES = (msg.Refused, msg.Failed, RunnerCrashed)  # a probe's events that end it as failed


def next_event(runner: ModelRunner, stream, deadline: float):
    """A probe's next event, or None once its deadline has passed (its request is then cancelled)."""
    try:
        return stream.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        runner.cancel(stream)
        return None


def probe(runner: ModelRunner, tokens: int, timeout: float, prompts: tuple[str, ...] = PROBE_PROMPTS) -> str | None:
    """Run the probe prompts greedily on a loaded model; None when each made ``tokens`` tokens in time, else why not."""
    deadline = time.monotonic() + timeout
    params = SamplingParams(max_tokens=tokens, temperature=0.0, seed=0)
    for prompt in prompts:
        try:
            stream = runner.submit(None, prompt, params)
        except BackendError as exc:
            return f"the probe {prompt!r} could not start: {exc}"
        made, finish = 0, None
        while finish is None:
            event = next_event(runner, stream, deadline)
            if event is None:
                return f"the probe {prompt!r} made {made} of {tokens} tokens in the {timeout:.0f} s allowed"
            if isinstance(event, FAILURES):
                return f"the probe {prompt!r} failed: {event.message}"
            if isinstance(event, msg.Output):
                made, finish = event.completion_tokens, event.finish_reason
        if made == 0 or (made < tokens and finish != "stop"):  # a natural end after some tokens is healthy
            return f"the probe {prompt!r} made {made} of {tokens} tokens (finish_reason {finish})"
    return None


def rewarm(runner: ModelRunner, chats: list[tuple[list[dict], list[dict] | None]], timeout: float) -> int:
    """Prefill ``chats`` (messages, tools), all at once so each takes a slot of its own, generating one greedy token
    each: their next turns then reuse them on this model as they would have on the one it replaces. The chats
    are rendered by this model's own template and tokenizer. Best effort: how many of them finished in time."""
    deadline = time.monotonic() + timeout
    params = SamplingParams(max_tokens=1, temperature=0.0)
    streams = []
    for messages, tools in chats:
        try:
            streams.append(runner.submit(messages, None, params, tools=tools))
        except BackendError:
            break
    finished = 0
    for stream in streams:
        while (event := next_event(runner, stream, deadline)) is not None and not isinstance(event, FAILURES):
            if isinstance(event, msg.Output) and event.finish_reason is not None:
                finished += 1
                break
    return finished
