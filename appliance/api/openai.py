"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
import time

import uuid

from flask import Blueprint, Response, g, jsonify, request

from appliance import auth, grammar
from appliance.api import request_log
from appliance.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from appliance.backends.base import SamplingParams, Usage
from appliance.config import SAMPLING_DEFAULTS
from appliance.errors import GenerationFailed, InvalidRequest
from appliance.generation import Generation
from appliance.pool import PooledModel
from appliance.request import LoggedRequest
from appliance.state import state

bp = Blueprint("openai", __name__, url_prefix="/v1")


request_log.attach(bp)


@bp.get("/models")
def list_models():
    """Every model the box serves, loaded or not; no file paths or process ids (the admin API has those)."""
    pool = state().models
    return jsonify({"object": "list", "data": [model_json(pool.describe(m)) for m in pool.known()]})


@bp.get("/models/<name>")
def get_model(name: str):
    pool = state().models
    return jsonify(model_json(pool.describe(pool.get(name))))


def model_json(info: dict) -> dict:
    return {"id": info["id"], "object": "model", "created": 0, "owned_by": "appliance", "appliance": info}


@bp.post("/chat/completions")
def chat_completions():
    req = parse_body(request.get_data(), ChatCompletionRequest)
    messages = [m.as_template_message() for m in req.messages]
    _check_prompt_size(sum(len(m["content"]) for m in messages), "messages")
    model = _arrived(req, prompt=json.dumps(messages, ensure_ascii=False))
    return _respond(req, model, messages=messages, prompt=None, chat=True)


@bp.post("/completions")
def completions():
    req = parse_body(request.get_data(), CompletionRequest)
    _check_prompt_size(len(req.prompt), "prompt")
    model = _arrived(req, prompt=req.prompt)
    return _respond(req, model, messages=None, prompt=req.prompt, chat=False)


def _check_prompt_size(chars: int, param: str) -> None:
    """Refuse a prompt that cannot fit before spending time to tokenize it."""
    limit = state().settings.prompt_chars_limit
    if chars > limit:
        raise InvalidRequest(f"the prompt is {chars} characters; at most {limit} are accepted (max_prompt_chars), "
                             "and no more can fit this model's context. Shorten the prompt.", param=param,
                             code="prompt_too_long", status=413)


def _arrived(req, prompt: str) -> PooledModel:
    """The model asked for; what the request is goes into its row now, before it waits for a slot."""
    model = state().models.get(req.model, kind="chat")
    g.logged_request.describe(model.name, prompt, req.stream)
    return model


def _sampling_params(req, model: PooledModel) -> SamplingParams:
    options = state().models.sampling_defaults(model)
    options.update({name: getattr(req, name) for name in SAMPLING_DEFAULTS if getattr(req, name) is not None})
    return SamplingParams(max_tokens=req.max_tokens, seed=req.seed, stop=req.stop_list,
                          logit_bias=req.logit_bias_pairs, grammar=_grammar(req), **options)


def _grammar(req) -> str | None:
    """The grammar a request's output must follow, compiled and checked before it queues; None: free text."""
    fmt = req.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if req.grammar is not None and wants_json:
        raise InvalidRequest("send either grammar or a JSON response_format, not both", param="grammar",
                             code="invalid_value")
    param = "grammar" if req.grammar is not None else (
        "response_format.json_schema.schema" if wants_json and fmt.type == "json_schema" else "response_format.schema")
    try:
        if req.grammar is not None:
            return grammar.text_grammar(req.grammar)
        if not wants_json:
            return None
        return grammar.json_schema_grammar(fmt.json_schema.schema_ if fmt.type == "json_schema" else fmt.schema_)
    except grammar.GrammarError as exc:
        raise InvalidRequest(f"{param}: {exc}", param=param, code="invalid_schema") from None


def _respond(req, model: PooledModel, messages, prompt, chat: bool):
    pool, logged = state().models, g.logged_request
    generation = Generation(
        model.runner, model.admission, logged.started, logged.cancel, client=auth.client_id(),
        limits=auth.client_limits(), load=lambda: pool.load(model),
        priority=auth.request_priority(req.priority or request.headers.get("X-Priority"), model.admission.classes),
    )
    generation.start(messages, prompt, _sampling_params(req, model))  # until it is admitted, errors are plain responses
    pool.ask_keep_alive(model, req.keep_alive)
    logged.generation = generation
    shape = _ChatShape(model.name) if chat else _CompletionShape(model.name)
    if req.stream:
        logged.streaming = True
        return Response(
            _Stream(logged, shape, req.include_usage),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    generation.run_to_end()
    return jsonify(shape.complete(generation))


class _Stream:
    """The SSE body: formats the generation's events. Its request ends when the events do, or at ``close``,
    which the server calls even when it never iterated the body (the client left first)."""

    def __init__(self, logged: LoggedRequest, shape, include_usage: bool):
        self.logged = logged
        self._events = self._events_of(logged, shape, include_usage)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._events)

    def close(self) -> None:
        self._events.close()
        self.logged.finish()

    @staticmethod
    def _events_of(logged: LoggedRequest, shape, include_usage: bool):
        generation = logged.generation
        yield sse(shape.first_delta())
        try:
            for output in generation.outputs():
                if output.text:
                    yield sse(shape.delta(output.text))
                if output.finish_reason:
                    yield sse(shape.delta("", output.finish_reason))
        except GenerationFailed as exc:  # headers are gone: report the failure in the stream
            logged.fail(exc)
        logged.finish()  # before the last events: a client that has read [DONE] finds its row finished
        if logged.error is not None:
            yield sse(logged.error.body())
        elif not generation.cancelled:
            if include_usage:
                yield sse(shape.usage_only(generation))
            yield sse("[DONE]")


class _ChatShape:
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str):
        self.model, self.id, self.created = model, new_id("chatcmpl"), int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def first_delta(self) -> dict:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._base(self.chunk_object) | {"choices": [choice]}

    def delta(self, text: str, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish_reason}
        return self._base(self.chunk_object) | {"choices": [choice]}

    def usage_only(self, result: Generation) -> dict:
        return self._base(self.chunk_object) | {"choices": [], "usage": usage_json(result.usage)}

    def complete(self, result: Generation) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.response_text},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        return self._base(self.object) | {"choices": [choice], "usage": usage_json(result.usage)}


class _CompletionShape(_ChatShape):
    object = chunk_object = "text_completion"

    def __init__(self, model: str):
        super().__init__(model)
        self.id = new_id("cmpl")

    def first_delta(self) -> dict:
        return self.delta("")

    def delta(self, text: str, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._base(self.chunk_object) | {"choices": [choice]}

    def complete(self, result: Generation) -> dict:
        choice = {"index": 0, "text": result.response_text, "logprobs": None, "finish_reason": result.finish_reason}
        return self._base(self.object) | {"choices": [choice], "usage": usage_json(result.usage)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_json(usage: Usage) -> dict:
    out = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
           "total_tokens": usage.total_tokens}
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return out


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode("utf-8")
