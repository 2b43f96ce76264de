"""/openapi.json: an OpenAPI 3.1 document of every route, built from the app itself.

Paths come from ``app.url_map`` and request bodies from the same pydantic models that
``parse_body`` validates with (``model_json_schema``, their ``$defs`` moved to
``components/schemas``), so the document cannot drift from the routes or their validation.
A route that ``OPERATIONS`` does not describe still appears, with its view's docstring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flask import Blueprint, current_app, jsonify
from pydantic import BaseModel

from appliance import __version__
from appliance.api.embeddings import EmbeddingRequest
from appliance.api.admin import KeyRequest
from appliance.api.schemas import ChatCompletionRequest, CompletionRequest, ImportRequest, PowerRequest, SwapRequest
from appliance.log_export import FORMATS as EXPORT_FORMATS

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
SKIPPED_METHODS = {"HEAD", "OPTIONS"}


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


# Responses: what the views build by hand (openai.py _ChatShape / _CompletionShape, errors.py), loosely.
RESPONSE_SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error"],
        "description": "Every HTTP error, in the OpenAI shape",
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": _nullable({"type": "string"}), "code": _nullable({"type": "string"})},
        }},
    },
    "Usage": {
        "type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                       "total_tokens": {"type": "integer"},
                       "prompt_tokens_details": {"type": "object",
                                                 "properties": {"cached_tokens": {"type": "integer"}}}},
    },
    "ChatCompletion": {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
            "model": {"type": "string"}, "usage": _ref("Usage"),
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"}, "logprobs": _nullable({"type": "object"}),
                    "finish_reason": _nullable({"type": "string"}),
                    "message": {"type": "object", "required": ["role", "content"],
                                "properties": {"role": {"const": "assistant"}, "content": _nullable({"type": "string"}),
                                               "tool_calls": {"type": "array", "items": {"type": "object"}}}},
                },
            }},
        },
    },
    "TextCompletion": {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
            "model": {"type": "string"}, "usage": _ref("Usage"),
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "text", "finish_reason"],
                "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                               "logprobs": _nullable({"type": "object"}),
                               "finish_reason": _nullable({"type": "string"})},
            }},
        },
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object", "owned_by"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                           "owned_by": {"type": "string"}, "appliance": {"type": "object"}},
        }}},
    },
    "Embeddings": {
        "type": "object", "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"}, "model": {"type": "string"},
            "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                      "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}},
            "data": {"type": "array", "items": {
                "type": "object", "required": ["object", "index", "embedding"],
                "properties": {"object": {"const": "embedding"}, "index": {"type": "integer"},
                               "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                                       {"type": "string", "description": "base64 of float32 LE"}]}},
            }},
        },
    },
    "Object": {"type": "object"},
    "Rows": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "array", "items": {"type": "object"}}},
    },
    "Status": {
        "type": "object", "required": ["state", "model", "queue"],
        "properties": {"state": {"enum": ["active", "idle", "deep_idle"]}, "model": {"type": "object"},
                       "queue": {"type": "object"}, "system": {"type": "object"}},
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
}

# With "stream": true: server-sent events, each a chunk as JSON in "data", the last one "data: [DONE]".
SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "description": "one server-sent event",
    "properties": {"data": {"type": "string", "description": "a JSON chunk, an error, or [DONE]"},
                   "event": {"type": "string"}},
}}}


@dataclass(frozen=True)
class Operation:
    summary: str
    body: type[BaseModel] | None = None
    ok: dict = field(default_factory=dict)  # the 200 response's content, by media type
    query: tuple = ()  # (name, JSON schema, description)
    tags: tuple = ()
    status: str = "200"  # what a success answers


def _json(name: str) -> dict:
    return {"application/json": {"schema": _ref(name)}}


LIMIT = ("limit", {"type": "integer", "maximum": 10**18 - 1, "minimum": -(10**18) + 1},
         "most rows to return, held to 1..1000 (default 50)")
TEXT = ("text", {"type": "boolean"}, "include the prompt and response texts (admin and auditor keys; default false)")
# The log's filters (appliance.log_export), the same for the list, the export and `appliance logs export`
LOG_FILTERS = (
    ("model", {"type": "string"}, "only this model's rows"),
    ("status", {"type": "string"}, "an HTTP status (e.g. 499), or ok, error, cancelled, open"),
    ("key_id", {"type": "string"}, "only rows of this API key id"),
    ("priority", {"type": "string"}, "only rows of requests that ran in this priority class"),
    ("endpoint", {"type": "string"}, "only this endpoint, e.g. /v1/chat/completions"),
    ("since", {"type": "string"}, "rows started at or after this ISO 8601 time (UTC unless it names a zone)"),
    ("until", {"type": "string"}, "rows started before this time"),
    ("q", {"type": "string"}, "text in the prompt, response or error (case-insensitive for ASCII)"),
)
ADMIN = ("admin",)
OPERATIONS = {
    "openai.chat_completions": Operation("Chat completion (OpenAI-compatible)", ChatCompletionRequest,
                                         _json("ChatCompletion") | SSE, tags=("openai",)),
    "openai.completions": Operation("Text completion of a prompt (OpenAI-compatible)", CompletionRequest,
                                    _json("TextCompletion") | SSE, tags=("openai",)),
    "openai.list_models": Operation("Every model the box serves", ok=_json("ModelList"), tags=("openai",)),
    "openai.get_model": Operation("One model", ok=_json("Object"), tags=("openai",)),
    "embeddings.embeddings": Operation("Embeddings of one or more inputs (OpenAI-compatible)", EmbeddingRequest,
                                       _json("Embeddings"), tags=("openai",)),
    "admin.status": Operation("Power state, model, queue and system figures", ok=_json("Status"), tags=ADMIN),
    "admin.set_power": Operation("Force a power state", PowerRequest, _json("Status"), tags=ADMIN),
    "admin.logs": Operation("Recent requests from the log, newest first", ok=_json("Rows"), tags=ADMIN,
                            query=(LIMIT, ("offset", {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
                                                   "newest rows to skip"), TEXT) + LOG_FILTERS),
    "admin.log_row": Operation("One request's log row", ok=_json("Object"), tags=ADMIN, query=(TEXT,)),
    "admin.export_logs": Operation(
        "Every log row matching the filters, newest first, as CSV or JSON Lines",
        ok={"text/csv": {"schema": {"type": "string"}}, "application/x-ndjson": {"schema": {"type": "string"}}},
        tags=ADMIN, query=(("format", {"type": "string", "enum": list(EXPORT_FORMATS)}, "jsonl (default) or csv"),
                           TEXT) + LOG_FILTERS),
    "admin.verify_logs": Operation("Check the log's hash chain and signed checkpoints", ok=_json("Object"),
                                   tags=ADMIN),
    "admin.settings": Operation("Every setting with its value and where it came from", ok=_json("Rows"), tags=ADMIN),
    "admin.models": Operation("Every model, with what only admins see", ok=_json("Rows"), tags=ADMIN),
    "admin.verify_models": Operation("Recompute every model file's sha256", ok=_json("Rows"), tags=ADMIN),
    "admin.load_model": Operation("Load a model now, rather than at its first request", ok=_json("Object"),
                                  tags=ADMIN),
    "admin.unload_model": Operation(
        "Unload a model (its requests in flight finish first)", ok=_json("Object"), tags=ADMIN,
        query=(("force", {"type": "boolean"}, "also a model with requests in flight: they fail (default false)"),)),
    "admin.import_model": Operation("Import an exported package tar that is on this box, and register it",
                                    ImportRequest, _json("Object"), tags=ADMIN, status="201"),
    "admin.swap_model": Operation("Swap a model's name to another package after a warm-up probe", SwapRequest,
                                  _json("Object"), tags=ADMIN),
    "admin.model_events": Operation("Loads, unloads, swaps and evictions, newest first", ok=_json("Rows"), tags=ADMIN,
                                    query=(LIMIT,)),
    "admin.list_keys": Operation("Every API key (never a secret)", ok=_json("Rows"), tags=ADMIN),
    "admin.create_key": Operation("Create an API key; its secret is in this answer only", KeyRequest,
                                  _json("Object"), tags=ADMIN, status="201"),
    "admin.revoke_key": Operation("Revoke an API key", ok=_json("Object"), tags=ADMIN),
    "admin.status_history": Operation("The last hour by minute, from memory", ok=_json("Object"), tags=ADMIN),
    "admin.power_events": Operation("Recent power state changes, newest first", ok=_json("Rows"), tags=ADMIN,
                                    query=(LIMIT,)),
    "health.healthz": Operation("Liveness: the process answers", ok=_json("Health"), tags=("health",)),
    "health.readyz": Operation("Readiness: the model is loaded (503 with the reason before)",
                               ok={"application/json": {"schema": {"type": "object"}}}, tags=("health",)),
    "web.index": Operation("The web UI", ok={"text/html": {"schema": {"type": "string"}}}, tags=("ui",)),
    "static": Operation("The web UI's files", ok={"*/*": {"schema": {}}}, tags=("ui",)),
    "metrics.metrics_endpoint": Operation("Prometheus metrics (text exposition format)",
                                          ok={"text/plain": {"schema": {"type": "string"}}}, tags=("metrics",)),
    "openapi.openapi_document": Operation("This document", ok={"application/json": {"schema": {"type": "object"}}}),
}
ERRORS = {"description": "an error in the OpenAI shape", "content": _json("Error")}


def body_schema(model: type[BaseModel], components: dict) -> dict:
    """The model's JSON schema as a reference; it and its $defs go to ``components``."""
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return _ref(model.__name__)


def build_document(app) -> dict:
    components = dict(RESPONSE_SCHEMAS)
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        path, params = _openapi_path(rule.rule)
        for method in sorted(rule.methods - SKIPPED_METHODS):
            paths.setdefault(path, {})[method.lower()] = _operation(app, rule, method, params, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Edge appliance", "version": __version__,
                 "description": "OpenAI-compatible inference, the box's admin API, health probes and metrics"},
        "paths": paths,
        "components": {"schemas": components},
    }


def _openapi_path(rule: str) -> tuple[str, list[str]]:
    """Flask's /static/<path:filename> becomes /static/{filename}."""
    params = re.findall(r"<(?:[^:<>]+:)?([^<>]+)>", rule)
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule), params


def _operation(app, rule, method: str, params: list[str], components: dict) -> dict:
    described = OPERATIONS.get(rule.endpoint)
    view = app.view_functions.get(rule.endpoint)
    summary = described.summary if described else ((view.__doc__ or rule.endpoint).strip().splitlines()[0])
    op = {"operationId": f"{rule.endpoint}.{method.lower()}", "summary": summary,
          "responses": {described.status if described else "200": {
                            "description": "OK", "content": described.ok if described else {}},
                        "4XX": ERRORS, "5XX": ERRORS}}
    if described and described.tags:
        op["tags"] = list(described.tags)
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in params]
    parameters += [{"name": name, "in": "query", "required": False, "schema": schema, "description": text}
                   for name, schema, text in (described.query if described else ())]
    if parameters:
        op["parameters"] = parameters
    if described and described.body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body_schema(described.body, components)}}}
    return op


@bp.get("/openapi.json")
def openapi_document():
    """This service's OpenAPI 3.1 document."""
    return jsonify(build_document(current_app))
