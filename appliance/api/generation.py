"""Running one logged generation, and shaping its output as OpenAI JSON or SSE events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from appliance.backends import Chunk, SamplingParams, Usage
from appliance.db import Database
from appliance.runner import ModelRunner


@dataclass
class GenerationResult:
    text: str = ""
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    ttft_ms: float | None = None
    total_ms: float | None = None
    tokens_per_s: float | None = None


@dataclass
class Cancellation:
    """Why a generation should stop early: the client left, or the service is shutting down."""

    client_gone: Callable[[], bool]
    shutting_down: Callable[[], bool]

    def __call__(self) -> bool:
        return self.client_gone() or self.shutting_down()

    def status(self) -> tuple[int, str]:
        if self.shutting_down():
            return 503, "service shutting down"
        return 499, "client disconnected"


def logged_generation(
    runner: ModelRunner,
    db: Database,
    log_id: int,
    started: float,
    prompt: list[int],
    params: SamplingParams,
    cancel: Cancellation,
    result: GenerationResult,
) -> Iterator[Chunk]:
    """Yield the chunks of a generation and complete its log row however it ends.

    ``started`` is the request's arrival (perf_counter), so time to first
    token includes waiting for the model and the prompt's prefill.
    """
    status, error, parts, first = 200, None, [], None
    try:
        with runner.session() as backend:
            for chunk in backend.generate(prompt, params, cancelled=cancel):
                if first is None:
                    first = time.perf_counter()
                parts.append(chunk.text)
                result.usage = chunk.usage
                if chunk.finish_reason:
                    result.finish_reason = chunk.finish_reason
                yield chunk
        if result.finish_reason == "cancelled":
            status, error = cancel.status()
    except GeneratorExit:  # the server closed our iterator: the client went away
        status, error, result.finish_reason = 499, "client disconnected", "cancelled"
        raise
    except Exception as exc:
        status, error = 500, f"generation failed: {exc}"
        raise
    finally:
        end = time.perf_counter()
        result.text = "".join(parts)
        result.total_ms = (end - started) * 1000
        if first is not None:
            result.ttft_ms = (first - started) * 1000
            # Decode speed: the first token's time belongs to prefill (time to first token).
            if result.usage.completion_tokens > 1 and end > first:
                result.tokens_per_s = (result.usage.completion_tokens - 1) / (end - first)
        db.finish_request(
            log_id,
            status=status,
            error=error,
            response=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            ttft_ms=result.ttft_ms,
            total_ms=result.total_ms,
            tokens_per_s=result.tokens_per_s,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_json(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode("utf-8")
