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
from appliance.generation import Choice, Generation
from appliance.pool import PooledModel
from appliance.request import LoggedRequest
from appliance.runner import protocol as msg
from appliance.state import state
from appliance.tools import CallStream, ToolCall, call_grammar, split_calls

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
    tools = req.tool_list if req.calling else None  # tool_choice none: the model is not told of them
    _check_prompt_size(sum(len(json.dumps(m["content"])) for m in messages) + len(json.dumps(tools or [])), "messages")
    model = _arrived(req, prompt=json.dumps(messages, ensure_ascii=False))
    return _respond(req, model, messages=messages, prompt=None, chat=True, tools=tools)


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
                          logit_bias=req.logit_bias_pairs, grammar=_grammar(req), logprobs=req.logprobs_top, n=req.n,
                          **options)


def _grammar(req) -> str | None:
    """The grammar a request's output must follow, compiled and checked before it queues; None: free text."""
    fmt = req.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if req.grammar is not None and wants_json:
        raise InvalidRequest("send either grammar or a JSON response_format, not both", param="grammar",
                             code="invalid_value")
    calling = getattr(req, "calling", None)
    if calling not in (None, "auto"):
        if req.grammar is not None or wants_json:
            raise InvalidRequest("a required or named tool call is constrained already: leave out response_format "
                                 "and grammar, or set tool_choice to auto", param="tool_choice", code="invalid_value")
        only = None if calling == "required" else calling
        try:
            return grammar.lark_grammar(call_grammar(req.tool_list, only, req.parallel_tool_calls and only is None))
        except grammar.GrammarError as exc:
            raise InvalidRequest(f"tools: a parameters schema cannot be followed: {exc}", param="tools",
                                 code="invalid_schema") from None
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


def _respond(req, model: PooledModel, messages, prompt, chat: bool, tools: list[dict] | None = None):
    pool, logged = state().models, g.logged_request
    generation = Generation(
        model.runner, model.admission, logged.started, logged.cancel, client=auth.client_id(),
        limits=auth.client_limits(), load=lambda: pool.load(model),
        priority=auth.request_priority(req.priority or request.headers.get("X-Priority"), model.admission.classes),
    )
    generation.start(messages, prompt, _sampling_params(req, model), tools)  # until admitted, errors are plain responses
    pool.ask_keep_alive(model, req.keep_alive)
    logged.generation = generation
    logprobs = req.logprobs_top is not None
    shape = _ChatShape(model.name, logprobs, tools, req.n) if chat else _CompletionShape(model.name, logprobs, req.n)
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
                for event in shape.deltas(output):
                    yield sse(event)
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
    """A chat answer in OpenAI's shape, with a choice per sequence (n); with tools, the calls in a choice's text
    become its ``tool_calls``."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, logprobs: bool = False, tools: list[dict] | None = None, n: int = 1):
        self.model, self.id, self.created = model, new_id("chatcmpl"), int(time.time())
        self.logprobs, self.n = logprobs, n
        self.tool_names = {t["function"]["name"] for t in tools or []}
        self._calls = [CallStream(self.tool_names) for _ in range(n)] if tools else None
        self._called = [0] * n  # calls streamed so far, by choice

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def first_delta(self) -> dict:
        choices = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(self.n)]
        return self._base(self.chunk_object) | {"choices": choices}

    def delta(self, text: str, finish_reason: str | None = None, tool_calls: list[dict] | None = None,
              logprobs: tuple = (), index: int = 0) -> dict:
        delta = {"content": text} if text else {}
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs_json(logprobs, index) if logprobs else None,
                  "finish_reason": finish_reason}
        return self._base(self.chunk_object) | {"choices": [choice]}

    def deltas(self, output: msg.Output) -> list[dict]:
        """The chunks of one output of the runner: its text (with its tokens' logprobs), calls, and the end."""
        text, finish_reason, i = output.text, output.finish_reason, output.index
        logprobs = output.logprobs if self.logprobs else ()
        calls: list[ToolCall] = []
        if self._calls is not None:
            text, calls = self._calls[i].push(text)
            if finish_reason:
                rest, more = self._calls[i].end()
                text, calls = text + rest, calls + more
        events = [self.delta(text, logprobs=logprobs, index=i)] if text or logprobs else []
        for call in calls:  # the name first, then the arguments, as OpenAI streams them
            first = call.as_json(new_id("call")) | {"index": self._called[i]}
            first["function"] = {"name": call.name, "arguments": ""}
            rest = {"index": self._called[i], "function": {"arguments": call.arguments}}
            events += [self.delta("", tool_calls=[first], index=i), self.delta("", tool_calls=[rest], index=i)]
            self._called[i] += 1
        if finish_reason:
            events.append(self.delta("", self._finish_reason(finish_reason, self._called[i]), index=i))
        return events

    @staticmethod
    def _finish_reason(reason: str, calls: int) -> str:
        return "tool_calls" if calls and reason == "stop" else reason

    def usage_only(self, result: Generation) -> dict:
        return self._base(self.chunk_object) | {"choices": [], "usage": usage_json(result.usage)}

    def complete(self, result: Generation) -> dict:
        choices = [self._choice(i, c) for i, c in enumerate(result.choices)]
        return self._base(self.object) | {"choices": choices, "usage": usage_json(result.usage)}

    def _choice(self, index: int, choice: Choice) -> dict:
        text = choice.response_text
        text, calls = split_calls(text, self.tool_names) if self.tool_names else (text, [])
        message = {"role": "assistant", "content": text or None if calls else text}
        if calls:
            message["tool_calls"] = [call.as_json(new_id("call")) for call in calls]
        return {"index": index, "message": message,
                "logprobs": self._logprobs_json(choice.logprobs, index) if self.logprobs else None,
                "finish_reason": self._finish_reason(choice.finish_reason, len(calls))}

    def _logprobs_json(self, entries, index: int) -> dict:
        def token(data: bytes, logprob: float) -> dict:
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        return {"content": [token(data, logprob) | {"top_logprobs": [token(*alt) for alt in top]}
                            for data, logprob, top in entries], "refusal": None}


class _CompletionShape(_ChatShape):
    object = chunk_object = "text_completion"

    def __init__(self, model: str, logprobs: bool = False, n: int = 1):
        super().__init__(model, logprobs, n=n)
        self.id = new_id("cmpl")
        self._offsets = [0] * n  # by choice: characters of text before its next token, for text_offset

    def first_delta(self) -> dict:
        return self._base(self.chunk_object) | {"choices": [self.delta("", index=i)["choices"][0] for i in range(self.n)]}

    def delta(self, text: str, finish_reason: str | None = None, tool_calls=None, logprobs: tuple = (),
              index: int = 0) -> dict:
        choice = {"index": index, "text": text, "logprobs": self._logprobs_json(logprobs, index) if logprobs else None,
                  "finish_reason": finish_reason}
        return self._base(self.chunk_object) | {"choices": [choice]}

    def _logprobs_json(self, entries, index: int) -> dict:
        """The completions API's form: parallel lists, and each token's place in the choice's text."""
        tokens = [data.decode("utf-8", errors="replace") for data, _, _ in entries]
        offsets = []
        for text in tokens:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {"tokens": tokens, "token_logprobs": [logprob for _, logprob, _ in entries],
                "top_logprobs": [{data.decode("utf-8", errors="replace"): lp for data, lp in top} for _, _, top in entries],
                "text_offset": offsets}

    def _choice(self, index: int, choice: Choice) -> dict:
        return {"index": index, "text": choice.response_text,
                "logprobs": self._logprobs_json(choice.logprobs, index) if self.logprobs else None,
                "finish_reason": choice.finish_reason}


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
