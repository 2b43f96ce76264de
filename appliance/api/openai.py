"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
import time

from flask import Blueprint, Response, g, jsonify, request

from appliance.api.generation import Cancellation, GenerationResult, logged_generation, new_id, sse, usage_json
from appliance.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from appliance.backends import BackendError, SamplingParams
from appliance.chat_template import ChatTemplateError
from appliance.errors import ContextLengthExceeded, InvalidRequest, ModelNotFoundError, ServiceUnavailable
from appliance.state import state

bp = Blueprint("openai", __name__, url_prefix="/v1")


@bp.before_request
def _open_log_row():
    g.started = time.perf_counter()
    g.log_fields = {}
    g.log_id = state().db.start_request(endpoint=request.path, client=request.remote_addr)


@bp.after_request
def _close_log_row(response):
    # Streams complete their own row when the stream ends.
    if g.get("log_id") is not None and not g.get("streaming"):
        state().db.finish_request(
            g.log_id,
            status=response.status_code,
            error=g.get("log_error"),
            total_ms=(time.perf_counter() - g.started) * 1000,
            **g.log_fields,
        )
    return response


@bp.get("/models")
def list_models():
    runner = state().runner
    info = runner.info()
    return jsonify(
        {
            "object": "list",
            "data": [{"id": runner.name, "object": "model", "created": 0, "owned_by": "appliance", "appliance": info}],
        }
    )


@bp.post("/chat/completions")
def chat_completions():
    req = parse_body(request.get_data(), ChatCompletionRequest)
    messages = [m.as_template_message() for m in req.messages]
    g.log_fields.update(prompt=json.dumps(messages, ensure_ascii=False))
    runner = _runner_for(req.model)
    with runner.session() as backend:
        try:
            prompt_text = backend.render_chat(messages)
        except (ChatTemplateError, BackendError) as exc:
            raise InvalidRequest(str(exc), param="messages", code="chat_template_error") from None
        prompt = backend.tokenize(prompt_text)
        params = _sampling_params(req, len(prompt), backend.context_length, prompt_param="messages")
    return _respond(req, prompt, params, chat=True)


@bp.post("/completions")
def completions():
    req = parse_body(request.get_data(), CompletionRequest)
    g.log_fields.update(prompt=req.prompt)
    runner = _runner_for(req.model)
    with runner.session() as backend:
        prompt = backend.tokenize(req.prompt)
        params = _sampling_params(req, len(prompt), backend.context_length, prompt_param="prompt")
    return _respond(req, prompt, params, chat=False)


def _runner_for(model: str | None):
    runner = state().runner
    g.log_fields["model"] = runner.name
    if not runner.answers_to(model):
        raise ModelNotFoundError(f"model {model!r} is not served here; GET /v1/models lists the models")
    if runner.load_error and not runner.is_loaded:
        raise ServiceUnavailable(f"model {runner.name!r} failed to load: {runner.load_error}", code="model_load_failed")
    return runner


def _sampling_params(req, prompt_tokens: int, context: int, prompt_param: str) -> SamplingParams:
    room = context - prompt_tokens
    if room < 1:
        raise ContextLengthExceeded(
            f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens. Shorten the prompt.",
            param=prompt_param,
        )
    if req.max_tokens is not None and req.max_tokens > room:
        raise ContextLengthExceeded(
            f"max_tokens={req.max_tokens} does not fit: the prompt takes {prompt_tokens} of the {context} tokens "
            f"of context, so at most {room} can be generated",
            param="max_tokens",
        )
    g.log_fields["prompt_tokens"] = prompt_tokens
    return SamplingParams(
        max_tokens=req.max_tokens or room,
        temperature=0.8 if req.temperature is None else req.temperature,
        top_p=0.95 if req.top_p is None else req.top_p,
        top_k=40 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=req.stop_list,
    )


def _respond(req, prompt: list[int], params: SamplingParams, chat: bool):
    st = state()
    client_gone = request.environ.get("waitress.client_disconnected", lambda: False)
    cancel = Cancellation(client_gone=client_gone, shutting_down=st.shutting_down.is_set)
    result = GenerationResult()
    g.streaming = req.stream
    st.db.update_request(g.log_id, stream=int(req.stream), **g.log_fields)
    chunks = logged_generation(st.runner, st.db, g.log_id, g.started, prompt, params, cancel, result)
    shape = _ChatShape(st.runner.name) if chat else _CompletionShape(st.runner.name)
    if req.stream:
        return Response(
            _sse_stream(chunks, shape, result, req.include_usage),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    for _ in chunks:
        pass
    if result.finish_reason == "cancelled":
        status, reason = cancel.status()
        raise ServiceUnavailable(f"generation cancelled: {reason}", code="cancelled", status=status)
    g.log_id = None  # the generation already completed the row
    return jsonify(shape.complete(result))


def _sse_stream(chunks, shape, result: GenerationResult, include_usage: bool):
    yield sse(shape.first_delta())
    try:
        for chunk in chunks:
            if chunk.text:
                yield sse(shape.delta(chunk.text))
            if chunk.finish_reason:
                yield sse(shape.delta("", chunk.finish_reason))
    except Exception as exc:  # headers are gone: report the failure in the stream
        yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": "generation_failed"}})
        return
    if include_usage:
        yield sse(shape.usage_only(result))
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

    def usage_only(self, result: GenerationResult) -> dict:
        return self._base(self.chunk_object) | {"choices": [], "usage": usage_json(result.usage)}

    def complete(self, result: GenerationResult) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
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

    def complete(self, result: GenerationResult) -> dict:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return self._base(self.object) | {"choices": [choice], "usage": usage_json(result.usage)}
